"""Batch sizes, pool sizes and resources of the labelling job, with defaults per hardware."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PipelineSettings", "Resources"]


@dataclass(frozen=True)
class Resources:
    """What each stage asks Ray for (planned by ``graph.plan_resources``).

    ``proposal_actors`` / ``match_actors`` are each pool's largest size. A GPU pool
    (``*_min_actors`` set) starts at that size, its actors waiting for the GPU nodes an
    autoscaler adds, and gives idle actors back down to its minimum; a CPU pool
    (``*_min_actors`` None) has exactly that size. ``device`` is where the actors' torch
    code runs; ``gpus`` the most GPUs the plan uses (0: CPU) and ``basis`` why, in words.
    """

    proposal_actors: int
    match_actors: int
    gpus_per_proposal_actor: float
    gpus_per_match_actor: float
    cpus_per_actor: float
    torch_threads: int | None
    device: str
    match_torch_threads: int | None = None  # None: as torch_threads
    proposal_min_actors: int | None = None
    match_min_actors: int | None = None
    gpus: int = 0
    basis: str = ""


@dataclass(frozen=True)
class PipelineSettings:
    """Knobs of the dataset graph. ``None`` means: choose from what the cluster can provide.

    The policy is ``refseg.pipeline.dataflow.planning`` (run through
    ``graph.plan_resources``): on GPUs each GPU hosts a SAM2 and a DINOv2 actor, with GPU
    fractions in the ratio of their FLOPs per image, pools growing from one actor to one
    per planned GPU; ``max_gpus`` bounds the GPUs (0: CPU only) and ``gpu_wait_s`` the wait
    for the first GPU node. On CPU, one actor per pool with fractional CPUs so that read,
    decode and write tasks always find a CPU (a 2-CPU job whose actors take a whole CPU
    each hangs with no error), and torch threads equal to the CPUs (``torch_threads``).
    """

    decode_batch_size: int = 4
    proposal_batch_size: int = 2
    # None: one image per matching call on the CPU (the proposals of every image in a batch
    # are held while it is matched: at ntt, six images, a batch of 4 took the job's PSS to
    # 10.65 GiB, one to 8.58 GiB; BENCHMARKS section 10), graph.MATCH_BATCH_GPU on a GPU
    match_batch_size: int | None = None
    write_batch_size: int = 32
    proposal_actors: int | None = None
    match_actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    decode_cpus: float = 0.25
    write_cpus: float = 0.25
    torch_threads: int | None = None
    match_torch_threads: int | None = None
    max_pixels: int = 178_956_970  # PIL's own decompression-bomb limit (2x its warning size)
    max_gpus: int | None = None
    gpu_wait_s: float = 900.0
