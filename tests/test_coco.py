"""Tests of refseg.core.coco: COCO I/O, reference loading, streaming results, evaluation."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
from refseg.core import coco, rle

H, W = 64, 80
# Non-contiguous ids on purpose; 5 has no ground truth at all.
CATEGORIES = [
    {"id": 3, "name": "car"},
    {"id": 5, "name": "airplane"},
    {"id": 17, "name": "cat"},
    {"id": 90, "name": "toothbrush"},
]
# (annotation id, image id, category id, y0, y1, x0, x1)
OBJECTS = [
    (1, 10, 3, 4, 30, 6, 40),
    (2, 10, 17, 35, 60, 10, 70),
    (3, 20, 3, 10, 50, 40, 75),
    (4, 20, 90, 2, 20, 2, 30),
]


def _rect(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((1, H, W), bool)
    m[0, y0:y1, x0:x1] = True
    return m


def _gt() -> dict:
    anns = []
    for aid, iid, cid, y0, y1, x0, x1 in OBJECTS:
        (r,) = rle.encode_masks(_rect(y0, y1, x0, x1))
        anns.append(
            {
                "id": aid,
                "image_id": iid,
                "category_id": cid,
                "segmentation": r,
                "area": float((y1 - y0) * (x1 - x0)),
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "iscrowd": 0,
            }
        )
    images = [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (10, 20)]
    return {"images": images, "annotations": anns, "categories": copy.deepcopy(CATEGORIES)}


def _results(shift: int = 0, categories: dict[int, int] | None = None) -> list[dict]:
    """One result per GT object, boxes and masks moved right by ``shift`` pixels."""
    out = []
    for _, iid, cid, y0, y1, x0, x1 in OBJECTS:
        (r,) = rle.encode_masks(_rect(y0, y1, x0 + shift, x1 + shift))
        out.append(
            {
                "image_id": iid,
                "category_id": (categories or {}).get(cid, cid),
                "bbox": [float(x0 + shift), float(y0), float(x1 - x0), float(y1 - y0)],
                "score": 0.9,
                "segmentation": r,
            }
        )
    return out


# ---------------------------------------------------------------- load_coco / indexes


def test_load_coco_local_uri_and_memory(tmp_path: Path) -> None:
    gt = _gt()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    with fsspec.open("memory://refseg-test/gt.json", "w") as f:
        f.write(json.dumps(gt))
    for src in (path, str(path), f"file://{path}", "memory://refseg-test/gt.json"):
        assert coco.load_coco(src) == gt


def test_load_coco_rejects_non_coco(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a COCO"):
        coco.load_coco(path)


def test_indexes_use_ids_not_positions() -> None:
    gt = _gt()
    assert list(coco.categories_by_id(gt)) == [3, 5, 17, 90]
    assert coco.category_names(gt)[90] == "toothbrush"
    assert sorted(coco.images_by_id(gt)) == [10, 20]
    gt["categories"].append({"id": 17, "name": "dup"})
    with pytest.raises(ValueError, match="twice"):
        coco.categories_by_id(gt)


# ---------------------------------------------------------------- load_references


def _ref_dataset() -> dict:
    gt = _gt()
    a = gt["annotations"]
    a[1]["segmentation"] = [[10, 35, 70, 35, 70, 60, 10, 60]]  # polygon
    del a[2]["segmentation"]  # box only
    a[3]["segmentation"] = []  # empty: box only
    a[3]["mask_generated"] = True
    return gt


@pytest.mark.parametrize(
    ("annotation_id", "kind", "generated"),
    [(1, dict, False), (2, list, False), (3, None, False), (4, None, True)],
)
def test_load_references(annotation_id: int, kind: type | None, generated: bool) -> None:
    shots = {s.annotation_id: s for s in coco.load_references(_ref_dataset())}
    s = shots[annotation_id]
    obj = next(o for o in OBJECTS if o[0] == annotation_id)
    assert (s.image_id, s.category_id) == (obj[1], obj[2])
    assert s.file_name == f"{obj[1]}.jpg" and (s.height, s.width) == (H, W)
    _, _, _, y0, y1, x0, x1 = obj
    assert s.bbox == (x0, y0, x1 - x0, y1 - y0)
    assert (s.segmentation is None) if kind is None else isinstance(s.segmentation, kind)
    assert s.mask_generated is generated


def test_load_references_filters_categories() -> None:
    shots = coco.load_references(_ref_dataset(), category_ids=[3, 90])
    assert [s.annotation_id for s in shots] == [1, 3, 4]
    with pytest.raises(ValueError, match="unknown category ids"):
        coco.load_references(_ref_dataset(), category_ids=[0])


def test_load_references_missing_image() -> None:
    gt = _ref_dataset()
    gt["annotations"][0]["image_id"] = 999
    with pytest.raises(ValueError, match="image 999"):
        coco.load_references(gt)


def test_load_references_bbox_from_segmentation() -> None:
    gt = _gt()
    del gt["annotations"][0]["bbox"]
    (s,) = coco.load_references(gt, category_ids=[3])[:1]
    assert s.bbox == (6.0, 4.0, 34.0, 26.0)
    del gt["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match="neither bbox nor segmentation"):
        coco.load_references(gt)


# ---------------------------------------------------------------- write_results


def test_write_results_streams_a_generator(tmp_path: Path) -> None:
    items = _results()
    path = tmp_path / "sub" / "res.json"
    n = coco.write_results((dict(r, score=np.float32(0.5)) for r in items), path)
    assert n == len(items)
    loaded = coco.load_results(path)
    assert [r["category_id"] for r in loaded] == [3, 17, 3, 90]
    assert all(r["score"] == 0.5 for r in loaded)
    assert sorted(p.name for p in path.parent.iterdir()) == ["res.json"]


def test_write_results_empty(tmp_path: Path) -> None:
    path = tmp_path / "res.json"
    assert coco.write_results(iter([]), path) == 0
    assert json.loads(path.read_text()) == []


def test_write_results_memory_uri() -> None:
    uri = "memory://refseg-test/out/res.json"
    assert coco.write_results(_results(), uri) == 4
    assert coco.load_results(uri) == json.loads(json.dumps(_results()))


def _failing(items: list[dict]):
    yield items[0]
    raise RuntimeError("worker lost")


@pytest.mark.parametrize(
    ("results", "error"),
    [
        (lambda: [{"image_id": 1, "score": float("nan")}], ValueError),
        (lambda: _failing(_results()), RuntimeError),
    ],
    ids=["nan", "crash"],
)
def test_write_results_is_atomic(tmp_path: Path, results, error: type) -> None:
    path = tmp_path / "res.json"
    path.write_text("[]")
    with pytest.raises(error):
        coco.write_results(results(), path)
    assert path.read_text() == "[]"  # old content kept, no partial file
    assert [p.name for p in tmp_path.iterdir()] == ["res.json"]  # no temp left


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluate_perfect_results(iou_type: str) -> None:
    gt = _gt()
    before = copy.deepcopy(gt)
    report = coco.evaluate(gt, _results(), iou_types=(iou_type,))
    entry = report[iou_type]
    assert set(entry["stats"]) == set(coco.STAT_NAMES) and len(entry["stats"]) == 12
    assert entry["stats"]["AP"] == pytest.approx(1.0)
    assert entry["per_class"] == pytest.approx({3: 1.0, 5: -1.0, 17: 1.0, 90: 1.0})
    assert "Average Precision" in entry["summary"]
    assert gt == before  # the caller's dict is not modified


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_evaluate_shifted_results_score_less(iou_type: str) -> None:
    # Shift by 4 px: every IoU between 0.5 and 0.9, so AP50 = 1 and AP < 1.
    stats = coco.evaluate(_gt(), _results(shift=4), iou_types=(iou_type,))[iou_type]["stats"]
    assert stats["AP50"] == pytest.approx(1.0)
    assert 0.0 < stats["AP"] < 1.0


def test_evaluate_restricts_to_category_ids() -> None:
    res = _results()
    res[3] = _results(shift=40)[3]  # toothbrush (90) now misses
    full = coco.evaluate(_gt(), res, iou_types=("bbox",))["bbox"]
    part = coco.evaluate(_gt(), res, category_ids=[17, 3], iou_types=("bbox",))["bbox"]
    assert full["per_class"][90] == 0.0 and full["stats"]["AP"] < 1.0
    assert part["stats"]["AP"] == pytest.approx(1.0)
    assert sorted(part["per_class"]) == [3, 17]


def test_evaluate_empty_results() -> None:
    report = coco.evaluate(_gt(), [])
    for iou_type in ("bbox", "segm"):
        assert report[iou_type]["stats"]["AP"] == 0.0
        assert report[iou_type]["per_class"] == {3: 0.0, 5: -1.0, 17: 0.0, 90: 0.0}


def test_evaluate_from_files(tmp_path: Path) -> None:
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(_gt()))
    res_path = tmp_path / "res.json"
    coco.write_results(_results(shift=4), res_path)
    from_files = coco.evaluate(gt_path, res_path)
    in_memory = coco.evaluate(_gt(), _results(shift=4))
    assert from_files == in_memory


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: coco.evaluate(_gt(), [dict(_results()[0], image_id=11)]), "not in the ground"),
        # positions (0, 1, ...) instead of dataset ids
        (lambda: coco.evaluate(_gt(), _results(categories={3: 0, 17: 2})), "list positions"),
        (lambda: coco.evaluate(_gt(), _results(), category_ids=[4]), "unknown category"),
        (lambda: coco.evaluate(_gt(), _results(), iou_types=("keypoints",)), "iou type"),
        (
            lambda: coco.evaluate(
                _gt(), [{k: v for k, v in r.items() if k != "segmentation"} for r in _results()]
            ),
            "segmentation",
        ),
        (
            lambda: coco.evaluate(
                {
                    **_gt(),
                    "annotations": [
                        {k: v for k, v in a.items() if k != "area"} for a in _gt()["annotations"]
                    ],
                },
                _results(),
            ),
            "lack 'area'",
        ),
    ],
    ids=["image-id", "positions", "unknown-cat", "iou-type", "no-segm", "gt-area"],
)
def test_evaluate_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_format_eval() -> None:
    text = coco.format_eval(coco.evaluate(_gt(), _results(shift=4)))
    assert "== bbox ==" in text and "== segm ==" in text
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in text
    lines = text.splitlines()
    row = next(line for line in lines if "toothbrush" in line)
    assert row.split()[0] == "90"
    assert next(line for line in lines if "airplane" in line).endswith("n/a")


def test_write_json_array_streams_valid_json():
    import io as _io

    for items in ([], [{"a": 1}], [{"a": np.float32(0.5), "b": np.arange(2)}, [1, 2], "x"]):
        buf = _io.StringIO()
        assert coco.write_json_array(buf.write, iter(items)) == len(items)
        got = json.loads(buf.getvalue())
        assert got == json.loads(json.dumps(items, default=lambda o: o.tolist()))
    with pytest.raises(ValueError, match="item 1 has a NaN"):
        coco.write_json_array(_io.StringIO().write, [{"score": 1.0}, {"score": float("nan")}])
