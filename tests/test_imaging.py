"""Tests of refseg.core.imaging: every odd input is generated here with PIL/numpy."""

from __future__ import annotations

import contextlib
import io
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from refseg.core.imaging import (
    ImageDecodeError,
    ResizeInfo,
    context_crop_box,
    decode_image,
    resize_image,
    resize_longest_side,
    resize_square,
)
from refseg.core.tensors import crop_valid, lowres_to_original, to_float_tensor

RNG = np.random.default_rng(0)

# ----------------------------------------------------------------------------- builders
# Each builder returns (encoded bytes, expected (H, W, 3) uint8 array or None).

Built = tuple[bytes, "np.ndarray | None"]


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _raw_png(w: int, h: int, depth: int, color_type: int, rows: np.ndarray | None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB); rows: (h, row bytes) or None."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0)
    raw = b"" if rows is None else b"".join(b"\x00" + r.tobytes() for r in rows)
    idat = zlib.compress(raw) if rows is not None else b"\x00" * 16  # bomb: garbage data
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _gray3(g: np.ndarray) -> np.ndarray:
    return np.repeat(g.astype(np.uint8)[:, :, None], 3, axis=2)


def b_empty() -> Built:
    return b"", None


def b_truncated_jpeg() -> Built:
    data = _encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2], None


def b_truncated_png() -> Built:
    data = _encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    return data[: len(data) // 2], None


def b_bad_crc_png() -> Built:
    rgb = RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    data = bytearray(_raw_png(4, 4, 8, 2, rgb.reshape(4, -1)))
    data[29] ^= 0xFF  # first byte of the IHDR CRC
    return bytes(data), None


def b_text() -> Built:
    return b"just some text, not an image\n" * 4, None


def b_eps() -> Built:  # PIL could open EPS by running Ghostscript: not accepted
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto\n", None


def b_png_named_jpg() -> Built:
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    return _encode(Image.fromarray(rgb), "PNG"), rgb


def b_gray16_png() -> Built:
    v = np.array([0, 1, 255, 256, 257, 4095, 32768, 65279, 65280, 65534, 65535], np.uint16)
    v = np.concatenate([v, np.linspace(0, 65535, 21).astype(np.uint16)])[None]
    data = _encode(Image.fromarray(v), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    return data, _gray3(v >> 8)


def b_rgb16_png() -> Built:
    v = np.array([[[0, 255, 256], [65535, 0x1234, 0xABCD], [65280, 32768, 511]]], dtype=">u2")
    return _raw_png(3, 1, 16, 2, v.reshape(1, -1)), (v >> 8).astype(np.uint8)


def b_gray_alpha16_png() -> Built:
    v = np.array([[[1000, 65535], [65535, 0], [300, 12345]]], dtype=">u2")  # (gray, alpha)
    return _raw_png(3, 1, 16, 4, v.reshape(1, -1)), _gray3(v[..., 0] >> 8)


def b_gray16_tiff() -> Built:
    v = np.array([[0, 255, 256, 40000, 65535]], np.uint16)
    return _encode(Image.fromarray(v), "TIFF"), _gray3(v >> 8)


def b_int32_tiff() -> Built:
    v = np.array([[-5, 0, 256, 70000, 65535]], np.int32)
    return _encode(Image.fromarray(v), "TIFF"), _gray3(np.array([[0, 0, 1, 255, 255]]))


def b_float_tiff() -> Built:
    v = np.array([[-3.0, 0.0, 1.0, 128.0, 300.0]], np.float32)
    return _encode(Image.fromarray(v), "TIFF"), _gray3(np.array([[0, 0, 1, 128, 255]]))


def b_cmyk_jpeg() -> Built:
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red
    img.paste((0, 0, 0, 0), (8, 0, 16, 8))  # white
    want = np.zeros((8, 16, 3), np.uint8)
    want[:, :8] = (255, 0, 0)
    want[:, 8:] = 255
    return _encode(img, "JPEG", quality=100), want


def b_ycbcr_jpeg() -> Built:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:] = (30, 160, 220)
    return _encode(Image.fromarray(rgb).convert("YCbCr"), "JPEG", quality=100), rgb


def b_gray_png() -> Built:
    g = RNG.integers(0, 256, (6, 4), dtype=np.uint8)
    return _encode(Image.fromarray(g), "PNG"), _gray3(g)


def b_gray_alpha_png() -> Built:
    la = RNG.integers(0, 256, (6, 4, 2), dtype=np.uint8)
    return _encode(Image.fromarray(la, mode="LA"), "PNG"), _gray3(la[..., 0])


def b_bilevel_png() -> Built:
    bits = RNG.integers(0, 2, (5, 9)).astype(bool)
    return _encode(Image.fromarray(bits), "PNG"), _gray3(bits * 255)


def b_rgba_png() -> Built:
    rgba = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 0  # a fully transparent pixel keeps its colour
    return _encode(Image.fromarray(rgba), "PNG"), rgba[..., :3].copy()


def b_palette_transparent_png() -> Built:
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = [[10, 20, 30], [200, 100, 50], [0, 255, 0]]
    img = Image.fromarray(idx, mode="P")
    img.putpalette([c for rgb in pal for c in rgb])
    return _encode(img, "PNG", transparency=0), np.array(pal, np.uint8)[idx]


def _exif_stored() -> np.ndarray:
    stored = np.zeros((16, 32, 3), np.uint8)  # H=16, W=32; marker at the stored top-left
    stored[:8, :8] = 255
    return stored


def _exif6(fmt: str, **kw: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return _encode(Image.fromarray(_exif_stored()), fmt, exif=exif.tobytes(), **kw)


def b_exif6_jpeg() -> Built:
    want = np.rot90(_exif_stored(), k=-1).copy()  # (32, 16): marker now at the top-right
    assert want[0, 15].all() and not want[0, 0].any()
    return _exif6("JPEG", quality=100), want


def b_exif6_jpeg_ignored() -> Built:
    return _exif6("JPEG", quality=100), _exif_stored()


def b_exif6_png() -> Built:
    return _exif6("PNG"), np.rot90(_exif_stored(), k=-1).copy()


def b_one_pixel() -> Built:
    px = np.array([[[7, 8, 9]]], np.uint8)
    return _encode(Image.fromarray(px), "PNG"), px


def b_bomb_png() -> Built:  # declares 100000 x 100000 RGB (30 GB): must fail before any decode
    return _raw_png(100_000, 100_000, 8, 2, None), None


def b_over_max_pixels_png() -> Built:  # under PIL's limit, over the max_pixels given below
    return _raw_png(5_000, 5_000, 8, 2, None), None


def b_animated_gif() -> Built:
    frames = [Image.new("RGB", (6, 4), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    want = np.zeros((4, 6, 3), np.uint8)
    want[:] = (255, 0, 0)
    return buf.getvalue(), want


def b_multipage_tiff() -> Built:
    pages = [Image.fromarray(RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue(), np.asarray(pages[0]).copy()


def b_webp_lossless() -> Built:
    rgb = RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return _encode(Image.fromarray(rgb), "WEBP", lossless=True), rgb


def b_bmp() -> Built:
    rgb = RNG.integers(0, 256, (3, 5, 3), dtype=np.uint8)
    return _encode(Image.fromarray(rgb), "BMP"), rgb


@dataclass(frozen=True)
class Row:
    build: Callable[[], Built]
    uri: str
    error: str | None = None  # fragment of the ImageDecodeError message, or None: decodes
    atol: int = 0  # per-pixel tolerance for lossy formats
    kwargs: dict[str, Any] = field(default_factory=dict)


ROWS = {
    "zero-bytes": Row(b_empty, "s3://b/empty.jpg", "empty (0 bytes)"),
    "truncated-jpeg": Row(b_truncated_jpeg, "cut.jpg", "truncated"),
    "truncated-png": Row(b_truncated_png, "cut.png", "truncated"),
    "bad-crc-png": Row(b_bad_crc_png, "crc.png", "not a recognised image"),
    "text-file": Row(b_text, "notes.txt", "not a recognised image"),
    "eps-refused": Row(b_eps, "figure.eps", "not a recognised image"),
    "png-named-jpg": Row(b_png_named_jpg, "photo.jpg"),
    "gray-16bit-png": Row(b_gray16_png, "depth.png"),
    "rgb-16bit-png": Row(b_rgb16_png, "rgb16.png"),
    "gray-alpha-16bit-png": Row(b_gray_alpha16_png, "la16.png"),
    "gray-16bit-tiff": Row(b_gray16_tiff, "g16.tif"),
    "int32-tiff": Row(b_int32_tiff, "i32.tif"),
    "float-tiff": Row(b_float_tiff, "f32.tif"),
    "cmyk-jpeg": Row(b_cmyk_jpeg, "cmyk.jpg", atol=6),
    "ycbcr-jpeg": Row(b_ycbcr_jpeg, "ycc.jpg", atol=4),
    "grayscale": Row(b_gray_png, "gray.png"),
    "gray-alpha": Row(b_gray_alpha_png, "la.png"),
    "bilevel": Row(b_bilevel_png, "bits.png"),
    "rgba-alpha-dropped": Row(b_rgba_png, "rgba.png"),
    "palette-transparency": Row(b_palette_transparent_png, "pal.png"),
    "exif-6-jpeg": Row(b_exif6_jpeg, "rot.jpg", atol=24),
    "exif-6-jpeg-ignored": Row(
        b_exif6_jpeg_ignored, "rot.jpg", atol=24, kwargs={"apply_exif_orientation": False}
    ),
    "exif-6-png": Row(b_exif6_png, "rot.png"),
    "one-pixel": Row(b_one_pixel, "dot.png"),
    "bomb-100k-square": Row(b_bomb_png, "bomb.png", "decompression bomb"),
    "over-max-pixels": Row(
        b_over_max_pixels_png, "big.png", "exceeds max_pixels=1000000", kwargs={"max_pixels": 10**6}
    ),
    "animated-gif-first-frame": Row(b_animated_gif, "anim.gif"),
    "multipage-tiff-first-page": Row(b_multipage_tiff, "pages.tif"),
    "webp-lossless": Row(b_webp_lossless, "x.webp"),
    "bmp": Row(b_bmp, "x.bmp"),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_decode_table(row: Row) -> None:
    data, want = row.build()
    if row.error is not None:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data, uri=row.uri, **row.kwargs)
        message = str(info.value)
        assert row.uri in message and row.error in message, message
        assert info.value.uri == row.uri
        return
    assert want is not None
    got = decode_image(data, uri=row.uri, **row.kwargs)
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.shape, want.shape)
    assert got.flags.writeable and got.flags.c_contiguous
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= row.atol, f"max difference {diff.max()} > {row.atol}"


def test_16bit_gray_spans_full_range() -> None:
    data, _ = b_gray16_png()
    got = decode_image(data)
    assert got.min() == 0 and got.max() == 255  # scaled, not clipped (clipping gives 255s)
    assert (got[0, :4, 0] == [0, 0, 0, 1]).all()  # 0, 1, 255, 256 -> 0, 0, 0, 1


def test_decode_leaves_pil_and_warning_state_alone() -> None:
    filters = list(warnings.filters)
    limit = Image.MAX_IMAGE_PIXELS
    for row in ROWS.values():
        data, _ = row.build()
        with contextlib.suppress(ImageDecodeError):
            decode_image(data, uri=row.uri, **row.kwargs)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert limit == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters


def test_decode_rejects_a_path_and_bad_limits() -> None:
    with pytest.raises(TypeError, match="read the file first"):
        decode_image("images/cat.jpg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b_one_pixel()[0], max_pixels=0)
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b_bmp()[0], formats=("PNG",))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data, want = b_png_named_jpg()
    for buf in (bytearray(data), memoryview(data)):
        assert (decode_image(buf) == want).all()


def test_image_decode_error_pickles_with_its_fields() -> None:
    err = ImageDecodeError("s3://b/k.jpg", "the file is truncated", "re-download it")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, ValueError)
    assert (back.uri, back.problem, back.hint) == (err.uri, err.problem, err.hint)
    assert (
        str(back)
        == str(err)
        == ("cannot decode image 's3://b/k.jpg': the file is truncated; re-download it")
    )


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
