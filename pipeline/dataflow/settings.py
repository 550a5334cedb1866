"""Batch sizes, pool sizes and resources of the labelling job, with defaults per hardware."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PipelineSettings", "Resources"]


@dataclass(frozen=True)
class Resources:
    """What each stage asks Ray for, resolved against the cluster."""

    proposal_actors: int
    match_actors: int
    gpus_per_proposal_actor: float
    gpus_per_match_actor: float
    cpus_per_actor: float
    torch_threads: int | None
    device: str
    match_torch_threads: int | None = None  # None: as torch_threads


@dataclass(frozen=True)
class PipelineSettings:
    """Knobs of the dataset graph. ``None`` means: choose from the cluster's resources.

    On GPU clusters each actor takes one GPU (two pools share a lone GPU by halves): SAM2
    proposals get most GPUs since they carry ~85% of the FLOPs. On CPU, one actor per pool
    with fractional CPUs so that read, decode and write tasks always find a CPU (a 2-CPU
    job whose actors take a whole CPU each hangs with no error), and torch threads equal to
    the CPUs (``torch_threads`` sets them).
    """

    decode_batch_size: int = 4
    proposal_batch_size: int = 2
    match_batch_size: int = 4
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

    def resolve(self, cluster_gpus: float, cluster_cpus: float) -> Resources:
        gpus = int(cluster_gpus)
        if gpus >= 1:
            per = self.gpus_per_actor if self.gpus_per_actor is not None else 1.0
            if gpus == 1 and self.gpus_per_actor is None:
                per = 0.5  # one GPU: the two pools share it
            match = self.match_actors or max(1, round(gpus / per / 5))
            proposal = self.proposal_actors or max(1, int(gpus / per) - match)
            return Resources(
                proposal,
                match,
                per,
                per,
                self.cpus_per_actor or 1.0,
                self.torch_threads,
                "cuda",
                self.match_torch_threads or self.torch_threads,
            )
        cpus = self.cpus_per_actor if self.cpus_per_actor is not None else 0.5
        # Every core to each actor: SAM2 takes ~90% of the model time, so the matching
        # actor mostly waits (2 CPUs, tiny preset: 46 s -> 35 s for 24 images; BENCHMARKS.md).
        threads = self.torch_threads or max(1, int(cluster_cpus))
        return Resources(
            self.proposal_actors or 1,
            self.match_actors or 1,
            0.0,
            0.0,
            cpus,
            threads,
            "cpu",
            self.match_torch_threads or threads,
        )
