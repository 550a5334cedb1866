"""A gate on the pipeline's stage calls, for tests that act mid-job and must not race it.

A fault test kills an actor, a driver or a node, or stops the store, "mid-job". Waiting
for some parts and then acting races the job's end: on a fast machine (or with few
images) the job is done first. Here the job itself waits instead: the stage call numbered
``holds[tag]`` blocks until the test releases it, so whatever the test does while it
holds happens mid-job, always, and with a known amount of work done.

Worker side (stdlib only; runs inside Ray's actors): :func:`install` wraps
``ProposalStage.__call__`` (tag ``propose``) and ``MatchStage.__call__`` (``match``) of
``refseg.pipeline.dataflow.stages``. Each call

* appends ``<tag>-start <pid> <image_id>`` lines to the log before it runs and
  ``<tag> <pid> <image_id>`` after it returns (so a test counts calls begun twice);
* if its stage has a hold: takes the next number of that stage, across every process
  (the first ``calls/<tag>-<n>`` it can create with O_EXCL); the call numbered
  ``holds[tag]`` writes its pid to ``held-<tag>`` and waits until ``release-<tag>``
  exists. A retried call (its actor was killed) takes a new number and passes.

Test side: :class:`StageGate`. ``with gate.in_process():`` gates the jobs this
process runs on the session's Ray (the patched stage classes travel to the actors by
value); ``gate.env()`` is the environment of a driver subprocess (a ``sitecustomize``
installs the gate in the driver and in every Ray worker it starts).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TAGS = {"ProposalStage": "propose", "MatchStage": "match"}
HOLD_LIMIT_S = 900.0  # a held call gives up (and fails its job) after this: a test bug
# How long a test waits for what must come (a held call, the parts before it): a safety net
# only, under pytest's 600 s per test (a busy 2-core machine took 4 min to start actors).
WAIT_S = 500.0
ENV_DIR, ENV_LOG, ENV_HOLDS = "REFSEG_TEST_GATE", "REFSEG_TEST_GATE_LOG", "REFSEG_TEST_GATE_HOLDS"

# ------------------------------------------------------------------------ worker side


def _append(log: str, event: str, ids: Any) -> None:
    with open(log, "a") as f:
        f.write("".join(f"{event} {os.getpid()} {int(i)}\n" for i in ids))


def _number(folder: str, tag: str) -> int:
    """This call's number among the calls of stage ``tag`` (1, 2, ...), in every process."""
    calls = os.path.join(folder, "calls")
    os.makedirs(calls, exist_ok=True)
    n = 1
    while True:
        try:
            os.close(os.open(os.path.join(calls, f"{tag}-{n}"), os.O_CREAT | os.O_EXCL))
            return n
        except FileExistsError:
            n += 1


def _hold(folder: str, tag: str) -> None:
    tmp = os.path.join(folder, f".held-{tag}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(folder, f"held-{tag}"))
    release = os.path.join(folder, f"release-{tag}")
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise RuntimeError(f"stage gate: {tag} call held {HOLD_LIMIT_S:.0f} s, never released")
        time.sleep(0.02)


def gated(call: Callable[..., Any], tag: str, folder: str, log: str, hold: int) -> Any:
    """``call`` (a stage's ``__call__``) logged, and held at call number ``hold`` (0: never)."""

    def __call__(self: Any, batch: dict[str, Any]) -> dict[str, Any]:
        _append(log, f"{tag}-start", batch["image_id"])
        if hold and _number(folder, tag) == hold:
            _hold(folder, tag)
        out = call(self, batch)
        _append(log, tag, out["image_id"])
        return out

    return __call__


def install(stages: Any, folder: str, log: str, holds: dict[str, int]) -> None:
    """Gate the stage classes of module ``stages``."""
    for name, tag in TAGS.items():
        cls = getattr(stages, name)
        cls.__call__ = gated(cls.__call__, tag, folder, log, holds.get(tag, 0))


def install_from_env(stages: Any) -> None:
    """:func:`install` with the folder, log and holds of this process's environment."""
    holds = dict(h.split("=") for h in os.environ.get(ENV_HOLDS, "").split(",") if h)
    folder = os.environ[ENV_DIR]
    install(stages, folder, os.environ[ENV_LOG], {k: int(v) for k, v in holds.items()})


_SITECUSTOMIZE = textwrap.dedent(
    '''
    """Test probe (tests/stage_gate.py): gate the pipeline's stage calls in this process."""
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import os
    import sys


    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "refseg.pipeline.dataflow.stages":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                gate_spec = importlib.util.spec_from_file_location("_refseg_stage_gate", GATE)
                gate = importlib.util.module_from_spec(gate_spec)
                gate_spec.loader.exec_module(gate)
                gate.install_from_env(module)

            spec.loader.exec_module = exec_module
            return spec


    if os.environ.get("REFSEG_TEST_GATE"):
        sys.meta_path.insert(0, _Finder())
    '''
)

# -------------------------------------------------------------------------- test side


def running(proc: Any) -> bool:
    """Whether the job ``proc`` still runs: a Popen, a Thread, a ``threading.Event`` set when
    the job ended, or None (not known: taken as running)."""
    if proc is None:
        return True
    if hasattr(proc, "poll"):
        return proc.poll() is None
    if hasattr(proc, "is_alive"):
        return proc.is_alive()
    return not proc.is_set()


def _gone(pid: int) -> bool:
    """The process has ended (or is a zombie waiting for its parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


class StageGate:
    """The test's handle on a gate: ``holds`` maps ``propose``/``match`` to the number
    of the call that waits (e.g. ``StageGate(dir, propose=3)``: the third proposal call)."""

    def __init__(self, folder: Path, *, log: Path | None = None, **holds: int) -> None:
        unknown = set(holds) - set(TAGS.values())
        assert not unknown, f"holds are for {sorted(TAGS.values())}, not {sorted(unknown)}"
        self.folder, self.holds = folder, holds
        self.log = log or folder / "calls.log"
        folder.mkdir(parents=True, exist_ok=True)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a driver subprocess (and of the Ray it starts) with this gate on;
        also puts the repository on the PYTHONPATH."""
        site = self.folder / "site"
        site.mkdir(exist_ok=True)
        gate_file = Path(__file__).resolve()
        code = _SITECUSTOMIZE.replace("GATE)", f"{str(gate_file)!r})")
        (site / "sitecustomize.py").write_text(code)
        base = dict(os.environ if base is None else base)
        path = os.pathsep.join([str(site), str(gate_file.parents[1]), base.get("PYTHONPATH", "")])
        return {
            **base,
            "PYTHONPATH": path.rstrip(os.pathsep),
            ENV_DIR: str(self.folder),
            ENV_LOG: str(self.log),
            ENV_HOLDS: ",".join(f"{k}={v}" for k, v in self.holds.items()),
        }

    @contextlib.contextmanager
    def in_process(self) -> Iterator[None]:
        """Gate the jobs this process runs (on the session's Ray) inside the block."""
        import ray.cloudpickle as cloudpickle
        from refseg.pipeline.dataflow import stages

        saved = {name: vars(getattr(stages, name))["__call__"] for name in TAGS}
        install(stages, str(self.folder), str(self.log), self.holds)
        # Ray's actors would import the stage classes by name, without the gate: send them
        # (and this module's wrapper) by value while the block runs
        by_value = [stages, sys.modules[__name__]]
        for module in by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            yield
        finally:
            for module in by_value:
                cloudpickle.unregister_pickle_by_value(module)
            for name, call in saved.items():
                getattr(stages, name).__call__ = call

    def wait_held(self, tag: str, *, proc: Any = None, timeout: float = WAIT_S) -> int:
        """Wait until the held ``tag`` call has begun; its pid. ``timeout`` is a safety net
        (the call comes in bounded time); the job ``proc`` (see :func:`running`) ending
        first fails at once."""
        held = self.folder / f"held-{tag}"
        deadline = time.monotonic() + timeout
        while not held.exists():
            if not running(proc):
                raise AssertionError(f"the job ended before its {tag} call {self.holds[tag]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s: no held {tag} call")
            time.sleep(0.05)
        return int(held.read_text())

    def release(self, tag: str) -> None:
        """Let the held ``tag`` call (and any later one) go on."""
        (self.folder / f"release-{tag}").touch()

    def kill_held(self, tag: str, *, proc: Any = None) -> int:
        """SIGKILL the process of the held ``tag`` call once it holds, wait until it is
        gone, then release the gate (the retried call passes); the pid killed."""
        pid = self.wait_held(tag, proc=proc)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not _gone(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived SIGKILL for 60 s"
            time.sleep(0.02)
        self.release(tag)
        return pid

    def events(self, event: str) -> list[tuple[int, int]]:
        """(pid, image id) of each ``event`` line: ``propose``/``match`` (calls that
        returned) or ``propose-start``/``match-start`` (calls begun, also those killed)."""
        if not self.log.exists():
            return []
        rows = (line.split() for line in self.log.read_text().splitlines())
        return [(int(r[1]), int(r[2])) for r in rows if len(r) == 3 and r[0] == event]

    def counts(self, event: str) -> Counter[int]:
        """How many times each image id had ``event``."""
        return Counter(i for _, i in self.events(event))
