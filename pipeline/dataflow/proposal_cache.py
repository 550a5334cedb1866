"""The proposal cache of a labelling run: what matching needs, so a new bank needs no SAM2.

``refseg label --cache-proposals`` writes, beside each finished part, ``OUT/proposals/
part-<key>.parquet`` with one row per input image (``PROPOSALS_SCHEMA``):

* ``proposals``: the SAM2 proposals in the compact, exact transport form the pipeline
  already moves between its actors (``refseg.core.transport.encode_proposals``: bit-packed
  signs of the 256 x 256 logits plus the float32 logits of boundary pixels, IoUs, prompts, sizes).
* ``pooled``: the DINOv2 feature pooled inside every nonempty proposal, float32
  little-endian, C order, ``(n_pooled, feature_dim)``: exactly the tensor the labelling run
  matched (``Matcher.pool``), so matching it again against another bank gives the same
  numbers without any DINOv2 forward pass.

Pooled features were chosen over the target's DINOv2 feature map (h x w x D) because they
are never larger at the presets (at most 32 x 32 = 1024 proposals against 37 x 37 = 1369
patches at ``ntt``; 64 against 64 at ``tiny``), usually much smaller with real weights
(fewer proposals pass the IoU filter), and a rematch then skips pooling as well
(BENCHMARKS.md, section 6, has the bytes per image of both).

The images rows (status, error, sizes) are in the cache too, so a rematch writes the same
``images/`` rows as the labelling run from the cache alone. ``run.json`` records under
``proposal_cache`` the encoder, the checkpoint hashes and every setting that shaped the
cache (``cache_record``); a rematch refuses a bank or settings that do not fit it.

This module never imports torch at import time: the write tasks and the cache-reading
tasks that use it start fast (tests/test_rematch.py checks that).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from refseg.core.config import (
    RUNTIME_METHOD_FIELDS,
    RUNTIME_MODEL_FIELDS,
    MethodConfig,
    ModelConfig,
)
from refseg.pipeline.schema import Col, image_columns
from refseg.pipeline.storage import Location
from refseg.pipeline.store.layout import PROPOSALS_DIR

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROPOSALS_DIR",
    "PROPOSALS_SCHEMA",
    "CACHE_FORMAT",
    "REMATCH_FIELDS",
    "cache_table",
    "read_cache_parts",
    "pooled_to_bytes",
    "pooled_from_bytes",
    "shaping_method",
    "shaping_model",
    "cache_record",
]

CACHE_FORMAT = "refseg-proposal-cache"
CACHE_VERSION = 1

PROPOSALS_SCHEMA = pa.schema(
    [
        pa.field(Col.IMAGE_ID, pa.int64(), nullable=False),
        pa.field(Col.IMAGE_URI, pa.string(), nullable=False),
        pa.field(Col.WIDTH, pa.int32()),
        pa.field(Col.HEIGHT, pa.int32()),
        pa.field(Col.STATUS, pa.string(), nullable=False),
        pa.field(Col.ERROR, pa.string()),
        pa.field(Col.PROPOSALS, pa.binary()),  # transport.encode_proposals; empty for error rows
        pa.field(Col.POOLED, pa.binary()),  # float32 (n_pooled, feature_dim), little-endian
        pa.field("n_proposals", pa.int32()),
        pa.field("n_pooled", pa.int32()),
        pa.field("feature_dim", pa.int32()),
    ]
)

#: MethodConfig fields that act after the proposals and their pooled features: a rematch
#: may change them. Every other method field (grid, IoU filter, resize, mask threshold,
#: no_mem_embed, bf16, and any field added later) shaped the cache, except the
#: reference-only ones that only `build-memory` uses and the runtime-only ones
#: (``refseg.core.config.RUNTIME_METHOD_FIELDS``: the decoder's path and prompt batch).
REMATCH_FIELDS = (
    "nms_iou",
    "max_nms",
    "merge_power",
    "soft_merge",
    "max_instances",
    "score_threshold",
    "box_convention",
    "merge_resolution",
    "negative_margin",
)
REFERENCE_ONLY_FIELDS = ("context_scale", "min_mask_weight")


def pooled_to_bytes(pooled: torch.Tensor) -> bytes:
    """(K, D) features -> float32 little-endian C-order bytes."""
    arr = pooled.detach().cpu().float().contiguous().numpy()
    return np.ascontiguousarray(arr, dtype="<f4").tobytes()


def pooled_from_bytes(data: bytes, n: int, dim: int) -> torch.Tensor:
    """Inverse of ``pooled_to_bytes``: a (n, dim) float32 tensor."""
    import torch

    arr = np.frombuffer(data, dtype="<f4")
    if arr.size != n * dim:
        raise ValueError(f"pooled features hold {arr.size} values, expected {n} x {dim}")
    return torch.from_numpy(arr.astype(np.float32).reshape(n, dim))


def read_cache_parts(batch: dict[str, np.ndarray], *, cache: Location) -> dict[str, Any]:
    """CPU task of a rematch: the rows of the listed cache parts, done images left out.

    Args:
        batch: ``part`` (names of parts under ``cache/proposals/``) and ``keep`` (per part,
            the image ids still to do; empty: every image of the part).
    """
    tables = []
    for name, keep in zip(batch["part"], batch["keep"], strict=True):
        with cache.fs.open_input_file(cache.child(PROPOSALS_DIR, str(name)).path) as f:
            t = pq.read_table(f, columns=PROPOSALS_SCHEMA.names)
        if len(keep):
            ids = t.column(Col.IMAGE_ID).to_numpy()
            t = t.filter(np.isin(ids, np.asarray(keep, dtype=np.int64)))
        tables.append(t)
    table = pa.concat_tables(tables)
    out = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    out[Col.ERROR] = np.asarray([e or "" for e in table.column(Col.ERROR).to_pylist()], object)
    return out


def cache_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """The proposals part of one batch (the MatchStage output with the cache columns)."""
    n = len(batch[Col.IMAGE_ID])
    cols: dict[str, Any] = {
        **image_columns(batch),
        Col.PROPOSALS: [bytes(b) for b in batch[Col.PROPOSALS]],
        Col.POOLED: [bytes(b) for b in batch[Col.POOLED]],
    }
    for name in ("n_proposals", "n_pooled", "feature_dim"):
        cols[name] = batch.get(name, np.zeros(n, np.int32))
    return pa.Table.from_pydict(
        {k: pa.array(v, PROPOSALS_SCHEMA.field(k).type) for k, v in cols.items()},
        schema=PROPOSALS_SCHEMA,
    )


def shaping_method(method: MethodConfig) -> dict[str, Any]:
    """The method settings that shaped the proposals or their pooled features."""
    skip = set(REMATCH_FIELDS) | set(REFERENCE_ONLY_FIELDS) | set(RUNTIME_METHOD_FIELDS)
    return {
        f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.name not in skip
    }


def shaping_model(model: ModelConfig) -> dict[str, Any]:
    """The model settings that shaped the cache (checkpoints are compared by hash)."""
    skip = set(RUNTIME_MODEL_FIELDS) | {"sam2_checkpoint", "dinov2_checkpoint"}
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}


def cache_record(
    model: ModelConfig, method: MethodConfig, checkpoints: dict[str, Any]
) -> dict[str, Any]:
    """What ``run.json`` says of the cache: format, encoder, checkpoint hashes, settings."""
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "path": PROPOSALS_DIR,
        "content": "proposals: transport.encode_proposals; pooled: float32 (n_pooled, feature_dim) "
        "DINOv2 features pooled inside each nonempty proposal",
        "encoder": {
            "dinov2_model": model.dinov2_model,
            "dinov2_image_size": model.dinov2_image_size,
            "dinov2_sha256": checkpoints.get("dinov2"),
        },
        "sam2": {
            "sam2_config": model.sam2_config,
            "sam2_image_size": model.sam2_image_size,
            "sam2_sha256": checkpoints.get("sam2"),
        },
        "random_weights": model.random_weights,
        "model": shaping_model(model),
        "method": shaping_method(method),
    }
