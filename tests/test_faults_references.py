"""Fault injection, bad references (issue 6, item 6): each one gives a clear message.

``build_memory_bank`` runs on synthetic COCO dicts with the colour DINOv2 double of
tests/doubles.py and images made in memory, so no file, model or Ray is needed. Target
categories unknown to the bank are checked by the labelling job before any work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from refseg.core.memory_bank import MemoryBank
from refseg.core.references import build_memory_bank
from refseg.pipeline.job import _warn_categories, run_label

from tests.doubles import colour_dino_encoder
from tests.faults_util import make_job

RED, BLUE = (220, 30, 30), (30, 30, 220)
H, W = 96, 128


def _image(_uri: str) -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[20:60, 20:60] = RED
    img[40:80, 70:120] = BLUE
    return img


def _poly(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


GOOD_CAR = {
    "id": 1,
    "category_id": 3,
    "bbox": [20, 20, 40, 40],
    "segmentation": _poly(20, 20, 60, 60),
}
GOOD_DOG = {
    "id": 2,
    "category_id": 5,
    "bbox": [70, 40, 50, 40],
    "segmentation": _poly(70, 40, 120, 80),
}


def _refs(*anns: dict[str, Any], categories: list[dict[str, Any]] | None = None) -> dict:
    return {
        "images": [{"id": 1, "file_name": "ref.png", "height": H, "width": W}],
        "categories": categories or [{"id": 3, "name": "car"}, {"id": 5, "name": "dog"}],
        "annotations": [{"image_id": 1, "iscrowd": 0, **a} for a in anns],
    }


def _build(refs: dict) -> MemoryBank:
    enc = colour_dino_encoder([RED, BLUE], image_size=112)
    return build_memory_bank(enc, refs, "/refs", load_image=_image)


@dataclass(frozen=True)
class BadRef:
    ann: dict[str, Any]
    warning: str | None  # the shot is skipped with this warning (the other class is built)
    error: str | None = None  # or the build fails with this message


EMPTY_RLE = {"size": [H, W], "counts": [H * W]}  # uncompressed RLE, all background
BAD_REFS = {
    "empty-polygon-mask": BadRef(
        {
            "id": 7,
            "category_id": 5,
            "bbox": [70, 40, 50, 40],
            "segmentation": _poly(70, 40, 70, 40),
        },
        "annotation 7: empty mask",
    ),
    "empty-rle-mask": BadRef(
        {"id": 7, "category_id": 5, "bbox": [70, 40, 50, 40], "segmentation": EMPTY_RLE},
        "annotation 7: empty mask",
    ),
    "mask-outside-its-image": BadRef(
        {
            "id": 7,
            "category_id": 5,
            "bbox": [300, 200, 40, 40],
            "segmentation": _poly(300, 200, 340, 240),
        },
        "annotation 7: empty mask",
    ),
    "box-outside-its-image": BadRef(
        {
            "id": 7,
            "category_id": 5,
            "bbox": [300, 200, 40, 40],
            "segmentation": _poly(70, 40, 120, 80),
        },
        "annotation 7: box (300.0, 200.0, 40.0, 40.0) gives an empty context crop",
    ),
    "rle-of-another-image-size": BadRef(
        {
            "id": 7,
            "category_id": 5,
            "bbox": [70, 40, 50, 40],
            "segmentation": {"size": [50, 50], "counts": [2500]},
        },
        None,
        "annotation 7: RLE size [50, 50] != image size [96, 128]",
    ),
    "box-only-no-mask": BadRef(
        {"id": 7, "category_id": 5, "bbox": [70, 40, 50, 40]},
        None,
        "annotation 7 (image ref.png) has a box but no mask: run `refseg masks-from-boxes`",
    ),
}


@pytest.mark.parametrize("bad", BAD_REFS.values(), ids=BAD_REFS.keys())
def test_a_bad_shot_is_skipped_with_a_warning_or_refused_clearly(bad, caplog):
    extra_dog = {**GOOD_DOG, "id": 8}
    refs = _refs(GOOD_CAR, extra_dog, bad.ann)
    if bad.error is not None:
        with pytest.raises(ValueError) as info:
            _build(refs)
        assert bad.error in str(info.value), str(info.value)
        return
    with caplog.at_level(logging.WARNING, logger="refseg.core.references"):
        bank = _build(refs)
    assert bank.category_ids == [3, 5] and len(bank) == 2  # the good shots only
    assert [r.annotation_id for r in bank.records[5]] == [8]
    warnings = [r.getMessage() for r in caplog.records]
    assert any(bad.warning in w for w in warnings), warnings


@pytest.mark.parametrize("bad", [k for k, v in BAD_REFS.items() if v.warning])
def test_a_class_with_no_usable_shot_is_an_error_naming_it(bad):
    with pytest.raises(ValueError) as info:
        _build(_refs(GOOD_CAR, BAD_REFS[bad].ann))
    message = str(info.value)
    assert "no usable shot for categories 5 (dog)" in message, message
    assert "car" not in message


def test_duplicate_category_names_are_refused():
    cats = [{"id": 3, "name": "car"}, {"id": 5, "name": "car"}]
    with pytest.raises(ValueError, match=r"duplicate category names in the references: \['car'\]"):
        _build(_refs(GOOD_CAR, GOOD_DOG, categories=cats))


def test_references_without_annotations_are_refused():
    with pytest.raises(ValueError, match="hold no annotations"):
        _build(_refs())


def _targets(tmp_path, categories: list[dict[str, Any]]) -> str:
    coco = {"images": [], "annotations": [], "categories": categories}
    path = tmp_path / "targets.json"
    path.write_text(json.dumps(coco))
    return str(path)


def test_target_categories_unknown_to_the_bank_are_named_in_a_warning(tiny_setup, tmp_path, caplog):
    targets = _targets(tmp_path, [{"id": 3, "name": "car"}, {"id": 99, "name": "zebra"}])
    job = make_job(tiny_setup, tmp_path, tmp_path / "out", targets=targets)
    with caplog.at_level(logging.WARNING, logger="refseg.pipeline.job"):
        _warn_categories(job, MemoryBank.load(tiny_setup["bank"]))
    (message,) = [r.getMessage() for r in caplog.records]
    assert "cannot be labelled" in message and "99: 'zebra'" in message, message
    assert "3: 'car', 17: 'cat'" in message  # what the bank does know


def test_a_target_category_id_with_another_name_stops_the_job_before_any_work(tiny_setup, tmp_path):
    targets = _targets(tmp_path, [{"id": 3, "name": "truck"}])
    with pytest.raises(ValueError) as info:
        run_label(make_job(tiny_setup, tmp_path, tmp_path / "out", targets=targets))
    assert "category id 3 is 'truck' in the targets" in str(info.value)
    assert "'car' in the memory bank" in str(info.value)
    assert not (tmp_path / "out").exists()
