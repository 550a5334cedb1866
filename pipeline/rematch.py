"""``refseg rematch``: label a cached run's images again with another memory bank.

read the proposal cache of RUN (CPU tasks, one part each) -> match the pooled features
against the bank (actor pool holding the bank; no SAM2, no DINOv2) -> write parts (the
label pipeline's own writer). NEW_OUT gets exactly what ``refseg label`` writes:
``instances/``, ``images/``, ``coco_results.json``, ``coco_dataset.json``, ``run.json``.

A rematch output records the cache it read (``run.json``: ``proposal_cache.location``), so
it can be rematched in turn. Resume works as for labelling: a rerun of the same command on
the same NEW_OUT processes only images without finished output.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.data
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.memory_bank import MemoryBank
from refseg.pipeline.dataflow.graph import RematchStages
from refseg.pipeline.dataflow.proposal_cache import (
    CACHE_FORMAT,
    PROPOSALS_DIR,
    shaping_method,
    shaping_model,
)
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources
from refseg.pipeline.run import JobSummary, Todo, run_job
from refseg.pipeline.storage import Location, resolve
from refseg.pipeline.store import index, layout
from refseg.pipeline.store.progress import ProgressOptions, ProgressReporter
from refseg.pipeline.store.record import read_run_record

__all__ = [
    "ProposalCache",
    "RematchJob",
    "open_cache",
    "check_fits",
    "run_rematch",
    "configs_of",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProposalCache:
    """A labelling run's proposal cache, as ``run.json`` describes it.

    Attributes:
        run: the run folder given (a labelling run, or a rematch of one).
        location: the folder holding ``proposals/`` (the labelling run).
        record: the ``run.json`` of ``run``.
        info: its ``proposal_cache`` section (format, encoder, hashes, settings).
        parts: names of the finished parts that have a cache part.
    """

    run: Location
    location: Location
    record: dict[str, Any]
    info: dict[str, Any]
    parts: list[str]


def open_cache(run: str, *, s3_endpoint: str | None = None) -> ProposalCache:
    """Find and check the proposal cache of the run folder ``run``.

    Raises:
        FileNotFoundError / ValueError: no finished run, a run labelled without
            ``--cache-proposals``, or a cache that does not cover every finished image;
            each message says what to run instead.
    """
    loc = resolve(run, s3_endpoint=s3_endpoint)
    record = read_run_record(loc)
    if record is None:
        raise FileNotFoundError(
            f"{loc.uri} has no run.json: rematch needs a finished `refseg label "
            "--cache-proposals` run (rerun the same label command to finish an interrupted one)"
        )
    info = record.get("proposal_cache")
    if not info:
        raise ValueError(
            f"{loc.uri} was labelled without --cache-proposals, so it has no proposal cache: "
            "label the images again with `refseg label --cache-proposals --out NEW_RUN ...` "
            "(once), then `refseg rematch NEW_RUN --memory BANK --out ...`"
        )
    if info.get("format") != CACHE_FORMAT:
        raise ValueError(f"{loc.uri}: run.json's proposal_cache is not a {CACHE_FORMAT}")
    where = info.get("location")
    cache_loc = resolve(where, s3_endpoint=s3_endpoint) if where else loc
    finished, cached = layout.live_parts(cache_loc), layout.cached_parts(cache_loc)
    if not cached or len(cached) < len(finished):
        raise ValueError(
            f"the proposal cache {cache_loc.child(PROPOSALS_DIR).uri} covers {len(cached)} of "
            f"{len(finished)} finished parts: finish it by rerunning the same `refseg label "
            "--cache-proposals` command, or label again with --cache-proposals into a new --out"
        )
    return ProposalCache(loc, cache_loc, record, info, cached)


def configs_of(cache: ProposalCache) -> tuple[str, ModelConfig, MethodConfig]:
    """Preset name, model and method settings the cached run used (unknown keys dropped)."""
    cfg = cache.record.get("config", {})

    def build(cls: type, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})

    model = build(ModelConfig, cfg.get("model", {}))
    method = build(MethodConfig, cfg.get("method", {}))
    return str(cache.record.get("preset", "custom")), model, method


def check_fits(
    cache: ProposalCache,
    bank: MemoryBank,
    *,
    model: ModelConfig,
    method: MethodConfig,
    checkpoints: dict[str, str | None] | None = None,
) -> None:
    """Refuse a bank, settings or checkpoints that do not fit what the cache was made with.

    Args:
        model, method: the settings of the rematch (the run's, with any flags applied).
        checkpoints: SHA-256 of checkpoints named on the command line (``sam2``, ``dinov2``).
    """
    info, where = cache.info, cache.location.uri
    enc = info["encoder"]
    bank.check_encoder(enc["dinov2_model"], enc["dinov2_image_size"])
    bank_sha, cache_sha = bank.meta.get("dinov2_sha256"), enc.get("dinov2_sha256")
    if bank_sha and cache_sha and bank_sha != cache_sha:
        raise ValueError(
            f"the memory bank was built with DINOv2 weights {bank_sha}, but the proposal "
            f"cache of {where} holds features of {cache_sha}: rebuild the bank with the run's "
            "--dinov2-checkpoint (see its run.json), or label again with these weights"
        )
    bank_rw = bank.meta.get("random_weights")
    if bank_rw is not None and bool(bank_rw) != bool(info.get("random_weights")):
        log.warning(
            "the memory bank has random_weights=%s but the proposal cache of %s has "
            "random_weights=%s: the matches are meaningless",
            bank_rw,
            where,
            info.get("random_weights"),
        )
    asked = {**shaping_model(model), **shaping_method(method)}
    made = {**info.get("model", {}), **info.get("method", {})}
    differ = [k for k in sorted(asked) if k in made and _norm(asked[k]) != _norm(made[k])]
    hashes = {"sam2": info["sam2"].get("sam2_sha256"), "dinov2": enc.get("dinov2_sha256")}
    for key, sha in (checkpoints or {}).items():
        if sha and hashes.get(key) and sha != hashes[key]:
            differ.append(f"{key}_checkpoint")
            asked[f"{key}_checkpoint"], made[f"{key}_checkpoint"] = sha, hashes[key]
    if differ:
        what = ", ".join(f"{k} (cache: {made[k]!r}, asked: {asked[k]!r})" for k in differ)
        raise ValueError(
            f"the proposal cache of {where} was made with other settings where they matter: "
            f"{what}. A rematch can only change what acts after the proposals (NMS, max "
            "instances, soft merge, merge resolution, box convention, score threshold, "
            "negative margin); label again with `refseg label --cache-proposals` and the "
            "new settings"
        )


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class RematchJob:
    """One ``refseg rematch`` run: the cached proposals of ``cache`` matched into ``out``."""

    cache: ProposalCache
    memory: str
    out: str
    model: ModelConfig
    method: MethodConfig
    settings: PipelineSettings = field(default_factory=PipelineSettings)
    preset: str = "custom"
    num_cpus: int | None = None
    s3_endpoint: str | None = None
    take_over_lock: bool = False  # take over an S3 lease another run holds (lock.py)
    progress: ProgressOptions = field(default_factory=ProgressOptions)
    command = "rematch"

    def check_inputs(self, out: Location) -> MemoryBank:
        """OUT is not the run being rematched; the bank, loaded (``Job.check_inputs``; it
        was checked against the cache by ``check_fits``)."""
        runs = {self.cache.run.uri.rstrip("/"), self.cache.location.uri.rstrip("/")}
        if out.uri.rstrip("/") in runs:
            raise ValueError(f"--out {out.uri} is the run being rematched: choose a new folder")
        return MemoryBank.load(self.memory)

    def start_fields(self, bank_sha: str) -> dict[str, Any]:
        """run.json before the first part: the preset and the run rematched."""
        return {"preset": self.preset, "rematch": {"run": self.cache.run.uri}}

    def plan(self, out: Location) -> Todo:
        """The cache parts with images still to do; the source lists them (``Job.plan``)."""
        done = layout.done_image_ids(out)
        items, todo = _plan(self.cache, done)
        cached = self.cache.record.get("counts", {}).get("total", {}).get("images")

        def source(progress: ProgressReporter) -> ray.data.Dataset | None:
            progress.set_total(None if cached is None else max(0, int(cached) - len(done)))
            if not todo:
                log.info("all images of the cache already have output in %s", out.uri)
                return None
            return ray.data.from_items(items, override_num_blocks=len(items))

        return Todo(done, source)

    def stages(self, bank_bytes: bytes) -> RematchStages:
        """read cached proposal parts -> match their pooled features (``Job.stages``)."""
        return RematchStages(self.method, bank_bytes, self.cache.location, self.model.device)

    def finish_record(self, record: dict[str, Any], resources: Resources) -> None:
        """run.json as ``refseg label`` writes it, plus where the cache is."""
        cached = self.cache.record
        record["config"]["source"] = {"rematch_of": self.cache.run.uri}
        record["checkpoints"] = cached.get("checkpoints")
        record["rematch"] = {
            "run": self.cache.run.uri,
            "cache_fingerprint": cached.get("fingerprint"),
        }
        record["proposal_cache"] = {**self.cache.info, "location": self.cache.location.uri}


def _plan(cache: ProposalCache, done: np.ndarray) -> tuple[list[dict[str, Any]], int]:
    """One item per cache part with the ids still to do (``keep``: all when nothing is
    done yet, so a fresh rematch reads no part in the driver); and how many parts."""
    if not len(done):
        return [{"part": name, "keep": []} for name in cache.parts], len(cache.parts)
    items, n = [], 0
    by_part = index.ids_by_part(cache.location)  # the cache run's index, not every part
    for name in cache.parts:
        ids = by_part[name]
        keep = ids[~np.isin(ids, done)]
        if len(keep) == len(ids):
            items.append({"part": name, "keep": []})
        elif len(keep):
            items.append({"part": name, "keep": keep.tolist()})
        n += bool(len(keep))
    return items, n


def run_rematch(job: RematchJob) -> JobSummary:
    """Run (or resume) a rematch on the job skeleton (refseg.pipeline.run), as ``refseg
    label`` runs: it holds NEW_OUT, records its fingerprint there before the first part,
    and reports progress."""
    return run_job(job)
