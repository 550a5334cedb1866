"""Fault injection, object storage: S3 down at start, and an outage in the middle of a run.

Each test owns a moto server on its own port (the session's one is left alone). The
mid-run outage freezes moto with SIGSTOP, so connections hang as in a network outage and
the finished parts (in moto's memory) survive; SIGCONT ends the outage. It begins while
the stage gate (tests/stage_gate.py) holds the job with its first block written, so it
always lands mid-job, and the job goes on into it.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray.data
from botocore.config import Config
from refseg.pipeline.dataflow.sources import fetch_bytes
from refseg.pipeline.job import run_label
from refseg.pipeline.schema import Col

from tests.faults_util import (
    ROWS_PER_TASK,
    TWO_BLOCKS,
    MotoServer,
    free_port,
    image_ids,
    make_job,
    wait_until,
    write_jpegs,
)
from tests.stage_gate import WAIT_S, StageGate

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture
def moto():
    server = MotoServer()
    yield server
    server.stop()


def _s3(url: str):  # a client that never hangs on a frozen server for long
    cfg = Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=url, config=cfg)


class RefusingEndpoint:
    """A loopback port that takes each connection and resets it at once (the store is
    down), counting the attempts."""

    def __init__(self) -> None:
        self.attempts = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            self.attempts += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self._sock.close()


@pytest.mark.parametrize("where", ["out", "images"])
def test_endpoint_down_at_start_is_a_clear_error_before_any_work(
    tiny_setup, tmp_path, where, monkeypatch
):
    dead = RefusingEndpoint()
    images = "s3://in-bucket/targets" if where == "images" else str(tmp_path / "images")
    out = "s3://out-bucket/run" if where == "out" else str(tmp_path / "out")
    write_jpegs(tmp_path / "images", 2)
    graphs: list[str] = []  # every Ray Data stage built, had the job got that far
    map_batches = ray.data.Dataset.map_batches

    def spy(self, fn, *args, **kwargs):
        graphs.append(getattr(fn, "__name__", str(fn)))
        return map_batches(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    try:
        with pytest.raises(ConnectionError) as info:
            run_label(make_job(tiny_setup, images, out, s3_endpoint=dead.url))
    finally:
        dead.close()
    message = str(info.value)
    expected = "output location s3://out-bucket/run" if where == "out" else f"images {images}"
    assert message.startswith(f"cannot reach the {expected}: "), message
    assert "AWS Error NETWORK_CONNECTION" in message  # the store's own words
    assert "no work was started" in message and "--s3-endpoint" in message
    assert graphs == []  # failed in the driver's check, before any Ray work
    # one request with the S3 client's own few attempts, not Ray's retries of every task
    assert 1 <= dead.attempts <= 5, dead.attempts
    assert not (tmp_path / "out").exists()


def _batch(uri: str) -> dict[str, np.ndarray]:
    return {Col.IMAGE_ID: np.array([1]), Col.IMAGE_URI: np.array([uri], dtype=object)}


def test_a_transient_read_error_is_raised_for_a_retry_not_written_as_an_error_row():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OSError, match="AWS Error NETWORK_CONNECTION"):
        fetch_bytes(_batch("s3://in-bucket/a.jpg"), s3_endpoint=dead)


def test_a_missing_object_is_an_error_row(s3_endpoint):
    _s3(s3_endpoint).create_bucket(Bucket="faults-missing")
    out = fetch_bytes(_batch("s3://faults-missing/nope.jpg"), s3_endpoint=s3_endpoint)
    assert out[Col.BYTES][0] == b""
    assert "s3://faults-missing/nope.jpg: could not be read" in out[Col.ERROR][0]


class Outage:
    """Freezes ``moto`` mid-job, from a background thread: once ``gate`` holds the job's
    first proposal call of its second block and the first block's parts are in the
    bucket; then lets the job go on into the outage. It ends at ``end()``, or as soon as
    ``until()`` is true when that is given."""

    def __init__(
        self,
        moto: MotoServer,
        s3,
        bucket: str,
        gate: StageGate,
        *,
        until: Callable[[], bool] | None = None,
    ):
        self.moto, self.s3, self.bucket, self.gate, self.until = moto, s3, bucket, gate, until
        self.began = self.ended = False
        self.error: BaseException | None = None  # why it never began, if it did not
        self.parts_at_start: int | None = None
        self.job_done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def parts(self) -> int:
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="run/images/")
        return len(listing.get("Contents", []))

    def _run(self) -> None:
        try:
            self._begin()
        except BaseException as exc:  # reported by the test (a thread's error is lost)
            self.error = exc
            return
        if self.until is not None:
            wait_until(self.until, timeout=WAIT_S, what="the end of the outage", proc=self.job_done)
            self.end()

    def _begin(self) -> None:
        try:
            self.gate.wait_held("propose", proc=self.job_done)
            wait_until(
                lambda: self.parts() >= ROWS_PER_TASK, timeout=WAIT_S, what="the first block"
            )
            self.parts_at_start = self.parts()
            self.moto.pause()
            self.began = True
        finally:
            self.gate.release("propose")  # the job goes on (into the outage, if it began)

    def end(self) -> None:
        self.job_done.set()
        if self.began and not self.ended:
            self.moto.resume()
            self.ended = True
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)


BUCKET = "faults-out"
OUT = f"s3://{BUCKET}/run"


def _setup(tiny_setup, tmp_path, moto, n, bucket=BUCKET):
    write_jpegs(tmp_path / "images", n)
    s3 = _s3(moto.url)
    s3.create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/run"
    return s3, make_job(tiny_setup, tmp_path / "images", out, s3_endpoint=moto.url)


def _retry_log_lines(bucket: str) -> list[str]:
    """Ray Data's "Retrying attempt N to apply UDF transform" lines about ``bucket``."""
    import ray

    log = Path(ray._private.worker._global_node.get_logs_dir_path()) / "ray-data/ray-data.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [ln for ln in lines if "Retrying attempt" in ln and f"bucket '{bucket}'" in ln]


def test_outage_longer_than_the_retries_fails_clearly_then_rerun_resumes(
    tiny_setup, tmp_path, moto, monkeypatch
):
    monkeypatch.setattr(
        "refseg.pipeline.dataflow.graph.IO_RETRIES", 1
    )  # fail sooner: 2 attempts of a part
    n = TWO_BLOCKS
    s3, job = _setup(tiny_setup, tmp_path, moto, n)
    gate = StageGate(tmp_path / "gate", propose=ROWS_PER_TASK + 1)
    with gate.in_process():
        outage = Outage(moto, s3, BUCKET, gate)
        try:
            with pytest.raises(OSError) as info:
                run_label(job)
        finally:
            outage.end()
    assert outage.began, f"the outage did not begin: {outage.error!r}"
    message = str(info.value)
    assert message.startswith("the labelling job stopped: OSError: ")
    assert BUCKET in message and "AWS Error NETWORK_CONNECTION" in message
    assert "after 2/2 attempts" in message  # Ray Data's retry of the part write
    assert "rerun the same command" in message and "\n" not in message
    finished = image_ids(OUT, s3_endpoint=moto.url)
    assert outage.parts_at_start == len(finished) == ROWS_PER_TASK  # the first block only
    assert len(finished) == len(set(finished))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert "run/coco_results.json" not in keys  # the failed run wrote no final files

    summary = run_label(job)
    ids = image_ids(OUT, s3_endpoint=moto.url)
    assert len(ids) == len(set(ids)) == n  # nothing lost, nothing doubled
    assert (summary.skipped_done, summary.images) == (len(finished), n - len(finished))


@pytest.mark.slow
def test_outage_shorter_than_the_retries_is_ridden_out(tiny_setup, tmp_path, moto):
    """S3 frozen mid-run until Ray Data has retried a part write (so longer than the S3
    client's own three attempts), then back: Ray Data's further retries write the parts and
    the job completes as if nothing happened."""
    n, bucket = TWO_BLOCKS, "faults-short"
    s3, job = _setup(tiny_setup, tmp_path, moto, n, bucket)
    gate = StageGate(tmp_path / "gate", propose=ROWS_PER_TASK + 1)
    with gate.in_process():
        outage = Outage(moto, s3, bucket, gate, until=lambda: bool(_retry_log_lines(bucket)))
        try:
            summary = run_label(job)
        finally:
            outage.end()
    assert outage.began and outage.ended, f"the outage did not begin: {outage.error!r}"
    ids = image_ids(f"s3://{bucket}/run", s3_endpoint=moto.url)
    assert len(ids) == len(set(ids)) == n and (summary.images, summary.ok) == (n, n)
    retries = _retry_log_lines(bucket)
    print(f"\nshort outage: {len(retries)} part writes retried by Ray Data")
    assert retries, "no write was retried: the outage did not hit a write"
