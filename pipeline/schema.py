"""Column names flowing between stages and the Arrow schema of the images table."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
from refseg.core.instances import INSTANCES_SCHEMA

__all__ = ["Col", "IMAGES_SCHEMA", "INSTANCES_SCHEMA", "image_id_from_uri"]


class Col:
    """Names of the columns between stages (one place, never retyped)."""

    IMAGE_ID = "image_id"
    IMAGE_URI = "image_uri"
    BYTES = "bytes"
    SQUARE = "square"  # (S, S, 3) uint8 SAM2 input
    VALID_H = "valid_h"
    VALID_W = "valid_w"
    WIDTH = "width"
    HEIGHT = "height"
    STATUS = "status"
    ERROR = "error"
    PROPOSALS = "proposals"  # refseg.core.transport.encode_proposals
    POOLED = (
        "pooled"  # float32 (n_pooled, feature_dim) bytes (refseg.pipeline.dataflow.proposal_cache)
    )
    INSTANCES = "instances"  # Arrow IPC stream of INSTANCES_SCHEMA rows of one image
    N_INSTANCES = "n_instances"
    SECONDS = "seconds"
    T_DECODE = "decode_seconds"
    T_PROPOSE = "propose_seconds"
    T_MATCH = "match_seconds"
    T_ENCODE = "encode_seconds"
    FILE_SIZE = "file_size"  # bytes of the input file when it was listed (null: unknown)
    FILE_MTIME = "file_mtime_ns"  # its modification time, ns since the epoch (null: unknown)


IMAGES_SCHEMA = pa.schema(
    [
        pa.field(Col.IMAGE_ID, pa.int64(), nullable=False),
        pa.field(Col.IMAGE_URI, pa.string(), nullable=False),
        pa.field(Col.WIDTH, pa.int32()),
        pa.field(Col.HEIGHT, pa.int32()),
        pa.field(Col.STATUS, pa.string(), nullable=False),  # "ok" | "error"
        pa.field(Col.ERROR, pa.string()),
        pa.field(Col.N_INSTANCES, pa.int32()),
        pa.field(Col.SECONDS, pa.float64()),
        # per-stage seconds of this image (its share of each batch), for profiling
        pa.field(Col.T_DECODE, pa.float64()),
        pa.field(Col.T_PROPOSE, pa.float64()),
        pa.field(Col.T_MATCH, pa.float64()),
        pa.field(Col.T_ENCODE, pa.float64()),
        # the input file as listed: a rerun redoes the image when either differs
        pa.field(Col.FILE_SIZE, pa.int64()),
        pa.field(Col.FILE_MTIME, pa.int64()),
    ]
)


def image_id_from_uri(uri: str) -> int:
    """Deterministic 52-bit id of an image URI (exact in JSON readers that use doubles)."""
    return int.from_bytes(hashlib.sha256(uri.encode("utf-8")).digest()[:8], "big") >> 12


def image_columns(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Each image's id, URI, size, status and error text, as every per-image part holds them."""
    return {
        Col.IMAGE_ID: batch[Col.IMAGE_ID],
        Col.IMAGE_URI: [str(u) for u in batch[Col.IMAGE_URI]],
        Col.WIDTH: batch[Col.WIDTH],
        Col.HEIGHT: batch[Col.HEIGHT],
        Col.STATUS: [str(s) for s in batch[Col.STATUS]],
        Col.ERROR: [str(e) if e else None for e in batch[Col.ERROR]],
    }
