"""``refseg evaluate`` with results in every COCO segmentation form tools write.

Polygons and uncompressed RLE are rasterised at the ground-truth image's size, as
pycocotools does for ground truth (``frPyObjects``, ``merge``); anything else is a clear
error that says what is accepted.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils
from refseg.core import coco, rle
from refseg.jobs.cli import main

from tests.test_coco import OBJECTS, H, W, _gt, _results


def _polygon_results(shift: int = 2) -> list[dict]:
    """One result per GT object: its rectangle moved by ``shift`` px, as a polygon."""
    out = []
    for r, (_, _, _, y0, y1, x0, x1) in zip(_results(shift), OBJECTS, strict=True):
        xa, xb = x0 + shift, x1 + shift
        out.append({**r, "segmentation": [[xa, y0, xb, y0, xb, y1, xa, y1]]})
    return out


def _as_pycocotools_would(results: list[dict]) -> list[dict]:
    """The same results converted by hand the way pycocotools' annToRLE converts GT."""
    out = []
    for r in results:
        seg = r["segmentation"]
        if isinstance(seg, list):
            rle_ = mask_utils.merge(mask_utils.frPyObjects(seg, H, W))
        else:
            rle_ = mask_utils.frPyObjects(seg, H, W)
        out.append({**r, "segmentation": {"size": rle_["size"], "counts": rle_["counts"].decode()}})
    return out


def test_polygon_results_evaluate_as_their_rasterised_masks() -> None:
    polys = _polygon_results()
    got = coco.evaluate(_gt(), polys)
    want = coco.evaluate(_gt(), _as_pycocotools_would(polys))
    assert got == want
    assert got["segm"]["stats"]["AP50"] == pytest.approx(1.0)
    assert 0.0 < got["segm"]["stats"]["AP"] < 1.0


def test_one_flat_polygon_and_several_polygons_per_result() -> None:
    polys = _polygon_results()
    flat = [{**r, "segmentation": r["segmentation"][0]} for r in polys]
    assert coco.evaluate(_gt(), flat) == coco.evaluate(_gt(), polys)
    # an object in two halves: the union (merge) of both polygons
    split = []
    for r in polys:
        (p,) = r["segmentation"]
        xa, y0, xb, _, _, y1 = p[0], p[1], p[2], p[3], p[4], p[5]
        xm = (xa + xb) / 2
        halves = [[xa, y0, xm, y0, xm, y1, xa, y1], [xm, y0, xb, y0, xb, y1, xm, y1]]
        split.append({**r, "segmentation": halves})
    want = coco.evaluate(_gt(), _as_pycocotools_would(split))
    assert coco.evaluate(_gt(), split) == want


def test_uncompressed_rle_results() -> None:
    compressed = _results(shift=3)
    uncompressed = []
    for r in compressed:
        mask = rle.decode_rle(r["segmentation"]).flatten(order="F").astype(int)
        change = [0, *[i for i in range(1, mask.size) if mask[i] != mask[i - 1]], mask.size]
        counts = [b - a for a, b in itertools.pairwise(change)]
        if mask[0]:
            counts = [0, *counts]
        uncompressed.append({**r, "segmentation": {"size": [H, W], "counts": counts}})
    assert coco.evaluate(_gt(), uncompressed) == coco.evaluate(_gt(), compressed)


@pytest.mark.parametrize(
    ("segmentation", "why"),
    [
        ("not a mask", "got str"),
        ([[1, 2, 3, 4]], "a polygon needs >= 3"),
        ([], "got list"),
        ({"size": [H + 1, W], "counts": "PXo0"}, "is not the image's"),
    ],
    ids=["string", "short-polygon", "empty", "rle-size"],
)
def test_unusable_segmentations_say_what_is_accepted(segmentation, why) -> None:
    res = _results()
    res[1] = {**res[1], "segmentation": segmentation}
    with pytest.raises(ValueError) as info:
        coco.evaluate(_gt(), res, iou_types=("segm",))
    msg = str(info.value)
    assert msg.startswith("result 1 (image 10): unusable segmentation (") and why in msg
    assert "accepted: COCO RLE" in msg and "polygons [[x0, y0" in msg


def test_cli_evaluate_a_polygon_results_file(tmp_path: Path) -> None:
    gt, res = tmp_path / "gt.json", tmp_path / "results.json"
    gt.write_text(json.dumps(_gt()))
    res.write_text(json.dumps(_polygon_results()))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["evaluate", "--results", str(res), "--ground-truth", str(gt)])
    assert rc == 0, err.getvalue()
    assert "== segm ==" in out.getvalue() and "refseg evaluate: 4 results" in out.getvalue()
    saved = json.loads((tmp_path / "results.eval.json").read_text())
    assert saved["segm"]["stats"]["AP50"] == pytest.approx(1.0)
