"""One run at a time on an OUT: a lock on local disk, a lease on S3.

A second ``refseg label`` on the same OUT would delete the first one's in-flight parts as
orphans and write the COCO files under it, so a run holds OUT from before its first
change to OUT until its last (``hold_out``). Who holds it is in ``OUT/lock.json``
(host, pid, user, run id, start, last heartbeat); the second run is refused with an
``OutLockedError`` naming OUT, the holder and what to do.

* Local OUT: an exclusive ``flock`` on the OUT folder itself, plus ``lock.json`` for the
  message. The kernel drops the lock when the holding process ends, killed or not, so a
  stale lock cannot exist; ``lock.json`` left by a killed run is simply overwritten.
* S3 OUT: ``lock.json`` is a lease, created with a conditional write
  (``If-None-Match: *``: exactly one of two runs starting together gets it) and renewed
  every ``ttl / 5`` seconds by a heartbeat thread with ``If-Match`` on its ETag. A lease is
  stale, and the next run takes it over (again with ``If-Match``, so only one taker wins),
  when it expired (no heartbeat for ``ttl`` seconds: the holder was killed or cut off),
  when its holder ran on this host and that process has ended, or with ``take_over``
  (``--take-over-lock``). A run whose lease was taken over while it was cut off finds
  out at its next heartbeat and stops before its final files (``check``). Expiry compares
  the holder's clock with the taker's: hosts' clocks must agree to well within ``ttl``.
* Other stores (gs://): no lock; a warning says so.

Every time stamp and every heartbeat wait goes through a :class:`Clock` (``SYSTEM_CLOCK``:
``time.time`` and real waits), so that tests move a lease's time explicitly.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

from refseg.pipeline.storage import Location
from refseg.pipeline.store import s3_objects
from refseg.pipeline.store.atomic import write_bytes

__all__ = ["LOCK_NAME", "LEASE_TTL_S", "SYSTEM_CLOCK", "Clock", "OutLockedError", "hold_out"]
__all__ += ["LeaseLostError", "SystemClock"]

log = logging.getLogger(__name__)

LOCK_NAME = "lock.json"
#: Seconds an S3 lease lives without a heartbeat (heartbeats come every fifth of it).
LEASE_TTL_S = 300.0
_LIVE: set[str] = set()  # run ids of the leases this process holds now


class Clock(Protocol):
    """Where a lock reads the time (``now``: seconds since the epoch) and waits between
    heartbeats (``wait``: ``seconds`` or until ``stop`` is set; True when it was set)."""

    def now(self) -> float: ...

    def wait(self, stop: threading.Event, seconds: float) -> bool: ...


class SystemClock:
    """Wall-clock time (``time.time``) and real waits."""

    def now(self) -> float:
        return time.time()

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        return stop.wait(seconds)


SYSTEM_CLOCK = SystemClock()


class OutLockedError(OSError):
    """Another run holds OUT."""


class LeaseLostError(OutLockedError):
    """This run's S3 lease was taken over by another run while this one was cut off."""


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner(run_id: str, now: float) -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return {
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": os.getpid(),
        "user": user,
        "run_id": run_id,
        "started": now,
        "started_at": _iso(now),
    }


def _parse(body: bytes | None) -> dict[str, Any] | None:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("owner"), dict) else None


def _describe(lease: dict[str, Any] | None, now: float) -> str:
    if lease is None:
        return "holder unknown (its lock.json is missing or unreadable)"
    o = lease["owner"]
    text = (
        f"pid {o.get('pid')} on host {o.get('host')} (user {o.get('user')}, run "
        f"{o.get('run_id')}), started {o.get('started_at')}"
    )
    if isinstance(lease.get("heartbeat"), int | float):
        text += f", last heartbeat {max(0.0, now - lease['heartbeat']):.0f} s ago"
    return text


def _pid_ended(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def _refusal(out: Location, lease: dict[str, Any] | None, hint: str, now: float) -> OutLockedError:
    return OutLockedError(
        f"{out.uri} is in use by another `refseg label` run: {_describe(lease, now)}. "
        "Two runs on one OUT would delete each other's unfinished parts and mix their "
        f"files. Wait for that run to end, or use another --out. {hint}"
    )


class _LocalLock:
    def __init__(self, out: Location, clock: Clock) -> None:
        self.out, self.fd, self.clock = out, -1, clock

    def acquire(self) -> None:
        import fcntl

        os.makedirs(self.out.path, exist_ok=True)
        fd = os.open(self.out.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(
                self.out,
                _parse(_read_local(self.out.child(LOCK_NAME).path)),
                "(The lock goes with that process: it is released when the process ends, "
                "even if it is killed.)",
                self.clock.now(),
            ) from None
        self.fd = fd
        now = self.clock.now()
        lease = {"owner": _owner(uuid.uuid4().hex[:12], now), "heartbeat": now}
        write_bytes(self.out.child(LOCK_NAME), json.dumps(lease, indent=1).encode())

    def check(self) -> None:
        return None

    def release(self) -> None:
        if self.fd < 0:
            return
        import fcntl

        with contextlib.suppress(OSError):
            os.unlink(self.out.child(LOCK_NAME).path)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class _S3Lease:
    def __init__(self, out: Location, *, ttl: float, take_over: bool, clock: Clock) -> None:
        self.out, self.loc = out, out.child(LOCK_NAME)
        self.ttl, self.take_over, self.clock = float(ttl), take_over, clock
        self.owner = _owner(uuid.uuid4().hex[:12], clock.now())
        self.etag: str | None = None
        self.lost: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._renewing = threading.Lock()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = self.clock.now()
        lease = {
            "owner": self.owner,
            "heartbeat": now,
            "heartbeat_at": _iso(now),
            "ttl_s": self.ttl,
            "expires": now + self.ttl,
            "expires_at": _iso(now + self.ttl),
        }
        return json.dumps(lease, indent=1).encode()

    def _stale(self, lease: dict[str, Any] | None) -> str | None:
        """Why the lease seen may be taken over, or None while its holder may be alive."""
        if self.take_over:
            return "--take-over-lock was given"
        if lease is None:
            return "it is not a refseg lease"
        o, now = lease["owner"], self.clock.now()
        expires = lease.get("expires")
        if not isinstance(expires, int | float) or expires < now:
            return f"it expired at {lease.get('expires_at')} (no heartbeat for {self.ttl:.0f} s)"
        if o.get("host") == self.owner["host"]:
            if o.get("boot_id") and o.get("boot_id") != self.owner["boot_id"]:
                return "its host has restarted since"
            if o.get("pid") == self.owner["pid"]:
                if o.get("run_id") not in _LIVE:
                    return "an earlier run in this process left it"
            elif _pid_ended(o.get("pid")):
                return f"its process {o.get('pid')} on this host has ended"
        return None

    def acquire(self) -> None:
        ep, path = self.out.endpoint, self.loc.path
        for _ in range(5):
            try:
                self.etag = s3_objects.put_if_absent(ep, path, self._body())
            except Exception as exc:
                raise OSError(
                    f"cannot write the lease {self.loc.uri} of OUT {self.out.uri}: {exc}. "
                    "Check that the bucket exists and that these credentials may write it"
                ) from exc
            if self.etag:
                break
            seen = s3_objects.get(ep, path)
            if seen is None:
                continue  # released meanwhile: try again to create it
            lease = _parse(seen[0])
            why = self._stale(lease)
            if why is None:
                expires = lease["expires_at"] if lease else "?"
                raise _refusal(
                    self.out,
                    lease,
                    f"If that run was killed, its lease expires at {expires} ({self.ttl:.0f} s "
                    "after its last heartbeat) and a rerun then takes OUT over; "
                    "--take-over-lock takes it over now (only if that run is surely stopped).",
                    self.clock.now(),
                )
            self.etag = s3_objects.put_if_match(ep, path, self._body(), seen[1])
            if self.etag:
                log.warning(
                    "took over the lease on %s from %s: %s",
                    self.out.uri,
                    _describe(lease, self.clock.now()),
                    why,
                )
                break
        else:
            raise OutLockedError(
                f"{self.out.uri}: could not take its lease {self.loc.uri}: other runs keep "
                "changing it; make sure one run at a time writes OUT"
            )
        _LIVE.add(self.owner["run_id"])
        self._thread = threading.Thread(target=self._beat, name="refseg-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        """Renew the lease now (If-Match on its ETag); a failed match means it was lost.

        Raises the store's error when the request fails (an outage).
        """
        with self._renewing:  # the heartbeat thread and check() never race on the ETag
            if self.lost is not None:
                return
            etag = s3_objects.put_if_match(
                self.out.endpoint, self.loc.path, self._body(), self.etag or ""
            )
            if etag is None:
                with contextlib.suppress(Exception):
                    seen = s3_objects.get(self.out.endpoint, self.loc.path)
                    self.lost = _parse(seen[0] if seen else None)
                self.lost = self.lost or {"owner": {}}
                log.error("lost the lease on %s to another run", self.out.uri)
                return
            self.etag = etag

    def _beat(self) -> None:
        while not self.clock.wait(self._stop, self.ttl / 5) and self.lost is None:
            try:
                self._renew()
            except Exception as exc:  # a store outage: keep trying while the run goes on
                log.warning("could not renew the lease %s (%s); retrying", self.loc.uri, exc)

    def check(self) -> None:
        """Raise ``LeaseLostError`` if another run holds OUT now; renews the lease first,
        so that the next ``ttl`` seconds are this run's."""
        with contextlib.suppress(Exception):  # an outage: the heartbeats' word stands
            self._renew()
        if self.lost is not None:
            raise LeaseLostError(
                f"this run lost its lease on {self.out.uri} to another run "
                f"({_describe(self.lost, self.clock.now())}) after its heartbeats failed for "
                f"{self.ttl:.0f} s: it stops without writing the final files; the run that "
                "holds OUT now completes it"
            )

    def release(self) -> None:
        """Stop the heartbeats and delete the lease if it is still this run's.

        Bounded to a few seconds when the store does not answer (a run that failed in an
        outage must not hang here): the lease is then left to expire, and a rerun on this
        host takes it over at once.
        """
        self._stop.set()
        _LIVE.discard(self.owner["run_id"])
        problem = "the store did not answer"
        if self._renewing.acquire(timeout=5):  # no heartbeat in flight: the ETag is final
            try:
                if self.lost is not None or not self.etag:
                    return
                s3_objects.delete_if_match(self.out.endpoint, self.loc.path, self.etag, quick=True)
                return
            except Exception as exc:
                problem = str(exc)
            finally:
                self._renewing.release()
        log.warning(
            "could not remove the lease %s (%s): the next run takes it over once it "
            "expires, or at once on this host",
            self.loc.uri,
            problem,
        )


class _NoLock:
    def acquire(self) -> None:
        return None

    def check(self) -> None:
        return None

    def release(self) -> None:
        return None


@contextlib.contextmanager
def hold_out(
    out: Location, *, take_over: bool = False, ttl: float = LEASE_TTL_S, clock: Clock = SYSTEM_CLOCK
) -> Iterator[Any]:
    """Hold OUT for the ``with`` block; the object yielded has ``check()``.

    ``clock`` gives the time stamps and the waits between heartbeats (tests pass one they
    move by hand).

    Raises:
        OutLockedError: another run holds OUT (the message names it and what to do).
    """
    lock: Any
    if out.is_local:
        lock = _LocalLock(out, clock) if os.name == "posix" else _NoLock()
    elif out.scheme == "s3":
        lock = _S3Lease(out, ttl=ttl, take_over=take_over, clock=clock)
    else:
        log.warning(
            "%s: no lock on %s:// outputs; make sure one run at a time writes OUT",
            out.uri,
            out.scheme,
        )
        lock = _NoLock()
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
