"""Row adapters at the edges of the labelling stages, for any ``ray.data.Dataset``.

``input_columns`` maps a user's columns (image bytes or an image URI, an optional id) to
the stages' own (``Col``); ``instance_rows`` and ``image_rows`` turn the stages' per-image
output into plain Arrow rows (``INSTANCES_SCHEMA``, ``IMAGES_SCHEMA``): the same rows
``refseg label`` writes to ``OUT/instances`` and ``OUT/images``. No torch here: these are
CPU tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from refseg.pipeline.dataflow.writer import images_table
from refseg.pipeline.schema import INSTANCES_SCHEMA, Col, image_id_from_uri

__all__ = ["InputColumns", "input_columns", "instance_rows", "image_rows"]

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputColumns:
    """Which of a dataset's columns hold each image.

    Attributes:
        bytes: encoded image bytes (JPEG, PNG, TIFF, ...); ``None``: read ``uri``.
        uri: the image's URI or path (local, s3://, gs://); also the ``image_uri`` of its
            rows. Without it, rows get ``bytes:<sha256 of the bytes>``.
        image_id: int64 ids; ``None``: a deterministic 52-bit hash of the URI.
    """

    bytes: str | None = "bytes"
    uri: str | None = None
    image_id: str | None = None

    def __post_init__(self) -> None:
        if self.bytes is None and self.uri is None:
            raise ValueError("name a column of image bytes, a column of image URIs, or both")

    @property
    def standard(self) -> bool:
        """The stages' own columns already (a refseg source)."""
        return (self.bytes, self.uri, self.image_id) == (Col.BYTES, Col.IMAGE_URI, Col.IMAGE_ID)


def _column(batch: Batch, name: str) -> np.ndarray:
    if name not in batch:
        raise ValueError(
            f"the dataset has no column {name!r} (it has {sorted(batch)}): name the image "
            "columns with bytes_column=, uri_column=, id_column="
        )
    return batch[name]


def input_columns(batch: Batch, *, columns: InputColumns) -> Batch:
    """A user's batch -> ``image_id, image_uri, error`` (+ ``bytes`` when given). CPU task."""
    n = len(next(iter(batch.values()))) if batch else 0
    data = _column(batch, columns.bytes) if columns.bytes else None
    if columns.uri:
        uris = [str(u) for u in _column(batch, columns.uri)]
    else:
        uris = ["bytes:" + hashlib.sha256(bytes(b)).hexdigest() for b in data]  # type: ignore[union-attr]
    if columns.image_id:
        ids = np.asarray(_column(batch, columns.image_id), dtype=np.int64)
    else:
        ids = np.asarray([image_id_from_uri(u) for u in uris], dtype=np.int64)
    out: Batch = {
        Col.IMAGE_ID: ids,
        Col.IMAGE_URI: np.asarray(uris, dtype=object),
        Col.ERROR: np.full(n, "", dtype=object),
    }
    if data is not None:
        out[Col.BYTES] = np.asarray([bytes(b) for b in data], dtype=object)
    return out


def instance_rows(batch: Batch) -> pa.Table:
    """The stages' per-image rows -> one row per instance (``INSTANCES_SCHEMA``). CPU task."""
    tables = [pa.ipc.open_stream(b).read_all() for b in batch[Col.INSTANCES] if len(b)]
    if not tables:
        return INSTANCES_SCHEMA.empty_table()
    return pa.concat_tables(tables).cast(INSTANCES_SCHEMA)


def image_rows(batch: Batch) -> pa.Table:
    """The stages' per-image rows -> one row per image (``IMAGES_SCHEMA``: status, error,
    sizes, instance count, per-stage seconds). CPU task."""
    return images_table(batch)
