"""Tests of refseg.core.rle and refseg.core.instances: tiny arrays, pycocotools round trips."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as mask_utils
from refseg.core import rle
from refseg.core.instances import INSTANCES_SCHEMA, Instances

H, W = 6, 8


def _mask(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


RECT = _mask(1, 4, 1, 5)  # what the polygon [[1,1, 5,1, 5,4, 1,4]] rasterises to
MASKS = {
    "empty": np.zeros((H, W), bool),
    "full": np.ones((H, W), bool),
    "pixel": _mask(5, 6, 7, 8),
    "rect": RECT,
    "random": np.random.default_rng(0).random((H, W)) > 0.5,
}


# ---------------------------------------------------------------- rle


@pytest.mark.parametrize("name", sorted(MASKS))
def test_encode_decode_round_trip(name: str) -> None:
    m = MASKS[name]
    (r,) = rle.encode_masks(m[None])
    assert isinstance(r["counts"], str) and r["size"] == [H, W]
    json.dumps(r)  # JSON-ready
    np.testing.assert_array_equal(rle.decode_rle(r), m)
    assert rle.rle_area([r])[0] == m.sum()
    ref = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))))
    np.testing.assert_array_equal(rle.rle_to_bbox([r])[0], ref)


def test_bbox_is_xywh_with_extent() -> None:
    (r,) = rle.encode_masks(RECT[None])
    np.testing.assert_array_equal(rle.rle_to_bbox([r]), [[1, 1, 4, 3]])


def _uncompressed_counts(m: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts: column-major run lengths, starting with a zero run."""
    flat = m.T.reshape(-1).astype(int)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


@pytest.mark.parametrize("form", ["str", "bytes", "uncompressed"])
@pytest.mark.parametrize("name", ["full", "pixel", "rect"])
def test_decode_accepts_counts_forms(form: str, name: str) -> None:
    m = MASKS[name]
    (r,) = rle.encode_masks(m[None])
    counts = {
        "str": r["counts"],
        "bytes": r["counts"].encode("utf-8"),
        "uncompressed": _uncompressed_counts(m),
    }[form]
    np.testing.assert_array_equal(rle.decode_rle({"size": [H, W], "counts": counts}), m)


def test_uncompressed_rle_with_wrong_sum_raises() -> None:
    with pytest.raises(ValueError, match="sum to"):
        rle.decode_rle({"size": [H, W], "counts": [3, 4]})


@pytest.mark.parametrize(
    ("masks", "error"),
    [(np.zeros((H, W), bool), ValueError), (np.zeros((1, H, W), np.uint8), TypeError)],
    ids=["2d", "uint8"],
)
def test_encode_masks_rejects_bad_input(masks: np.ndarray, error: type) -> None:
    with pytest.raises(error):
        rle.encode_masks(masks)


def test_empty_inputs() -> None:
    assert rle.encode_masks(np.zeros((0, H, W), bool)) == []
    assert rle.rle_area([]).shape == (0,)
    assert rle.rle_to_bbox([]).shape == (0, 4)


def _segmentations() -> dict[str, object]:
    (r,) = rle.encode_masks(RECT[None])
    return {
        "polygon": [[1, 1, 5, 1, 5, 4, 1, 4]],
        "rle-str": r,
        "rle-bytes": {"size": [H, W], "counts": r["counts"].encode("utf-8")},
        "uncompressed": {"size": [H, W], "counts": _uncompressed_counts(RECT)},
    }


@pytest.mark.parametrize("kind", ["polygon", "rle-str", "rle-bytes", "uncompressed"])
def test_annotation_to_rle(kind: str) -> None:
    ann = {"id": 1, "segmentation": _segmentations()[kind]}
    r = rle.annotation_to_rle(ann, H, W)
    assert isinstance(r["counts"], str)
    np.testing.assert_array_equal(rle.decode_rle(r), RECT)


@pytest.mark.parametrize(
    ("seg", "match"),
    [
        (None, "no segmentation"),
        ([], "no segmentation"),
        ({"size": [H + 1, W], "counts": "0"}, "size"),
        ([[1, 1, 2, 2]], "polygon"),
    ],
    ids=["none", "empty-list", "size-mismatch", "short-polygon"],
)
def test_annotation_to_rle_errors(seg: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rle.annotation_to_rle({"id": 7, "segmentation": seg}, H, W)


# ---------------------------------------------------------------- Instances


def _instances(with_masks: bool = True, with_rles: bool = False) -> Instances:
    masks = np.stack([RECT, _mask(0, 6, 0, 1), _mask(2, 3, 6, 8)])
    inst = Instances(
        image_size=(H, W),
        boxes=[[1, 1, 5, 4], [0, 0, 1, 6], [6, 2, 8, 3]],
        scores=[0.9, 0.5, 0.7],
        category_ids=[3, 17, 90],
        proposal_iou=[0.8, 0.6, 0.95],
        masks=masks if (with_masks or with_rles) else None,
    )
    if with_rles:
        inst = inst.with_rles(drop_masks=not with_masks)
    return inst


def test_dtypes_are_coerced() -> None:
    inst = _instances()
    assert inst.boxes.dtype == np.float32 and inst.boxes.shape == (3, 4)
    assert inst.scores.dtype == np.float32
    assert inst.category_ids.dtype == np.int64
    assert inst.proposal_iou.dtype == np.float32
    assert len(inst) == 3


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"boxes": np.zeros((3, 3))}, ValueError, "reshape"),
        ({"scores": np.zeros(2)}, ValueError, "scores"),
        ({"category_ids": np.zeros(4)}, ValueError, "category_ids"),
        ({"proposal_iou": np.zeros((3, 1))}, ValueError, "proposal_iou"),
        ({"masks": np.zeros((3, H, W + 1), bool)}, ValueError, "masks"),
        ({"masks": np.zeros((3, H, W), np.uint8)}, TypeError, "bool"),
        ({"rles": ()}, ValueError, "rles"),
        ({"rles": ({"size": [1, 1], "counts": "1"},) * 3}, ValueError, "size"),
        ({"image_size": (0, W)}, ValueError, "image_size"),
        ({"image_size": (H, W, 3)}, ValueError, "image_size"),
    ],
)
def test_construction_validates(changes: dict, error: type, match: str) -> None:
    kwargs = {
        "image_size": (H, W),
        "boxes": np.zeros((3, 4)),
        "scores": np.zeros(3),
        "category_ids": np.zeros(3),
        "proposal_iou": np.zeros(3),
    }
    with pytest.raises(error, match=match):
        Instances(**{**kwargs, **changes})


@pytest.mark.parametrize(
    ("index", "expected_ids"),
    [
        (np.array([True, False, True]), [3, 90]),
        (np.array([2, 0]), [90, 3]),
        ([1], [17]),
        (slice(1, None), [17, 90]),
        (1, [17]),
        (np.array([], dtype=np.int64), []),
        ([], []),
        (np.zeros(3, bool), []),
    ],
)
@pytest.mark.parametrize("storage", ["masks", "rles", "both"])
def test_getitem_keeps_fields_aligned(index, expected_ids: list[int], storage: str) -> None:
    full = _instances(with_masks=storage != "rles", with_rles=storage != "masks")
    sub = full[index]
    assert sub.category_ids.tolist() == expected_ids
    pos = [full.category_ids.tolist().index(c) for c in expected_ids]
    np.testing.assert_array_equal(sub.boxes, full.boxes[pos].reshape(-1, 4))
    np.testing.assert_array_equal(sub.scores, full.scores[pos])
    np.testing.assert_array_equal(sub.proposal_iou, full.proposal_iou[pos])
    if full.masks is not None:
        np.testing.assert_array_equal(sub.masks, full.masks[pos].reshape(-1, H, W))
    if full.rles is not None:
        assert sub.rles == tuple(full.rles[p] for p in pos)
    np.testing.assert_array_equal(sub.areas(), full.areas()[pos])


def test_getitem_rejects_wrong_bool_length() -> None:
    with pytest.raises(IndexError):
        _instances()[np.array([True, False])]


def test_empty() -> None:
    e = Instances.empty((H, W))
    assert len(e) == 0 and e.masks is None and e.image_size == (H, W)
    assert e.to_coco_results(1) == []
    t = e.to_arrow(1, "a.jpg", {})
    assert t.num_rows == 0 and t.schema == INSTANCES_SCHEMA
    assert Instances.empty((H, W), with_masks=True).masks.shape == (0, H, W)


def test_merge() -> None:
    a = _instances()
    merged = Instances.merge([a[[0]], Instances.empty((H, W)), a[[1, 2]]])
    assert merged.category_ids.tolist() == [3, 17, 90]
    np.testing.assert_array_equal(merged.masks, a.masks)
    np.testing.assert_array_equal(merged.boxes, a.boxes)
    r = _instances(with_masks=False, with_rles=True)
    assert Instances.merge([r[[2]], r[[0]]]).rles == (r.rles[2], r.rles[0])


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        (lambda a: [], "at least one"),
        (lambda a: [a, Instances.empty((H + 1, W))], "image sizes"),
        (lambda a: [a, a.with_rles(drop_masks=True)], "masks"),
    ],
    ids=["none", "sizes", "mixed-masks"],
)
def test_merge_errors(parts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Instances.merge(parts(_instances()))


def test_with_rles_and_areas() -> None:
    a = _instances()
    b = a.with_rles()
    assert b.masks is not None and len(b.rles) == 3
    c = a.with_rles(drop_masks=True)
    assert c.masks is None
    np.testing.assert_array_equal([rle.decode_rle(r) for r in c.rles], a.masks)
    np.testing.assert_array_equal(a.areas(), [12, 6, 2])
    np.testing.assert_array_equal(c.areas(), [12, 6, 2])
    bare = _instances(with_masks=False)
    with pytest.raises(ValueError, match="neither"):
        bare.with_rles()
    with pytest.raises(ValueError, match="neither"):
        bare.areas()


def test_xywh() -> None:
    np.testing.assert_array_equal(_instances().xywh(), [[1, 1, 4, 3], [0, 0, 1, 6], [6, 2, 2, 1]])


def test_to_coco_results() -> None:
    a = _instances()
    res = a.to_coco_results(42)
    json.dumps(res)
    assert [r["category_id"] for r in res] == [3, 17, 90]
    assert all(r["image_id"] == 42 for r in res)
    assert res[0]["bbox"] == [1.0, 1.0, 4.0, 3.0]
    assert res[0]["score"] == pytest.approx(0.9)
    assert [r["area"] for r in res] == [12.0, 6.0, 2.0]
    for r, m in zip(res, a.masks, strict=True):
        assert isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]).astype(bool), m)


def test_to_coco_results_without_masks_uses_box_area() -> None:
    res = _instances(with_masks=False).to_coco_results(1)
    assert all("segmentation" not in r for r in res)
    assert [r["area"] for r in res] == [12.0, 6.0, 2.0]


NAMES = {3: "car", 17: "cat", 90: "toothbrush"}


@pytest.mark.parametrize("storage", ["masks", "rles"])
def test_arrow_round_trip(storage: str) -> None:
    a = _instances(with_masks=storage == "masks", with_rles=storage == "rles")
    t = a.to_arrow(7, "s3://bucket/img.jpg", NAMES)
    assert t.schema == INSTANCES_SCHEMA
    assert t.schema.field("bbox").type == pa.list_(pa.float64(), 4)
    rows = t.to_pylist()
    assert [r["category_name"] for r in rows] == ["car", "cat", "toothbrush"]
    assert rows[2]["bbox"] == [6.0, 2.0, 2.0, 1.0]
    assert {r["image_id"] for r in rows} == {7}
    b = Instances.from_arrow(t)
    assert b.image_size == (H, W)
    np.testing.assert_array_equal(b.boxes, a.boxes)
    np.testing.assert_array_equal(b.scores, a.scores)
    np.testing.assert_array_equal(b.category_ids, a.category_ids)
    np.testing.assert_array_equal(b.proposal_iou, a.proposal_iou)
    np.testing.assert_array_equal([rle.decode_rle(r) for r in b.rles], _instances().masks)


def test_arrow_round_trip_fractional_boxes_is_exact() -> None:
    a = _instances(with_masks=False)
    a = Instances((H, W), a.boxes + np.float32(0.3), a.scores, a.category_ids, a.proposal_iou)
    b = Instances.from_arrow(a.to_arrow(1, "x", NAMES), image_size=(H, W))
    np.testing.assert_array_equal(b.boxes, a.boxes)
    assert b.rles is None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: _instances().to_arrow(1, "x", {3: "car"}), "lacks category ids"),
        (
            lambda: Instances.from_arrow(
                pa.concat_tables(
                    [_instances().to_arrow(1, "x", NAMES), _instances().to_arrow(2, "y", NAMES)]
                )
            ),
            "one image",
        ),
        (lambda: Instances.from_arrow(Instances.empty((H, W)).to_arrow(1, "x", {})), "image_size"),
        (
            lambda: Instances.from_arrow(_instances().to_arrow(1, "x", NAMES), image_size=(9, 9)),
            "disagree",
        ),
        (lambda: Instances.from_arrow(pa.table({"image_id": [1]})), "lacks instance columns"),
    ],
    ids=["names", "two-images", "empty-no-size", "size-mismatch", "columns"],
)
def test_arrow_errors(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_from_arrow_empty_with_size() -> None:
    b = Instances.from_arrow(Instances.empty((H, W)).to_arrow(1, "x", {}), image_size=(H, W))
    assert len(b) == 0 and b.image_size == (H, W)
