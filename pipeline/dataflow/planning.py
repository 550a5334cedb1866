"""The resource plan of every job that labels: what each actor pool asks Ray for.

Planned from what the cluster can provide (:mod:`.capacity`), not only what is up at the
start, so that a job on an autoscaling cluster whose GPU workers start at zero asks for
GPUs and its autoscaler starts them:

* **Device.** ``cpu``: CPU actors. ``cuda``: GPU actors, or a one-line ``NoGpuError`` when
  the cluster can never have a GPU (a local Ray without one, an autoscaler without GPU
  node types) or none joins within ``gpu_wait_s``; never CPU instead. ``auto`` (the CLI's
  default): GPUs when the cluster has some up, its autoscaler has GPU node types, or
  ``max_gpus`` says how many; CPU otherwise (a local machine without GPU, as before).
* **How many GPUs.** ``max_gpus`` when given, bounded by the most the cluster can have;
  else that most (autoscaler config), else the GPUs up now (one when none is up).
* **Split.** Each GPU hosts one SAM2 proposal actor and one DINOv2 matching actor, with
  GPU fractions in the ratio of their measured FLOPs per image
  (``refseg.core.sizing.STAGE_GFLOP_PER_IMAGE``, the ``ntt`` preset with the fast
  decoder: 0.75 / 0.25 of a GPU). Fractions rather than pools sized in that ratio: a GPU
  then runs whichever stage has work (with whole GPUs per actor the pools' integer sizes
  leave one stage the bottleneck, e.g. 6 SAM2 + 2 DINOv2 GPUs out of 8 at a 76:24 load
  give SAM2 1.01 GPU of work per GPU), and every GPU node that joins adds both stages.
* **Pool sizes.** On GPUs each pool starts at its largest size (its actors wait for the
  GPU nodes the autoscaler adds, and start working as each node joins) and gives idle
  actors back down to one (the autoscaler then releases idle nodes). Starting large
  matters: Ray Data 2.60 grows a GPU pool only within the GPUs up now (ray #59144). On
  CPU, one actor per pool with fractional CPUs, as before (a 2-CPU job whose actors take
  a whole CPU each hangs).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Protocol

from refseg.core.sizing import STAGE_GFLOP_PER_IMAGE
from refseg.pipeline.dataflow.capacity import ClusterCapacity, NoGpuError
from refseg.pipeline.dataflow.settings import PipelineSettings, Resources

__all__ = [
    "CPU_MATCH_THREADS",
    "TEST_GPU_ACTORS_ON_CPU",
    "gpu_shares",
    "gpus_to_use",
    "plan",
]

log = logging.getLogger(__name__)

#: torch threads per cached-feature matching actor on CPU: matching without DINOv2 is many
#: small tensor operations, which extra threads slow down (BENCHMARKS.md, section 6).
CPU_MATCH_THREADS = 1

#: Tests only: GPU actors (which ask Ray for GPUs) run their torch code on the CPU, for
#: Ray's fake GPU nodes (``ray.cluster_utils.AutoscalingCluster``). Never set it otherwise.
TEST_GPU_ACTORS_ON_CPU = "REFSEG_TEST_GPU_ACTORS_ON_CPU"


class StageList(Protocol):
    """What the plan reads of a job's stage list (graph.LabelStages / RematchStages)."""

    pools: tuple[str, ...]

    @property
    def device(self) -> str: ...


def gpu_shares(gflop: dict[str, float] = STAGE_GFLOP_PER_IMAGE) -> tuple[float, float]:
    """(proposal, matching) fractions of one GPU, from each stage's FLOPs per image.

    The proposal share is rounded down to 0.01 and the matching share is the rest, so the
    two actors always fit on one GPU together.
    """
    total = gflop["propose"] + gflop["match"]
    propose = math.floor(100 * gflop["propose"] / total) / 100
    return propose, round(1.0 - propose, 2)


def _count(n: float) -> str:
    return f"{n:g} GPU" + ("" if n == 1 else "s")


def gpus_to_use(s: PipelineSettings, device: str, cap: ClusterCapacity) -> tuple[int, str]:
    """How many GPUs the job plans for (0: CPU) and why, in words.

    Raises:
        NoGpuError: ``device`` is ``cuda`` and the cluster can never have a GPU.
        ValueError: a device Ray jobs cannot run on, or ``cuda`` with ``max_gpus=0``.
    """
    wants = device.startswith("cuda")
    if device not in ("auto", "cpu") and not wants:
        raise ValueError(f"--device {device}: refseg's Ray jobs run on cpu, cuda or auto")
    if wants and s.max_gpus == 0:
        raise ValueError(f"--device {device} with --max-gpus 0: drop one of the two")
    if device == "cpu" or s.max_gpus == 0:
        return 0, "--device cpu" if device == "cpu" else "--max-gpus 0"
    if cap.local and cap.gpus < 1 and (wants or s.max_gpus):
        raise NoGpuError(
            f"--device {device}: this machine has no GPU that Ray sees (a local Ray, no "
            "autoscaler); run with --device cpu, or set RAY_ADDRESS to a GPU cluster"
        )
    if cap.max_gpus is not None:  # an autoscaler config says what the cluster can have
        if cap.max_gpus < 1:
            if wants:
                raise NoGpuError(
                    f"--device {device}: the Ray cluster has no GPU and {cap.source} has no "
                    "GPU node type; run with --device cpu, or give the cluster GPU workers"
                )
            return 0, f"no GPU node type in {cap.source}"
        if s.max_gpus and s.max_gpus < cap.max_gpus:
            return s.max_gpus, f"{_count(s.max_gpus)}: --max-gpus"
        return int(cap.max_gpus), f"{_count(cap.max_gpus)}: the most {cap.source} allows"
    if s.max_gpus:
        return s.max_gpus, f"{_count(s.max_gpus)}: --max-gpus"
    if cap.gpus >= 1:
        return int(cap.gpus), f"{_count(int(cap.gpus))}: the GPUs up now"
    if wants:
        return 1, f"1 GPU: --device {device}, none up yet and no autoscaler config found"
    return 0, "no GPU up, no autoscaler config with GPU node types, no --max-gpus"


def _cpu_plan(s: PipelineSettings, pools: tuple[str, ...], cap: ClusterCapacity) -> Resources:
    cpus = s.cpus_per_actor if s.cpus_per_actor is not None else 0.5
    # Every core to each actor: SAM2 takes ~90% of the model time, so the matching actor
    # mostly waits (2 CPUs, tiny preset: 46 s -> 35 s for 24 images; BENCHMARKS.md).
    threads = s.torch_threads or max(1, int(cap.cpus))
    match_threads = s.match_torch_threads or threads
    if "propose" not in pools:  # cached-feature matching: small ops, one thread by default
        match_threads = s.match_torch_threads or s.torch_threads or CPU_MATCH_THREADS
    return Resources(
        s.proposal_actors or 1,
        s.match_actors or 1,
        0.0,
        0.0,
        cpus,
        threads,
        "cpu",
        match_threads,
    )


def _pool(fixed: int | None, largest: int) -> tuple[int, int]:
    """(min, max) actors of a GPU pool: a size the user fixed, else 1 to ``largest``."""
    return (fixed, fixed) if fixed else (1, max(1, largest))


def _gpu_plan(s: PipelineSettings, pools: tuple[str, ...], gpus: int, basis: str) -> Resources:
    cpus = s.cpus_per_actor if s.cpus_per_actor is not None else 1.0
    threads, match_threads = s.torch_threads, s.match_torch_threads or s.torch_threads
    if "propose" not in pools:  # cached-feature matching: the one pool takes every GPU
        per = s.gpus_per_actor if s.gpus_per_actor is not None else 1.0
        low, high = _pool(s.match_actors, int(gpus / per))
        return Resources(
            proposal_actors=0,
            match_actors=high,
            gpus_per_proposal_actor=0.0,
            gpus_per_match_actor=per,
            cpus_per_actor=cpus,
            torch_threads=threads,
            device="cuda",
            match_torch_threads=match_threads,
            match_min_actors=low,
            gpus=gpus,
            basis=basis,
        )
    if s.gpus_per_actor is None:  # both actors on every GPU, shares by FLOPs
        propose, match = gpu_shares()
        p_largest = m_largest = gpus
    else:  # the user's fraction per actor: the GPU slots split in the FLOP ratio
        propose = match = s.gpus_per_actor
        slots = max(2, int(gpus / s.gpus_per_actor))
        p_largest = min(max(1, round(slots * gpu_shares()[0])), slots - 1)  # and one DINOv2
        m_largest = max(1, slots - p_largest)
    p_low, p_high = _pool(s.proposal_actors, p_largest)
    m_low, m_high = _pool(s.match_actors, m_largest)
    return Resources(
        proposal_actors=p_high,
        match_actors=m_high,
        gpus_per_proposal_actor=propose,
        gpus_per_match_actor=match,
        cpus_per_actor=cpus,
        torch_threads=threads,
        device="cuda",
        match_torch_threads=match_threads,
        proposal_min_actors=p_low,
        match_min_actors=m_low,
        gpus=gpus,
        basis=basis,
    )


def plan(s: PipelineSettings, stages: StageList, cap: ClusterCapacity) -> Resources:
    """The plan for a job's stage list on a cluster of this capacity (no waiting here)."""
    gpus, basis = gpus_to_use(s, stages.device, cap)
    if not gpus:
        return _cpu_plan(s, stages.pools, cap)
    res = _gpu_plan(s, stages.pools, gpus, basis)
    if os.environ.get(TEST_GPU_ACTORS_ON_CPU) == "1":
        log.warning("%s=1: GPU actors run their torch code on the CPU", TEST_GPU_ACTORS_ON_CPU)
        res = dataclasses.replace(res, device="cpu")
    return res
