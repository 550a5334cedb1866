"""Tests of decoding in refseg.core.imaging: every odd input is generated here with PIL/numpy.

``decode_image`` over a table of generated files (truncated, 16-bit, CMYK, EXIF-rotated,
bombs, animated, ...), the PIL and warning state it must leave alone, its argument checks and
``ImageDecodeError``. Resizing, crop boxes and tensors are in ``test_imaging_resize.py``.
"""

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
from PIL import Image, ImageFile
from refseg.core.imaging import ImageDecodeError, decode_image

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
