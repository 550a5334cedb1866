"""``refseg label``: the labelling job (images -> SAM2 -> DINOv2 -> OUT) on the job skeleton.

The skeleton (refseg.pipeline.run) holds OUT, records the fingerprint, runs the graph and
writes the record; this module says what is particular to labelling: its source of
images, what a rerun redoes (store/redo.py), and its run.json fields.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from refseg.core.banks import check_bank
from refseg.core.checkpoints import model_checkpoints_sha256, resolve_checkpoint
from refseg.core.coco import load_coco
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.memory_bank import MemoryBank
from refseg.pipeline.dataflow.graph import LabelStages
from refseg.pipeline.dataflow.proposal_cache import cache_record
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources
from refseg.pipeline.dataflow.sources import ImageSource, NothingToDo, list_targets, read_source
from refseg.pipeline.run import JobSummary, LabelSummary, Todo, ensure_ray, run_job
from refseg.pipeline.run_steps import check_reachable
from refseg.pipeline.storage import Location, resolve
from refseg.pipeline.store import layout
from refseg.pipeline.store.progress import ProgressOptions, ProgressReporter
from refseg.pipeline.store.record import package_versions
from refseg.pipeline.store.redo import plan_rerun

__all__ = ["LabelJob", "LabelSummary", "run_label", "ensure_ray"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelJob:
    """One ``refseg label`` run: images from ``source`` labelled into ``out``."""

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
    # SHA-256 of the checkpoints the models load (official defaults included), if the
    # caller has them already; None: hashed by check_inputs (and for the proposal cache)
    checkpoints: dict[str, str | None] | None = None
    command = "label"

    @property
    def s3_endpoint(self) -> str | None:
        """The S3-compatible endpoint of the source (and OUT, bank, checkpoints)."""
        return self.source.s3_endpoint

    def check_inputs(self, out: Location) -> MemoryBank:
        """The checkpoints exist (a missing one says where to get it), the images are
        reachable, the bank fits the DINOv2 this run loads (name, size, weights) and the
        targets' category ids (``Job.check_inputs``)."""
        hashes = self.checkpoints or model_checkpoints_sha256(self.model)
        check_reachable(resolve(self.source.images, s3_endpoint=self.s3_endpoint), "images")
        bank = MemoryBank.load(self.memory)
        check_bank(bank, self.model, hashes["dinov2"], self.memory)
        _warn_categories(self, bank)
        return bank

    def start_fields(self, bank_sha: str) -> dict[str, Any]:
        """What run.json says before the first part is written (store/record.py)."""
        return {
            "preset": self.preset,
            "config": {
                "model": self.model,
                "method": self.method,
                "pipeline": self.settings,
                "memory": self.memory,
                "source": self.source,
                "out": self.out,
            },
            "random_weights": self.model.random_weights,
            "memory_bank": {"sha256": bank_sha},
            "versions": package_versions(),
        }

    def plan(self, out: Location) -> Todo:
        """List the targets and decide what runs again (store/redo.py's ``plan_rerun``);
        the source reads the rest (``Job.plan``)."""
        _check_cache_resume(out, self.cache_proposals)
        plan = plan_rerun(out, list_targets(self.source, out=out), retry_errors=self.retry_errors)

        def source(progress: ProgressReporter) -> Any:
            try:
                return read_source(
                    self.source,
                    done=plan.done,
                    fetch_cpus=self.settings.decode_cpus,
                    listing=plan.listing,
                    on_listed=progress.set_total,
                )
            except NothingToDo as exc:
                log.info("%s", exc)
                return None

        counts = {
            "redone": {"changed": plan.changed, "errors_retried": plan.retried},
            "duplicate_rows_removed": plan.duplicates,
        }
        return Todo(plan.done, source, counts)

    def stages(self, bank_bytes: bytes) -> LabelStages:
        """decode -> SAM2 proposals -> DINOv2 matching (``Job.stages``)."""
        return LabelStages(self.model, self.method, bank_bytes, self.cache_proposals)

    def finish_record(self, record: dict[str, Any], resources: Resources) -> None:
        """run.json's source, checkpoint hashes and proposal cache (``Job.finish_record``)."""
        record["config"]["source"] = self.source
        record["checkpoints"] = _checkpoint_hashes(self.model)
        if self.cache_proposals:
            hashes = self.checkpoints or model_checkpoints_sha256(self.model)
            record["proposal_cache"] = cache_record(self.model, self.method, hashes)


def run_label(job: LabelJob) -> JobSummary:
    """Run (or resume) a labelling job; returns the counts of this run (refseg.pipeline.run)."""
    return run_job(job)


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
