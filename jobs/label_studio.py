"""Label Studio's JSON export: picking the annotation of a task and turning regions into masks.

The layout read (Label Studio's "JSON" export, one list of tasks)::

    [{"id": 1, "data": {"image": ..., "refseg_image_id": 11, "refseg_instances": [0, 1]},
      "annotations": [{"id": 5, "was_cancelled": false, "ground_truth": false,
                       "updated_at": "...", "result": [REGION, ...], ...}],
      "predictions": [PREDICTION or prediction id, ...], ...}]

A REGION has ``id``, ``type`` (``polygonlabels``, ``brushlabels``, ``rectanglelabels``...),
``original_width``, ``original_height`` and a ``value`` whose coordinates are percentages
of the image size: ``points: [[x, y], ...]`` for a polygon, ``x, y, width, height`` for a
rectangle, and for a brush ``format: "rle", rle: [int, ...]``: Label Studio's brush RLE
(the rle-pack bit stream, thi.ng/umbrella) of the flattened H x W x 4 RGBA mask, whose
alpha channel is the painted area. Newer Label Studio versions add ``origin``
(``prediction``, ``prediction-changed``, ``manual``) to each region, and export
``predictions`` as ids only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from refseg.core import rle as rle_ops

__all__ = [
    "LABEL_KEYS",
    "chosen_annotation",
    "decode_brush_rle",
    "region_label",
    "region_mask",
]

#: Region type -> the key of its label list inside ``value``.
LABEL_KEYS = {
    "polygonlabels": "polygonlabels",
    "brushlabels": "brushlabels",
    "rectanglelabels": "rectanglelabels",
    "ellipselabels": "ellipselabels",
    "labels": "labels",
}


def chosen_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The annotation that counts: not cancelled (skipped); a ground-truth one first, else
    the latest by ``updated_at`` (or ``created_at``), else the last listed; None if none."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None
    gt = [a for a in anns if a.get("ground_truth")]
    pool = gt or anns
    return max(enumerate(pool), key=lambda ka: (str(_when(ka[1])), ka[0]))[1]


def _when(ann: Mapping[str, Any]) -> str:
    return ann.get("updated_at") or ann.get("created_at") or ""


def region_label(region: Mapping[str, Any]) -> str | None:
    """The (first) label of a region, or None for a region without one."""
    key = LABEL_KEYS.get(str(region.get("type", "")).lower())
    labels = (region.get("value") or {}).get(key) if key else None
    return str(labels[0]) if labels else None


class _Bits:
    """MSB-first reader over a byte sequence."""

    def __init__(self, data: Sequence[int]) -> None:
        self.bits = np.unpackbits(np.asarray(data, dtype=np.uint8))
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > len(self.bits):
            raise ValueError("brush RLE ends early: the region is truncated")
        v = 0
        for b in self.bits[self.pos : self.pos + n]:
            v = (v << 1) | int(b)
        self.pos += n
        return v


def decode_brush_rle(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of a Label Studio brush region (``value.rle``).

    The stream: 32 bits value count, 5 bits word size - 1, four 4-bit run-length field
    sizes - 1, then chunks: 1 bit (repeat or literal), 2 bits (which size field), that
    many bits of run length - 1, then one word (repeated) or that many words.
    """
    bits = _Bits(rle)
    n = bits.read(32)
    if n != height * width * 4:
        raise ValueError(
            f"brush RLE holds {n} values, but a {width}x{height} RGBA mask has "
            f"{height * width * 4}: original_width/original_height do not fit the region"
        )
    word = bits.read(5) + 1
    sizes = [bits.read(4) + 1 for _ in range(4)]
    out = np.zeros(n, dtype=np.uint8)
    i = 0
    while i < n:
        repeat = bits.read(1)
        j = min(n, i + 1 + bits.read(sizes[bits.read(2)]))
        if repeat:
            out[i:j] = bits.read(word)
        else:
            for k in range(i, j):
                out[k] = bits.read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3] > 0


def region_mask(region: Mapping[str, Any], height: int, width: int) -> np.ndarray | None:
    """(H, W) bool mask of a polygon or brush region at the image size; None for a region
    with no area shape (a rectangle or keypoint: a box is not a mask)."""
    kind = str(region.get("type", "")).lower()
    value = region.get("value") or {}
    if kind in ("polygonlabels", "polygon"):
        pts = np.asarray(value.get("points") or [], dtype=np.float64).reshape(-1, 2)
        if len(pts) < 3:
            return None
        xy = pts / 100.0 * [width, height]
        return rle_ops.decode_rle(rle_ops.polygons_to_rle([xy.reshape(-1).tolist()], height, width))
    if kind in ("brushlabels", "brush") and value.get("format", "rle") == "rle":
        h = int(region.get("original_height") or height)
        w = int(region.get("original_width") or width)
        mask = decode_brush_rle(value.get("rle") or [], h, w)
        if (h, w) != (height, width):
            raise ValueError(
                f"brush region {region.get('id')} is {w}x{h}, the image is {width}x{height}"
            )
        return mask
    return None
