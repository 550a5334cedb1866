"""Pixels of the report page: reading images small, drawing masks and boxes, data URIs.

Overlays are drawn on thumbnails (long side ``THUMB_SIDE``): the page never embeds a
full-size image, and a large photo is decoded at a reduced scale where its format allows.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from refseg.core import rle as rle_ops
from refseg.core.imaging import decode_image, decode_thumbnail
from refseg.jobs.report_data import FILL_ALPHA, class_colour

__all__ = ["Shape", "draw_overlay", "read_image", "read_thumbnail", "to_data_uri"]


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        return ImageFont.load_default()


def _read(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def read_image(uri: str) -> np.ndarray:
    """``uri`` (fsspec) as ``(H, W, 3)`` uint8 RGB, EXIF-oriented as the pipeline decodes it."""
    return decode_image(_read(uri), uri=uri)


def read_thumbnail(uri: str, side: int) -> tuple[np.ndarray, float]:
    """``(thumb, scale)``: long side <= ``side``; a JPEG is decoded at a reduced scale, never
    whole (``imaging.decode_thumbnail``), so an overlay of a 48 MP photo stays small."""
    return decode_thumbnail(_read(uri), side, uri=uri)


def _thumb(img: np.ndarray, side: int, upscale: float = 1.0) -> tuple[np.ndarray, float]:
    """Resize ``(H, W, 3)`` so its long side is <= ``side`` (up to ``upscale`` x larger)."""
    h, w = img.shape[:2]
    s = min(side / max(h, w), upscale)
    if s == 1.0:
        return img, 1.0
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR)), s


def _scaled_mask(
    mask: np.ndarray, out_hw: tuple[int, int], scale: float, box: Sequence[float]
) -> np.ndarray:
    """``mask`` (H, W) bool resampled onto an ``out_hw`` grid; only its tight COCO xywh
    ``box`` (from its RLE: the mask is never scanned for it) is resized."""
    out = np.zeros(out_hw, dtype=bool)
    if box[2] <= 0 or box[3] <= 0:
        return out
    x0, y0 = int(box[0]), int(box[1])
    x1, y1 = x0 + int(box[2]), y0 + int(box[3])
    ty0, tx0 = int(y0 * scale), int(x0 * scale)
    ty1 = min(out_hw[0], max(ty0 + 1, round(y1 * scale)))
    tx1 = min(out_hw[1], max(tx0 + 1, round(x1 * scale)))
    crop = Image.fromarray(mask[y0:y1, x0:x1].astype(np.uint8) * 255)
    small = crop.resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BILINEAR)
    out[ty0:ty1, tx0:tx1] = np.asarray(small) >= 128
    return out


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` within 2 px of its border (4-neighbour erosion, twice)."""
    inner = mask
    for _ in range(2):
        e = inner.copy()
        e[1:] &= inner[:-1]
        e[:-1] &= inner[1:]
        e[:, 1:] &= inner[:, :-1]
        e[:, :-1] &= inner[:, 1:]
        inner = e
    return mask & ~inner


@dataclass(frozen=True)
class Shape:
    """One thing to draw: a mask (COCO RLE / None), its COCO xywh box, class and label."""

    rle: Mapping[str, Any] | None
    bbox: Sequence[float]
    category_id: int
    label: str


def draw_overlay(img: np.ndarray, shapes: Sequence[Shape], scale: float) -> np.ndarray:
    """Draw ``shapes`` (in original pixel coordinates) on a thumbnail ``img`` of the original
    resized by ``scale``: filled masks with outlines, or box outlines when there is no mask,
    then labels at each box's top-left corner. Returns ``(h, w, 3)`` uint8."""
    canvas = img.astype(np.float32)
    hw = img.shape[:2]
    boxes_only = []
    for shape in shapes:
        colour = np.asarray(class_colour(shape.category_id), dtype=np.float32)
        if shape.rle is None:
            boxes_only.append(shape)
            continue
        rle = shape.rle
        s = hw[0] / int(rle["size"][0])  # the mask's own grid may differ from the image's
        box = rle_ops.rle_to_bbox([rle])[0]  # from the runs: no scan of the decoded mask
        m = _scaled_mask(rle_ops.decode_rle(rle), hw, s, box)
        canvas[m] = canvas[m] * (1 - FILL_ALPHA) + colour * FILL_ALPHA
        canvas[_edge(m)] = colour
    pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw, font = ImageDraw.Draw(pil), _font()
    for shape in boxes_only:
        x, y, w, h = (v * scale for v in shape.bbox)
        draw.rectangle((x, y, x + w, y + h), outline=class_colour(shape.category_id), width=2)
    for shape in shapes:
        colour = class_colour(shape.category_id)
        left, top, right, bottom = draw.textbbox((0, 0), shape.label, font=font)
        tw, th = right - left + 4, bottom - top + 4
        x = min(max(0.0, shape.bbox[0] * scale), max(0.0, hw[1] - tw))
        y = shape.bbox[1] * scale - th
        y = y if y >= 0 else min(shape.bbox[1] * scale, max(0.0, hw[0] - th))
        draw.rectangle((x, y, x + tw, y + th), fill=colour)
        ink = (0, 0, 0) if sum(colour) > 380 else (255, 255, 255)
        draw.text((x + 2 - left, y + 2 - top), shape.label, fill=ink, font=font)
    return np.asarray(pil)


def to_data_uri(img: np.ndarray, fmt: str = "JPEG") -> str:
    """``(H, W, 3)`` uint8 as a ``data:image/...;base64`` URI."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, quality=82)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"
