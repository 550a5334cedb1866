"""The dataset graph of a labelling job, with every resource choice in one place.

read bytes -> decode (CPU tasks) -> SAM2 proposals (actor pool) -> DINOv2 matching
(actor pool holding the memory bank; masks leave it as RLE) -> write parts (CPU tasks).
"""

from __future__ import annotations

import ray.data
from ray.data import ActorPoolStrategy
from refseg.core.config import MethodConfig, ModelConfig
from refseg.pipeline.dataflow.decode import decode_batch
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources
from refseg.pipeline.dataflow.stages import MatchStage, ProposalStage
from refseg.pipeline.dataflow.writer import write_parts
from refseg.pipeline.storage import Location

__all__ = ["build_graph"]

# Fault tolerance: Ray Data's actor pools default to max_restarts=-1 and
# max_task_retries=-1 (a lost actor is restarted and its batch retried); tasks are retried
# by Ray as usual. Passing them again is deprecated in Ray 2.60, so they are not repeated.
# Exceptions are not retried, except transient object-store errors (Ray Data's own list:
# network errors, throttling, 503s): their task runs again, up to IO_RETRIES times with
# exponential backoff (2, 4, 8... s, jittered), on top of the S3 client's three attempts.
# Only write_parts and fetch_bytes raise them (other failed reads are error rows); both are
# idempotent.
IO_RETRIES = 6


def _retry_transient_io_errors(ds: ray.data.Dataset) -> None:
    ctx = ds.context  # the dataset's own copy, shared by every dataset derived from it
    ctx.retried_map_errors = list(ctx.retried_io_errors)
    ctx.max_map_retries = IO_RETRIES


def build_graph(
    source: ray.data.Dataset,
    *,
    model: ModelConfig,
    method: MethodConfig,
    bank_bytes: bytes,
    settings: PipelineSettings,
    resources: Resources,
    out: Location,
    cache_proposals: bool = False,
) -> ray.data.Dataset:
    """Wire the stages; returns a dataset of small per-image summary rows.

    With ``cache_proposals`` the write tasks also write the proposal cache (``proposals/``).
    """
    _retry_transient_io_errors(source)
    actor_model = ModelConfig(**{**model.__dict__, "device": resources.device})
    ds = source.map_batches(
        decode_batch,
        fn_kwargs={
            "size": model.sam2_image_size,
            "resize": method.resize,
            "max_pixels": settings.max_pixels,
        },
        batch_size=settings.decode_batch_size,
        num_cpus=settings.decode_cpus,
    )
    ds = ds.map_batches(
        ProposalStage,
        fn_constructor_kwargs={
            "model": actor_model,
            "method": method,
            "torch_threads": resources.torch_threads,
        },
        compute=ActorPoolStrategy(size=resources.proposal_actors),
        batch_size=settings.proposal_batch_size,
        num_gpus=resources.gpus_per_proposal_actor,
        num_cpus=resources.cpus_per_actor,
    )
    ds = ds.map_batches(
        MatchStage,
        # The bank goes to each actor's constructor once, never with each batch.
        fn_constructor_kwargs={
            "model": actor_model,
            "method": method,
            "bank_bytes": bank_bytes,
            "torch_threads": resources.match_torch_threads,
            "cache_proposals": cache_proposals,
        },
        compute=ActorPoolStrategy(size=resources.match_actors),
        batch_size=settings.match_batch_size,
        num_gpus=resources.gpus_per_match_actor,
        num_cpus=resources.cpus_per_actor,
    )
    return ds.map_batches(
        write_parts,
        fn_kwargs={"out": out},
        batch_size=settings.write_batch_size,
        num_cpus=settings.write_cpus,
    )
