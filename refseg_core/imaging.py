"""Image decoding and the geometric helpers of the method (resize, context crop).

This module does not import torch, so CPU decode tasks start fast; the tensor side
(upsampling, float conversion) is in :mod:`refseg.core.tensors`.

Conventions used throughout:

- Images are ``(H, W, 3)`` uint8 RGB numpy arrays, row-major: ``img[y, x]``.
- Sizes are ``(h, w)`` tuples; boxes are COCO ``(x, y, w, h)`` floats in, ``(x0, y0, x1, y1)``
  ints out with an exclusive end, so ``img[y0:y1, x0:x1]`` is the crop.
- Continuous pixel coordinates put the centre of pixel ``i`` at ``i + 0.5``.

Decoding follows the paper's code (PIL, ``convert("RGB")``: grayscale replicated, alpha
dropped without compositing) and adds what it lacks: EXIF orientation, 16-bit images scaled
instead of clipped, truncated files and decompression bombs refused with a clear error.
PIL's global settings (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``, warning filters) are
never changed here, so decoding is safe to call from many threads.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps
from refseg.core.config import ResizeMode
from refseg.core.crops import context_crop_box
from refseg.core.resizing import (
    PreparedTarget,
    ResizeInfo,
    longest_side_hw,
    prepare_target,
    resize_image,
    resize_longest_side,
    resize_square,
)

__all__ = [
    "DEFAULT_FORMATS",
    "ImageDecodeError",
    "PreparedTarget",
    "ResizeInfo",
    "context_crop_box",
    "decode_image",
    "decode_target",
    "decode_thumbnail",
    "longest_side_hw",
    "prepare_target",
    "resize_image",
    "resize_longest_side",
    "resize_square",
]

#: Raster formats ``decode_image`` accepts, detected from the bytes (never from the name).
#: Vector and document formats (EPS would start Ghostscript) are left out on purpose.
DEFAULT_FORMATS: tuple[str, ...] = (
    "JPEG", "MPO", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "JPEG2000", "AVIF",
)  # fmt: skip

_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the image, the problem and a fix.

    Attributes ``uri``, ``problem`` and ``hint`` hold the parts of the message. The error
    pickles with its fields (Ray ships exceptions between processes).
    """

    def __init__(self, uri: str, problem: str, hint: str = "") -> None:
        self.uri, self.problem, self.hint = uri, problem, hint
        message = f"cannot decode image {uri!r}: {problem}"
        super().__init__(f"{message}; {hint}" if hint else message)

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str, str]]:
        return (type(self), (self.uri, self.problem, self.hint))


_HINT_REENCODE = "re-download or re-encode the file (e.g. as PNG or JPEG), or drop it"
_HINT_BOMB = "downscale the image, or raise max_pixels if it is genuine"


def _accepted(formats: Sequence[str]) -> list[str]:
    Image.init()
    return [f for f in (s.upper() for s in formats) if f in Image.OPEN]


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    uri: str = "<bytes>",
    max_pixels: int = 178_956_970,
    apply_exif_orientation: bool = True,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> np.ndarray:
    """Decode encoded image bytes to an ``(H, W, 3)`` uint8 RGB array (a writable copy).

    The format is detected from the content; ``uri`` only names the image in errors.
    Multi-frame files (animated GIF/WebP/PNG, multi-page TIFF) give their first frame.

    Pixel modes: L, LA, 1, P/PA (palette, transparency ignored), RGBA/RGBa/RGBX (alpha
    dropped, not composited, like PIL's ``convert("RGB")`` in the paper's code), CMYK
    (including Adobe's inverted JPEGs, as PIL reads them), YCbCr, LAB, HSV: through PIL's
    ``convert("RGB")``. 16-bit grayscale (I;16*) and 32-bit integer (I, clipped to
    0..65535 first) are scaled by ``>> 8`` so 0..65535 spans 0..255; PIL already reads 16-bit
    RGB(A) PNGs by their high byte, which is the same rule. Float (F) images follow PIL:
    clipped to 0..255. Gray results are replicated to three channels.

    Args:
        data: the file's bytes.
        uri: where the bytes came from, for messages.
        max_pixels: largest ``H * W`` accepted, checked on the declared size before any
            pixel is decoded. PIL refuses images above ``2 * PIL.Image.MAX_IMAGE_PIXELS``
            on its own (reported here as the same error) and warns above
            ``PIL.Image.MAX_IMAGE_PIXELS``; that warning is left to the warning filters.
        apply_exif_orientation: rotate/flip per the EXIF orientation tag (the paper's
            loader does not; pass False where annotations refer to the stored pixel grid).
        formats: PIL format names tried, see ``DEFAULT_FORMATS``.

    Raises:
        ImageDecodeError: empty, unrecognised, truncated or corrupt data, a declared size
            above ``max_pixels``, or a pixel mode that cannot become RGB.
        TypeError: ``data`` is not bytes-like (e.g. a path).
    """

    def finish(img: Image.Image, _: tuple[int, int]) -> np.ndarray:
        return _to_rgb_array(img, uri)

    return _decode(data, uri, max_pixels, apply_exif_orientation, formats, finish)


def decode_target(
    data: bytes | bytearray | memoryview,
    size: int,
    mode: ResizeMode = "square",
    *,
    uri: str = "<bytes>",
    max_pixels: int = 178_956_970,
    apply_exif_orientation: bool = True,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> PreparedTarget:
    """``prepare_target(decode_image(data, ...), size, mode)``, the same arrays, in less
    memory: the decoded pixels stay in PIL and go straight to the resize (no full-size NumPy
    copy, no second PIL image made from it), and an EXIF rotation replaces the decoded
    image instead of adding a rotated copy beside it. Arguments and errors as
    ``decode_image``."""

    def finish(img: Image.Image, _: tuple[int, int]) -> PreparedTarget:
        return _target(img, size, mode, uri)

    return _decode(data, uri, max_pixels, apply_exif_orientation, formats, finish)


def decode_thumbnail(
    data: bytes | bytearray | memoryview, side: int, *, uri: str = "<bytes>", **kw: int
) -> tuple[np.ndarray, float]:
    """A picture of the image for people (reports), long side at most ``side`` px.

    JPEGs decode at a reduced scale (libjpeg's draft mode), so a 48 MP photo never exists
    at full size; the pixels differ slightly from resizing the full decode. EXIF-oriented;
    ``max_pixels`` (keyword) and errors as ``decode_image``.

    Returns:
        ``(thumb, scale)``: (h, w, 3) uint8 and thumbnail pixels per original pixel (of the
        EXIF-oriented image, the frame masks and boxes refer to).
    """

    def finish(img: Image.Image, orig_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
        deep = img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F")
        rgb = Image.fromarray(_to_rgb_array(img, uri)) if deep else _rgb(img, uri)
        s = min(1.0, side / max(orig_hw))
        h, w = (max(1, round(v * s)) for v in orig_hw)
        return np.asarray(rgb.resize((w, h), Image.Resampling.BILINEAR)), s

    max_pixels = kw.get("max_pixels", 178_956_970)
    return _decode(data, uri, max_pixels, True, DEFAULT_FORMATS, finish, draft=side)


def _decode(data, uri, max_pixels, apply_exif_orientation, formats, finish, draft=None):  # type: ignore[no-untyped-def]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(
            f"decode_image takes the encoded bytes of {uri!r}, got {type(data).__name__}; "
            "read the file first"
        )
    if len(data) == 0:
        raise ImageDecodeError(uri, "the data is empty (0 bytes)", "check the source file")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    allowed = _accepted(formats)
    try:
        with Image.open(io.BytesIO(data), formats=allowed) as img:
            _check_size(img.size, max_pixels, uri)
            orig_hw = (img.height, img.width)
            if draft:  # JPEG: decode at the smallest DCT scale still >= draft px
                img.draft("RGB", (draft, draft))
            _load(img, uri)
            if apply_exif_orientation and _orient(img, uri):
                orig_hw = orig_hw[::-1]
            return finish(img, orig_hw)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            uri,
            f"not a recognised image ({len(data)} bytes); accepted formats: {', '.join(allowed)}",
            "check that the file is an image; the file name's extension is not used",
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            uri, f"PIL refused it as a possible decompression bomb ({_said(exc)})", _HINT_BOMB
        ) from None
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error...)
        raise ImageDecodeError(
            uri, f"corrupt image data ({type(exc).__name__}: {_said(exc)})", _HINT_REENCODE
        ) from exc


# Bytes literals in a decoder's message (PIL quotes chunk names, markers, tag values).
_BYTES_REPR = re.compile(r"""\bb(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def _said(exc: BaseException) -> str:
    """A decoder's message without the file bytes it may quote (error rows end up in
    reports: a file's content must never leak into them)."""
    return _BYTES_REPR.sub("<bytes>", str(exc))[:200]


def _check_size(size: tuple[int, int], max_pixels: int, uri: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(uri, f"declared size {w} x {h} has no pixels", _HINT_REENCODE)
    if w * h > max_pixels:
        raise ImageDecodeError(
            uri,
            f"declared size {w} x {h} = {w * h} pixels exceeds max_pixels={max_pixels} "
            "(possible decompression bomb; nothing was decoded)",
            _HINT_BOMB,
        )


def _load(img: Image.Image, uri: str) -> None:
    """Decode the pixels now, so truncation surfaces here rather than later."""
    try:
        img.load()
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise ImageDecodeError(
                uri, f"the file is truncated ({_said(exc)})", _HINT_REENCODE
            ) from exc
        raise


def _orient(img: Image.Image, uri: str) -> bool:
    """Rotate/flip ``img`` in place per its EXIF orientation (the old pixels are freed);
    True where height and width swapped."""
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(img, in_place=True)
        return orientation in (5, 6, 7, 8)
    except Exception as exc:
        raise ImageDecodeError(
            uri,
            f"unreadable EXIF orientation ({type(exc).__name__}: {_said(exc)})",
            "re-save the image without EXIF or decode with apply_exif_orientation=False",
        ) from exc


def _target(img: Image.Image, size: int, mode: ResizeMode, uri: str) -> PreparedTarget:
    """The SAM2 input square of a decoded image, resized from PIL's own pixels."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):  # scaled through NumPy
        return prepare_target(_to_rgb_array(img, uri), size, mode)
    return prepare_target(_rgb(img, uri), size, mode)


def _to_rgb_array(img: Image.Image, uri: str) -> np.ndarray:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(img)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    out = np.array(_rgb(img.convert("L") if mode == "F" else img, uri), dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:
        raise ImageDecodeError(uri, f"mode {mode!r} gave an array of shape {out.shape}")
    return out


def _rgb(img: Image.Image, uri: str) -> Image.Image:
    try:
        return img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageDecodeError(
            uri,
            f"pixel mode {img.mode!r} cannot be converted to RGB ({_said(exc)})",
            _HINT_REENCODE,
        ) from exc
