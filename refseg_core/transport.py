"""The proposals' transport form: compact, exact bytes between the proposal and matching
stages, and in the proposal cache (npz arrays, no pickle)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from refseg.core.proposals import Proposals

__all__ = ["encode_proposals", "decode_proposals"]


def encode_proposals(proposals: Proposals) -> bytes:
    """Compact, exact transport form (npz, no pickle).

    Masks are stored as bit-packed signs plus the float32 logits of pixels near a sign
    change only; interior pixels decode as ±1e4. Resampling to the original size
    (``refseg.core.tensors.lowres_to_original``) thresholded at 0 is then unchanged:
    every output pixel is a positive-weighted mean of low-res pixels, so its sign is
    decided by them alone wherever they share one sign, and every window that mixes
    signs is kept exactly. A window is 2 x 2 pixels when enlarging (the "boundary": a
    pixel whose 3x3 neighbourhood has both signs) and up to ceil(2 s) pixels per axis
    when the antialiased square resize shrinks by s > 1 (originals smaller than the
    low-res map): the boundary is then widened by ceil(2 s) - 1 pixels on that axis.
    """
    logits = proposals.logits.detach().float().cpu()
    fg = logits > 0
    n, h, w = fg.shape
    if n:
        f = fg[:, None].float()
        hi = F.max_pool2d(f, 3, stride=1, padding=1)
        lo = -F.max_pool2d(-f, 3, stride=1, padding=1)
        boundary = hi != lo
        ry, rx = _shrink_margin(proposals, h, w)
        if ry or rx:
            kernel = (2 * ry + 1, 2 * rx + 1)
            band = F.max_pool2d(boundary.float(), kernel, stride=1, padding=(ry, rx))
            boundary = band > 0
        boundary = boundary[:, 0]
    else:
        boundary = torch.zeros((0, h, w), dtype=torch.bool)
    flat_idx = torch.nonzero(boundary.reshape(-1)).flatten()
    buf = io.BytesIO()
    np.savez(
        buf,
        signs=np.packbits(fg.numpy().reshape(n, h * w), axis=1),
        boundary_index=flat_idx.numpy().astype(np.int32),
        boundary_value=logits.reshape(-1)[flat_idx].numpy(),
        iou=proposals.iou.detach().float().cpu().numpy(),
        points=proposals.points.detach().float().cpu().numpy(),
        shape=np.array([n, h, w], dtype=np.int64),
        sizes=np.array(
            [proposals.input_size, *proposals.valid_hw, *proposals.orig_hw], dtype=np.int64
        ),
    )
    return buf.getvalue()


def _shrink_margin(p: Proposals, h: int, w: int) -> tuple[int, int]:
    """Extra exact pixels per axis around sign changes: ceil(2 s) - 1 where the square
    resize to the original shrinks (antialiased, scale s = low-res / original > 1)."""
    if p.valid_hw != (p.input_size, p.input_size):
        return 0, 0  # longest-side: bilinear sampling, two neighbours per axis
    return tuple(  # type: ignore[return-value]
        math.ceil(2 * lo / orig) - 1 if lo > orig else 0
        for lo, orig in ((h, p.orig_hw[0]), (w, p.orig_hw[1]))
    )


def decode_proposals(data: bytes) -> Proposals:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    n, h, w = (int(v) for v in z["shape"])
    signs = np.unpackbits(z["signs"], axis=1, count=h * w).astype(bool) if n else None
    dense = np.full((n, h * w), -1e4, dtype=np.float32)
    if n:
        dense[signs] = 1e4
    dense = dense.reshape(-1)
    dense[z["boundary_index"]] = z["boundary_value"]
    size, vh, vw, oh, ow = (int(v) for v in z["sizes"])
    return Proposals(
        torch.from_numpy(dense.reshape(n, h, w)),
        torch.from_numpy(z["iou"]),
        torch.from_numpy(z["points"]),
        size,
        (vh, vw),
        (oh, ow),
    )
