"""`refseg sample-references`, `build-memory` and `label`, end to end through ``main(argv)``.

CPU only: the tiny preset with random weights, small generated images and COCO files. The
labelling tests share one module-scoped run (one local Ray with 2 CPUs). evaluate,
checkpoints, help, usage errors and version are in ``test_cli_no_model.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from pycocotools.coco import COCO
from refseg.core.memory_bank import MemoryBank
from refseg.jobs.cli import build_parser, main

from tests.cli_util import BOX, TRI, _run, make_dataset

TINY = ["--preset", "tiny", "--random-weights"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _sample(gt: Path, out: Path, *, split: str, seed: int = 0, shots: int = 2) -> Path:
    rc, _, err = _run(
        ["sample-references", "--annotations", str(gt), "--shots", str(shots),
         "--seed", str(seed), "--split", split, "--out", str(out)]
    )  # fmt: skip
    assert rc == 0, err
    return out


# ------------------------------------------------------------------ sample-references


def test_sample_references_same_seed_same_bytes(dataset, tmp_path):
    a = _sample(dataset, tmp_path / "a.json", split="box,7", seed=3)
    b = _sample(dataset, tmp_path / "b.json", split="box,7", seed=3)
    assert a.read_bytes() == b.read_bytes()
    refs = json.loads(a.read_bytes())
    assert sorted({x["category_id"] for x in refs["annotations"]}) == [BOX, TRI]
    assert len(refs["annotations"]) == 4 and refs["info"]["seed"] == 3

    def chosen(seed: int) -> list[int]:
        path = _sample(dataset, tmp_path / f"s{seed}.json", split="box,7", seed=seed)
        return [x["id"] for x in json.loads(path.read_text())["annotations"]]

    assert any(chosen(s) != chosen(3) for s in range(4, 9))  # 2 of 6 candidates per class


def test_sample_references_unknown_split_is_a_clear_error(dataset, tmp_path):
    rc, _, err = _run(
        ["sample-references", "--annotations", str(dataset), "--shots", "1",
         "--split", "coco-fsod-novel", "--out", str(tmp_path / "r.json")]
    )  # fmt: skip
    assert rc == 2
    assert err.startswith("refseg sample-references: error: split 'coco-fsod-novel'")
    assert "Traceback" not in err and not (tmp_path / "r.json").exists()


# ----------------------------------------------------------------------- build-memory


def _build(refs: Path, images: Path, bank: Path, *extra: str) -> tuple[int, str, str]:
    return _run(
        ["build-memory", "--references", str(refs), "--images", str(images),
         "--out", str(bank), *TINY, *extra]
    )  # fmt: skip


def test_build_memory_then_add_a_class(dataset, tmp_path):
    root = dataset.parent
    refs_box = _sample(dataset, tmp_path / "box.json", split="box", shots=2)
    refs_tri = _sample(dataset, tmp_path / "tri.json", split="tri", shots=3)
    bank_path = tmp_path / "bank.safetensors"
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        rc = main(["build-memory", "--references", str(refs_box), "--images", str(root),
                   "--out", str(bank_path), *TINY])  # fmt: skip
    assert rc == 0
    first = MemoryBank.load(str(bank_path))
    assert first.category_ids == [BOX] and len(first) == 2
    assert first.meta["random_weights"] is True and first.meta["preset"] == "tiny"
    assert first.meta["dinov2_model"] == "vits14" and "created" in first.meta
    assert first.meta["dinov2_sha256"] is None and first.meta["dinov2_checkpoint"] is None

    rc, out, err = _build(refs_tri, root, bank_path, "--add")
    assert rc == 0, err
    assert "2 classes, 5 shots (+1 classes, +3 shots)" in out
    both = MemoryBank.load(str(bank_path))
    assert both.category_ids == [BOX, TRI] and both.names == {BOX: "box", TRI: "tri"}
    assert torch.equal(both.shots[BOX], first.shots[BOX])  # bit for bit
    assert both.shots[TRI].shape == (3, first.dim)
    assert both.meta["created"] == first.meta["created"] and "updated" in both.meta

    before = bank_path.read_bytes()
    rc, out, err = _build(refs_tri, root, bank_path, "--add")
    assert rc == 0, err
    assert "3 shots already in" in out and "nothing new to add" in out
    assert bank_path.read_bytes() == before


def test_build_memory_refuses_a_bank_of_other_weights(dataset, tmp_path):
    refs = _sample(dataset, tmp_path / "box.json", split="box", shots=1)
    bank = MemoryBank(encoder="vits14", image_size=112, meta={"random_weights": False})
    bank.save(str(tmp_path / "bank"))
    rc, _, err = _build(refs, dataset.parent, tmp_path / "bank", "--add")
    assert rc == 2 and "other DINOv2 weights" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # a missing checkpoint says where to get it
        (["--preset", "tiny"], "refseg checkpoints download dinov2_vits14"),
        # a bad path names the path
        ([*TINY, "--references", "{tmp}/missing.json"], "{tmp}/missing.json"),
        ([*TINY, "--add", "--out", "{tmp}/no-bank"], "{tmp}/no-bank"),
        ([*TINY, "--images", "{tmp}/no-images"], "{tmp}/no-images/im"),
    ],
)
def test_build_memory_errors_are_one_clear_line(dataset, tmp_path, argv, expected):
    refs = _sample(dataset, tmp_path / "refs.json", split="box", shots=1)
    base = ["--references", str(refs), "--images", str(dataset.parent), "--out",
            str(tmp_path / "bank"), "--cache-dir", str(tmp_path / "empty-cache")]  # fmt: skip
    rc, _, err = _run(["build-memory", *base, *(a.format(tmp=tmp_path) for a in argv)])
    assert rc == 2
    assert err.startswith("refseg build-memory: error: ")
    assert expected.format(tmp=tmp_path) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- label


@pytest.fixture(scope="module")
def label_run(dataset, tmp_path_factory):
    """One labelling run of 4 images (COCO targets, so image ids are the GT's)."""
    import ray

    started_here = not ray.is_initialized()
    tmp = tmp_path_factory.mktemp("label")
    root = dataset.parent
    gt = json.loads(dataset.read_text())
    targets = {**gt, "images": gt["images"][:4], "annotations": []}
    (tmp / "targets.json").write_text(json.dumps(targets))
    refs = _sample(dataset, tmp / "refs.json", split="box,tri", shots=1)
    rc, _, err = _build(refs, root, tmp / "bank")
    assert rc == 0, err
    out = tmp / "out"
    argv = ["label", "--memory", str(tmp / "bank"), "--images", str(root), "--out", str(out),
            "--targets", str(tmp / "targets.json"), *TINY, "--num-cpus", "2",
            "--write-batch-size", "2", "--proposal-batch-size", "2"]  # fmt: skip
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        rc, stdout, stderr = _run_raw(argv)
    yield {"rc": rc, "stdout": stdout, "stderr": stderr, "out": out, "gt": dataset, "tmp": tmp}
    if started_here:
        ray.shutdown()


def _run_raw(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_label_writes_outputs_and_summary(label_run):
    assert label_run["rc"] == 0, label_run["stderr"]
    assert re.search(r"refseg label: 4 images \(4 ok, 0 errors\)", label_run["stdout"])
    out: Path = label_run["out"]
    assert (out / "instances").is_dir()
    images = pq.read_table(out / "images").to_pylist()
    assert sorted(r["image_id"] for r in images) == [101, 102, 103, 104]
    assert {r["status"] for r in images} == {"ok"}
    results = json.loads((out / "coco_results.json").read_text())
    assert len(results) == sum(r["n_instances"] for r in images)
    if results:
        gt = COCO(str(label_run["gt"]))
        loaded = gt.loadRes(results)
        assert {a["image_id"] for a in loaded.dataset["annotations"]} <= {101, 102, 103, 104}
        assert len(loaded.dataset["annotations"]) == len(results)
    record = json.loads((out / "run.json").read_text())
    assert record["random_weights"] is True and record["warnings"]
    assert record["preset"] == "tiny"
    assert record["config"]["pipeline"]["write_batch_size"] == 2


def test_evaluate_a_run_folder_uses_the_banks_classes(label_run):
    out = label_run["out"]
    rc, stdout, err = _run(
        ["evaluate", "--results", str(out), "--ground-truth", str(label_run["gt"])]
    )
    assert rc == 0, err
    assert "categories: the run's memory bank" in stdout
    saved = json.loads((out / "eval.json").read_text())
    assert saved["inputs"]["category_ids"] == [BOX, TRI]
    assert set(saved) >= {"bbox", "segm"} and len(saved["segm"]["stats"]) == 12


def test_label_category_clash_names_both_sides(dataset, tmp_path):
    refs = _sample(dataset, tmp_path / "refs.json", split="box", shots=1)
    assert _build(refs, dataset.parent, tmp_path / "bank")[0] == 0
    gt = json.loads(dataset.read_text())
    gt["categories"][0]["name"] = "crate"  # id 3 is "box" in the bank
    (tmp_path / "targets.json").write_text(json.dumps(gt))
    rc, _, err = _run(
        ["label", "--memory", str(tmp_path / "bank"), "--images", str(dataset.parent),
         "--out", str(tmp_path / "out"), "--targets", str(tmp_path / "targets.json"), *TINY]
    )  # fmt: skip
    assert rc == 2
    assert "'crate'" in err and "'box'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("extra", "expected", "traceback"),
    [
        ([*TINY], "memory bank not found: {tmp}/nowhere/bank", False),
        (["-v", *TINY], "memory bank not found: {tmp}/nowhere/bank", True),
        # no Ray is started: the missing checkpoint is found before, with where to get it
        (["--preset", "tiny"], "refseg checkpoints download sam2.1_hiera_tiny", False),
    ],
)
def test_label_errors_name_the_missing_file(tmp_path, extra, expected, traceback):
    rc, _, err = _run(
        ["label", *extra, "--memory", str(tmp_path / "nowhere" / "bank"), "--images",
         str(tmp_path), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    assert rc == 2
    assert "refseg label: error: " in err and expected.format(tmp=tmp_path) in err
    assert ("Traceback" in err) == traceback


def test_pipeline_settings_precedence(tmp_path):
    from refseg.jobs.cmd_label import PIPELINE_FLAGS, pipeline_settings
    from refseg.jobs.options import load_config_file
    from refseg.pipeline.dataflow.settings import PipelineSettings

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("pipeline:\n  write_batch_size: 7\n  decode-batch-size: 3\nnum_cpus: 5\n")
    args = build_parser().parse_args(
        ["label", "--memory", "m", "--images", "i", "--out", "o", "--config", str(cfg),
         "--decode-batch-size", "9"]
    )  # fmt: skip
    settings = pipeline_settings(args, load_config_file(str(cfg)))
    assert (settings.write_batch_size, settings.decode_batch_size) == (7, 9)
    assert settings.match_batch_size == PipelineSettings().match_batch_size
    assert set(PIPELINE_FLAGS) == {f for f in PipelineSettings.__dataclass_fields__}


def test_cpu_resources_threads_per_pool():
    from refseg.core.config import MethodConfig, ModelConfig
    from refseg.pipeline.dataflow.capacity import ClusterCapacity
    from refseg.pipeline.dataflow.graph import LabelStages, plan_resources
    from refseg.pipeline.dataflow.settings import PipelineSettings

    stages = LabelStages(ModelConfig(device="auto"), MethodConfig(), b"")
    r = plan_resources(PipelineSettings(), stages, ClusterCapacity(2, 0))
    assert (r.device, r.torch_threads, r.match_torch_threads) == ("cpu", 2, 2)
    r = plan_resources(PipelineSettings(match_torch_threads=1), stages, ClusterCapacity(4, 0))
    assert (r.torch_threads, r.match_torch_threads, r.cpus_per_actor) == (4, 1, 0.5)
    r = plan_resources(PipelineSettings(), stages, ClusterCapacity(64, 8))
    # every GPU hosts both pools (tests/test_resource_plan.py has the whole policy)
    assert (r.device, r.proposal_actors, r.match_actors) == ("cuda", 8, 8)
