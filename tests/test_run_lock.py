"""One run at a time on an OUT (issue 13): a lock on local disk, a lease on S3 (moto).

These hold OUT in this process (or in a subprocess that is then killed) and try a second
holder. The job-level case is tests/test_run_concurrent.py. Heartbeats run on a
``ManualClock``: time moves only when a test calls ``advance``, which returns once every
heartbeat due by then has been sent, so nothing here waits on, or races, the real clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import boto3
import pytest
from refseg.pipeline.storage import resolve
from refseg.pipeline.store.lock import LeaseLostError, OutLockedError, hold_out

from tests.faults_util import REPO

HOST = socket.gethostname()


class ManualClock:
    """A lock's clock (refseg.pipeline.store.lock.Clock) that moves only in ``advance``.

    The heartbeat threads (named ``refseg-lease``) of the leases started after it wait on
    it; ``advance`` first waits until each of them is waiting (or has ended), moves the
    time, then waits until every thread whose wait fell due has sent its heartbeat and
    waits again (or has ended).
    """

    THREAD = "refseg-lease"

    def __init__(self, start: float = 1.9e9) -> None:
        self.t = start
        self._cond = threading.Condition()
        self._waiting: dict[threading.Thread, float] = {}  # thread -> the time it waits for
        self._older = {t for t in threading.enumerate() if t.name == self.THREAD}

    def now(self) -> float:
        with self._cond:
            return self.t

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        me = threading.current_thread()
        with self._cond:
            self._waiting[me] = self.t + seconds
            self._cond.notify_all()
            # a short real wait only to notice ``stop`` (an Event cannot wake a Condition)
            while not stop.is_set() and self.t < self._waiting[me]:
                self._cond.wait(0.05)
            del self._waiting[me]
            return stop.is_set()

    def _settled(self) -> bool:
        return all(
            self._waiting.get(t, self.t) > self.t
            for t in threading.enumerate()
            if t.name == self.THREAD and t not in self._older
        )

    def _settle(self) -> None:
        deadline = time.monotonic() + 120  # a safety net only: a heartbeat takes milliseconds
        while not self._settled():
            if time.monotonic() > deadline:
                raise AssertionError("a lease heartbeat thread did not come back to its wait")
            self._cond.wait(0.01)  # threads that end do not notify: look again soon

    def advance(self, seconds: float) -> None:
        with self._cond:
            self._settle()
            self.t += seconds
            self._cond.notify_all()
            self._settle()


# ------------------------------------------------------------------------------- local


def test_a_second_holder_of_a_local_out_is_refused_with_who_holds_it(tmp_path):
    out = resolve(str(tmp_path / "out"))
    with hold_out(out):
        holder = json.loads((tmp_path / "out" / "lock.json").read_text())
        assert holder["owner"]["pid"] == os.getpid()
        with pytest.raises(OutLockedError) as info, hold_out(out):
            pass
    message = str(info.value)
    assert message.startswith(f"{out.uri} is in use by another `refseg label` run: ")
    assert f"pid {os.getpid()} on host {HOST}" in message
    assert "Wait for that run to end, or use another --out" in message
    assert "released when the process ends" in message
    assert not (tmp_path / "out" / "lock.json").exists()  # released: removed
    with hold_out(out):  # and free again
        pass


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from refseg.pipeline.store.lock import hold_out
    from refseg.pipeline.storage import resolve
    with hold_out(resolve(sys.argv[1]), ttl=float(sys.argv[2])):
        print("held", flush=True)
        time.sleep(600)
    """
)


def _holder(out: str, ttl: float = 300.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, out, str(ttl)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_holder_never_blocks_a_local_rerun(tmp_path):
    out = str(tmp_path / "out")
    proc = _holder(out)
    try:
        with pytest.raises(OutLockedError, match=f"pid {proc.pid} on host"), hold_out(resolve(out)):
            pass
    finally:
        _kill(proc)
    assert (tmp_path / "out" / "lock.json").exists()  # left behind by the killed run
    with hold_out(resolve(out)):
        holder = json.loads((tmp_path / "out" / "lock.json").read_text())
        assert holder["owner"]["pid"] == os.getpid()


# ---------------------------------------------------------------------------------- S3


@pytest.fixture
def s3_out(s3_endpoint, request):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"lock-{request.node.name.replace('_', '-')[:40].lower()}".rstrip("-")
    s3.create_bucket(Bucket=bucket)
    return s3, bucket, resolve(f"s3://{bucket}/run", s3_endpoint=s3_endpoint)


def _lease(s3, bucket: str) -> dict | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key="run/lock.json")["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def _plant(s3, bucket: str, *, host: str, pid: int, expires: float) -> None:
    owner = {"host": host, "pid": pid, "user": "someone", "run_id": "old", "started_at": "x"}
    lease = {"owner": owner, "heartbeat": expires - 300, "expires": expires, "expires_at": "t"}
    s3.put_object(Bucket=bucket, Key="run/lock.json", Body=json.dumps(lease).encode())


def test_a_second_holder_of_an_s3_out_is_refused_and_told_how_to_take_over(s3_out):
    s3, bucket, out = s3_out
    with hold_out(out):
        lease = _lease(s3, bucket)
        assert lease["owner"]["pid"] == os.getpid() and lease["expires"] > time.time()
        with pytest.raises(OutLockedError) as info, hold_out(out):
            pass
    message = str(info.value)
    assert f"s3://{bucket}/run is in use by another `refseg label` run" in message
    assert f"pid {os.getpid()} on host {HOST}" in message and "last heartbeat" in message
    assert f"expires at {lease['expires_at']}" in message and "--take-over-lock" in message
    assert _lease(s3, bucket) is None  # released: removed


def test_two_runs_starting_together_get_one_lease(s3_out):
    _, _, out = s3_out
    results: list[str] = []
    barrier, release = threading.Barrier(2), threading.Event()

    def start() -> None:
        barrier.wait()
        try:
            with hold_out(out):
                results.append("held")
                release.wait(120)  # set by the refused one; the bound only ends a failure
        except OutLockedError:
            results.append("refused")
            release.set()

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == ["held", "refused"]


def test_an_expired_lease_of_a_killed_run_elsewhere_is_taken_over(s3_out, caplog):
    s3, bucket, out = s3_out
    _plant(s3, bucket, host="gone-node-7", pid=1234, expires=time.time() - 1)
    with hold_out(out):
        assert _lease(s3, bucket)["owner"]["pid"] == os.getpid()
    assert "took over the lease" in caplog.text and "it expired" in caplog.text


def test_a_live_lease_elsewhere_blocks_until_take_over_lock(s3_out):
    s3, bucket, out = s3_out
    _plant(s3, bucket, host="busy-node-3", pid=1234, expires=time.time() + 300)
    with pytest.raises(OutLockedError, match="pid 1234 on host busy-node-3"), hold_out(out):
        pass
    with hold_out(out, take_over=True):
        assert _lease(s3, bucket)["owner"]["host"] == HOST


def test_the_lease_of_an_ended_process_on_this_host_is_taken_over_at_once(s3_out, s3_endpoint):
    s3, bucket, out = s3_out
    proc = _holder(out.uri, ttl=300.0)  # a run on this host, killed: its lease stays
    _kill(proc)
    assert _lease(s3, bucket)["owner"]["pid"] == proc.pid
    with hold_out(out):
        assert _lease(s3, bucket)["owner"]["pid"] == os.getpid()


TTL = 300.0  # heartbeats every 60 s of the manual clock


def test_heartbeats_keep_a_lease_past_its_ttl(s3_out):
    s3, bucket, out = s3_out
    clock = ManualClock()
    with hold_out(out, ttl=TTL, clock=clock):
        start = clock.now()
        assert _lease(s3, bucket)["expires"] == start + TTL
        clock.advance(270)  # one heartbeat (due at 60 s), sent at 270 s
        assert _lease(s3, bucket)["heartbeat"] == start + 270
        clock.advance(270)  # 540 s: past the first expiry, alive only through its heartbeats
        assert _lease(s3, bucket)["expires"] == start + 540 + TTL
        with pytest.raises(OutLockedError), hold_out(out, ttl=TTL, clock=clock):
            pass


def test_without_heartbeats_a_lease_expires_after_its_ttl(s3_out, caplog):
    """The other side of the test above: a holder cut off (its heartbeats never reach the
    store) loses OUT to the next run once ``ttl`` has passed, and not before."""
    s3, bucket, out = s3_out
    clock = ManualClock()
    _plant(s3, bucket, host="cut-off-node", pid=1234, expires=clock.now() + TTL)
    clock.advance(TTL - 1)
    with pytest.raises(OutLockedError, match="cut-off-node"), hold_out(out, clock=clock):
        pass
    clock.advance(2)
    with hold_out(out, ttl=TTL, clock=clock):
        assert _lease(s3, bucket)["owner"]["pid"] == os.getpid()
    assert "took over the lease" in caplog.text and "it expired" in caplog.text


def test_a_run_whose_lease_was_taken_over_finds_out_and_leaves_the_new_lease(s3_out):
    s3, bucket, out = s3_out
    clock = ManualClock()
    held = hold_out(out, ttl=TTL, clock=clock)
    first = held.__enter__()
    with hold_out(out, take_over=True, ttl=TTL, clock=clock):
        taker = _lease(s3, bucket)["owner"]["run_id"]
        assert first.lost is None
        clock.advance(TTL / 5)  # the next heartbeat of each: the first run's If-Match fails
        assert first.lost is not None and first.lost["owner"]["run_id"] == taker
        with pytest.raises(LeaseLostError, match="lost its lease"):
            first.check()
        held.__exit__(None, None, None)  # the first run ends: the new lease stays
        assert _lease(s3, bucket)["owner"]["run_id"] == taker
        clock.advance(TTL / 5)  # and the taker's heartbeats go on
        assert _lease(s3, bucket)["heartbeat"] == clock.now()
    assert _lease(s3, bucket) is None
