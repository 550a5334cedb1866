"""Tensor helpers of the method: image to float tensor, low-res maps back to the image.

Kept apart from :mod:`refseg.core.imaging` so that decoding never imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from refseg.core.imaging import PreparedTarget, ResizeInfo

__all__ = [
    "crop_valid",
    "images_to_float",
    "lowres_to_original",
    "stack_targets",
    "stack_targets_uint8",
    "to_float_tensor",
]


def crop_valid(lowres: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """The part of a low-res map of the input square that covers the image.

    Args:
        lowres: (..., h, w) map of the whole ``size`` x ``size`` input (e.g. SAM's 256 x 256
            mask logits).

    Returns:
        A view ``lowres[..., :ch, :cw]`` with ``ch = ceil(valid_h * h / size)`` (likewise
        ``cw``): every low-res pixel that overlaps the image. When the valid edge falls
        inside a low-res pixel, that pixel is kept whole, so upsampling the crop to the
        original size stretches it by less than one low-res pixel; ``lowres_to_original``
        maps exactly instead.
    """
    h, w = int(lowres.shape[-2]), int(lowres.shape[-1])
    vh, vw = info.valid_hw
    ch, cw = -(-vh * h // info.size), -(-vw * w // info.size)
    return lowres[..., :ch, :cw]


def lowres_to_original(lowres: torch.Tensor, info: ResizeInfo) -> torch.Tensor:
    """Bilinear (align_corners=False) resampling of (N, h, w) input-square maps to the image.

    ``"square"``: ``F.interpolate(..., antialias=True)`` straight to the original size, as
    the paper's code does (method.md §4.5); the antialiasing matters where the original is
    smaller than the low-res map in a dimension: each output pixel then averages the
    low-res pixels under a triangle filter as wide as the scale, instead of sampling two.
    ``"longest-side"``: each original pixel centre is mapped to its exact position in the
    low-res map and sampled bilinearly (two neighbours per axis, no antialiasing, like SAM2's
    own predictor, whose final resize does not antialias either): one interpolation, no
    size x size intermediate (SAM's predictor instead upsamples to size x size, crops the
    valid part and resizes again). As with any bilinear resampling, pixels at the valid
    edge blend in the neighbouring padded low-res pixel.

    Returns:
        (N, H, W) float32 at ``info.orig_hw``, on the input's device.
    """
    if lowres.ndim != 3:
        raise ValueError(f"lowres must be (N, h, w), got shape {tuple(lowres.shape)}")
    oh, ow = info.orig_hw
    if lowres.shape[0] == 0:
        return torch.zeros((0, oh, ow), dtype=torch.float32, device=lowres.device)
    x = lowres[:, None].float()
    if info.valid_hw == (info.size, info.size):
        return F.interpolate(
            x, size=(oh, ow), mode="bilinear", align_corners=False, antialias=True
        )[:, 0]
    vh, vw = info.valid_hw
    dev = x.device
    # normalised grid_sample coordinates (-1 = left edge of the map) of original pixel centres
    gy = (torch.arange(oh, device=dev, dtype=torch.float64) + 0.5) * (2 * vh / (oh * info.size))
    gx = (torch.arange(ow, device=dev, dtype=torch.float64) + 0.5) * (2 * vw / (ow * info.size))
    grid = torch.stack(torch.meshgrid(gx - 1, gy - 1, indexing="xy"), dim=-1).float()
    grid = grid[None].expand(x.shape[0], -1, -1, -1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0]


def to_float_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) contiguous float32 in [0, 1] (values / 255).

    ``img`` may be read-only (Ray hands out zero-copy views of its object store): the float
    conversion happens in NumPy, into a new array that torch may own and write.
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}")
    chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32)
    return torch.from_numpy(chw).div_(255.0)


def stack_targets(targets: Sequence[PreparedTarget]) -> torch.Tensor:
    """(B, 3, S, S) float32 in [0, 1], made on the host (see ``stack_targets_uint8``)."""
    return torch.stack([to_float_tensor(t.square) for t in targets])


def stack_targets_uint8(targets: Sequence[PreparedTarget]) -> torch.Tensor:
    """(B, S, S, 3) uint8: the squares as they are, a quarter of the float32 bytes.

    For a model on a GPU: the models' ``propose``/``target_features`` convert it on their
    device (:func:`images_to_float`), to the same values as :func:`stack_targets`.
    """
    return torch.from_numpy(np.stack([t.square for t in targets]))


def images_to_float(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch of images as (B, 3, S, S) contiguous float32 in [0, 1] on ``device``.

    Args:
        images: (B, 3, S, S) float in [0, 1], or uint8 as (B, 3, S, S) or (B, S, S, 3)
            (channels first when ``shape[1] == 3``). uint8 is copied to ``device`` as is and
            divided by 255 there, the operation ``to_float_tensor`` does on the host, so the
            values are identical bit for bit.
    """
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(
            f"images must be (B, 3, S, S) or, as uint8, (B, S, S, 3); got {tuple(images.shape)}"
        )
    if images.dtype != torch.uint8:
        if images.shape[1] != 3:
            raise ValueError(
                f"float images must be channels first (B, 3, S, S), got {tuple(images.shape)}"
            )
        return images.to(device, torch.float32)
    x = images.to(device)
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
