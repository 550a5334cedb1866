"""The dataset graph of every job that labels, with every resource choice in one place.

label:   source (bytes) -> decode (CPU tasks) -> SAM2 proposals (actor pool) -> DINOv2
         matching (actor pool holding the memory bank; masks leave it as RLE)
rematch: cache items -> read proposal-cache parts (CPU tasks) -> matching of the cached
         pooled features (actor pool holding the bank; no SAM2, no DINOv2)
then, for a job with an OUT: -> write parts (CPU tasks).

Each job names its stage list (:class:`LabelStages` or :class:`RematchStages`); the pools
it needs (``pools``) are what :func:`plan_resources` sizes, and every ``map_batches`` call
goes through :func:`_tasks` or :func:`_actors` here, so no other module chooses a CPU,
GPU, pool size or batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import ray.data
from ray.data import ActorPoolStrategy
from refseg.core.config import MethodConfig, ModelConfig
from refseg.pipeline.dataflow.decode import decode_batch
from refseg.pipeline.dataflow.proposal_cache import read_cache_parts
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources
from refseg.pipeline.dataflow.stages import MatchStage, ProposalStage, RematchStage
from refseg.pipeline.dataflow.writer import write_parts
from refseg.pipeline.storage import Location

__all__ = [
    "CPU_MATCH_THREADS",
    "LabelStages",
    "RematchStages",
    "Stages",
    "build_graph",
    "plan_resources",
]

# Fault tolerance: Ray Data's actor pools default to max_restarts=-1 and
# max_task_retries=-1 (a lost actor is restarted and its batch retried); tasks are retried
# by Ray as usual. Passing them again is deprecated in Ray 2.60, so they are not repeated.
# Exceptions are not retried, except transient object-store errors (Ray Data's own list:
# network errors, throttling, 503s): their task runs again, up to IO_RETRIES times with
# exponential backoff (2, 4, 8... s, jittered), on top of the S3 client's three attempts.
# Only write_parts, fetch_bytes and read_cache_parts raise them (other failed reads are
# error rows); all are idempotent.
IO_RETRIES = 6

#: torch threads per cached-feature matching actor on CPU: matching without DINOv2 is many
#: small tensor operations, which extra threads slow down (BENCHMARKS.md, section 6).
CPU_MATCH_THREADS = 1


@dataclass(frozen=True)
class LabelStages:
    """decode -> SAM2 proposals -> DINOv2 matching (``refseg label``, the Python API).

    Attributes:
        model, method: what the actors build and run.
        bank_bytes: the memory bank (safetensors bytes), given to each matching actor's
            constructor once, never with each batch.
        cache_proposals: keep the proposals and pooled features for the proposal cache.
    """

    model: ModelConfig
    method: MethodConfig
    bank_bytes: bytes
    cache_proposals: bool = False
    pools = ("propose", "match")


@dataclass(frozen=True)
class RematchStages:
    """read cached proposal parts -> match their pooled features (``refseg rematch``).

    Attributes:
        method: the post-proposal settings.
        bank_bytes: the memory bank (safetensors bytes), once per actor.
        cache: the run folder holding ``proposals/``.
    """

    method: MethodConfig
    bank_bytes: bytes
    cache: Location
    pools = ("rematch",)


Stages = LabelStages | RematchStages


def plan_resources(
    settings: PipelineSettings, stages: Stages, cluster: dict[str, float]
) -> Resources:
    """What each pool asks Ray for: the one resource policy of every job.

    Args:
        settings: the user's pipeline settings (``None`` fields: choose here).
        stages: the job's stage list (its ``pools``).
        cluster: ``ray.cluster_resources()``.
    """
    res = settings.resolve(cluster.get("GPU", 0), cluster.get("CPU", 1))
    if "propose" in stages.pools:
        return res
    # cached-feature matching only: every GPU to the one pool; on CPU one actor with one
    # torch thread unless the user says otherwise
    if res.device == "cuda":
        per = settings.gpus_per_actor or 1.0
        actors = settings.match_actors or max(1, int(cluster.get("GPU", 0) / per))
        return dataclasses.replace(res, match_actors=actors, gpus_per_match_actor=per)
    threads = settings.match_torch_threads or settings.torch_threads or CPU_MATCH_THREADS
    return dataclasses.replace(res, match_torch_threads=threads)


def _retry_transient_io_errors(ds: ray.data.Dataset) -> None:
    ctx = ds.context  # the dataset's own copy, shared by every dataset derived from it
    ctx.retried_map_errors = list(ctx.retried_io_errors)
    ctx.max_map_retries = IO_RETRIES


def _tasks(ds: ray.data.Dataset, fn: Any, kwargs: dict[str, Any], batch: int, cpus: float):
    return ds.map_batches(fn, fn_kwargs=kwargs, batch_size=batch, num_cpus=cpus)


def _actors(
    ds: ray.data.Dataset,
    cls: type,
    kwargs: dict[str, Any],
    *,
    actors: int,
    gpus: float,
    cpus: float,
    batch: int,
) -> ray.data.Dataset:
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=actors),
        batch_size=batch,
        num_gpus=gpus,
        num_cpus=cpus,
    )


def append_stages(
    ds: ray.data.Dataset, stages: Stages, settings: PipelineSettings, res: Resources
) -> ray.data.Dataset:
    """``ds`` with the job's model stages appended; rows leave them with the writer's
    columns (``refseg.pipeline.dataflow.writer.write_parts``)."""
    s = settings
    if isinstance(stages, RematchStages):
        ds = _tasks(ds, read_cache_parts, {"cache": stages.cache}, 1, s.decode_cpus)
        kwargs = {
            "method": stages.method,
            "bank_bytes": stages.bank_bytes,
            "device": res.device,
            "torch_threads": res.match_torch_threads,
        }
        return _actors(
            ds,
            RematchStage,
            kwargs,
            actors=res.match_actors,
            gpus=res.gpus_per_match_actor,
            cpus=res.cpus_per_actor,
            batch=s.match_batch_size,
        )
    model = dataclasses.replace(stages.model, device=res.device)
    decode = {
        "size": model.sam2_image_size,
        "resize": stages.method.resize,
        "max_pixels": s.max_pixels,
    }
    ds = _tasks(ds, decode_batch, decode, s.decode_batch_size, s.decode_cpus)
    propose = {"model": model, "method": stages.method, "torch_threads": res.torch_threads}
    ds = _actors(
        ds,
        ProposalStage,
        propose,
        actors=res.proposal_actors,
        gpus=res.gpus_per_proposal_actor,
        cpus=res.cpus_per_actor,
        batch=s.proposal_batch_size,
    )
    match = {
        "model": model,
        "method": stages.method,
        "bank_bytes": stages.bank_bytes,
        "torch_threads": res.match_torch_threads,
        "cache_proposals": stages.cache_proposals,
    }
    return _actors(
        ds,
        MatchStage,
        match,
        actors=res.match_actors,
        gpus=res.gpus_per_match_actor,
        cpus=res.cpus_per_actor,
        batch=s.match_batch_size,
    )


def build_graph(
    source: ray.data.Dataset,
    stages: Stages,
    *,
    settings: PipelineSettings,
    resources: Resources,
    out: Location,
) -> ray.data.Dataset:
    """Wire a job: its stages, then the part writer; a dataset of small per-image rows."""
    _retry_transient_io_errors(source)
    ds = append_stages(source, stages, settings, resources)
    return _tasks(ds, write_parts, {"out": out}, settings.write_batch_size, settings.write_cpus)
