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
import logging
from dataclasses import dataclass
from typing import Any, Literal

import ray.data
from ray.data import ActorPoolStrategy
from refseg.core.config import MethodConfig, ModelConfig
from refseg.pipeline.dataflow.capacity import ClusterCapacity, read_capacity, wait_for_gpu
from refseg.pipeline.dataflow.decode import decode_batch
from refseg.pipeline.dataflow.planning import CPU_MATCH_THREADS, plan
from refseg.pipeline.dataflow.proposal_cache import read_cache_parts
from refseg.pipeline.dataflow.rows import InputColumns, image_rows, input_columns, instance_rows
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources
from refseg.pipeline.dataflow.sources import fetch_bytes
from refseg.pipeline.dataflow.stages import MatchStage, ProposalStage, RematchStage
from refseg.pipeline.dataflow.writer import write_parts
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location

log = logging.getLogger(__name__)

__all__ = [
    "CPU_MATCH_THREADS",
    "LabelStages",
    "RematchStages",
    "Stages",
    "build_graph",
    "append_labelling",
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
MATCH_BATCH_GPU = 4  # images per matching call on a GPU (PipelineSettings.match_batch_size)


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

    @property
    def device(self) -> str:
        """``cpu``, ``cuda`` or ``auto``: where the job is meant to run (the plan's input)."""
        return self.model.device


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
    device: str = "auto"  # cpu, cuda or auto: where the job is meant to run
    pools = ("rematch",)


Stages = LabelStages | RematchStages


def plan_resources(
    settings: PipelineSettings,
    stages: Stages,
    cluster: dict[str, float] | ClusterCapacity,
) -> Resources:
    """What each pool asks Ray for: the one resource policy of every job
    (``refseg.pipeline.dataflow.planning``), from what the cluster can provide.

    On a cluster with no GPU up yet whose plan uses GPUs, waits (``settings.gpu_wait_s`` at
    most) until the autoscaler has started a GPU node, and raises ``NoGpuError`` (one line)
    if none comes.

    Args:
        settings: the user's pipeline settings (``None`` fields: choose here).
        stages: the job's stage list (its ``pools`` and ``device``).
        cluster: ``ray.cluster_resources()`` (the autoscaler's capacity is read from the
            connected cluster), or a :class:`ClusterCapacity` (nothing is read).
    """
    cap = cluster if isinstance(cluster, ClusterCapacity) else read_capacity(cluster)
    res = plan(settings, stages, cap)
    log.info("resources: %s", res)
    if res.gpus and cap.gpus < 1 and not isinstance(cluster, ClusterCapacity):
        share = min(s for s in (res.gpus_per_proposal_actor, res.gpus_per_match_actor) if s)
        wait_for_gpu(share, settings.gpu_wait_s, res.basis)
    return res


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
    min_actors: int | None,
    gpus: float,
    cpus: float,
    batch: int,
) -> ray.data.Dataset:
    if min_actors is None:  # a fixed pool (CPU)
        compute = ActorPoolStrategy(size=actors)
    else:  # start at the largest size (ray #59144), give idle actors back down to min
        compute = ActorPoolStrategy(min_size=min_actors, max_size=actors, initial_size=actors)
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        compute=compute,
        batch_size=batch,
        num_gpus=gpus,
        num_cpus=cpus,
    )


def _rematch_stages(
    ds: ray.data.Dataset, stages: RematchStages, s: PipelineSettings, res: Resources
) -> ray.data.Dataset:
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
        min_actors=res.match_min_actors,
        gpus=res.gpus_per_match_actor,
        cpus=res.cpus_per_actor,
        batch=match_batch(s, res),
    )


def match_batch(s: PipelineSettings, res: Resources) -> int:
    """Images per matching call: the user's, else one on the CPU and MATCH_BATCH_GPU on GPUs."""
    if s.match_batch_size is not None:
        return s.match_batch_size
    return 1 if res.device == "cpu" else MATCH_BATCH_GPU


def _label_stages(
    ds: ray.data.Dataset, stages: LabelStages, s: PipelineSettings, res: Resources
) -> ray.data.Dataset:
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
        min_actors=res.proposal_min_actors,
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
        min_actors=res.match_min_actors,
        gpus=res.gpus_per_match_actor,
        cpus=res.cpus_per_actor,
        batch=match_batch(s, res),
    )


Output = Literal["instances", "images", "parts"]


def append_labelling(
    ds: ray.data.Dataset,
    stages: LabelStages,
    *,
    settings: PipelineSettings | None = None,
    resources: Resources | None = None,
    columns: InputColumns = InputColumns(),
    output: Output = "instances",
    s3_endpoint: str | None = None,
) -> ray.data.Dataset:
    """``ds`` with refseg's labelling stages appended: what ``refseg label`` runs between
    its source and its OUT, for any dataset with an image-bytes or image-URI column.

    Args:
        ds: one row per image; ``columns`` names its bytes / URI / id columns (a URI
            column alone: the bytes are read by CPU tasks, local paths or object stores).
        stages: models, method and memory bank (:class:`LabelStages`).
        settings: batch and pool knobs (defaults when ``None``).
        resources: what each pool asks Ray for; ``None``: :func:`plan_resources` on the
            running cluster (the policy ``refseg label`` uses).
        output: ``"instances"``: one row per instance (``INSTANCES_SCHEMA``, as
            ``OUT/instances``); ``"images"``: one row per image (``IMAGES_SCHEMA``: status,
            error text of an unreadable image, instance count, seconds per stage);
            ``"parts"``: the per-image rows ``refseg label``'s writer takes.
    """
    s = settings or PipelineSettings()
    if resources is None:
        resources = plan_resources(s, stages, ray.cluster_resources())
    if not columns.standard:
        ds = _tasks(ds, input_columns, {"columns": columns}, s.decode_batch_size, s.decode_cpus)
    if columns.bytes is None:
        fetch = {"s3_endpoint": s3_endpoint}
        ds = _tasks(ds, fetch_bytes, fetch, s.decode_batch_size, s.decode_cpus)
    ds = _label_stages(ds, stages, s, resources)
    if output == "parts":
        return ds
    rows = instance_rows if output == "instances" else image_rows
    return _tasks(ds, rows, {}, s.write_batch_size, s.write_cpus)


def build_graph(
    source: ray.data.Dataset,
    stages: Stages,
    *,
    settings: PipelineSettings,
    resources: Resources,
    out: Location,
) -> ray.data.Dataset:
    """Wire a job: its stages, then the part writer; a dataset of small per-image rows.

    ``source`` holds the stages' own columns (refseg.pipeline.dataflow.sources).
    """
    _retry_transient_io_errors(source)
    if isinstance(stages, RematchStages):
        ds = _rematch_stages(source, stages, settings, resources)
    else:
        standard = InputColumns(Col.BYTES, Col.IMAGE_URI, Col.IMAGE_ID)
        ds = append_labelling(
            source, stages, settings=settings, resources=resources, columns=standard, output="parts"
        )
    return _tasks(ds, write_parts, {"out": out}, settings.write_batch_size, settings.write_cpus)
