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

import functools
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps
from refseg.core.config import ResizeMode
from refseg.core.crops import context_crop_box

if TYPE_CHECKING:  # torch is imported only where tensors are made (refseg.core.tensors)
    import torch

__all__ = [
    "DEFAULT_FORMATS",
    "ImageDecodeError",
    "PreparedTarget",
    "ResizeInfo",
    "context_crop_box",
    "decode_image",
    "decode_target",
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
_BICUBIC = Image.Resampling.BICUBIC


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
    finish = functools.partial(_to_rgb_array, uri=uri)
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
    finish = functools.partial(_target, size=size, mode=mode, uri=uri)
    return _decode(data, uri, max_pixels, apply_exif_orientation, formats, finish)


def _decode(data, uri, max_pixels, apply_exif_orientation, formats, finish):  # type: ignore[no-untyped-def]
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
            _load(img, uri)
            if apply_exif_orientation:
                _orient(img, uri)
            return finish(img)
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


def _orient(img: Image.Image, uri: str) -> None:
    """Rotate/flip ``img`` in place per its EXIF orientation (the old pixels are freed)."""
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
            ImageOps.exif_transpose(img, in_place=True)
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


# ----------------------------------------------------------------------------- resizing


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
