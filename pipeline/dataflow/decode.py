"""The decode stage: image bytes to SAM2 input squares, on CPU tasks.

This module never imports torch (nor does anything it imports), so each task worker starts
in well under a second and holds little memory; tests/test_layers.py checks that.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from refseg.core.imaging import decode_target
from refseg.pipeline.schema import Col

__all__ = ["decode_batch", "error_text"]

Batch = dict[str, np.ndarray]


def error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def decode_batch(batch: Batch, *, size: int, resize: str, max_pixels: int) -> Batch:
    """Bytes -> SAM2 input squares. CPU task. Undecodable files become error rows."""
    n = len(batch[Col.IMAGE_ID])
    squares = np.zeros((n, size, size, 3), dtype=np.uint8)
    cols: dict[str, list[Any]] = {k: [] for k in (Col.VALID_H, Col.VALID_W, Col.HEIGHT)}
    cols.update({Col.WIDTH: [], Col.STATUS: [], Col.ERROR: [], Col.T_DECODE: []})
    for i in range(n):
        t0 = time.perf_counter()
        uri = str(batch[Col.IMAGE_URI][i])
        try:
            fetch_error = batch[Col.ERROR][i] if Col.ERROR in batch else ""
            if fetch_error:
                raise ValueError(str(fetch_error))
            data = batch[Col.BYTES][i]
            data = data if isinstance(data, bytes | bytearray | memoryview) else bytes(data)
            # decoded pixels go from PIL to the square: no full-size array (issue 18)
            prep = decode_target(data, size, resize, uri=uri, max_pixels=max_pixels)  # type: ignore[arg-type]
            squares[i] = prep.square
            vals = (*prep.valid_hw, *prep.orig_hw, "ok", "")
        except Exception as exc:
            vals = (0, 0, 0, 0, "error", error_text(exc))
        for key, v in zip(
            (Col.VALID_H, Col.VALID_W, Col.HEIGHT, Col.WIDTH, Col.STATUS, Col.ERROR),
            vals,
            strict=True,
        ):
            cols[key].append(v)
        cols[Col.T_DECODE].append(time.perf_counter() - t0)
    out: Batch = {
        Col.IMAGE_ID: np.asarray(batch[Col.IMAGE_ID], dtype=np.int64),
        Col.IMAGE_URI: np.asarray(batch[Col.IMAGE_URI], dtype=object),
        Col.SQUARE: squares,
    }
    for key, vals_ in cols.items():
        out[key] = np.asarray(vals_, dtype=object if key in (Col.STATUS, Col.ERROR) else None)
    for key in (Col.FILE_SIZE, Col.FILE_MTIME):  # the listed file's identity, to the images part
        if key in batch:
            out[key] = np.asarray(batch[key], dtype=np.int64)
    return out
