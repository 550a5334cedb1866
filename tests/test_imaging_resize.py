"""Tests of refseg.core.imaging's geometry and refseg.core.tensors on generated arrays.

``resize_square`` against PIL's default bicubic, ``resize_longest_side`` and ``ResizeInfo``,
``crop_valid`` and ``lowres_to_original`` against the paper's and SAM's interpolations,
``context_crop_box`` and its errors, and ``to_float_tensor``. Decoding is in
``test_imaging.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from refseg.core.imaging import (
    ResizeInfo,
    context_crop_box,
    resize_image,
    resize_longest_side,
    resize_square,
)
from refseg.core.tensors import crop_valid, lowres_to_original, to_float_tensor

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("hw", [(1, 1), (10, 30), (48, 64), (70, 30)])
@pytest.mark.parametrize("size", [1, 16, 64])
def test_resize_square_is_pils_default_bicubic(hw: tuple[int, int], size: int) -> None:
    img = RNG.integers(0, 256, (*hw, 3), dtype=np.uint8)
    out = resize_square(img, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    paper = np.asarray(Image.fromarray(img).convert("RGB").resize((size, size)))  # NTT's call
    assert (out == paper).all()


@pytest.mark.parametrize(
    ("hw", "size", "valid"),
    [
        ((480, 640), 1024, (768, 1024)),
        ((640, 480), 1024, (1024, 768)),
        ((333, 500), 1024, (682, 1024)),  # 681.98 rounds up
        ((100, 100), 64, (64, 64)),
        ((1, 1000), 100, (1, 100)),  # never 0 rows
        ((5, 3), 20, (20, 12)),  # upscaling
    ],
)
def test_resize_longest_side(hw: tuple[int, int], size: int, valid: tuple[int, int]) -> None:
    img = RNG.integers(1, 256, (*hw, 3), dtype=np.uint8)
    square, got_valid = resize_longest_side(img, size)
    assert got_valid == valid
    assert square.shape == (size, size, 3) and square.dtype == np.uint8
    vh, vw = valid
    assert not square[vh:].any() and not square[:, vw:].any()  # zero padding bottom/right
    want = np.asarray(Image.fromarray(img).resize((vw, vh), Image.Resampling.BICUBIC))
    assert (square[:vh, :vw] == want).all()


@pytest.mark.parametrize(("mode", "valid"), [("square", (32, 32)), ("longest-side", (24, 32))])
def test_resize_image_info(mode: str, valid: tuple[int, int]) -> None:
    img = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    out, info = resize_image(img, 32, mode)  # type: ignore[arg-type]
    assert out.shape == (32, 32, 3)
    assert info == ResizeInfo((30, 40), 32, mode, valid)  # type: ignore[arg-type]
    xy = torch.tensor([[40.0, 30.0], [20.0, 15.0]])
    assert torch.allclose(info.to_original_xy(info.to_input_xy(xy)), xy)
    assert torch.allclose(info.to_input_xy(xy)[0], torch.tensor([valid[1], valid[0]]).float())
    with pytest.raises(ValueError, match="resize mode"):
        resize_image(img, 32, "crop")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("valid", "lowres", "want"),
    [
        ((1024, 1024), 256, (256, 256)),  # square: everything
        ((768, 1024), 256, (192, 256)),  # exact
        ((683, 1024), 256, (171, 256)),  # 170.75: the partly covered pixel is kept
        ((1024, 1), 256, (256, 1)),
    ],
)
def test_crop_valid(valid: tuple[int, int], lowres: int, want: tuple[int, int]) -> None:
    info = ResizeInfo((10, 10), 1024, "longest-side", valid)
    maps = torch.arange(3 * lowres * lowres, dtype=torch.float32).reshape(3, lowres, lowres)
    out = crop_valid(maps, info)
    assert tuple(out.shape) == (3, *want)
    assert torch.equal(out, maps[:, : want[0], : want[1]])


@pytest.mark.parametrize("orig", [(37, 53), (9, 53), (7, 5)])
def test_lowres_to_original_square_is_the_papers_interpolate(orig) -> None:
    """The paper's call, antialias on (method.md §4.5): it matters when shrinking."""
    info = ResizeInfo(orig, 64, "square", (64, 64))
    low = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))
    up = lowres_to_original(low, info)
    paper = F.interpolate(low[:, None], size=orig, mode="bilinear", antialias=True)[:, 0]
    plain = F.interpolate(low[:, None], size=orig, mode="bilinear", antialias=False)[:, 0]
    assert torch.equal(up, paper)
    if min(orig) < 16:
        assert not torch.equal(up > 0, plain > 0)
    assert lowres_to_original(low[:0], info).shape == (0, *orig)


def test_lowres_to_original_longest_side_matches_sams_two_steps() -> None:
    # a linear ramp is reproduced exactly by bilinear resampling, so the direct mapping and
    # SAM's (to size, crop valid, to original) agree wherever neither touches the border
    orig, size, low = (60, 90), 96, 24
    _, info = resize_image(np.zeros((*orig, 3), np.uint8), size, "longest-side")
    assert info.valid_hw == (64, 96)
    yy, xx = torch.meshgrid(torch.arange(low).float(), torch.arange(low).float(), indexing="ij")
    maps = torch.stack([3 * yy + 0.5 * xx, -yy + 2 * xx])
    direct = lowres_to_original(maps, info)
    up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)
    sam = F.interpolate(up[:, :, :64, :96], size=orig, mode="bilinear", align_corners=False)[:, 0]
    assert direct.shape == (2, *orig)
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert torch.allclose(direct[inner], sam[inner], atol=1e-4)
    # and the ramp value at an original pixel centre is the exact low-res position
    y, x = 30, 45
    u = (y + 0.5) * 64 / 60 * low / size - 0.5
    v = (x + 0.5) * 96 / 90 * low / size - 0.5
    assert direct[0, y, x].item() == pytest.approx(3 * u + 0.5 * v, abs=1e-4)


# ----------------------------------------------------------------------------- crops, tensors


@pytest.mark.parametrize(
    ("bbox", "hw", "scale", "want"),
    [
        ((100, 100, 50, 20), (480, 640), 1.2, (95, 80, 155, 140)),  # centred square
        ((10.9, 20.7, 30.5, 10.2), (100, 100), 1.2, (6, 6, 44, 43)),  # corners truncated first
        ((0, 0, 50, 50), (100, 100), 1.2, (0, 0, 55, 55)),  # clipped at top-left
        ((80, 70, 20, 30), (100, 100), 1.2, (72, 67, 100, 100)),  # clipped at bottom-right
        ((10, 10, 20, 10), (100, 100), 1.0, (10, 5, 30, 25)),  # scale 1: the box's square
        ((-10.5, 5, 20, 10), (100, 100), 1.2, (0, 0, 10, 21)),  # int() truncates toward 0
        ((0, 0, 100, 100), (100, 100), 1.2, (0, 0, 100, 100)),  # whole image
    ],
)
def test_context_crop_box(
    bbox: tuple[float, ...], hw: tuple[int, int], scale: float, want: tuple[int, ...]
) -> None:
    got = context_crop_box(bbox, hw, scale)
    assert got == want
    assert all(type(v) is int for v in got)


@pytest.mark.parametrize(
    ("bbox", "hw", "scale", "match"),
    [
        ((10, 10, 0, 5), (100, 100), 1.2, "degenerate box"),
        ((10, 10, 5, -1), (100, 100), 1.2, "degenerate box"),
        ((10, float("nan"), 5, 5), (100, 100), 1.2, "degenerate box"),
        ((10.2, 10.2, 0.5, 0.5), (100, 100), 1.2, "empty context crop"),  # sub-pixel
        ((200, 200, 10, 10), (100, 100), 1.2, "empty context crop"),  # outside
        ((10, 10, 5), (100, 100), 1.2, "4 numbers"),
        ((10, 10, 5, 5), (100, 100), 0.0, "scale"),
        ((10, 10, 5, 5), (0, 100), 1.2, "image_hw"),
    ],
)
def test_context_crop_box_errors(
    bbox: tuple[float, ...], hw: tuple[int, int], scale: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        context_crop_box(bbox, hw, scale)


def test_to_float_tensor() -> None:
    img = RNG.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    img[0, 0] = (0, 128, 255)
    view = img[1:6, 2:8]  # a strided crop, as memory_bank passes
    for arr in (img, view):
        t = to_float_tensor(arr)
        assert t.shape == (3, *arr.shape[:2]) and t.dtype == torch.float32
        assert t.is_contiguous()
        assert torch.equal(t, torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1))
    assert to_float_tensor(img)[:, 0, 0].tolist() == pytest.approx([0.0, 128 / 255, 1.0])
    for bad in (img.astype(np.float32), img[..., 0], img[..., :2]):
        with pytest.raises(ValueError, match="uint8"):
            to_float_tensor(bad)
