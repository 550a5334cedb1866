"""Tests of ``refseg demo`` (jobs/demo.py) and its sample dataset (jobs/sample_data.py).

The end-to-end test runs the real demo offline (tiny preset, random weights, local Ray) on 4
generated images and checks every artefact it prints.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refseg.core import rle as rle_ops
from refseg.core.coco import STAT_NAMES, load_coco
from refseg.core.sampling import passes_rules
from refseg.jobs import demo
from refseg.jobs.cli import main
from refseg.jobs.sample_data import CLASSES, make_sample_data


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("REFSEG_CACHE", str(cache))
    return cache


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------ sample data


def test_sample_data_is_deterministic_and_prefix_stable(tmp_path):
    a = make_sample_data(tmp_path / "a", n_images=3, seed=5)
    b = make_sample_data(tmp_path / "b", n_images=3, seed=5)
    c = make_sample_data(tmp_path / "c", n_images=5, seed=5)
    d = make_sample_data(tmp_path / "d", n_images=3, seed=6)
    assert _digest(a.images) == _digest(b.images)
    assert a.targets.read_text() == b.targets.read_text()
    assert _digest(a.references_dir) == _digest(b.references_dir)
    assert {k: v for k, v in _digest(c.images).items() if k in _digest(a.images)} == _digest(
        a.images
    )
    assert _digest(a.images) != _digest(d.images)


def test_sample_data_ground_truth(tmp_path):
    data = make_sample_data(tmp_path, n_images=6, seed=0)
    gt = load_coco(data.targets)
    assert [c["id"] for c in gt["categories"]] == [cid for cid, _, _ in CLASSES]
    assert len(gt["images"]) == 6 and all(a["iscrowd"] == 0 for a in gt["annotations"])
    assert {a["category_id"] for a in gt["annotations"]} <= {c for c, _, _ in CLASSES}
    per_image: dict[int, list[np.ndarray]] = {}
    for a in gt["annotations"]:
        mask = rle_ops.decode_rle(a["segmentation"])
        assert a["area"] == mask.sum() > 100
        assert a["bbox"] == rle_ops.rle_to_bbox([a["segmentation"]])[0].tolist()
        per_image.setdefault(a["image_id"], []).append(mask)
    for masks in per_image.values():  # shapes never overlap
        assert (np.sum(masks, axis=0) <= 1).all()
    for im in gt["images"]:
        img = np.asarray(Image.open(data.images / im["file_name"]))
        assert img.shape == (im["height"], im["width"], 3)
    refs = load_coco(data.references)
    images = {im["id"]: im for im in refs["images"]}
    counts = [sum(a["category_id"] == c for a in refs["annotations"]) for c, _, _ in CLASSES]
    assert counts == [2, 2, 2]
    assert all(passes_rules(a, images[a["image_id"]]) for a in refs["annotations"])


def test_sample_data_rejects_no_images(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        make_sample_data(tmp_path, n_images=0)


# ------------------------------------------------------------------ model choice


def _fail(name: str) -> None:
    raise urllib.error.URLError("no network")


def _fake_download(cache: Path):
    def download(name: str) -> None:
        (cache / demo.checkpoints.OFFICIAL[name].filename).write_bytes(b"weights")

    return download


@pytest.mark.parametrize(
    ("offline", "random_weights", "cached", "download", "official"),
    [
        (True, False, False, None, False),  # offline, nothing cached: random weights
        (False, False, False, "fail", False),  # download fails: random weights
        (False, False, False, "ok", True),  # downloaded
        (True, False, True, None, True),  # offline but cached
        (False, True, True, None, False),  # forced random weights
    ],
)
def test_choose_models(
    empty_cache, monkeypatch, offline, random_weights, cached, download, official
):
    if cached:
        _fake_download(empty_cache)(demo.DEMO_CHECKPOINTS["sam2"])
        _fake_download(empty_cache)(demo.DEMO_CHECKPOINTS["dinov2"])
    calls: list[str] = []

    def downloader(name: str) -> None:
        calls.append(name)
        (_fail if download == "fail" else _fake_download(empty_cache))(name)

    monkeypatch.setattr(demo, "_download", downloader)
    model, _, note = demo.choose_models(offline=offline, random_weights=random_weights)
    assert model.random_weights is (not official)
    if official:
        assert (model.sam2_checkpoint, model.dinov2_checkpoint) == tuple(
            demo.DEMO_CHECKPOINTS.values()
        )
        assert (model.sam2_config, model.dinov2_model) == ("sam2.1_hiera_t", "vits14")
    else:
        assert model.sam2_checkpoint is None and model.sam2_image_size == 256
        assert "meaningless" in note
    assert bool(calls) is (download is not None)


def test_download_fails_fast_without_network(empty_cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(demo.urllib.request, "urlopen", refuse)
    model, _, note = demo.choose_models(offline=False)
    assert model.random_weights and note == demo.RANDOM_NOTE
    assert not any(empty_cache.iterdir())  # nothing half-downloaded


def test_refuses_a_foreign_output_folder(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--offline", "--images", "1"]) == 2
    assert "not made by `refseg demo`" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_rerun_clears_only_the_demo_outputs(tmp_path):
    out = tmp_path / "demo"
    demo._prepare_out(out)  # a new folder: created and marked
    for sub in ("dataset", "run"):
        (out / sub).mkdir()
        (out / sub / "old.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    demo._prepare_out(out)
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER, "notes.txt"]


# ------------------------------------------------------------------ end to end


def test_demo_offline_end_to_end(tmp_path, empty_cache, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "4", "--offline"]) == 0
    printed = capsys.readouterr().out
    assert demo.RANDOM_NOTE in printed
    listing = printed.split("refseg demo: outputs\n", 1)[1].splitlines()
    artefacts = dict(line.strip().split(": ", 1) for line in listing)
    expected = {"dataset", "target images", "reference pool", "references", "memory bank"}
    expected |= {"run", "results", "eval", "report"}
    assert expected <= set(artefacts)
    for label, path in artefacts.items():
        assert Path(path).exists(), (label, path)
        assert Path(path).is_relative_to(out.resolve())
    report = json.loads(Path(artefacts["eval"]).read_text())
    for iou_type in ("bbox", "segm"):
        assert list(report[iou_type]["stats"]) == list(STAT_NAMES)
        assert set(report[iou_type]["per_class"]) == {str(c) for c, _, _ in CLASSES}
    shots = load_coco(artefacts["references"])
    assert sorted(a["category_id"] for a in shots["annotations"]) == [c for c, _, _ in CLASSES]
    run = json.loads((Path(artefacts["run"]) / "run.json").read_text())
    assert run["random_weights"] is True and run["counts"]["total"]["images"] == 4
    assert "<html" in Path(artefacts["report"]).read_text().lower()
