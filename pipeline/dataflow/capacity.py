"""What the Ray cluster can provide, not only what is up when the job starts.

An autoscaling cluster (``cluster.yaml``, KubeRay) starts with no GPU node; its GPU workers
appear when work asks for GPUs. The resource plan (``graph.plan_resources``) therefore reads,
besides ``ray.cluster_resources()``, the most GPUs the cluster's autoscaler can start, from
the first of:

1. the autoscaler's cluster config in the GCS (``node_group_configs``), where the Ray
   version and the autoscaler report one (Ray Data reads the same);
2. the autoscaling config the cluster launcher writes on the head node,
   ``~/ray_bootstrap_config.yaml`` (``ray up``; ``cluster.yaml`` starts the head's
   autoscaler with that file): a ``ray job submit`` driver runs on the head.

Neither is there on a local Ray, on a fixed cluster, or on KubeRay with Ray 2.60 (say the
count with ``--max-gpus``). :func:`wait_for_gpu` bounds the wait for the first GPU node.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml

__all__ = [
    "BOOTSTRAP_CONFIG",
    "ClusterCapacity",
    "NoGpuError",
    "autoscaler_gpus",
    "read_capacity",
    "wait_for_gpu",
]

log = logging.getLogger(__name__)

#: Where ``ray up`` leaves the autoscaling config on the head node (relative to its home).
BOOTSTRAP_CONFIG = "ray_bootstrap_config.yaml"


class NoGpuError(ValueError):
    """The job is to run on GPUs that the cluster does not have and cannot start."""


@dataclass(frozen=True)
class ClusterCapacity:
    """The cluster's resources now and the most GPUs it can provide.

    Attributes:
        cpus, gpus: what ``ray.cluster_resources()`` reports now.
        max_gpus: the most GPUs the cluster can have (up now or startable by its
            autoscaler); ``None`` when nothing says (no autoscaler config found).
        source: where ``max_gpus`` comes from, for messages and run.json.
        local: a Ray this process started on this machine (no autoscaler, ever).
    """

    cpus: float
    gpus: float
    max_gpus: float | None = None
    source: str = "the nodes up now"
    local: bool = False


def autoscaler_gpus(config: Mapping[str, Any]) -> float:
    """The most GPUs an autoscaling config's node types can give at once.

    Args:
        config: a Ray cluster launcher / autoscaler config (``available_node_types``,
            ``head_node_type``, optional top-level ``max_workers``).

    Returns:
        the head's GPUs plus each worker type's ``max_workers`` x its ``GPU`` resource,
        counting the types with the most GPUs per node first and at most ``max_workers``
        worker nodes in all.
    """
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    total = float((types.get(head, {}).get("resources") or {}).get("GPU", 0))
    nodes_left = config.get("max_workers", math.inf)
    workers = [
        (float((spec.get("resources") or {}).get("GPU", 0)), int(spec.get("max_workers", 0)))
        for name, spec in types.items()
        if name != head
    ]
    for per_node, count in sorted(workers, reverse=True):
        if per_node <= 0 or nodes_left <= 0:
            continue
        take = min(count, nodes_left)
        total += per_node * take
        nodes_left -= take
    return total


def _from_gcs() -> float | None:
    """The GPUs of the autoscaler's cluster config in the GCS, if one was reported."""
    try:
        from ray._private.state import state

        limits = state.get_max_resources_from_cluster_config()
    except Exception as exc:  # a private API: its absence must not stop a job
        log.debug("no cluster config from the GCS: %s", exc)
        return None
    return None if limits is None else float(limits.get("GPU", 0))


def _from_bootstrap_config(path: Path) -> float | None:
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
        return autoscaler_gpus(config)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as exc:
        log.warning("could not read the autoscaling config %s: %s", path, exc)
        return None


def read_capacity(resources: Mapping[str, float] | None = None) -> ClusterCapacity:
    """The connected cluster's capacity (``ray.init`` done).

    Args:
        resources: ``ray.cluster_resources()`` if the caller has it already.
    """
    now = dict(resources) if resources is not None else ray.cluster_resources()
    cpus, gpus = float(now.get("CPU", 0)), float(now.get("GPU", 0))
    local = not os.environ.get("RAY_ADDRESS")  # refseg starts a local Ray without it
    most = _from_gcs()
    if most is not None:
        return ClusterCapacity(cpus, gpus, max(most, gpus), "the autoscaler's cluster config")
    path = Path.home() / BOOTSTRAP_CONFIG
    most = _from_bootstrap_config(path)
    if most is not None:
        return ClusterCapacity(cpus, gpus, max(most, gpus), f"the autoscaling config {path}")
    return ClusterCapacity(cpus, gpus, None, "the nodes up now", local)


@ray.remote(num_cpus=0)
class _GpuProbe:
    """Holds a share of a GPU; ready once a node with a GPU has taken it."""

    def ready(self) -> bool:
        return True


def wait_for_gpu(share: float, timeout_s: float, plan: str) -> float:
    """Wait until a GPU node has joined; returns the seconds waited.

    A probe actor asks Ray for ``share`` of a GPU (so an autoscaler starts a GPU node) and
    is killed once placed (its node stays up for the job's own actors).

    Raises:
        NoGpuError: no GPU within ``timeout_s`` (one line: what was asked and why it may
            not come).
    """
    log.warning("waiting up to %.0f s for a GPU node (%s)", timeout_s, plan)
    start = time.monotonic()
    probe = _GpuProbe.options(num_gpus=share).remote()
    try:
        ray.get(probe.ready.remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise NoGpuError(
            f"no GPU joined the Ray cluster within {timeout_s:.0f} s ({plan}): its "
            "autoscaler has no GPU node type or could not start one (see `ray status`); "
            "run with --device cpu, or give the cluster GPU workers, or wait longer with "
            "--gpu-wait-s"
        ) from None
    finally:
        ray.kill(probe)
    return time.monotonic() - start
