"""The writer tasks: one batch's parts into OUT (store/layout.py says where and in what order)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from refseg.pipeline.dataflow.proposal_cache import cache_table
from refseg.pipeline.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, Col, image_columns
from refseg.pipeline.storage import Location
from refseg.pipeline.store.layout import (
    IMAGES_DIR,
    INSTANCES_DIR,
    PROPOSALS_DIR,
    part_key,
    write_table,
)

__all__ = ["images_table", "instances_blob", "write_parts"]


def images_table(batch: dict[str, np.ndarray]) -> pa.Table:
    n = len(batch[Col.IMAGE_ID])
    seconds = sum(
        np.asarray(batch[c], dtype=np.float64)
        for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE)
    )
    cols: dict[str, Any] = {
        **image_columns(batch),
        Col.N_INSTANCES: batch.get(Col.N_INSTANCES, np.zeros(n, np.int32)),
        Col.SECONDS: seconds,
    }
    for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE):
        cols[c] = batch[c]
    for c in (Col.FILE_SIZE, Col.FILE_MTIME):  # -1 or absent: unknown
        known = np.asarray(batch.get(c, np.full(n, -1)), dtype=np.int64)
        cols[c] = [int(v) if v >= 0 else None for v in known]
    return pa.Table.from_pydict(
        {k: pa.array(v, IMAGES_SCHEMA.field(k).type) for k, v in cols.items()},
        schema=IMAGES_SCHEMA,
    )


def instances_blob(table: pa.Table) -> bytes:
    """One image's instances table as the Arrow IPC bytes ``write_parts`` reads back."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def write_parts(batch: dict[str, np.ndarray], *, out: Location) -> dict[str, np.ndarray]:
    """Write one batch's instances part, then its images part; return a small summary.

    A batch that carries the proposal cache (``Col.POOLED``) writes its proposals part first.
    """
    key = part_key(batch[Col.IMAGE_ID])
    if Col.POOLED in batch:
        write_table(out.child(PROPOSALS_DIR, f"part-{key}.parquet"), cache_table(batch))
    tables = [pa.ipc.open_stream(b).read_all() for b in batch[Col.INSTANCES] if len(b)]
    inst = pa.concat_tables(tables) if tables else INSTANCES_SCHEMA.empty_table()
    images = images_table(batch)
    write_table(out.child(INSTANCES_DIR, f"part-{key}.parquet"), inst.cast(INSTANCES_SCHEMA))
    write_table(out.child(IMAGES_DIR, f"part-{key}.parquet"), images)
    return {
        Col.IMAGE_ID: images.column(Col.IMAGE_ID).to_numpy(),
        Col.STATUS: np.asarray(images.column(Col.STATUS).to_pylist(), dtype=object),
        Col.N_INSTANCES: images.column(Col.N_INSTANCES).to_numpy(),
        Col.SECONDS: images.column(Col.SECONDS).to_numpy(),
    }
