"""The proposals' transport form: compact, exact bytes between the proposal and matching
stages, and in the proposal cache (npz arrays, no pickle)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from refseg.core.proposals import Proposals

__all__ = ["encode_proposals", "decode_proposals", "pack_bits", "transport_arrays"]


#: Proposals whose transport arrays are computed per step on their device: bounds the
#: float copies of the max-pools to a few hundred MiB at 256 x 256 (256 masks: 64 MiB each).
ENCODE_CHUNK = 256
#: Bit weights of one packed byte, most significant first (``np.packbits``' default order).
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


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

    The arrays are computed where the logits are (:func:`transport_arrays`): on a GPU
    only the packed signs, the boundary pixels and the small per-proposal arrays are copied
    to the host, never the (N, h, w) logits.
    """
    arrays = {k: v.cpu().numpy() for k, v in transport_arrays(proposals).items()}
    buf = io.BytesIO()
    np.savez(
        buf,
        **arrays,
        sizes=np.array(
            [proposals.input_size, *proposals.valid_hw, *proposals.orig_hw], dtype=np.int64
        ),
    )
    return buf.getvalue()


def transport_arrays(proposals: Proposals) -> dict[str, torch.Tensor]:
    """The transport form's arrays, on the proposals' device (torch ops only).

    Returns:
        ``signs`` (N, ceil(h*w / 8)) uint8, each row ``np.packbits`` of the row-major
        foreground (logit > 0); which pixels are kept exactly, as ``boundary_index`` (K,)
        int32 flat indices into the (N, h, w) logits, or, where that is smaller (K above
        1/32 of the pixels: speckled masks), as ``boundary_mask`` (N, ceil(h*w / 8)) uint8
        packed like ``signs``; ``boundary_value`` (K,) float32 their logits, in row-major
        order; ``iou`` (N,) float32; ``points`` (N, 2) float32; ``shape`` (3,) int64.
    """
    logits = proposals.logits.detach()
    dev = logits.device
    n, h, w = logits.shape
    ry, rx = _shrink_margin(proposals, h, w)
    signs, masks, index, value = [], [], [], []
    for s in range(0, n, ENCODE_CHUNK):
        part = logits[s : s + ENCODE_CHUNK].float()
        fg = part > 0
        boundary = _boundary(fg, ry, rx)
        signs.append(pack_bits(fg.reshape(fg.shape[0], h * w)))
        masks.append(pack_bits(boundary.reshape(fg.shape[0], h * w)))
        idx = torch.nonzero(boundary.reshape(-1)).flatten()
        value.append(part.reshape(-1)[idx])
        index.append((idx + s * h * w).to(torch.int32))
    empty = torch.zeros((0, -(-h * w // 8)), dtype=torch.uint8, device=dev)
    kept = sum(int(i.numel()) for i in index)
    where: dict[str, torch.Tensor] = (
        {"boundary_mask": torch.cat(masks)}
        if 4 * kept > n * -(-h * w // 8)  # int32 indices would outweigh a bit per pixel
        else {"boundary_index": torch.cat(index) if n else torch.zeros(0, dtype=torch.int32)}
    )
    return {
        "signs": torch.cat(signs) if n else empty,
        **where,
        "boundary_value": torch.cat(value) if n else torch.zeros(0, dtype=torch.float32),
        "iou": proposals.iou.detach().float(),
        "points": proposals.points.detach().float(),
        "shape": torch.tensor([n, h, w], dtype=torch.int64, device=dev),
    }


def _boundary(fg: torch.Tensor, ry: int, rx: int) -> torch.Tensor:
    """(n, h, w) bool: pixels whose 3x3 neighbourhood has both signs, widened by (ry, rx)."""
    f = fg[:, None].float()
    hi = F.max_pool2d(f, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-f, 3, stride=1, padding=1)
    boundary = hi != lo
    if ry or rx:
        kernel = (2 * ry + 1, 2 * rx + 1)
        boundary = F.max_pool2d(boundary.float(), kernel, stride=1, padding=(ry, rx)) > 0
    return boundary[:, 0]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """``np.packbits(bits, axis=-1)`` in torch, on the tensor's device.

    Args:
        bits: (..., L) bool.

    Returns:
        (..., ceil(L / 8)) uint8; the first element of each group of 8 is the most
        significant bit, and a last partial group is padded with zeros.
    """
    pad = -bits.shape[-1] % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    groups = bits.unflatten(-1, (-1, 8)).to(torch.uint8)
    return (groups * weights).sum(dim=-1, dtype=torch.uint8)


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
    if "boundary_mask" in z.files:  # speckled masks: a bit per pixel (transport_arrays)
        kept = np.unpackbits(z["boundary_mask"], axis=1, count=h * w).astype(bool)
        dense[kept.reshape(-1)] = z["boundary_value"]
    else:
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
