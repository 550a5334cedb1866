"""Large images elsewhere on the path: decoding straight to the SAM2 square, the benchmark.

``imaging.decode_target`` must give exactly ``prepare_target(decode_image(...))`` (same
square, same sizes, same errors) for every pixel mode and EXIF orientation, without the
full-size array copies; ``bench/large_images.py --quick`` must run and compare both paths.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refseg.core.imaging import ImageDecodeError, decode_image, decode_target, prepare_target

RNG = np.random.default_rng(0)
ROOT = Path(__file__).resolve().parents[1]


def _photo(h: int = 45, w: int = 70) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], axis=-1)
    return np.clip(base + RNG.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return _encode(Image.fromarray(_photo()), "JPEG", quality=92, exif=exif.tobytes())


def _sixteen_bit() -> bytes:
    values = RNG.integers(0, 65536, size=(33, 50), dtype=np.uint16)
    return _encode(Image.fromarray(values), "PNG")


CASES = {
    "rgb-jpeg": lambda: _encode(Image.fromarray(_photo()), "JPEG", quality=90),
    "rgb-png": lambda: _encode(Image.fromarray(_photo()), "PNG"),
    "gray": lambda: _encode(Image.fromarray(_photo()[..., 0]), "PNG"),
    "gray-alpha": lambda: _encode(Image.fromarray(_photo()[..., :2].copy(), "LA"), "PNG"),
    "palette": lambda: _encode(Image.fromarray(_photo()).convert("P"), "PNG"),
    "rgba": lambda: _encode(Image.fromarray(np.dstack([_photo(), _photo()[..., :1]])), "PNG"),
    "cmyk-jpeg": lambda: _encode(Image.fromarray(_photo()).convert("CMYK"), "JPEG"),
    "one-bit": lambda: _encode(Image.fromarray(_photo()[..., 0] > 128), "PNG"),
    "sixteen-bit": _sixteen_bit,
    "float-tiff": lambda: _encode(
        Image.fromarray(RNG.normal(100, 80, (20, 31)).astype(np.float32)), "TIFF"
    ),
    **{f"exif-{v}": (lambda v=v: _with_orientation(v)) for v in range(1, 9)},
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("mode", ["square", "longest-side"])
def test_decode_target_equals_decode_then_prepare(name, mode):
    data = CASES[name]()
    want = prepare_target(decode_image(data, uri=name), 64, mode)
    got = decode_target(data, 64, mode, uri=name)
    assert got.square.dtype == np.uint8 and got.square.shape == (64, 64, 3)
    assert np.array_equal(got.square, want.square)
    assert got.valid_hw == want.valid_hw and got.orig_hw == want.orig_hw
    if name in ("exif-5", "exif-6", "exif-7", "exif-8"):  # rotated: height and width swap
        assert got.orig_hw == (70, 45)


def test_decode_target_errors_are_decode_images():
    data = CASES["rgb-png"]()
    for call in (decode_image, lambda d, **kw: decode_target(d, 64, **kw)):
        with pytest.raises(ImageDecodeError, match="exceeds max_pixels=100"):
            call(data, uri="big.png", max_pixels=100)
        with pytest.raises(ImageDecodeError, match=r"truncated|corrupt"):
            call(data[: len(data) // 2], uri="cut.png")
        with pytest.raises(ImageDecodeError, match="not a recognised image"):
            call(b"hello", uri="x.png")


def test_decode_target_holds_no_full_size_array(monkeypatch):
    """The decoded pixels never become a NumPy array of the image's size."""
    data = _encode(Image.fromarray(_photo(300, 400)), "PNG")
    sizes = []
    real = np.asarray

    def watch(a, *args, **kwargs):
        out = real(a, *args, **kwargs)
        sizes.append(out.size)
        return out

    import refseg.core.imaging as imaging

    monkeypatch.setattr(imaging.np, "asarray", watch)
    monkeypatch.setattr(imaging.np, "array", watch)
    decode_target(data, 64, "square")
    assert sizes and max(sizes) <= 64 * 64 * 3
    sizes.clear()
    decode_image(data)
    assert max(sizes) == 300 * 400 * 3  # the check can see a full-size array


def test_large_images_bench_quick(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / "bench" / "large_images.py"), "--quick"]
    out = subprocess.run(
        [*cmd, "--kinds", "ellipse", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "large_images.json").read_text())
    (row,) = result["rows"]
    assert row["image"] == "480x640" and row["survivors"] == 100
    assert row["equal"] is True and row["max_score_diff"] <= 1e-6
    assert row["instances"] == 100 and 0 < row["mean_mask_share"] < 0.5
    for path in ("today", "new"):
        assert 0 < row[f"{path}_s"] < 600 and row[f"{path}_peak_mib"] >= 0
    assert row["speed-up"] == pytest.approx(row["today_s"] / row["new_s"])


def _exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(arr), "JPEG", quality=90, exif=exif.tobytes())


def _record_loads(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of every PIL image decoded (``Image.load``) from now on."""
    loaded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def load(self):
        loaded.append(self.size)
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    return loaded


@pytest.mark.parametrize("orientation", [1, 6])
def test_thumbnail_of_a_large_jpeg_is_decoded_small(orientation, monkeypatch):
    from refseg.core.imaging import decode_thumbnail

    big = np.repeat(np.repeat(_photo(75, 100), 32, axis=0), 32, axis=1)  # 2400 x 3200
    data = _exif_jpeg(big, orientation)
    loaded = _record_loads(monkeypatch)
    thumb, scale = decode_thumbnail(data, 512)
    rotated = orientation == 6
    assert thumb.shape == ((512, 384, 3) if rotated else (384, 512, 3))
    assert scale == pytest.approx(512 / 3200)
    assert max(max(s) for s in loaded) <= 1600  # libjpeg's draft: never 3200 px wide
    full = prepare_target(decode_image(data), 512, "longest-side").square
    want = full[: thumb.shape[0], : thumb.shape[1]].astype(int)
    assert np.abs(thumb.astype(int) - want).mean() < 8  # the same picture, near enough


def test_report_tile_embeds_a_thumbnail_not_the_image(tmp_path, monkeypatch):
    import base64

    from refseg.jobs.report_data import THUMB_SIDE, ImageRow
    from refseg.jobs.report_render import TileInput, render_tile

    path = tmp_path / "big.jpg"
    big = np.repeat(np.repeat(_photo(75, 100), 32, axis=0), 32, axis=1)
    path.write_bytes(_encode(Image.fromarray(big), "JPEG", quality=90))
    mask = np.zeros((2400, 3200), bool)
    mask[600:1800, 800:2400] = True
    from refseg.core import rle as rle_ops

    inst = {
        "segmentation": rle_ops.encode_masks(mask[None])[0],
        "bbox": [800.0, 600.0, 1600.0, 1200.0],
        "category_id": 1,
        "category_name": "thing",
        "score": 0.9,
    }
    row = ImageRow(1, str(path), 3200, 2400)
    loaded = _record_loads(monkeypatch)
    html = render_tile(TileInput(row, [inst], 10))
    assert loaded and max(max(s) for s in loaded) <= 1600  # the photo is never decoded whole
    (uri,) = [p.split('"')[0] for p in html.split('src="')[1:]]
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert max(img.size) <= THUMB_SIDE and len(uri) < 200_000
    pixels = np.asarray(img).astype(int)
    inside, outside = pixels[200, 256], pixels[20, 20]  # the mask is drawn on the thumbnail
    assert np.abs(inside - outside).sum() > 30
