"""The `refseg` commands that run no model, end to end through ``main(argv)``.

``evaluate`` on hand-made perfect results and with a missing ground truth, ``checkpoints
list`` and ``download`` against a local cache, ``--help`` of every subcommand, the parser's
registry, usage errors and ``version``. CPU only, no Ray; the generated COCO set is
``tests/cli_util.py``'s.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils
from refseg.jobs.cli import COMMANDS, Command, build_parser

from tests.cli_util import BOX, TRI, H, W, _run, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


# --------------------------------------------------------------------------- evaluate


def _perfect_results(gt: dict) -> list[dict]:
    results = []
    for a in gt["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], H, W))
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": a["bbox"], "score": 1.0, "segmentation": rle})  # fmt: skip
    return results


@pytest.mark.parametrize(("split", "classes"), [([], {BOX, TRI}), (["--split", "tri"], {TRI})])
def test_evaluate_perfect_results_give_ap_one(dataset, tmp_path, split, classes):
    results = tmp_path / "perfect.json"
    results.write_text(json.dumps(_perfect_results(json.loads(dataset.read_text()))))
    rc, stdout, err = _run(
        ["evaluate", "--results", str(results), "--ground-truth", str(dataset), *split]
    )
    assert rc == 0, err
    saved = json.loads((tmp_path / "perfect.eval.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert saved[iou_type]["stats"]["AP"] == pytest.approx(1.0)
        assert {int(k) for k in saved[iou_type]["per_class"]} == classes
    assert "Average Precision" in stdout and "100.00" in stdout


def test_evaluate_missing_ground_truth_names_it(dataset, tmp_path):
    results = tmp_path / "r.json"
    results.write_text("[]")
    rc, _, err = _run(
        ["evaluate", "--results", str(results), "--ground-truth", str(tmp_path / "gt.json")]
    )
    assert rc == 2 and f"ground truth not found: {tmp_path / 'gt.json'}" in err


# ------------------------------------------------------------------------ checkpoints


def test_checkpoints_list_and_download_from_cache(tmp_path):
    rc, out, _ = _run(["checkpoints", "list", "--cache-dir", str(tmp_path)])
    assert rc == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert {"sam2.1_hiera_large", "dinov2_vitl14"} <= set(rows)
    assert rows["sam2.1_hiera_tiny"][3] == "no"

    payload = b"not really a checkpoint"
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(payload)
    rc, out, err = _run(
        ["checkpoints", "download", "sam2.1_hiera_tiny", "--cache-dir", str(tmp_path)]
    )
    assert rc == 0, err
    assert "already cached" in out and hashlib.sha256(payload).hexdigest() in out
    rc, out, _ = _run(["checkpoints", "list", "--cache-dir", str(tmp_path)])
    assert (
        next(ln for ln in out.splitlines() if ln.startswith("sam2.1_hiera_tiny ")).split()[3]
        == "yes"
    )


def test_checkpoints_download_unknown_name(tmp_path):
    rc, out, err = _run(["checkpoints", "download", "sam3_giant", "--cache-dir", str(tmp_path)])
    assert rc == 2 and out == ""
    assert err.startswith("refseg checkpoints download: error: unknown checkpoint 'sam3_giant'")
    assert "sam2.1_hiera_large" in err


# --------------------------------------------------------------------- parser, version


def _subcommands() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    names = [[n] for n in sub.choices]
    return [*names, ["checkpoints", "list"], ["checkpoints", "download"]]


@pytest.mark.parametrize("argv", _subcommands(), ids=" ".join)
def test_help_of_every_subcommand(argv):
    rc, out, _ = _run([*argv, "--help"])
    assert rc == 0 and out.startswith("usage: refseg " + " ".join(argv))


def test_core_subcommands_are_registered():
    names = {a[0] for a in _subcommands()}
    assert {"sample-references", "build-memory", "label", "evaluate", "report",
            "checkpoints", "version"} <= names  # fmt: skip


def test_absent_command_module_is_left_out():
    ghost = Command("ghost", "refseg.jobs._no_such_module", "add", "run", "not written yet")
    parser = build_parser([ghost, *COMMANDS])
    sub = next(a for a in parser._actions if a.dest == "command")
    assert "ghost" not in sub.choices and "label" in sub.choices


@pytest.mark.parametrize(
    "argv", [[], ["label"], ["evaluate", "--results", "x"], ["no-such-command"]]
)
def test_usage_errors_exit_2(argv):
    rc, _, err = _run(argv)
    assert rc == 2 and "usage: refseg" in err


def test_version_lists_packages():
    rc, out, _ = _run(["version"])
    assert rc == 0
    assert re.search(r"^torch\s+\d", out, re.M) and re.search(r"^sam2\s+1\.1\.0", out, re.M)
