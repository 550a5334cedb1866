"""cluster.yaml is a valid Ray cluster launcher config (Ray's own schema)."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_ray_schema(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_has_gpu_workers_that_autoscale_and_install_refseg(config):
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert config["head_node_type"] == "head"
    setup = "\n".join(config["setup_commands"])
    assert "--no-build-isolation sam2" in setup
    assert "/home/ray/refseg" in setup


def test_schema_check_rejects_a_broken_config(config):
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))
