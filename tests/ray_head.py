"""A `ray start --head --block` of the tests' own, and nothing else on the machine touched.

Ray's own helpers (``ray stop``, ``AutoscalingCluster.start``/``shutdown``) stop every Ray
on the machine; these start the head in a session of its own, with a private temp dir (so a
``ray.init()`` elsewhere never finds it) and free ports, and stop exactly that session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# Every port a head opens that has a fixed default (6379, 8265, 10001, 52365, ...)
PORT_FLAGS = (
    "--port",
    "--object-manager-port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_ports(
    argv: list[str], fixed: dict[str, int] | None = None
) -> tuple[list[str], dict[str, int]]:
    """``argv`` with every port flag set to a free port (replacing values it had), or to
    the port ``fixed`` gives it."""
    ports = {flag: free_port() for flag in PORT_FLAGS} | (fixed or {})
    kept = [a for a in argv if a.split("=", 1)[0] not in ports]
    return kept + [f"{flag}={port}" for flag, port in ports.items()], ports


def _session_members(sid: int) -> list[int]:
    """PIDs whose session is ``sid`` (Linux /proc; empty elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
            pids.append(int(entry.parent.name))
    return pids


@contextmanager
def ray_head(
    argv: list[str],
    env: dict[str, str],
    *,
    ports: dict[str, int] | None = None,
    wait_s: float = 120,
) -> Iterator[dict]:
    """Run ``ray start ARGV --head --block`` (ARGV without ``ray start``); yield its info.

    Yields ``{"gcs": "127.0.0.1:PORT", "dashboard": "http://127.0.0.1:PORT", "ports": ...,
    "temp_dir": ...}`` once the GCS accepts connections and, when one was asked for, the
    dashboard answers HTTP (any status: 401 counts). ``ports``: flags whose port is given
    (e.g. ``{"--port": N}`` when a config names the GCS address). Stops the whole session
    afterwards.
    """
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths
    argv, ports = with_free_ports(argv, ports)
    argv = [*argv, f"--temp-dir={temp_dir}", "--block"]
    log = Path(temp_dir) / "head.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [RAY, "start", *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    info = {
        "gcs": f"127.0.0.1:{ports['--port']}",
        "dashboard": f"http://127.0.0.1:{ports['--dashboard-port']}",
        "ports": ports,
        "temp_dir": temp_dir,
        "log": log,
    }
    try:
        _wait_up(proc, info, log, wait_s)
        yield info
    finally:
        _stop(proc)


def _wait_up(proc: subprocess.Popen, info: dict, log: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if b"will now block forever" in log.read_bytes():
            try:
                urllib.request.urlopen(info["dashboard"] + "/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers: 401 without a token
            except OSError:
                pass
        time.sleep(0.5)
    raise RuntimeError(f"the head did not come up in {wait_s} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops its processes), then SIGKILL what remains."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    for pid in _session_members(proc.pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)
