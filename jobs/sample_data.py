"""A small synthetic instance-segmentation dataset for ``refseg demo`` (deterministic, seeded).

Three classes of textured shapes (a striped disc, a checkered square, a dotted triangle) on
varied gradient-and-noise backgrounds. Every target image holds one to three non-overlapping
shapes; its ground truth is COCO JSON with RLE masks. A separate pool of reference images
holds one large, centred shape each (two per class), also as COCO JSON with masks.

Layout under ``root``::

    images/target_000.png ...     targets.json      (ground truth of the targets)
    references/ref_disc_0.png ... references.json   (the reference pool)

Image ``i`` depends only on ``(seed, i)``, so a larger ``n_images`` adds images and keeps
the first ones. Masks are drawn with PIL (no anti-aliasing), so the ground truth is exact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from refseg.core import rle as rle_ops

__all__ = ["CLASSES", "SampleData", "make_sample_data", "render_shape"]

# category id, name, base RGB colour (ids are not 0..C-1 on purpose: ids are never positions)
CLASSES: tuple[tuple[int, str, tuple[int, int, int]], ...] = (
    (1, "disc", (200, 60, 50)),
    (4, "square", (40, 110, 210)),
    (7, "triangle", (230, 190, 40)),
)
TARGET_HW = (144, 192)
REFERENCE_HW = (160, 160)
REFERENCES_PER_CLASS = 2


@dataclass(frozen=True)
class SampleData:
    """Where the generated files are (all local paths)."""

    root: Path
    images: Path  # folder of the target images
    targets: Path  # COCO ground truth of the targets
    references_dir: Path
    references: Path  # COCO file of the reference pool (with masks)


def _shape_mask(name: str, hw: tuple[int, int], cx: float, cy: float, r: float, angle: float):
    """(H, W) bool mask of one shape of circumradius ``r`` centred at (cx, cy)."""
    canvas = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        k = 4 if name == "square" else 3
        pts = [
            (
                cx + r * math.cos(angle + 2 * math.pi * i / k),
                cy + r * math.sin(angle + 2 * math.pi * i / k),
            )
            for i in range(k)
        ]
        draw.polygon(pts, fill=255)
    return np.asarray(canvas) > 0


def _texture(name: str, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) float in [0, 1]: stripes (disc), checkerboard (square), dots (triangle)."""
    yy, xx = np.mgrid[: hw[0], : hw[1]].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    period = rng.uniform(5, 8)
    if name == "disc":
        return 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    if name == "square":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    return (np.sin(2 * math.pi * u / period) * np.sin(2 * math.pi * v / period) > 0.3) * 1.0


def _background(hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float: a gradient between two muted colours plus noise."""
    a, b = rng.uniform(60, 190, 3), rng.uniform(60, 190, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
    img = a + (b - a) * t[..., None]
    return img + rng.normal(0, 10, (*hw, 3))


def render_shape(
    img: np.ndarray, cls: int, cx: float, cy: float, r: float, rng: np.random.Generator
) -> np.ndarray:
    """Paint shape class ``cls`` (an index into CLASSES) onto ``img`` in place; its mask."""
    _, name, colour = CLASSES[cls]
    hw = img.shape[:2]
    mask = _shape_mask(name, hw, cx, cy, r, rng.uniform(0, 2 * math.pi))
    base = np.clip(np.asarray(colour) + rng.normal(0, 15, 3), 0, 255)
    tex = _texture(name, hw, rng)[..., None]
    paint = base * (0.45 + 0.55 * tex)
    img[mask] = paint[mask]
    return mask


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> dict[str, Any]:
    rle = rle_ops.encode_masks(mask[None])[0]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": rle,
        "area": float(mask.sum()),
        "bbox": [float(v) for v in rle_ops.rle_to_bbox([rle])[0]],
        "iscrowd": 0,
    }


def _target(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    h, w = TARGET_HW
    img = _background(TARGET_HW, rng)
    boxes: list[tuple[float, float, float, float]] = []
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        for _try in range(50):
            r = rng.uniform(15, 30)
            cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
            box = (cx - r - 3, cy - r - 3, cx + r + 3, cy + r + 3)
            if all(box[2] < b[0] or b[2] < box[0] or box[3] < b[1] or b[3] < box[1] for b in boxes):
                boxes.append(box)
                cls = int(rng.integers(len(CLASSES)))
                shapes.append((CLASSES[cls][0], render_shape(img, cls, cx, cy, r, rng)))
                break
    return np.clip(img, 0, 255).astype(np.uint8), shapes


def _reference(cls: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = REFERENCE_HW
    img = _background(REFERENCE_HW, rng)
    r = rng.uniform(36, 46)
    cx, cy = w / 2 + rng.uniform(-8, 8), h / 2 + rng.uniform(-8, 8)
    mask = render_shape(img, cls, cx, cy, r, rng)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def _coco(images: list[dict], annotations: list[dict], description: str) -> dict[str, Any]:
    return {
        "info": {"description": description},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name} for cid, name, _ in CLASSES],
    }


def _write_set(
    folder: Path, names: list[str], make: Callable[[int], tuple[np.ndarray, list]]
) -> tuple[list[dict], list[dict]]:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, name in enumerate(names):
        img, shapes = make(i)
        Image.fromarray(img).save(folder / name)
        images.append(
            {"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]}
        )
        for cid, mask in shapes:
            annotations.append(_annotation(len(annotations) + 1, i + 1, cid, mask))
    return images, annotations


def make_sample_data(root: str | Path, *, n_images: int = 12, seed: int = 0) -> SampleData:
    """Write the dataset under ``root`` (files are overwritten); return where it is."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    root = Path(root)
    data = SampleData(
        root=root,
        images=root / "images",
        targets=root / "targets.json",
        references_dir=root / "references",
        references=root / "references.json",
    )
    targets = [f"target_{i:03d}.png" for i in range(n_images)]
    images, anns = _write_set(
        data.images, targets, lambda i: _target(np.random.default_rng([seed, 0, i]))
    )
    data.targets.write_text(json.dumps(_coco(images, anns, "refseg demo targets")))

    pool = [(c, k) for c in range(len(CLASSES)) for k in range(REFERENCES_PER_CLASS)]

    def reference(i: int) -> tuple[np.ndarray, list]:
        cls, k = pool[i]
        img, mask = _reference(cls, np.random.default_rng([seed, 1, cls, k]))
        return img, [(CLASSES[cls][0], mask)]

    names = [f"ref_{CLASSES[c][1]}_{k}.png" for c, k in pool]
    images, anns = _write_set(data.references_dir, names, reference)
    data.references.write_text(json.dumps(_coco(images, anns, "refseg demo references")))
    return data
