"""Full-resolution masks of low-res logits inside windows, bit-identical to the whole image.

``lowres_to_original(logits, info) > threshold`` (method.md §4.5) builds a float image per
mask: K x H x W values for K masks. This module computes the same booleans one mask and one
window (a row/column range of the original image) at a time, so memory follows the window,
never K x H x W, and the work follows the mask's box instead of the image.

Why a window suffices: bilinear resizing, with or without antialiasing, is a weighted sum of
low-res pixels with non-negative weights, so a full-size pixel can exceed a threshold
``t >= 0`` only where one of its taps is positive. ``FullResolution.window`` returns the
rows and columns whose taps touch the positive low-res pixels; outside it the mask is false.

Why the values are bit-identical (not only close), ``"square"`` (``F.interpolate`` with
antialias): torch computes that resize as a horizontal pass (rounded to float32) followed
by a vertical pass, each output index from its own taps. Rows of the horizontal pass and
columns of the vertical pass are independent, so both run through torch's own kernel on
the rows and columns a window needs. Only the vertical pass, when it enlarges, is done
here for the window's rows alone: each output is ``t0 * w0 + t1 * w1`` over two taps with
torch's own weights (read back from the kernel), evaluated as the kernel does (one fused
multiply-add, or two roundings where the CPU has no FMA); values that the fast float32
evaluation leaves undecided are finished exactly in float64. ``"longest-side"``
(``grid_sample``): every output pixel depends only on its own grid coordinate, so the
window's part of the same grid gives the same values.

Which evaluation the running kernel uses is checked once per device against a whole-image
resize (``exactness``); where neither matches, ``FullResolution.exact`` is False and the
caller must take the dense path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from refseg.core.imaging import ResizeInfo
from refseg.core.tensors import lowres_to_original
from refseg.core.windows import Window, axis, exact_fma, first_last, longest_side_grid, spans

__all__ = ["FullResolution", "Window", "exact_fma", "exactness"]

#: Float32 values per step of the windowed evaluation (1 MiB): temporaries stay in cache.
CHUNK = 2**18
#: Float32 values per step of torch's vertical pass over whole columns (16 MiB).
KERNEL_CHUNK = 2**22
#: The windowed vertical pass costs up to about this many times torch's per pixel: a
#: window taller than 1/ROUTE_RATIO of the image runs torch's pass over whole columns.
ROUTE_RATIO = 2
#: Share of a window's pixels that the sure-sign test may leave open before every pixel
#: is evaluated instead (speckled masks).
UNSURE_SHARE = 0.1
#: Taps at least this large cannot underflow when weighted: their output keeps their sign.
_TINY = 2.0**-100


class FullResolution:
    """Thresholded full-resolution masks of (h, w) low-res logits, window by window.

    Args:
        info: how the image was put into the model's input square.
        lowres_hw: (h, w) of the low-res logits (SAM2: input size / 4).
        threshold: foreground where the full-resolution logit is ``> threshold``.
        device: where the logits live and the work runs.
        variant: the vertical pass's evaluation, ``"fma"`` or ``"plain"``; None checks the
            device once (``exactness``). Tests force one.
    """

    def __init__(
        self,
        info: ResizeInfo,
        lowres_hw: tuple[int, int],
        *,
        threshold: float = 0.0,
        device: torch.device | str = "cpu",
        variant: str | None = None,
    ) -> None:
        self.info = info
        self.h, self.w = (int(v) for v in lowres_hw)
        self.oh, self.ow = info.orig_hw
        self.threshold = float(threshold)
        self.device = torch.device(device)
        self.square = info.valid_hw == (info.size, info.size)  # lowres_to_original's test
        self.variant, self.exact = (variant, True) if variant else exactness(self.device)
        if self.square:
            ax_y, ax_x = axis(self.h, self.oh), axis(self.w, self.ow)
            self._lo_y, self._hi_y = ax_y.lo, ax_y.hi
            self._lo_x, self._hi_x = ax_x.lo, ax_x.hi
            self._two_tap = ax_y.two_tap
            dev = self.device
            self._i0, self._i1 = ax_y.i0.to(dev), ax_y.i1.to(dev)
            self._w0, self._w1 = ax_y.w0.to(dev), ax_y.w1.to(dev)
            self._w1d = self._w1.double()
        else:
            gy, gx = longest_side_grid(info)
            self._gy, self._gx = gy.to(self.device), gx.to(self.device)
            # the low-res row/column each output samples (grid_sample's unnormalisation,
            # border clamp), in float64: the window below widens it by one pixel per side
            self._sy = np.clip(((gy.double().numpy() + 1) * self.h - 1) / 2, 0, self.h - 1)
            self._sx = np.clip(((gx.double().numpy() + 1) * self.w - 1) / 2, 0, self.w - 1)

    # ------------------------------------------------------------------ windows

    def windows(self, logits: torch.Tensor) -> list[Window | None]:
        """The windows outside which each of ``logits`` (K, h, w) is surely not foreground.

        None for a mask that is empty at every size (no positive low-res pixel, or only
        ones that no full-size pixel samples). A negative threshold gives the whole image
        (a pixel may pass it with no positive tap).
        """
        k = int(logits.shape[0])
        if self.threshold < 0:
            return [Window(0, self.oh, 0, self.ow)] * k
        pos = (logits > 0).cpu().numpy()
        r0, r1 = first_last(pos.any(axis=2))  # (K,) first/last positive row, -1 if none
        c0, c1 = first_last(pos.any(axis=1))
        if self.square:
            y0, y1 = spans(self._lo_y, self._hi_y, r0, r1)
            x0, x1 = spans(self._lo_x, self._hi_x, c0, c1)
        else:  # taps floor(s), floor(s) + 1 of sample position s, one pixel of margin
            y0, y1 = spans(np.floor(self._sy) - 1, np.floor(self._sy) + 2, r0, r1)
            x0, x1 = spans(np.floor(self._sx) - 1, np.floor(self._sx) + 2, c0, c1)
        ok = (r0 >= 0) & (y0 < y1) & (x0 < x1)
        return [
            Window(int(y0[i]), int(y1[i]), int(x0[i]), int(x1[i])) if ok[i] else None
            for i in range(k)
        ]

    def window(self, logits: torch.Tensor) -> Window | None:
        """``windows`` of one (h, w) mask."""
        return self.windows(logits[None])[0]

    # ------------------------------------------------------------------ masks

    def mask(self, logits: torch.Tensor, win: Window) -> torch.Tensor:
        """(win.h, win.w) bool: ``lowres_to_original(logits) > threshold`` inside ``win``.

        Args:
            logits: (h, w) float32 low-res logits of one mask, on ``device``.
        """
        x = logits.float()
        if not self.square:
            return self._grid_mask(x, win)
        if self._two_tap and self.variant and (win.y1 - win.y0) * ROUTE_RATIO < self.oh:
            return self._emulated_mask(x, win)
        return self._kernel_mask(x, win)

    def values(self, logits: torch.Tensor, win: Window) -> torch.Tensor:
        """(win.h, win.w) float32 full-resolution logits inside ``win`` (for checks)."""
        x = logits.float()
        if not self.square:
            return self._grid(x, win.y0, win.y1, win.x0, win.x1)
        if self._two_tap and self.variant:
            temp, a = self._horizontal(x, win)
            i = slice(win.y0, win.y1)
            t0 = temp.index_select(0, self._i0[i] - a)
            t1 = temp.index_select(0, self._i1[i] - a)
            rows = torch.arange(win.y0, win.y1, device=self.device)[:, None].expand_as(t0)
            return self._two_taps(t0, t1, rows)
        return self._kernel_columns(x, win, lambda v: v)

    def _horizontal(self, x: torch.Tensor, win: Window) -> tuple[torch.Tensor, int]:
        """Torch's horizontal pass of the input rows the window's vertical taps read.

        Returns ``(temp, a)``: (rows, win.w) float32 for input rows ``a:a + rows``.
        """
        a = int(self._lo_y[win.y0])
        b = int(max(self._hi_y[win.y1 - 1], int(self._i1[win.y1 - 1]))) + 1
        rows = x[a:b][None, None]
        temp = F.interpolate(
            rows, size=(b - a, self.ow), mode="bilinear", align_corners=False, antialias=True
        )
        return temp[0, 0, :, win.x0 : win.x1], a

    def _emulated_mask(self, x: torch.Tensor, win: Window) -> torch.Tensor:
        """The vertical pass for the window's rows only (two taps per output row).

        Output rows come in runs that read the same two rows ``A``, ``B`` of the horizontal
        pass (an enlarging axis). With threshold 0, a pixel is surely foreground where
        ``A`` and ``B`` are both positive (and not so small that a product could underflow)
        and surely background where both are <= 0: non-negative weights keep the sign.
        Only the remaining pixels, a band along the mask's horizontal edges, are evaluated,
        exactly as the kernel does.
        """
        if self.threshold != 0:
            return self._emulated_mask_any(x, win)
        temp, a = self._horizontal(x, win)
        i0 = self._i0[win.y0 : win.y1]
        runs, inverse, counts = torch.unique_consecutive(
            i0, return_inverse=True, return_counts=True
        )
        starts = torch.cumsum(counts, 0) - counts
        ta = temp.index_select(0, runs - a)  # (R, w): first tap of each run
        tb = temp.index_select(0, self._i1[win.y0 + starts] - a)  # second tap
        sure_fg = (ta >= _TINY) & (tb >= _TINY)
        unsure = ~sure_fg & ((ta > 0) | (tb > 0))
        n_run, width, length = ta.shape[0], ta.shape[1], int(counts.max())
        if int(torch.count_nonzero(unsure)) * length > UNSURE_SHARE * n_run * length * width:
            return self._rows_positive(temp, a, win)  # speckles: every pixel, in float64
        # (R, L, w): run r's output rows, padded to the longest run
        padded = sure_fg[:, None, :].expand(n_run, length, width).clone()
        run, col = torch.nonzero(unsure, as_tuple=True)
        if run.numel():
            offset = torch.arange(length, device=self.device)
            rows = (win.y0 + starts[:, None] + offset).clamp(max=win.y1 - 1)  # (R, L)
            rows = rows[run]  # (M, L)
            t0 = ta[run, col][:, None].expand_as(rows)
            t1 = tb[run, col][:, None].expand_as(rows)
            padded[run, :, col] = self._two_taps_positive(t0, t1, rows)
        within = torch.arange(win.y1 - win.y0, device=self.device) - starts[inverse]
        return padded.reshape(n_run * length, width).index_select(0, inverse * length + within)

    def _rows_positive(self, temp: torch.Tensor, a: int, win: Window) -> torch.Tensor:
        """``values(...) > 0`` for every pixel of the window, a few rows at a time.

        The product ``t1 * w1`` of two float32 is exact in float64, so the float64 sum
        ``t1 * w1 + t0 * w0`` (``t0 * w0`` rounded to float32, as the kernel does) has the
        sign of the FMA's exact value; only a value so small that float32 rounds it to
        zero could differ, and none exists unless a tap is below 2**-60 (checked).
        """
        out = torch.empty(win.shape, dtype=torch.bool, device=self.device)
        nonzero = temp[temp != 0]
        tiny = bool(nonzero.numel()) and float(nonzero.abs().min()) < 2.0**-60
        step = max(1, CHUNK // max(win.x1 - win.x0, 1))
        for s in range(win.y0, win.y1, step):
            i = slice(s, min(s + step, win.y1))
            t0 = temp.index_select(0, self._i0[i] - a)
            t1 = temp.index_select(0, self._i1[i] - a)
            p0 = t0 * self._w0[i, None]
            part = out[i.start - win.y0 : i.stop - win.y0]
            if self.variant == "plain":
                torch.gt(p0 + t1 * self._w1[i, None], 0, out=part)
            elif tiny:
                torch.gt(exact_fma(t1, self._w1[i, None].expand_as(t1), p0), 0, out=part)
            else:
                exact = torch.addcmul(p0.double(), t1.double(), self._w1d[i, None])
                torch.gt(exact, 0, out=part)
        return out

    def _two_taps(self, t0: torch.Tensor, t1: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The kernel's value ``t0 * w0 + t1 * w1`` of output ``rows`` (flat, float32)."""
        p0 = t0 * self._w0[rows]
        if self.variant == "plain":
            return p0 + t1 * self._w1[rows]
        return exact_fma(t1, self._w1[rows], p0)

    def _two_taps_positive(
        self, t0: torch.Tensor, t1: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """``_two_taps(...) > 0``, with the exact FMA only where float32 leaves it open.

        ``q = p0 + p1`` (two roundings) is within 2**-23 (|p0| + |p1|) of the FMA's value;
        where ``|q|`` exceeds that, both have the same sign.
        """
        p0 = t0 * self._w0[rows]
        w1 = self._w1[rows]
        p1 = t1 * w1
        q = p0 + p1
        out = q > 0
        if self.variant == "plain":
            return out
        margin = (p0.abs() + p1.abs()) * 2.0**-20 + 2.0**-140
        near = torch.nonzero(q.abs() <= margin).flatten()
        if near.numel():
            out[near] = exact_fma(t1[near], w1[near], p0[near]) > 0
        return out

    def _emulated_mask_any(self, x: torch.Tensor, win: Window) -> torch.Tensor:
        """``_emulated_mask`` for a nonzero threshold: every pixel evaluated, in chunks."""
        temp, a = self._horizontal(x, win)
        thr = self.threshold
        out = torch.empty(win.shape, dtype=torch.bool, device=self.device)
        step = max(1, CHUNK // max(win.x1 - win.x0, 1))
        for s in range(win.y0, win.y1, step):
            i = slice(s, min(s + step, win.y1))
            t0 = temp.index_select(0, self._i0[i] - a)
            t1 = temp.index_select(0, self._i1[i] - a)
            w1 = self._w1[i, None]
            p0 = t0 * self._w0[i, None]
            p1 = t1 * w1
            q = p0 + p1  # the kernel's value without FMA; with FMA within a few ulps of it
            part = out[i.start - win.y0 : i.stop - win.y0]
            torch.gt(q, thr, out=part)
            if self.variant == "plain":
                continue
            # FMA rounds a * b + c once; q rounds twice. Where q is too close to the
            # threshold for both to agree surely, evaluate the FMA exactly.
            margin = (p0.abs() + p1.abs() + q.abs()) * 2.0**-21 + 2.0**-140
            near = torch.nonzero((q - thr).abs() <= margin, as_tuple=True)
            if near[0].numel():
                w1n = w1.expand_as(t1)[near]
                part[near] = exact_fma(t1[near], w1n, p0[near]) > thr
        return out

    def _kernel_columns(self, x: torch.Tensor, win: Window, fn) -> torch.Tensor:
        """Torch's whole-column vertical pass on the window's columns, rows cut after."""
        temp, a = self._horizontal(x, win)
        if a == 0 and temp.shape[0] == self.h:
            full = temp
        else:  # rows no output of the window reads: zeros
            full = torch.zeros((self.h, temp.shape[1]), dtype=torch.float32, device=self.device)
            full[a : a + temp.shape[0]] = temp
        parts = []
        step = max(1, KERNEL_CHUNK // self.oh)
        for c in range(0, full.shape[1], step):
            col = full[:, c : c + step].contiguous()[None, None]
            up = F.interpolate(
                col,
                size=(self.oh, col.shape[-1]),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            parts.append(fn(up[0, 0, win.y0 : win.y1]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _kernel_mask(self, x: torch.Tensor, win: Window) -> torch.Tensor:
        thr = self.threshold
        return self._kernel_columns(x, win, lambda v: v > thr)

    def _grid(self, x: torch.Tensor, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        gy, gx = torch.meshgrid(self._gx[x0:x1], self._gy[y0:y1], indexing="xy")
        grid = torch.stack([gy, gx], dim=-1)[None]
        out = F.grid_sample(
            x[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        return out[0, 0]

    def _grid_mask(self, x: torch.Tensor, win: Window) -> torch.Tensor:
        out = torch.empty(win.shape, dtype=torch.bool, device=self.device)
        step = max(1, CHUNK // max(win.x1 - win.x0, 1))
        for s in range(win.y0, win.y1, step):
            e = min(s + step, win.y1)
            part = self._grid(x, s, e, win.x0, win.x1)
            torch.gt(part, self.threshold, out=out[s - win.y0 : e - win.y0])
        return out


_EXACTNESS: dict[str, tuple[str | None, bool]] = {}


def exactness(device: torch.device) -> tuple[str | None, bool]:
    """``(variant, exact)`` for ``device``: which vertical-pass evaluation reproduces
    torch's resize there bit for bit (``"fma"``, ``"plain"`` or None), and whether the
    windowed computation is exact at all. Checked once per device type on a small probe
    against ``lowres_to_original`` of the whole image (enlarging and shrinking axes, both
    resize modes)."""
    key = device.type
    if key not in _EXACTNESS:
        _EXACTNESS[key] = _check(device)
    return _EXACTNESS[key]


def _check(device: torch.device) -> tuple[str | None, bool]:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn((2, 48, 40), generator=g) * 3).to(device)
    cases = [
        ResizeInfo((331, 517), 160, "square", (160, 160)),
        ResizeInfo((29, 300), 160, "square", (160, 160)),
        ResizeInfo((331, 517), 160, "longest-side", (102, 160)),
    ]

    def agrees(variant: str | None) -> bool:
        for info in cases:
            ref = lowres_to_original(x, info)
            fr = FullResolution(info, (48, 40), device=device, variant=variant or "plain")
            if variant is None:
                fr.variant = None  # whole-column kernel route only
            for k in range(x.shape[0]):
                win = Window(7, info.orig_hw[0] - 3, 5, info.orig_hw[1] - 2)
                got = fr.values(x[k], win)
                if not torch.equal(got, ref[k, win.y0 : win.y1, win.x0 : win.x1]):
                    return False
        return True

    if not agrees(None):
        return None, False
    for variant in ("fma", "plain"):
        if agrees(variant):
            return variant, True
    return None, True
