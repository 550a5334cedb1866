"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
# The image a user builds from the Dockerfile and pushes (its tag is refseg's version)
REFSEG_IMAGE = "ghcr.io/YOUR_ORG/refseg:0.1.0"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_schema(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_has_gpu_workers_that_autoscale_from_zero(config):
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert workers["resources"]["GPU"] >= 1  # the job reads GPU node types from here
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["GPU"] == 0  # no models on the head
    assert config["idle_timeout_minutes"] > 0  # idle GPU nodes are released


def test_cluster_yaml_runs_the_refseg_image_and_installs_nothing_on_the_nodes(config):
    image = config["docker"]["image"]
    assert image == REFSEG_IMAGE  # what README's `docker build -t` makes from the Dockerfile
    assert f"docker build -t {image} ." in (ROOT / "README.md").read_text()
    assert not config.get("setup_commands")  # refseg is in the image (deploy/install.sh)
    assert "--gpus all" not in str(config["docker"])  # the CPU head has no GPU to give


def test_schema_check_rejects_a_broken_config(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_the_head_autoscaler_reads_the_config_a_job_reads(config):
    """`ray up` writes the prepared config to ~/ray_bootstrap_config.yaml on the head, its
    autoscaler reads it, and so does a refseg job's resource plan (capacity.py)."""
    from refseg.pipeline.dataflow.capacity import BOOTSTRAP_CONFIG, autoscaler_gpus

    (line,) = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert f"--autoscaling-config=~/{BOOTSTRAP_CONFIG}" in line
    workers = config["available_node_types"]["gpu_worker"]
    expected = workers["max_workers"] * workers["resources"]["GPU"]
    assert autoscaler_gpus(prepare_config(copy.deepcopy(config))) == expected == 128
