"""The one job skeleton of every command that labels (``refseg label``, ``refseg rematch``).

A job is a :class:`Job`: the settings every labelling job has, plus the few steps where
commands differ (its inputs' checks, its plan of what to do, its source and stage list,
its own run.json fields). :func:`run_job` does the rest, in this order and nowhere else:

1. resolve OUT and check it (and the job's inputs) are reachable; load the memory bank;
2. hold OUT (store/lock.py) from before its first change to its last;
3. record the configuration's fingerprint in run.json before any part is written (a rerun
   with other settings is refused), repair what a killed run left;
4. plan: which images are done, what runs (the job's ``plan``);
5. start or join Ray, plan resources, build the graph (dataflow/graph.py), drain it into
   counts and progress;
6. settle OUT (one row per image), write the COCO files and the complete run.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import ray
import ray.data
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.memory_bank import MemoryBank
from refseg.pipeline.dataflow.graph import Stages, build_graph, plan_resources
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources
from refseg.pipeline.run_steps import (
    check_reachable,
    complete_record,
    config_fingerprint,
    drain,
    new_counts,
)
from refseg.pipeline.storage import Location, resolve
from refseg.pipeline.store import layout
from refseg.pipeline.store.lock import hold_out
from refseg.pipeline.store.progress import ProgressOptions, ProgressReporter, reporting
from refseg.pipeline.store.record import check_fingerprint, start_record, write_run_record
from refseg.pipeline.store.redo import settle, tidy

__all__ = ["Job", "JobSummary", "LabelSummary", "Todo", "ensure_ray", "run_job"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSummary:
    """The counts of one run of a job (what its command prints)."""

    images: int
    ok: int
    errors: int
    instances: int
    seconds: float
    skipped_done: int
    out: str
    command: str = "label"

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """The one line the command prints at the end."""
        return (
            f"refseg {self.command}: {self.images} images ({self.ok} ok, {self.errors} "
            f"errors), {self.instances} instances, {self.images_per_second:.2f} images/s, "
            f"{self.skipped_done} already done; outputs in {self.out}"
        )


LabelSummary = JobSummary  # the name `refseg label`'s callers know


@dataclass
class Todo:
    """What a job's plan decided.

    Attributes:
        done: int64 ids of the images whose rows stay (not run again).
        source: builds the input dataset, or returns ``None`` when nothing is left to do;
            called once Ray is up, with the progress reporter (to set the total).
        counts: extra run.json counts (``skipped_done`` is added by the skeleton).
    """

    done: np.ndarray
    source: Callable[[ProgressReporter], ray.data.Dataset | None]
    counts: dict[str, Any] = field(default_factory=dict)


class Job(Protocol):
    """A command that labels: the settings every such job has, and its own steps."""

    command: str
    memory: str
    out: str
    model: ModelConfig
    method: MethodConfig
    settings: PipelineSettings
    preset: str
    num_cpus: int | None
    take_over_lock: bool
    progress: ProgressOptions

    @property
    def s3_endpoint(self) -> str | None: ...

    def check_inputs(self, out: Location) -> MemoryBank:
        """Before OUT is held: the inputs exist and fit (raise a clear error if not); the
        memory bank, loaded."""

    def start_fields(self, bank_sha: str) -> dict[str, Any]:
        """run.json's fields (besides the fingerprint) before the first part is written."""

    def plan(self, out: Location) -> Todo:
        """What runs, OUT held and cleaned; may remove rows that run again."""

    def stages(self, bank_bytes: bytes) -> Stages:
        """The job's stage list for the graph builder."""

    def finish_record(self, record: dict[str, Any], resources: Resources) -> None:
        """Add the job's own fields to the complete run.json (in place)."""


@contextlib.contextmanager
def _endpoint_env(endpoint: str | None) -> Iterator[None]:
    """``AWS_ENDPOINT_URL`` set to the job's S3 endpoint while the driver reads its inputs."""
    old = os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield
    finally:
        if endpoint and old is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        elif endpoint:
            os.environ["AWS_ENDPOINT_URL"] = old  # type: ignore[assignment]


def ensure_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> None:
    """Connect to RAY_ADDRESS when set, else start a local Ray (the embedded default)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, include_dashboard=False)


class _NoBarsNote(logging.Filter):
    """Drops Ray Data's "Progress bars disabled. To enable, set DataContext..." note."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")


def _ray_bars(show: bool) -> None:
    """Ray Data's per-operator bars on or off (off: the job's own bar; --ray-progress: on)."""
    ray.data.DataContext.get_current().enable_progress_bars = show
    note = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _NoBarsNote) for f in note.filters):
        note.addFilter(_NoBarsNote())


def _begin(out: Location, start: dict[str, Any]) -> None:
    """Before the first part, holding OUT: refuse another configuration, then record this
    one (run.json with the fingerprint and ``status: running``, unless it holds this
    fingerprint already, so an interrupted run still names the configuration of its
    parts); repair what a kill left (store/redo.py's ``tidy``)."""
    recorded = check_fingerprint(out, start["fingerprint"], has_parts=layout.has_parts(out))
    if recorded != start["fingerprint"]:
        write_run_record(out, start)
    removed = tidy(out)
    if removed:
        log.warning("removed %d parts of interrupted batches; their images run again", removed)


def run_job(job: Job) -> JobSummary:
    """Run (or resume) a labelling job; returns the counts of this run.

    The run holds OUT (store/lock.py) from before its first change to OUT to its last; a
    second run on the same OUT is refused with an ``OutLockedError``. Progress goes to
    stderr and to OUT/progress.json (store/progress.py) from when OUT is held.
    """
    with reporting(job.progress) as progress:
        t0 = time.perf_counter()
        out = resolve(job.out, s3_endpoint=job.s3_endpoint)
        check_reachable(out, "output location")
        with _endpoint_env(job.s3_endpoint):  # the bank and checkpoints through it too
            bank = job.check_inputs(out)
        with hold_out(out, take_over=job.take_over_lock) as lock:
            return _run_holding_out(job, out, bank, lock, t0, progress)


def _run_holding_out(
    job: Job, out: Location, bank: MemoryBank, lock: Any, t0: float, progress: ProgressReporter
) -> JobSummary:
    progress.start(out)  # OUT is held: this run's progress.json
    bank_bytes = bank.to_bytes()
    bank_sha = hashlib.sha256(bank_bytes).hexdigest()
    fingerprint = config_fingerprint(job.model, job.method, bank_sha)
    _begin(out, start_record(fingerprint, job.start_fields(bank_sha)))
    todo = job.plan(out)
    progress.set_already_done(len(todo.done))

    endpoint = job.s3_endpoint
    ensure_ray(job.num_cpus, {"AWS_ENDPOINT_URL": endpoint} if endpoint else None)
    _ray_bars(job.progress.ray_bars)
    stages = job.stages(bank_bytes)
    resources = plan_resources(job.settings, stages, ray.cluster_resources())
    counts = new_counts()
    source = todo.source(progress)
    if source is not None:
        ds = build_graph(source, stages, settings=job.settings, resources=resources, out=out)
        drain(ds, out, progress, counts)
    seconds = time.perf_counter() - t0
    lock.check()  # a run whose S3 lease was taken over writes no final file
    settled = settle(out)  # one row per image even if a killed run's workers wrote late
    record = complete_record(
        out,
        fingerprint=fingerprint,
        preset=job.preset,
        config={
            "model": job.model,
            "method": job.method,
            "pipeline": job.settings,
            "resources": resources,
            "memory": job.memory,
            "out": job.out,
        },
        random_weights=job.model.random_weights,
        bank=bank,
        bank_sha=bank_sha,
        counts=counts,
        more_counts={"skipped_done": len(todo.done), **todo.counts},
        seconds=seconds,
        snapshot=settled,
    )
    job.finish_record(record, resources)
    write_run_record(out, record)
    progress.finish("done")
    return JobSummary(
        counts["images"],
        counts["ok"],
        counts["errors"],
        counts["instances"],
        seconds,
        len(todo.done),
        out.uri,
        job.command,
    )
