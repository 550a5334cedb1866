"""The labelling job: resume state, Ray start-up, the graph, outputs and the run record."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from pipeline import outputs
from pipeline.graph import build_graph
from pipeline.lock import hold_out
from pipeline.progress import ProgressOptions, ProgressReporter
from pipeline.proposal_cache import cache_record
from pipeline.redo import begin_run, settle
from pipeline.run_record import package_versions, start_record, write_run_record
from pipeline.schema import Col
from pipeline.settings import PipelineSettings
from pipeline.sources import ImageSource, NothingToDo, read_source
from pipeline.storage import Location, resolve
from refseg_core.checkpoints import resolve_checkpoint
from refseg_core.coco import load_coco
from refseg_core.config import MethodConfig, ModelConfig
from refseg_core.memory_bank import MemoryBank

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
    # write OUT/proposals/ for `refseg rematch` (pipeline.proposal_cache)
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


def _changed(obj: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config's fields that differ from their defaults (so a new field keeps old runs)."""
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name not in ignore and getattr(obj, f.name) != f.default
    }


def _config_fingerprint(job: LabelJob, bank_sha: str) -> str:
    """What decides the labels: settings that differ from the defaults, and the bank.

    Where and how fast the models run (device, torch.compile, the mask decoder's path and
    prompt batch, which give the same masks up to float rounding) is left out.
    """
    cfg: dict[str, Any] = {
        "model": _changed(job.model, ignore=("device", "compile")),
        "method": _changed(job.method, ignore=("decoder", "prompt_batch")),
    }
    cfg["bank_sha256"] = bank_sha
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _checkpoint_hashes(model: ModelConfig) -> dict[str, str | None]:
    if model.random_weights:
        return {"sam2": None, "dinov2": None, "note": "random weights"}  # type: ignore[dict-item]
    out: dict[str, str | None] = {}
    for key, spec in (("sam2", model.sam2_checkpoint), ("dinov2", model.dinov2_checkpoint)):
        out[key] = resolve_checkpoint(spec).sha256 if spec else None
    return out


def _check_reachable(loc: Location, what: str) -> None:
    """Fail fast, before Ray starts, when a store is down (retries would take minutes)."""
    try:
        loc.fs.get_file_info(loc.path)
    except Exception as exc:
        raise ConnectionError(
            f"cannot reach the {what} {loc.uri}: {exc}. Check the endpoint "
            "(--s3-endpoint / AWS_ENDPOINT_URL) and credentials; no work was started"
        ) from exc


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


# "OSError: When uploading ..." lines of a (remote) traceback; the innermost cause comes first
_ERROR_LINE = re.compile(r"^\s*(?:\w+\.)*(\w*(?:Error|Exception)): (.+)$")


def _stopped(exc: Exception, out: Location) -> Exception:
    """One clear message for a job that failed mid-run (Ray's errors hold remote tracebacks).

    The root cause's first line, the retries Ray Data made, what is kept and how to resume.
    A root cause that is an ``OSError`` (an object store that stayed down through every
    retry) gives an ``OSError``, anything else a ``RuntimeError``.
    """
    lines = str(exc).splitlines()
    roots = [m for m in map(_ERROR_LINE.match, lines) if m and not m[0].lstrip().startswith("ray.")]
    if roots:
        name, first = roots[0].group(1), roots[0].group(2).strip()
    else:
        name, first = type(exc).__name__, (lines or [""])[0].strip()
    tries = [ln.strip().rstrip(".") for ln in lines if "attempts (total backoff" in ln]
    if tries:
        first = f"{first} ({tries[0]})"
    cls = getattr(builtins, name, None)
    kind = OSError if isinstance(cls, type) and issubclass(cls, OSError) else RuntimeError
    return kind(
        f"the labelling job stopped: {name}: {first}. Images with finished output in "
        f"{out.uri} are kept; once the cause is fixed, rerun the same command: only the "
        "unfinished images run again"
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
    stderr and to OUT/progress.json (see :mod:`pipeline.progress`), from when OUT is held.
    """
    progress = ProgressReporter(job.progress)
    try:
        return _run_label(job, progress)
    except BaseException:
        progress.finish("failed")  # a no-op when the job stopped before it started
        raise


def _run_label(job: LabelJob, progress: ProgressReporter) -> LabelSummary:
    t0 = time.perf_counter()
    out = resolve(job.out, s3_endpoint=job.source.s3_endpoint)
    _check_reachable(out, "output location")
    _check_reachable(resolve(job.source.images, s3_endpoint=job.source.s3_endpoint), "images")
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
    fingerprint = _config_fingerprint(job, bank_sha)
    _check_cache_resume(out, job.cache_proposals)
    # fingerprint and run.json before any change; clean-up, targets and what runs again
    plan = begin_run(
        job.source,
        out,
        start_record(fingerprint, _start_fields(job, bank_sha)),
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
    counts = {"images": 0, "ok": 0, "errors": 0, "instances": 0}
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
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                n = len(batch[Col.IMAGE_ID])
                n_err = int(np.sum(batch[Col.STATUS] != "ok"))
                counts["images"] += n
                counts["errors"] += n_err
                counts["ok"] += n - n_err
                counts["instances"] += int(np.sum(batch[Col.N_INSTANCES]))
                progress.add(n, n_err)
        except Exception as exc:
            raise _stopped(exc, out) from exc
    except NothingToDo as exc:
        log.info("%s", exc)
    seconds = time.perf_counter() - t0
    lock.check()  # a run whose S3 lease was taken over writes no final file
    settle(out)  # one row per image even if a killed run's workers wrote late
    categories = [{"id": c, "name": bank.names[c]} for c in bank.category_ids]
    coco_stats = outputs.write_coco(out, categories)
    totals = _totals(out)
    record: dict[str, Any] = {
        "fingerprint": fingerprint,
        "status": "complete",
        "preset": job.preset,
        "config": {
            "model": job.model,
            "method": job.method,
            "pipeline": job.settings,
            "resources": res,
            "memory": job.memory,
            "source": job.source,
            "out": job.out,
        },
        "random_weights": job.model.random_weights,
        "warnings": ["random weights: results are meaningless"] if job.model.random_weights else [],
        "versions": package_versions(),
        "checkpoints": _checkpoint_hashes(job.model),
        "memory_bank": {"sha256": bank_sha, **bank.describe(), "meta": bank.meta},
        "references": [
            {**dataclasses.asdict(r), "category_name": bank.names[c], "image_uri": r.file_name}
            for c in bank.category_ids
            for r in bank.records[c]
        ],
        "counts": {
            "this_run": counts,
            "total": totals,
            "skipped_done": len(done),
            "redone": {"changed": plan.changed, "errors_retried": plan.retried},
            "duplicate_rows_removed": plan.duplicates,
        },
        "timings": {
            "seconds": seconds,
            "coco_json_seconds": coco_stats["seconds"],
            "images_per_second": counts["images"] / seconds if seconds else 0.0,
            "stage_seconds": totals.pop("stage_seconds"),
        },
        "ray": {"address": os.environ.get("RAY_ADDRESS", "local")},
    }
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
    finished, cached = outputs.finished_parts(out), outputs.cached_parts(out)
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


def _totals(out: Location) -> dict[str, Any]:
    cols = [Col.STATUS, Col.N_INSTANCES, Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE]
    tot: dict[str, Any] = {"images": 0, "ok": 0, "errors": 0, "instances": 0}
    stages = dict.fromkeys(("decode", "propose", "match", "encode"), 0.0)
    for t in outputs.iter_tables(out, outputs.IMAGES_DIR, cols):
        status = np.asarray(t.column(Col.STATUS).to_pylist())
        tot["images"] += t.num_rows
        tot["ok"] += int(np.sum(status == "ok"))
        tot["errors"] += int(np.sum(status != "ok"))
        tot["instances"] += int(np.sum(t.column(Col.N_INSTANCES).to_numpy()))
        for key, col in zip(stages, cols[2:], strict=True):
            stages[key] += float(np.nansum(t.column(col).to_numpy(zero_copy_only=False)))
    tot["stage_seconds"] = stages
    return tot
