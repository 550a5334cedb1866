"""The labelling job: resume state, Ray start-up, the graph, outputs and the run record."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from refseg.core.checkpoints import resolve_checkpoint
from refseg.core.coco import load_coco
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.memory_bank import MemoryBank
from refseg.pipeline.dataflow.graph import build_graph
from refseg.pipeline.dataflow.proposal_cache import cache_record
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import ImageSource, NothingToDo, list_targets, read_source
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
from refseg.pipeline.store.record import package_versions, start_record, write_run_record
from refseg.pipeline.store.redo import begin_run, settle

__all__ = ["LabelJob", "LabelSummary", "run_label", "ensure_ray"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelJob:
    memory: str
    source: ImageSource
    out: str
    model: ModelConfig
    method: MethodConfig
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    preset: str = "custom"
    num_cpus: int | None = None  # for a local Ray started on the fly
    retry_errors: bool = False  # run the images of earlier error rows again
    take_over_lock: bool = False  # take over an S3 lease another run holds (lock.py)
    progress: ProgressOptions = field(default_factory=ProgressOptions)
    # write OUT/proposals/ for `refseg rematch` (refseg.pipeline.dataflow.proposal_cache)
    cache_proposals: bool = False
    # SHA-256 of the checkpoints the models load, as resolved before the run (official
    # defaults included); None: only the explicitly given checkpoints are hashed
    checkpoints: dict[str, str | None] | None = None


@dataclass(frozen=True)
class LabelSummary:
    images: int
    ok: int
    errors: int
    instances: int
    seconds: float
    skipped_done: int
    out: str

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"refseg label: {self.images} images ({self.ok} ok, {self.errors} errors), "
            f"{self.instances} instances, {self.images_per_second:.2f} images/s, "
            f"{self.skipped_done} already done; outputs in {self.out}"
        )


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


def _checkpoint_hashes(model: ModelConfig) -> dict[str, str | None]:
    if model.random_weights:
        return {"sam2": None, "dinov2": None, "note": "random weights"}  # type: ignore[dict-item]
    out: dict[str, str | None] = {}
    for key, spec in (("sam2", model.sam2_checkpoint), ("dinov2", model.dinov2_checkpoint)):
        out[key] = resolve_checkpoint(spec).sha256 if spec else None
    return out


def _warn_categories(job: LabelJob, bank: MemoryBank) -> None:
    if not job.source.targets:
        return
    cats = {int(c["id"]): c["name"] for c in load_coco(job.source.targets).get("categories", [])}
    for cid, name in cats.items():
        if cid in bank.names and bank.names[cid] != name:
            raise ValueError(
                f"category id {cid} is {name!r} in the targets ({job.source.targets}) but "
                f"{bank.names[cid]!r} in the memory bank ({job.memory}): the two must use "
                "the same category ids"
            )
    unknown = sorted(set(cats) - set(bank.names))
    if unknown:
        log.warning(
            "targets list categories the bank does not know (they cannot be labelled): %s; "
            "bank has %s",
            {c: cats[c] for c in unknown},
            bank.names,
        )


def _start_fields(job: LabelJob, bank_sha: str) -> dict[str, Any]:
    """What run.json says before the first part is written (pipeline/run_record.py)."""
    return {
        "preset": job.preset,
        "config": {
            "model": job.model,
            "method": job.method,
            "pipeline": job.settings,
            "memory": job.memory,
            "source": job.source,
            "out": job.out,
        },
        "random_weights": job.model.random_weights,
        "memory_bank": {"sha256": bank_sha},
        "versions": package_versions(),
    }


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


def run_label(job: LabelJob) -> LabelSummary:
    """Run (or resume) a labelling job; returns the counts of this run.

    The run holds OUT (pipeline/lock.py) from before its first change to OUT to its last;
    a second run on the same OUT is refused with an ``OutLockedError``. Progress goes to
    stderr and to OUT/progress.json (see :mod:`refseg.pipeline.store.progress`), from when
    OUT is held.
    """
    with reporting(job.progress) as progress:
        return _run_label(job, progress)


def _run_label(job: LabelJob, progress: ProgressReporter) -> LabelSummary:
    t0 = time.perf_counter()
    out = resolve(job.out, s3_endpoint=job.source.s3_endpoint)
    check_reachable(out, "output location")
    check_reachable(resolve(job.source.images, s3_endpoint=job.source.s3_endpoint), "images")
    bank = MemoryBank.load(job.memory)
    bank.check_encoder(job.model.dinov2_model, job.model.dinov2_image_size)
    _warn_categories(job, bank)
    with hold_out(out, take_over=job.take_over_lock) as lock:
        return _run_holding_out(job, out, bank, lock, t0, progress)


def _run_holding_out(
    job: LabelJob,
    out: Location,
    bank: MemoryBank,
    lock: Any,
    t0: float,
    progress: ProgressReporter,
) -> LabelSummary:
    progress.start(out)  # OUT is held: this run's progress.json
    bank_bytes = bank.to_bytes()
    bank_sha = hashlib.sha256(bank_bytes).hexdigest()
    fingerprint = config_fingerprint(job, bank_sha)
    _check_cache_resume(out, job.cache_proposals)
    # fingerprint and run.json before any change; clean-up, targets and what runs again
    plan = begin_run(
        out,
        start_record(fingerprint, _start_fields(job, bank_sha)),
        lambda: list_targets(job.source, out=out),
        retry_errors=job.retry_errors,
    )
    done = plan.done
    progress.set_already_done(len(done))

    env = {}
    if job.source.s3_endpoint:
        env["AWS_ENDPOINT_URL"] = job.source.s3_endpoint
    ensure_ray(job.num_cpus, env or None)
    _ray_bars(job.progress.ray_bars)
    res = job.settings.resolve(
        ray.cluster_resources().get("GPU", 0), ray.cluster_resources().get("CPU", 1)
    )
    counts = new_counts()
    try:
        source = read_source(
            job.source,
            done=done,
            fetch_cpus=job.settings.decode_cpus,
            listing=plan.listing,
            on_listed=progress.set_total,
        )
        ds = build_graph(
            source,
            model=job.model,
            method=job.method,
            bank_bytes=bank_bytes,
            settings=job.settings,
            resources=res,
            out=out,
            cache_proposals=job.cache_proposals,
        )
        drain(ds, out, progress, counts)
    except NothingToDo as exc:
        log.info("%s", exc)
    seconds = time.perf_counter() - t0
    lock.check()  # a run whose S3 lease was taken over writes no final file
    settle(out)  # one row per image even if a killed run's workers wrote late
    record = complete_record(
        out,
        fingerprint=fingerprint,
        preset=job.preset,
        config={
            "model": job.model,
            "method": job.method,
            "pipeline": job.settings,
            "resources": res,
            "memory": job.memory,
            "source": job.source,
            "out": job.out,
        },
        random_weights=job.model.random_weights,
        checkpoints=_checkpoint_hashes(job.model),
        bank=bank,
        bank_sha=bank_sha,
        counts=counts,
        more_counts={
            "skipped_done": len(done),
            "redone": {"changed": plan.changed, "errors_retried": plan.retried},
            "duplicate_rows_removed": plan.duplicates,
        },
        seconds=seconds,
    )
    if job.cache_proposals:
        hashes = job.checkpoints or _checkpoint_hashes(job.model)
        record["proposal_cache"] = cache_record(job.model, job.method, hashes)
    write_run_record(out, record)
    progress.finish("done")
    return LabelSummary(
        counts["images"],
        counts["ok"],
        counts["errors"],
        counts["instances"],
        seconds,
        len(done),
        out.uri,
    )


def _check_cache_resume(out: Location, cache_proposals: bool) -> None:
    """Refuse to resume a run with the proposal cache switched on or off half-way."""
    finished, cached = layout.finished_parts(out), layout.cached_parts(out)
    if cache_proposals and len(cached) < len(finished):
        raise ValueError(
            f"{out.uri} holds {len(finished) - len(cached)} finished parts labelled without "
            "--cache-proposals: a cache must cover every image, so use a new --out (or "
            "delete the old outputs to relabel)"
        )
    if not cache_proposals and cached:
        raise ValueError(
            f"{out.uri} was labelled with --cache-proposals: rerun with --cache-proposals "
            "to resume it, or use a new --out"
        )
