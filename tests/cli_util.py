"""Helpers of the command-line tests: ``main(argv)`` captured, a small generated COCO set.

* ``_run``: ``refseg.jobs.cli.main(argv)`` with stdout and stderr captured.
* ``make_dataset``: PNG images with one rectangle (``BOX``) and one triangle (``TRI``)
  each, ``W`` x ``H`` pixels, and their COCO ground truth.

Used by ``test_cli.py`` and ``test_cli_no_model.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from refseg.jobs.cli import main

W, H = 160, 128
BOX, TRI = 3, 7  # category ids; not list positions


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured; random-weight warnings silenced."""
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*(RANDOM WEIGHTS|random weights)")
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _poly_ann(aid: int, image_id: int, cat: int, pts: list[tuple[int, int]]) -> dict:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    poly = [float(v) for p in pts for v in p]
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
    return {
        "id": aid,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": [poly],
        "bbox": [
            float(min(xs)),
            float(min(ys)),
            float(max(xs) - min(xs)),
            float(max(ys) - min(ys)),
        ],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def make_dataset(root: Path, n_images: int = 6) -> Path:
    """PNG images with one rectangle (BOX) and one triangle (TRI) each; returns GT.json."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, n_images + 1):
        x, y = 12 + 4 * i, 14 + 2 * i
        box = [(x, y), (x + 50, y), (x + 50, y + 44), (x, y + 44)]
        tri = [(96, 20 + 3 * i), (146, 20 + 3 * i), (121, 70 + 4 * i)]
        arr = rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        draw.polygon(box, fill=(220, 40, 40))
        draw.polygon(tri, fill=(40, 200, 60))
        img.save(root / f"im{i}.png")
        images.append({"id": 100 + i, "file_name": f"im{i}.png", "width": W, "height": H})
        anns.append(_poly_ann(10 * i, 100 + i, BOX, box))
        anns.append(_poly_ann(10 * i + 1, 100 + i, TRI, tri))
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": BOX, "name": "box"}, {"id": TRI, "name": "tri"}],
    }
    path = root / "gt.json"
    path.write_text(json.dumps(gt))
    return path
