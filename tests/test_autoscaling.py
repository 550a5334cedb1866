"""`refseg label` on Ray's autoscaler simulation: GPU workers from zero, pools that grow.

``ray.cluster_utils.AutoscalingCluster`` (as Ray's own autoscaler tests use it): a head with
2 CPUs and no GPU, a worker type ``gpu_worker`` with one fake GPU that the fake node
provider starts, from 0 to 2 nodes, as demand asks. Its autoscaling config is also written
to ``~/ray_bootstrap_config.yaml``, where ``ray up`` leaves it on a real head, and the job
runs with ``RAY_ADDRESS`` set, as a ``ray job submit`` driver on the head does.

``refseg label`` runs with the README's cluster flags (no device or GPU flag; tiny preset
and random weights to keep it cheap; half a GPU per actor, see GPU_SHARE) and
``REFSEG_TEST_GPU_ACTORS_ON_CPU=1``: its GPU actors ask Ray for the fake GPUs but run their
torch code on the CPU. Its first proposal call waits (a stage gate) until a proposal actor
lives on each worker, so the second worker always joins mid-job. Then:

* the autoscaler started GPU workers, and both model stages ran there (none on the head);
* every image is labelled exactly once;
* once the second worker joined, more actors worked (proposal batches ran on both nodes).

Ray's own ``AutoscalingCluster.start``/``shutdown`` run ``ray stop --force`` (every Ray on
the machine) and read an ``example.yaml`` the pip wheel lacks: the subclass below gives it a
complete config and starts and stops only its own head (tests/ray_head.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray.cluster_utils import AutoscalingCluster
from refseg.pipeline.dataflow.sources import FETCH_BLOCK_ROWS

from tests.faults_util import write_jpegs
from tests.ray_head import free_port, ray_head
from tests.stage_gate import WAIT_S, StageGate

# Blocks of FETCH_BLOCK_ROWS images: four, so that blocks still wait when the second proposal
# actor starts (the first, held, takes at most two). With 10 images (two blocks) the first
# actor took both, Ray Data's pool scaled the second down ("consumed all inputs") and no
# proposal ran on the second worker (seen under two busy loops).
IMAGES = 4 * FETCH_BLOCK_ROWS
MAX_NODES = 2
# Half a GPU per actor: 4 slots on the 2 GPUs, 3 SAM2 + 1 DINOv2 actors (FLOP ratio), and
# any placement fits. With the default shares (0.75 SAM2 + 0.25 DINOv2 per GPU) Ray may put
# both DINOv2 actors on one GPU, and the second SAM2 actor then fits on neither (seen under
# load: 1.25 of 2 GPUs used, a SAM2 actor pending until the job ended).
GPU_SHARE = 0.5
SLOTS = int(MAX_NODES / GPU_SHARE)
GPU_WORKER = {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0}


class FakeGpuCluster(AutoscalingCluster):
    """``AutoscalingCluster`` with its whole config here and a head of its own."""

    def __init__(self, head_resources: dict, worker_node_types: dict, **config) -> None:
        self.gcs_port = free_port()
        super().__init__(head_resources, worker_node_types, **config)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
        """What Ray's ``fake_multi_node/example.yaml`` holds, with these node types."""
        return {
            "cluster_name": "fake_multinode",
            "max_workers": MAX_NODES,
            "provider": {
                "type": "fake_multinode",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
                "gcs_address": f"127.0.0.1:{self.gcs_port}",  # not Ray's default 6379
            },
            "available_node_types": {
                **worker_node_types,
                "ray.head.default": {
                    "resources": head_resources,
                    "node_config": {},
                    "max_workers": 0,
                },
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 1.0,
            "docker": {},
            **{k: [] for k in ("initialization_commands", "setup_commands")},
            **{k: [] for k in ("head_setup_commands", "worker_setup_commands")},
            **{k: [] for k in ("head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            "rsync_exclude": [],
            "rsync_filter": [],
            **kw,
        }

    def run(self, home: Path, gate: StageGate):
        """``ray start --head`` with this config (a context manager yielding ray_head's info);
        the head, the nodes its autoscaler starts and their workers have ``gate`` on."""
        path = home / "ray_bootstrap_config.yaml"
        path.write_text(yaml.safe_dump(self._config))
        env = gate.env({k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
        env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            HOME=str(home),
        )
        head = self._config["available_node_types"]["ray.head.default"]["resources"]
        argv = [
            "--head",
            f"--autoscaling-config={path}",
            f"--num-cpus={head['CPU']}",
            f"--num-gpus={head.get('GPU', 0)}",
        ]
        return ray_head(argv, env, ports={"--port": self.gcs_port})


def _proposal_nodes(address: str) -> set[str]:
    """Nodes with a live proposal actor."""
    from ray.util.state import list_actors

    alive = list_actors(
        address=address,
        filters=[("state", "=", "ALIVE")],
        detail=True,
        limit=10_000,
        raise_on_missing_output=False,
    )
    return {a.node_id for a in _stage_actors(alive, "ProposalStage")}


def _hold_until_both_workers_propose(gate: StageGate, proc, address: str) -> None:
    """The job's first proposal call waits until a proposal actor lives on each GPU worker,
    so the second worker always joins mid-job (else a slow machine may finish the job on
    the first worker before the autoscaler's second node is up)."""
    gate.wait_held("propose", proc=proc)
    deadline = time.monotonic() + WAIT_S
    while len(nodes := _proposal_nodes(address)) < MAX_NODES:
        assert proc.poll() is None, "the job ended while its first proposal call was held"
        assert time.monotonic() < deadline, f"after {WAIT_S:.0f} s proposal actors on {nodes}"
        time.sleep(1)
    gate.release("propose")


@pytest.fixture(scope="module")
def labelled(tiny_setup, tmp_path_factory):
    """One `refseg label` on a fresh fake cluster; its outputs and the cluster's record."""
    from ray.util.state import list_actors, list_nodes, list_tasks

    root = tmp_path_factory.mktemp("autoscaling")
    home = root / "home"
    home.mkdir()
    write_jpegs(root / "images", IMAGES)
    cluster = FakeGpuCluster({"CPU": 2, "GPU": 0}, {"gpu_worker": GPU_WORKER | {"max_workers": 2}})
    gate = StageGate(root / "gate", propose=1)
    t0 = time.monotonic()
    with cluster.run(home, gate) as head:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            RAY_ADDRESS=head["gcs"],
            HOME=str(home),
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            REFSEG_TEST_GPU_ACTORS_ON_CPU="1",
        )
        argv = [sys.executable, "-m", "refseg.jobs", "label"]
        argv += ["--memory", tiny_setup["bank"], "--images", str(root / "images")]
        argv += ["--out", str(root / "out"), "--progress-interval", "60"]
        argv += ["--preset", "tiny", "--random-weights", "--gpu-wait-s", "300"]
        argv += ["--proposal-batch-size", "1", "--match-batch-size", "1"]
        argv += ["--gpus-per-actor", str(GPU_SHARE)]
        logs = root / "driver.out", root / "driver.err"
        with logs[0].open("w") as out, logs[1].open("w") as err:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True, cwd=root)
            try:
                _hold_until_both_workers_propose(gate, proc, head["dashboard"])
                proc.wait(timeout=900)
            finally:
                if proc.poll() is None:
                    proc.kill()
        stdout, stderr = (log.read_text() for log in logs)
        seconds = time.monotonic() - t0
        address = head["dashboard"]
        nodes = list_nodes(address=address, detail=True, raise_on_missing_output=False)
        actors = list_actors(address=address, detail=True, raise_on_missing_output=False)
        tasks = list_tasks(
            address=address,
            filters=[("type", "=", "ACTOR_TASK")],
            detail=True,
            limit=10_000,
            raise_on_missing_output=False,
        )
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]
    return {
        "out": root / "out",
        "stdout": stdout,
        "stderr": stderr,
        "nodes": nodes,
        "actors": actors,
        "tasks": tasks,
        "seconds": seconds,
    }


def _gpu_nodes(nodes) -> set[str]:
    return {n.node_id for n in nodes if n.resources_total.get("GPU", 0) > 0}


def _stage_actors(actors, stage: str):
    return [a for a in actors if stage in a.class_name]


def test_the_autoscaler_started_gpu_workers_and_both_stages_ran_there(labelled):
    gpu_nodes = _gpu_nodes(labelled["nodes"])
    assert len(gpu_nodes) == MAX_NODES, labelled["nodes"]
    for stage in ("ProposalStage", "MatchStage"):
        # placed actors (one Ray Data scaled down before any node took it has no node)
        where = {
            a.actor_id[-8:]: (a.node_id, a.state) for a in _stage_actors(labelled["actors"], stage)
        }
        placed = {node for node, _ in where.values() if node}
        assert placed and placed <= gpu_nodes, (stage, where, gpu_nodes)  # never the head
    record = json.loads((labelled["out"] / "run.json").read_text())
    res = record["config"]["resources"]
    assert res["gpus"] == MAX_NODES and "autoscaling config" in res["basis"]
    assert (res["proposal_min_actors"], res["proposal_actors"]) == (1, SLOTS - 1)
    assert (res["match_min_actors"], res["match_actors"]) == (1, 1)
    assert res["gpus_per_proposal_actor"] == res["gpus_per_match_actor"] == GPU_SHARE
    print(f"\nrefseg label on the fake cluster: {labelled['seconds']:.0f} s; resources {res}")


def test_every_image_is_labelled_exactly_once(labelled):
    record = json.loads((labelled["out"] / "run.json").read_text())
    assert record["counts"]["total"] == {"images": IMAGES, "ok": IMAGES, "errors": 0} | {
        "instances": record["counts"]["total"]["instances"]
    }
    assert record["counts"]["duplicate_rows_removed"] == 0
    coco = json.loads((labelled["out"] / "coco_dataset.json").read_text())
    names = [Path(im["file_name"]).name for im in coco["images"]]
    assert sorted(names) == [f"img_{i:03d}.jpg" for i in range(IMAGES)]
    assert f"refseg label: {IMAGES} images ({IMAGES} ok, 0 errors)" in labelled["stdout"]


def test_more_actors_work_once_the_second_worker_joins(labelled):
    ran = [
        t
        for t in labelled["tasks"]
        if "ProposalStage" in (t.func_or_class_name or t.name)
        and t.state == "FINISHED"
        and (t.actor_id and t.node_id)
    ]
    by_node = {t.node_id for t in ran}
    by_actor = {t.actor_id for t in ran}
    assert len(by_node) == MAX_NODES and len(by_actor) >= MAX_NODES, ran
    per_node = {n[-6:]: sum(t.node_id == n for t in ran) for n in by_node}
    print(f"\nproposal tasks per node: {per_node}")
