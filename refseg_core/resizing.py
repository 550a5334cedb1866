"""Resizing images into the models' input square (method.md §3.1) and back (§4.5).

Re-exported by :mod:`refseg.core.imaging`, where it lived. No torch import here (only for
type hints), so decode tasks start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from refseg.core.config import ResizeMode

if TYPE_CHECKING:  # torch is imported only where tensors are made (refseg.core.tensors)
    import torch

__all__ = [
    "PreparedTarget",
    "ResizeInfo",
    "longest_side_hw",
    "prepare_target",
    "resize_image",
    "resize_longest_side",
    "resize_square",
]

_BICUBIC = Image.Resampling.BICUBIC


def _shape(img: np.ndarray | Image.Image) -> tuple[int, ...]:
    """(H, W[, C]) of an array or of a PIL image (C = 3 for RGB)."""
    if isinstance(img, Image.Image):
        return (img.height, img.width, *((len(img.getbands()),) if img.mode != "L" else ()))
    return tuple(int(v) for v in img.shape)


def _pil_resize(img: np.ndarray | Image.Image, hw: tuple[int, int]) -> np.ndarray:
    if isinstance(img, Image.Image):  # resized from PIL's pixels, no array copy first
        return np.array(img.resize((hw[1], hw[0]), _BICUBIC))
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or 0 in img.shape[:2]:
        raise ValueError(
            f"expected a non-empty (H, W[, C]) uint8 image, got {img.dtype} {img.shape}"
        )
    out = Image.fromarray(np.ascontiguousarray(img)).resize((hw[1], hw[0]), _BICUBIC)
    return np.array(out)


def resize_square(img: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """PIL-bicubic resize of an (H, W[, 3]) uint8 image to (size, size[, 3]).

    The aspect ratio is not kept: the paper's default for SAM2 targets.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return _pil_resize(img, (size, size))


def longest_side_hw(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) of an image scaled so its longest side is ``size``, rounded half up, >= 1."""
    h, w = hw
    scale = size / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def resize_longest_side(
    img: np.ndarray | Image.Image, size: int
) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL-bicubic resize keeping the aspect ratio, padded with zeros at bottom/right.

    Returns:
        ``(square, (h, w))``: the (size, size[, 3]) uint8 array and the (h, w) of the image
        inside it, at its top-left corner (the SAM predictor's layout).
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    shape = _shape(img)
    vh, vw = longest_side_hw(shape[:2], size)
    resized = _pil_resize(img, (vh, vw))
    square = np.zeros((size, size, *shape[2:]), dtype=np.uint8)
    square[:vh, :vw] = resized
    return square, (vh, vw)


@dataclass(frozen=True)
class ResizeInfo:
    """How an original image was put into a ``size`` x ``size`` model input.

    ``orig_hw``: the original (H, W). ``mode``: ``"square"`` (stretched, valid_hw ==
    (size, size)) or ``"longest-side"`` (image at the top-left, zero padding elsewhere).
    ``valid_hw``: the (h, w) of the image inside the input square.
    """

    orig_hw: tuple[int, int]
    size: int
    mode: ResizeMode
    valid_hw: tuple[int, int]

    def to_input_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) continuous (x, y) in original pixels -> input-square pixels."""
        sx = self.valid_hw[1] / self.orig_hw[1]
        sy = self.valid_hw[0] / self.orig_hw[0]
        return xy * xy.new_tensor([sx, sy])

    def to_original_xy(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) continuous (x, y) in input-square pixels -> original pixels."""
        sx = self.orig_hw[1] / self.valid_hw[1]
        sy = self.orig_hw[0] / self.valid_hw[0]
        return xy * xy.new_tensor([sx, sy])


def resize_image(img: np.ndarray, size: int, mode: ResizeMode) -> tuple[np.ndarray, ResizeInfo]:
    """Resize an (H, W, 3) uint8 image into the (size, size, 3) model input per ``mode``."""
    orig = (int(img.shape[0]), int(img.shape[1]))
    if mode == "square":
        return resize_square(img, size), ResizeInfo(orig, size, mode, (size, size))
    if mode == "longest-side":
        square, valid = resize_longest_side(img, size)
        return square, ResizeInfo(orig, size, mode, valid)
    raise ValueError(f"resize mode must be 'square' or 'longest-side', got {mode!r}")


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class PreparedTarget:
    """A target resized for SAM2: (S, S, 3) uint8 square plus where the image lies in it."""

    square: np.ndarray
    valid_hw: tuple[int, int]
    orig_hw: tuple[int, int]


def prepare_target(
    image: np.ndarray | Image.Image, size: int, mode: ResizeMode = "square"
) -> PreparedTarget:
    """Resize an (H, W, 3) uint8 RGB image (or an RGB PIL image: the same result without an
    array copy) to the SAM2 input square (PIL bicubic).

    ``square`` stretches to size x size (the paper); ``longest-side`` keeps the aspect
    ratio and pads bottom/right with zeros (SAM2's predictor).
    """
    orig = _shape(image)[:2]
    if mode == "square":
        return PreparedTarget(resize_square(image, size), (size, size), orig)
    square, valid = resize_longest_side(image, size)
    return PreparedTarget(square, (int(valid[0]), int(valid[1])), orig)
