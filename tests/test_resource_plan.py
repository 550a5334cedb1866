"""The resource plan: from what the cluster can provide, the one policy of label and rematch.

Tables of cluster capacities (no Ray needed) and what each pool then asks for; the bounded
wait for a GPU on a local 2-CPU Ray; ``refseg label --device cuda`` refused on a machine
without a GPU rather than run on its CPU.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import pytest
import yaml
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.sizing import STAGE_GFLOP_PER_IMAGE
from refseg.pipeline.dataflow.capacity import (
    ClusterCapacity,
    NoGpuError,
    autoscaler_gpus,
    read_capacity,
    wait_for_gpu,
)
from refseg.pipeline.dataflow.graph import (
    MATCH_BATCH_GPU,
    LabelStages,
    RematchStages,
    match_batch,
    plan_resources,
)
from refseg.pipeline.dataflow.planning import TEST_GPU_ACTORS_ON_CPU, gpu_shares
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.storage import resolve

ROOT = Path(__file__).resolve().parents[1]
# cluster.yaml when a job starts: the CPU head up, 16 p5 nodes of 8 GPUs startable
DOCUMENTED = ClusterCapacity(8, 0, 128, "the autoscaling config ~/ray_bootstrap_config.yaml")
LOCAL_CPU = ClusterCapacity(2, 0, None, local=True)


def _label(device: str = "auto") -> LabelStages:
    return LabelStages(ModelConfig(device=device), MethodConfig(), b"")


def _rematch(device: str = "auto") -> RematchStages:
    return RematchStages(MethodConfig(), b"", resolve("/tmp"), device)


def _plan(cap: ClusterCapacity, device: str = "auto", stages=None, **settings):
    return plan_resources(PipelineSettings(**settings), stages or _label(device), cap)


def test_a_local_cpu_machine_plans_as_before():
    res = _plan(LOCAL_CPU)
    assert (res.device, res.gpus, res.proposal_actors, res.match_actors) == ("cpu", 0, 1, 1)
    assert (res.gpus_per_proposal_actor, res.gpus_per_match_actor) == (0.0, 0.0)
    assert (res.cpus_per_actor, res.torch_threads, res.match_torch_threads) == (0.5, 2, 2)
    assert res.proposal_min_actors is None and res.match_min_actors is None  # fixed pools
    res = _plan(ClusterCapacity(4, 0, local=True), match_torch_threads=1)
    assert (res.torch_threads, res.match_torch_threads) == (4, 1)


def test_matching_takes_one_image_per_call_on_the_cpu_and_more_on_gpus():
    """Each image's proposals are held while its batch is matched: on the CPU one at a time
    (the job's PSS at ntt 10.65 -> 8.58 GiB, BENCHMARKS section 10); the user's size wins."""
    assert match_batch(PipelineSettings(), _plan(LOCAL_CPU)) == 1
    assert match_batch(PipelineSettings(), _plan(DOCUMENTED)) == MATCH_BATCH_GPU > 1
    for cap in (LOCAL_CPU, DOCUMENTED):
        assert match_batch(PipelineSettings(match_batch_size=3), _plan(cap)) == 3


def test_the_documented_cluster_asks_for_gpus_before_any_is_up():
    res = _plan(DOCUMENTED)
    assert res.device == "cuda" and res.gpus == 128
    assert "autoscaling config" in res.basis
    # every GPU hosts one SAM2 and one DINOv2 actor; pools from 1 up to one per GPU
    assert (res.proposal_min_actors, res.proposal_actors) == (1, 128)
    assert (res.match_min_actors, res.match_actors) == (1, 128)
    assert res.gpus_per_proposal_actor + res.gpus_per_match_actor <= 1.0
    assert res.cpus_per_actor == 1.0


def test_the_gpu_split_follows_the_measured_flops():
    propose, match = gpu_shares()
    share = STAGE_GFLOP_PER_IMAGE["propose"] / sum(STAGE_GFLOP_PER_IMAGE.values())
    assert propose <= share < propose + 0.01 and propose + match <= 1.0
    assert gpu_shares({"propose": 1.0, "match": 1.0}) == (0.5, 0.5)
    assert gpu_shares({"propose": 85.0, "match": 15.0}) == (0.85, 0.15)
    res = _plan(DOCUMENTED)
    assert (res.gpus_per_proposal_actor, res.gpus_per_match_actor) == (propose, match)


@pytest.mark.parametrize(
    ("cap", "max_gpus", "gpus", "basis"),
    [
        (DOCUMENTED, 16, 16, "--max-gpus"),  # bounded by the user
        (DOCUMENTED, 500, 128, "autoscaling config"),  # never more than the cluster has
        (ClusterCapacity(64, 4), None, 4, "GPUs up now"),  # a fixed cluster
        (ClusterCapacity(64, 0), 8, 8, "--max-gpus"),  # KubeRay: no config, the user says
    ],
)
def test_how_many_gpus(cap, max_gpus, gpus, basis):
    res = _plan(cap, max_gpus=max_gpus)
    assert res.gpus == gpus and basis in res.basis
    assert res.proposal_actors == res.match_actors == gpus


def test_cpu_when_asked_or_when_nothing_says_gpu():
    assert _plan(DOCUMENTED, "cpu").device == "cpu"
    assert _plan(DOCUMENTED, max_gpus=0).device == "cpu"
    assert _plan(ClusterCapacity(8, 0)).device == "cpu"  # remote, nothing known: as before
    no_gpu_types = ClusterCapacity(8, 0, 0, "the autoscaling config X")
    assert _plan(no_gpu_types).device == "cpu"


@pytest.mark.parametrize(
    ("cap", "message"),
    [
        (LOCAL_CPU, "--device cuda: this machine has no GPU that Ray sees"),
        (
            ClusterCapacity(8, 0, 0, "the autoscaling config X"),
            "--device cuda: the Ray cluster has no GPU and the autoscaling config X has no "
            "GPU node type",
        ),
    ],
)
def test_cuda_the_cluster_can_never_provide_is_refused_at_once(cap, message):
    with pytest.raises(NoGpuError) as err:
        _plan(cap, "cuda")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cuda_is_honoured_where_gpus_may_come():
    res = _plan(ClusterCapacity(8, 0), "cuda")  # remote, unknown autoscaler: one GPU
    assert (res.device, res.gpus) == ("cuda", 1) and "--max-gpus" not in res.basis
    assert _plan(DOCUMENTED, "cuda:1").device == "cuda"  # Ray gives each actor its GPU


def test_bad_device_requests_are_one_line_errors():
    with pytest.raises(ValueError, match="--device cuda with --max-gpus 0"):
        _plan(DOCUMENTED, "cuda", max_gpus=0)
    with pytest.raises(ValueError, match="--device mps: refseg's Ray jobs run on"):
        _plan(DOCUMENTED, "mps")


def test_user_fixed_sizes_and_whole_gpus():
    res = _plan(DOCUMENTED, proposal_actors=3, max_gpus=8)
    assert (res.proposal_min_actors, res.proposal_actors) == (3, 3)  # fixed by the user
    assert (res.match_min_actors, res.match_actors) == (1, 8)
    res = _plan(DOCUMENTED, gpus_per_actor=1.0, max_gpus=8)  # whole GPUs: pools in FLOP ratio
    assert (res.proposal_actors, res.match_actors) == (6, 2)
    assert res.gpus_per_proposal_actor == res.gpus_per_match_actor == 1.0


def test_rematch_plans_through_the_same_policy():
    res = _plan(DOCUMENTED, stages=_rematch())
    assert (res.device, res.gpus, res.match_actors, res.match_min_actors) == ("cuda", 128, 128, 1)
    assert (res.proposal_actors, res.gpus_per_match_actor) == (0, 1.0)
    res = _plan(LOCAL_CPU, stages=_rematch())
    assert (res.device, res.match_actors, res.match_torch_threads) == ("cpu", 1, 1)
    with pytest.raises(NoGpuError):
        _plan(LOCAL_CPU, stages=_rematch("cuda"))


def test_the_test_only_switch_runs_gpu_actors_on_the_cpu(monkeypatch):
    monkeypatch.setenv(TEST_GPU_ACTORS_ON_CPU, "1")
    res = _plan(DOCUMENTED)
    assert res.device == "cpu" and res.gpus == 128 and res.gpus_per_proposal_actor > 0


# ------------------------------------------------------------------ reading the cluster


def test_autoscaler_gpus_of_cluster_yaml():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    workers = config["available_node_types"]["gpu_worker"]
    assert autoscaler_gpus(config) == workers["max_workers"] * workers["resources"]["GPU"]
    small = {**config, "max_workers": 3}
    assert autoscaler_gpus(small) == 3 * workers["resources"]["GPU"]  # at most 3 nodes
    no_gpu = {**config, "available_node_types": {"head": config["available_node_types"]["head"]}}
    assert autoscaler_gpus(no_gpu) == 0


def test_read_capacity_finds_the_bootstrap_config_on_the_head(tmp_path, monkeypatch):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (tmp_path / "ray_bootstrap_config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a job on a cluster, not a local Ray
    cap = read_capacity({"CPU": 8.0})
    assert (cap.gpus, cap.max_gpus, cap.local) == (0.0, 128.0, False)
    assert str(tmp_path / "ray_bootstrap_config.yaml") in cap.source
    (tmp_path / "ray_bootstrap_config.yaml").unlink()
    assert read_capacity({"CPU": 8.0}).max_gpus is None
    monkeypatch.delenv("RAY_ADDRESS")
    assert read_capacity({"CPU": 2.0}).local


def test_the_wait_for_a_gpu_is_bounded(ray_local):
    t0 = time.monotonic()
    with pytest.raises(NoGpuError) as err:
        wait_for_gpu(0.5, 2.0, "1 GPU: --device cuda")
    assert time.monotonic() - t0 < 30  # the bound, not a speed target
    assert str(err.value).startswith("no GPU joined the Ray cluster within 2 s (1 GPU:")
    assert "\n" not in str(err.value)


def test_refseg_label_device_cuda_without_a_gpu_is_refused(tiny_setup, tmp_path):
    """Before: the job ran on the CPU and exited 0; now one line and exit 2."""
    from refseg.jobs.cli import main

    from tests.faults_util import write_jpegs

    write_jpegs(tmp_path / "images", 1)
    argv = ["label", "--memory", tiny_setup["bank"], "--images", str(tmp_path / "images")]
    argv += ["--out", str(tmp_path / "out"), "--preset", "tiny", "--random-weights"]
    argv += ["--num-cpus", "2", "--device", "cuda"]
    err = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        rc = main(argv)
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("refseg label: error:")]
    assert rc == 2 and lines == [
        "refseg label: error: --device cuda: this machine has no GPU that Ray sees (a local "
        "Ray, no autoscaler); run with --device cpu, or set RAY_ADDRESS to a GPU cluster"
    ]
