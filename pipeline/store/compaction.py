"""Compaction: small parts merged into large ones, atomically and resumably.

Writers make one part per batch (tens of images); a corpus of a million images would be
tens of thousands of files. Compaction merges groups of small parts into one part of the
same layout and schema (``images/``, ``instances/`` and, with a proposal cache,
``proposals/`` files named ``part-<key of its image ids>.parquet``), so that OUT stays a few
hundred files for refseg and for the engines users query it with (DuckDB, Polars, Spark,
Ray Data: plain Parquet, row groups of up to ``ROW_GROUP_ROWS`` rows).

* Automatic (``settle`` at the end of every run): parts are sorted into size tiers (a tier
  spans a factor ``FANOUT`` of rows); a tier holding ``FANOUT`` parts has them merged into
  one part of the next tier, so each row is rewritten about log_FANOUT(COMPACT_ROWS / batch)
  times in its life: bytes written stay in proportion to the new images, amortised. At most
  ``AUTO_MAX_ROWS`` rows are merged per run (an OUT from before compaction existed is
  merged over a few runs, or at once by ``refseg compact OUT``).
* Full (``refseg compact OUT``): every small part merged into parts of up to
  ``COMPACT_ROWS`` images.

A compacted part holds at most ``COMPACT_ROWS`` images and ``COMPACT_BYTES`` bytes per file;
each part is one COCO shard (store/coco_shards.py), so that bound keeps shards loadable.
Kill safety comes from the journal (store/journal.py) and the index's rule that a part is
forgotten before it is deleted (store/index.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import index, journal, layout
from refseg.pipeline.store.atomic import atomic_output
from refseg.pipeline.store.journal import Group
from refseg.pipeline.store.layout import IMAGES_DIR, INSTANCES_DIR, PROPOSALS_DIR, part_key
from refseg.pipeline.store.pool import READ_THREADS, delete_all, map_bounded, read_table

__all__ = [
    "AUTO_MAX_ROWS",
    "COMPACT_BYTES",
    "COMPACT_ROWS",
    "FANOUT",
    "compact",
    "recover",
]

log = logging.getLogger(__name__)

#: Images per compacted part (and per COCO shard).
COMPACT_ROWS = 4096
#: Bytes of any one file of a compacted part (the proposal cache is the large one).
COMPACT_BYTES = 256 * 1024 * 1024
#: Parts of one size tier merged at once.
FANOUT = 8
#: Rows the automatic compaction of one run merges at most.
AUTO_MAX_ROWS = 256 * 1024
#: Rows per row group of a compacted file.
ROW_GROUP_ROWS = 64 * 1024
_DIRS = (PROPOSALS_DIR, INSTANCES_DIR, IMAGES_DIR)  # the order a part's files appear in


def recover(out: Location) -> int:
    """Finish or undo a compaction a kill interrupted (store/journal.py); call it holding
    OUT's lock. Returns the number of groups repaired."""
    groups = journal.read_journal(out)
    if not groups:
        return 0
    listed = layout.finished_stamps(out)
    index.forget(out, journal.hidden(groups, listed))  # before they are deleted
    return journal.recover(out, listed)


def _sizes(snap: index.Snapshot) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """Rows per finished part, its largest file's bytes, and the parts with a cache part."""
    rows = snap.part_rows()
    size = {p: s[0] for p, s in snap.listed.items()}
    cached: set[str] = set()
    for kind in (INSTANCES_DIR, PROPOSALS_DIR):
        for p, s in layout.list_stamps(snap.out.child(kind)).items():
            if p in size:
                size[p] = max(size[p], s[0])
                cached |= {p} if kind == PROPOSALS_DIR else set()
    return rows, size, cached


def _small(rows: dict[str, int], size: dict[str, int]) -> list[str]:
    return sorted(
        p for p in rows if rows[p] <= COMPACT_ROWS // 2 and size.get(p, 0) <= COMPACT_BYTES // 2
    )


def _pack(names: list[str], rows: dict[str, int], size: dict[str, int]) -> Iterator[list[str]]:
    """Consecutive runs of ``names`` within the row and byte bounds, two parts or more."""
    group: list[str] = []
    n = b = 0
    for p in names:
        if group and (n + rows[p] > COMPACT_ROWS or b + size[p] > COMPACT_BYTES):
            if len(group) > 1:
                yield group
            group, n, b = [], 0, 0
        group.append(p)
        n, b = n + rows[p], b + size[p]
    if len(group) > 1:
        yield group


def _groups(snap: index.Snapshot, chunks: list[list[str]]) -> list[Group]:
    if not chunks:
        return []
    ids, at = snap.ids, index.row_groups(snap.rows)
    return [
        Group(f"part-{part_key(np.concatenate([ids[at[p]] for p in chunk]))}.parquet", tuple(chunk))
        for chunk in chunks
    ]


def _planned(snap: index.Snapshot, *, full: bool) -> tuple[list[Group], set[str]]:
    """The merges of a compaction and the parts with a cache part (one listing of each folder
    for both). ``full``: every small part, packed into parts of up to COMPACT_ROWS images
    (cache or not apart); else the automatic tiers: FANOUT parts of one size tier, at most
    AUTO_MAX_ROWS rows."""
    if not full and len(snap.listed) < FANOUT:
        return [], set()
    rows, size, cached = _sizes(snap)
    small = _small(rows, size)
    if full:
        chunks = [
            g
            for subset in ([p for p in small if p in cached], [p for p in small if p not in cached])
            for g in _pack(subset, rows, size)
        ]
        return _groups(snap, chunks), cached
    tiers: dict[tuple[bool, int], list[str]] = {}
    for p in small:
        tier = int(math.log(max(rows[p], 1), FANOUT))
        tiers.setdefault((p in cached, tier), []).append(p)
    chunks, budget = [], AUTO_MAX_ROWS
    for key in sorted(tiers, key=lambda t: t[1]):
        names = tiers[key]
        for k in range(0, len(names) - FANOUT + 1, FANOUT):
            for g in _pack(names[k : k + FANOUT], rows, size):
                n = sum(rows[p] for p in g)
                if n > budget:
                    return _groups(snap, chunks), cached
                chunks.append(g)
                budget -= n
    return _groups(snap, chunks), cached


def _write_stream(out: Location, kind: str, tables: Iterator[pa.Table], schema: pa.Schema) -> int:
    """Write ``tables`` as one Parquet file ``kind/<target>`` through ``atomic_output``;
    row groups of up to ROW_GROUP_ROWS rows; return the rows written."""
    n = 0
    with atomic_output(out) as f, pq.ParquetWriter(f, schema, compression="zstd") as w:
        pending: list[pa.Table] = []
        rows = 0
        for t in tables:
            pending.append(t.cast(schema))
            rows += t.num_rows
            if rows >= ROW_GROUP_ROWS:
                w.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                n, pending, rows = n + rows, [], 0
        if pending or not n:
            w.write_table(
                pa.concat_tables(pending) if pending else schema.empty_table(),
                row_group_size=ROW_GROUP_ROWS,
            )
            n += rows
    return n


def _merge(out: Location, g: Group, cached: bool, threads: int) -> int:
    """Write the target of ``g`` (cache, instances, images: the marker last), then delete
    its sources (the markers first). Memory: a few sources' tables at a time."""
    kinds = [k for k in _DIRS if cached or k != PROPOSALS_DIR]
    rows = 0
    for kind in kinds:
        locs = [out.child(kind, s) for s in g.sources]
        tables = map_bounded(read_table, locs, threads=threads)
        if kind == IMAGES_DIR:
            tables = (index.conform(t) for t in tables)
            schema = index.conform(pa.table({Col.IMAGE_ID: pa.array([], pa.int64())})).schema
        elif kind == INSTANCES_DIR:
            schema = INSTANCES_SCHEMA
        else:
            first = read_table(locs[0])
            schema = first.schema
        n = _write_stream(out.child(kind, g.target), kind, tables, schema)
        rows = n if kind == IMAGES_DIR else rows
    delete_all([out.child(IMAGES_DIR, s) for s in g.sources])  # the markers first
    delete_all([out.child(k, s) for k in kinds if k != IMAGES_DIR for s in g.sources])
    return rows


def compact(
    out: Location,
    *,
    snapshot: index.Snapshot | None = None,
    full: bool = True,
    threads: int = READ_THREADS,
) -> dict[str, Any]:
    """Merge small parts (``full``: all of them; else the automatic tiers); call it holding
    OUT's lock, after ``redo.tidy``. Returns counts: groups, parts merged, rows, files."""
    snap = snapshot if snapshot is not None else index.load(out)
    groups, cached = _planned(snap, full=full)
    if not groups:
        return {"groups": 0, "parts_merged": 0, "rows": 0}
    journal.write_journal(out, groups)
    index.forget(out, [s for g in groups for s in g.sources])  # before any is deleted
    rows = 0
    for g in groups:
        rows += _merge(out, g, all(s in cached for s in g.sources), threads)
    delete_all([out.child(index.INDEX_DIR, journal.JOURNAL)])
    merged = sum(len(g.sources) for g in groups)
    log.info("compaction: %d parts merged into %d (%d images)", merged, len(groups), rows)
    return {"groups": len(groups), "parts_merged": merged, "rows": rows}
