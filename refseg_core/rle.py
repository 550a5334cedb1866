"""COCO run-length encoding (RLE) of binary masks: pure functions around ``pycocotools.mask``.

Conventions: a mask is an ``(H, W)`` bool array, a stack is ``(N, H, W)`` bool. A COCO RLE
is ``{"size": [H, W], "counts": str}`` (compressed counts as a UTF-8 string, so that it
serialises to JSON and Arrow as is). Inputs also accept ``counts`` as ``bytes`` (what
pycocotools returns) or as a list of ints (COCO's "uncompressed RLE", used for crowd
annotations). Boxes are COCO ``xywh`` in pixels, float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

Rle = dict[str, Any]

SEGMENTATION_FORMS = (
    "COCO RLE {'size': [h, w], 'counts': str}, uncompressed RLE {'size': [h, w], 'counts': "
    "[ints]}, or polygons [[x0, y0, x1, y1, ...], ...] in pixels"
)


def _compressed(rle: Mapping[str, Any]) -> Rle:
    """Return ``rle`` as compressed RLE with ``bytes`` counts (pycocotools' own form)."""
    if "size" not in rle or "counts" not in rle:
        raise ValueError(f"an RLE needs 'size' and 'counts' keys, got keys {sorted(rle)}")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("utf-8")}
    if isinstance(counts, bytes):
        return {"size": [h, w], "counts": counts}
    if isinstance(counts, (Sequence, np.ndarray)):
        # Uncompressed RLE: frPyObjects compresses it (it sums to H*W or pycocotools fails).
        total = int(sum(int(c) for c in counts))
        if total != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {total}, expected H*W = {h * w}")
        out = mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w)
        return {"size": [h, w], "counts": out["counts"]}
    raise TypeError(f"RLE counts must be str, bytes or a list of ints, got {type(counts)!r}")


def _as_str(rle: Mapping[str, Any]) -> Rle:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("utf-8")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode_masks(masks: np.ndarray) -> list[Rle]:
    """Encode ``masks`` ``(N, H, W)`` bool into N COCO RLEs with ``str`` counts.

    One mask at a time: the only copy is one ``(H, W)`` column-major mask (pycocotools
    reads column-major bytes), never a second ``(N, H, W)`` array.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if masks.dtype != np.bool_:
        raise TypeError(f"masks must be bool, got {masks.dtype}")
    out = []
    for m in masks:
        fortran = np.asfortranarray(m.view(np.uint8))[:, :, None]  # (H, W, 1), one copy
        out.append(_as_str(mask_utils.encode(fortran)[0]))
    return out


def encode_window(
    mask: np.ndarray, top: int, left: int, size: tuple[int, int], *, columns: bool = False
) -> Rle:
    """COCO RLE of an ``size = (H, W)`` image that is false outside one window.

    Args:
        mask: ``(h, w)`` bool, the window's pixels, or with ``columns=True`` its transpose
            ``(w, h)`` (the window column by column: COCO's order, so no transposing copy
            is made here); the window's top-left pixel is ``(top, left)`` and it lies
            inside the image.

    Returns:
        The same RLE (``str`` counts) as ``encode_masks`` of the whole-image mask. A window
        under a third of the image is encoded from the window alone (run boundaries found
        column by column and placed in the image's column-major pixel order); a larger one
        through one whole-image column-major copy (H x W bytes), which pycocotools encodes
        faster than the window's own runs are found.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.dtype != np.bool_:
        raise ValueError(f"mask must be (h, w) bool, got {m.dtype} {m.shape}")
    cols_first = m if columns else m.T  # (w, h)
    h, w = (int(v) for v in size)
    bw, bh = cols_first.shape
    if top < 0 or left < 0 or top + bh > h or left + bw > w:
        raise ValueError(f"window {(top, left, bh, bw)} (top, left, h, w) is outside {h} x {w}")
    if 3 * m.size > h * w:  # a large window: pycocotools' C encoder on the whole image
        full = np.zeros((w, h), dtype=np.uint8)  # column-major (H, W) as its transpose
        full[left : left + bw, top : top + bh] = cols_first
        return _as_str(mask_utils.encode(full.T[:, :, None])[0])
    padded = np.zeros((bw, bh + 2), dtype=np.int8)
    padded[:, 1:-1] = cols_first
    cols, ks = np.nonzero(np.diff(padded, axis=1))  # run starts and ends, column-major
    pos = (cols.astype(np.int64) + left) * h + top + ks
    if pos.size > 1:  # a run that ends at a column's bottom and restarts at the next top
        same = pos[1:] == pos[:-1]
        if same.any():
            keep = np.ones(pos.size, dtype=bool)
            keep[1:] &= ~same
            keep[:-1] &= ~same
            pos = pos[keep]
    pos = pos[pos < h * w]  # a run that reaches the last pixel ends with the image
    counts = np.diff(np.concatenate([[0], pos, [h * w]])).astype(np.uint32)
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return _as_str(rle)


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode one RLE (compressed str/bytes counts or uncompressed list) to ``(H, W)`` bool."""
    return mask_utils.decode(_compressed(rle)).view(bool)  # 0/1 bytes: a view, no copy


def rle_area(rles: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Foreground pixel count of each RLE: ``(N,)`` float64."""
    if len(rles) == 0:
        return np.zeros((0,), dtype=np.float64)
    return np.asarray(mask_utils.area([_compressed(r) for r in rles]), dtype=np.float64)


def rle_to_bbox(rles: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Tight COCO box of each RLE: ``(N, 4)`` float64 ``xywh`` (w = extent in pixels)."""
    if len(rles) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    boxes = mask_utils.toBbox([_compressed(r) for r in rles])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def polygons_to_rle(polys: Sequence[Sequence[float]], h: int, w: int) -> Rle:
    """Rasterise COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (one object) to one RLE."""
    polys = [list(map(float, p)) for p in polys]
    if not polys:
        raise ValueError("polygon segmentation is empty")
    for p in polys:
        if len(p) < 6 or len(p) % 2:
            raise ValueError(f"a polygon needs >= 3 (x, y) pairs, got {len(p)} numbers")
    parts = mask_utils.frPyObjects(polys, int(h), int(w))
    return _as_str(mask_utils.merge(parts))


def annotation_to_rle(ann: Mapping[str, Any], h: int, w: int) -> Rle:
    """The segmentation of a COCO annotation (polygons, RLE or uncompressed RLE) as one RLE.

    ``h, w`` is the image size; an RLE whose size differs raises ``ValueError``.
    """
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, list) and not seg):
        raise ValueError(f"annotation {ann.get('id')} has no segmentation")
    if isinstance(seg, list):
        return polygons_to_rle(seg, h, w)
    if isinstance(seg, Mapping):
        rle = _compressed(seg)
        if rle["size"] != [int(h), int(w)]:
            raise ValueError(
                f"annotation {ann.get('id')}: RLE size {rle['size']} != image size {[h, w]}"
            )
        return _as_str(rle)
    raise TypeError(f"annotation {ann.get('id')}: unsupported segmentation {type(seg)!r}")


def segmentation_to_rle(seg: Any, h: int, w: int) -> Rle:
    """A COCO segmentation in any of ``SEGMENTATION_FORMS`` (or one flat polygon
    ``[x0, y0, ...]``) as one compressed RLE of an ``h`` x ``w`` image.

    Raises ``ValueError`` / ``TypeError`` for anything else, or an RLE of another size.
    """
    if isinstance(seg, Mapping):
        rle = _compressed(seg)
        if rle["size"] != [int(h), int(w)]:
            raise ValueError(f"RLE size {rle['size']} is not the image's {[int(h), int(w)]}")
        return _as_str(rle)
    if isinstance(seg, list) and seg:
        return polygons_to_rle(seg if isinstance(seg[0], list | tuple) else [seg], h, w)
    raise TypeError(f"got {type(seg).__name__} {str(seg)[:40]}")
