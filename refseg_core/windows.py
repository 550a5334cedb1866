"""Windows of the original image and torch's resize, axis by axis (for refseg.core.fullres).

``Window``: a row/column range of the original image. ``axis(n_in, n_out)``: torch's own
antialiased bilinear weights along one axis, read back from the kernel by resizing the
identity, with each output's first and last tap. ``longest_side_grid``: the grid_sample
coordinates ``lowres_to_original`` uses in ``"longest-side"`` mode. ``exact_fma``: one
float32 rounding of ``a * b + c``, as a fused multiply-add gives it. ``first_last`` and
``spans`` turn positive low-res rows/columns into the output ranges their taps reach.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from refseg.core.imaging import ResizeInfo

__all__ = ["Axis", "Window", "axis", "exact_fma", "first_last", "longest_side_grid", "spans"]


@dataclass(frozen=True)
class Window:
    """Rows ``y0:y1`` and columns ``x0:x1`` (ends exclusive) of the original image."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)

    def rows(self, y0: int, y1: int) -> Window | None:
        """This window's part of rows ``y0:y1``, or None if they do not meet."""
        a, b = max(self.y0, y0), min(self.y1, y1)
        return Window(a, b, self.x0, self.x1) if a < b else None


def exact_fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``round_float32(a * b + c)`` with one rounding (a fused multiply-add), float32 in/out.

    ``a * b`` is exact in float64; the float64 sum is rounded once more, which can only
    differ from a single rounding where it lands exactly halfway between two float32
    values: there the sum's exact error (TwoSum) decides the side.
    """
    s = a.double() * b.double()
    c64 = c.double()
    r = s + c64
    bv = r - s
    err = (s - (r - bv)) + (c64 - bv)  # s + c == r + err exactly
    f = r.float()
    fd = f.double()
    toward = torch.where(r > fd, torch.full_like(f, math.inf), torch.full_like(f, -math.inf))
    g = torch.nextafter(f, toward)
    tie = (r != fd) & ((r - fd) == (g.double() - r))
    wrong = tie & (err != 0) & ((err > 0) == (r > fd))
    return torch.where(wrong, g, f)


@dataclass(frozen=True)
class Axis:
    """One axis of torch's antialiased bilinear resize, ``n_in`` -> ``n_out`` samples.

    ``lo``/``hi``: (n_out,) first and last input index with a nonzero weight.
    ``i0``/``i1``/``w0``/``w1``: (n_out,) the two taps of an enlarging axis (``two_tap``).
    """

    lo: np.ndarray
    hi: np.ndarray
    i0: torch.Tensor
    i1: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    two_tap: bool


@functools.lru_cache(maxsize=32)
def axis(n_in: int, n_out: int) -> Axis:
    # Resizing the identity along one axis returns each output's weights exactly:
    # 1 * w = w, and the other taps add exact zeros.
    eye = torch.eye(n_in, dtype=torch.float32)[None, None]
    op = F.interpolate(
        eye, size=(n_out, n_in), mode="bilinear", align_corners=False, antialias=True
    )
    op = op[0, 0]  # (n_out, n_in)
    nz = op != 0
    lo = nz.to(torch.uint8).argmax(dim=1)
    hi = n_in - 1 - nz.flip(1).to(torch.uint8).argmax(dim=1)
    i1 = (lo + 1).clamp(max=n_in - 1)
    w0 = op.gather(1, lo[:, None])[:, 0]
    w1 = torch.where(i1 > lo, op.gather(1, i1[:, None])[:, 0], torch.zeros_like(w0))
    return Axis(lo.numpy(), hi.numpy(), lo, i1, w0, w1, bool(((hi - lo) <= 1).all()))


@functools.lru_cache(maxsize=32)
def longest_side_grid(info: ResizeInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(H,) and (W,) float32 grid_sample coordinates, as ``lowres_to_original`` makes them."""
    oh, ow = info.orig_hw
    vh, vw = info.valid_hw
    gy = (torch.arange(oh, dtype=torch.float64) + 0.5) * (2 * vh / (oh * info.size))
    gx = (torch.arange(ow, dtype=torch.float64) + 0.5) * (2 * vw / (ow * info.size))
    return (gy - 1).float(), (gx - 1).float()


def first_last(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, n) bool -> (K,) first and last True index; -1 and -1 where a row has none."""
    n = f.shape[1]
    first = np.argmax(f, axis=1)
    last = n - 1 - np.argmax(f[:, ::-1], axis=1)
    none = ~f.any(axis=1)
    first[none], last[none] = -1, -1
    return first, last


def spans(
    lo: np.ndarray, hi: np.ndarray, first: np.ndarray, last: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Output ranges ``[a, b)`` whose taps ``[lo, hi]`` (non-decreasing over outputs) meet
    the input ranges ``[first, last]``; (K,) each."""
    return np.searchsorted(hi, first, "left"), np.searchsorted(lo, last, "right")
