"""The reference context crop (method.md §1.2): integer box geometry, no pixels.

Re-exported by :mod:`refseg.core.imaging` (``imaging.context_crop_box``), where it lived.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["context_crop_box"]


def context_crop_box(
    bbox_xywh: Sequence[float], image_hw: Sequence[int], scale: float = 1.2
) -> tuple[int, int, int, int]:
    """Square context crop around a reference box (method.md §1.2), clipped to the image.

    Convention (the paper's code, reproduced exactly): the corners ``x0 = int(x)``,
    ``x1 = int(x + w)`` (likewise y) are truncated toward zero first; the centre is
    ``((x0 + x1) / 2, (y0 + y1) / 2)``; the side is ``max(x1 - x0, y1 - y0) * scale``; the
    crop corners are ``int(centre -/+ side / 2)``, clipped to ``[0, W]`` and ``[0, H]``.

    Returns:
        ``(x0, y0, x1, y1)`` ints, end exclusive: ``image[y0:y1, x0:x1]``. Near a border
        the crop is clipped, so it may be non-square.

    Raises:
        ValueError: a box with non-positive or non-finite size, or one whose crop is empty
            (a sub-pixel box, or a box outside the image).
    """
    if len(bbox_xywh) != 4:
        raise ValueError(f"bbox_xywh must have 4 numbers (x, y, w, h), got {bbox_xywh!r}")
    bx, by, bw, bh = (float(v) for v in bbox_xywh)
    img_h, img_w = int(image_hw[0]), int(image_hw[1])
    if not all(math.isfinite(v) for v in (bx, by, bw, bh)) or bw <= 0 or bh <= 0:
        raise ValueError(f"degenerate box {bbox_xywh!r}: width and height must be finite and > 0")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    if img_h < 1 or img_w < 1:
        raise ValueError(f"image_hw must be positive, got {tuple(image_hw)}")
    x0, y0, x1, y1 = int(bx), int(by), int(bx + bw), int(by + bh)
    mid_x, mid_y = (x0 + x1) * 0.5, (y0 + y1) * 0.5
    side = max(x1 - x0, y1 - y0) * scale
    cx0 = max(0, int(mid_x - side * 0.5))
    cy0 = max(0, int(mid_y - side * 0.5))
    cx1 = min(img_w, int(mid_x + side * 0.5))
    cy1 = min(img_h, int(mid_y + side * 0.5))
    if cx1 <= cx0 or cy1 <= cy0:
        raise ValueError(
            f"box {bbox_xywh!r} gives an empty context crop {(cx0, cy0, cx1, cy1)} in an image "
            f"of {img_h} x {img_w} (sub-pixel after truncation, or outside the image)"
        )
    return cx0, cy0, cx1, cy1
