"""Tests of ``refseg masks-from-boxes`` (jobs/box_masks.py).

Mask content is checked with ``tests.doubles.ShapeSam`` (a SAM2 stand-in that segments the
flat-coloured region filling a prompted box), so the box -> input square -> original size
mapping is exercised for real; the command line runs the real SAM2 (tiny, random weights),
whose masks are meaningless, so only the structure of its output is checked.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refseg.core import rle as rle_ops
from refseg.core.config import MethodConfig
from refseg.core.proposals import Sam2Proposer
from refseg.jobs import box_masks
from refseg.jobs.cli import main

from tests.doubles import ShapeSam

H, W = 90, 140
GREY, RED, BLUE = (120, 120, 120), (220, 30, 30), (30, 30, 220)


def _scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    img = np.empty((H, W, 3), np.uint8)
    img[:] = GREY
    rect = np.zeros((H, W), bool)
    rect[15:55, 20:60] = True
    yy, xx = np.mgrid[:H, :W]
    ellipse = ((xx - 102.5) / 22) ** 2 + ((yy - 55.5) / 25) ** 2 <= 1
    img[rect], img[ellipse] = RED, BLUE
    return img, {"rect": rect, "ellipse": ellipse}


def _box(mask: np.ndarray) -> list[float]:
    return rle_ops.rle_to_bbox(rle_ops.encode_masks(mask[None]))[0].tolist()


@pytest.fixture
def refs(tmp_path: Path) -> tuple[dict, Path, dict[str, np.ndarray]]:
    img, masks = _scene()
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(img).save(root / "a.png")
    Image.fromarray(img[:, ::-1]).save(root / "sub" / "b.png")  # mirrored: rect on the right
    given = rle_ops.encode_masks(masks["rect"][:, ::-1][None])[0]
    coco = {
        "info": {"description": "test"},
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "sub/b.png", "height": H, "width": W},
        ],
        "categories": [{"id": 5, "name": "red"}, {"id": 8, "name": "blue"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": _box(masks["rect"])},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 8,
                "bbox": _box(masks["ellipse"]),
                "segmentation": [],
                "iscrowd": 0,
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 5,
                "bbox": _box(masks["rect"][:, ::-1]),
                "segmentation": given,
                "area": float(masks["rect"].sum()),
            },
        ],
    }
    return coco, root, masks


@pytest.mark.parametrize(
    ("ann", "expected"),
    [
        ({"bbox": [1, 2, 3, 4]}, True),
        ({"bbox": [1, 2, 3, 4], "segmentation": None}, True),
        ({"bbox": [1, 2, 3, 4], "segmentation": []}, True),
        ({"bbox": [1, 2, 3, 4], "segmentation": [[0, 0, 1, 0, 1, 1]]}, False),
        ({"bbox": [1, 2, 3, 4], "segmentation": {"size": [2, 2], "counts": "04"}}, False),
        ({"bbox": [1, 2, 0, 4]}, False),
        ({"bbox": []}, False),
        ({}, False),
    ],
)
def test_needs_mask(ann, expected):
    assert box_masks.needs_mask(ann) is expected


@pytest.mark.parametrize("resize", ["square", "longest-side"])
def test_masks_match_the_prompted_shapes(refs, tmp_path, resize):
    coco, root, masks = refs
    before = copy.deepcopy(coco)
    proposer = Sam2Proposer(
        ShapeSam([GREY, RED, BLUE], image_size=256), MethodConfig(decoder="stock")
    )
    gallery = tmp_path / "gallery"
    out, summary = box_masks.masks_from_boxes(
        proposer, coco, str(root), resize=resize, gallery=str(gallery)
    )
    assert coco == before  # the input is not modified
    anns = {a["id"]: a for a in out["annotations"]}
    for ann_id, name in ((1, "rect"), (2, "ellipse")):
        a = anns[ann_id]
        assert a["mask_generated"] is True
        assert a["segmentation"]["size"] == [H, W] and isinstance(a["segmentation"]["counts"], str)
        got = rle_ops.decode_rle(a["segmentation"])
        iou = (got & masks[name]).sum() / (got | masks[name]).sum()
        assert iou > 0.9, (name, iou)
        assert a["area"] == got.sum()
    assert anns[3] == before["annotations"][2]  # had a mask: unchanged
    assert (summary.generated, summary.kept, summary.annotations) == (2, 1, 3)
    assert sorted(p.name for p in gallery.iterdir()) == ["ann1_a.png", "ann2_a.png", "ann3_b.png"]
    pic = np.asarray(Image.open(gallery / "ann1_a.png"))
    assert pic.shape == (H, W, 3) and (pic != np.asarray(Image.open(root / "a.png"))).any()


def test_box_masks_of_no_boxes():
    proposer = Sam2Proposer(ShapeSam([GREY], image_size=64), MethodConfig(decoder="stock"))
    img = np.zeros((10, 20, 3), np.uint8)
    assert box_masks.box_masks(proposer, img, np.zeros((0, 4))).shape == (0, 10, 20)


def test_cli_tiny_random_weights(refs, tmp_path, capsys):
    coco, root, _ = refs
    src = tmp_path / "refs.json"
    src.write_text(json.dumps(coco))
    out = tmp_path / "done" / "refs_masks.json"
    argv = ["masks-from-boxes", "--references", str(src), "--images", str(root)]
    argv += ["--out", str(out), "--preset", "tiny", "--random-weights"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 annotations, 2 masks generated, 1 already had masks" in printed
    result = json.loads(out.read_text())
    for a, orig in zip(result["annotations"], coco["annotations"], strict=True):
        if a["id"] in (1, 2):
            assert a["mask_generated"] is True
            assert a["segmentation"]["size"] == [H, W]
            assert rle_ops.decode_rle(a["segmentation"]).shape == (H, W)
            assert a["bbox"] == orig["bbox"]
        else:
            assert a == orig
    info = result["info"]["refseg_masks_from_boxes"]
    assert info["random_weights"] is True and info["sam2_config"] == "sam2.1_hiera_t"
    assert result["info"]["description"] == "test"
    gallery = out.parent / "refs_masks_gallery"
    assert len(list(gallery.glob("*.png"))) == 3
    assert str(gallery) in printed


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda coco, root: (root / "a.png").unlink(), "reference image not found"),
        (lambda coco, root: coco["images"][0].update(width=W + 1), "but the references say"),
        (lambda coco, root: coco["annotations"][0].update(image_id=9), "not in 'images'"),
    ],
)
def test_cli_errors(refs, tmp_path, capsys, break_it, message):
    coco, root, _ = refs
    break_it(coco, root)
    src = tmp_path / "refs.json"
    src.write_text(json.dumps(coco))
    argv = ["masks-from-boxes", "--references", str(src), "--images", str(root)]
    argv += ["--out", str(tmp_path / "o.json"), "--preset", "tiny", "--random-weights"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
