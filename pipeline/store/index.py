"""A compact index of OUT: what a rerun needs to plan, read from a few objects.

OUT/index/
  index.json          the pointer, written whole: the segments, and for each part it
                      covers the part's stamp (store/layout.py), segment and row count
  seg-<random>.parquet  immutable segments: images rows (IMAGES_SCHEMA) plus ``part``, the
                      name of the part each row is in

The parts stay the truth; the index is a cache of their images rows, checked against one
listing of ``images/`` each time it is read (``load``): a part's rows come from the index
only while the part is listed with the stamp the index recorded, every other finished
part is read on top (a bounded thread pool, store/pool.py), and rows of parts no longer
listed are left out. So a stale, missing or half-written index costs reads, never a lost
or doubled row: an OUT written before the index existed builds it on its first rerun.

A covered part is forgotten (the pointer rewritten without it) before any part file is
deleted or rewritten (``forget``), so a later part of the same name is never mistaken for
the indexed one. ``update_index``, at the end of a run, adds one segment holding the rows of
the parts read on top and merges segments by size tier (``FANOUT`` segments of one tier
become one of the next), so that a row is rewritten about log_FANOUT(N / new rows) times in
its life (a rerun writes index bytes in proportion to its new images, amortised) and there
are few segments; rows of forgotten parts are dropped once they are half of the rows.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from refseg.pipeline.schema import IMAGES_SCHEMA, Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import journal
from refseg.pipeline.store.atomic import write_bytes
from refseg.pipeline.store.journal import INDEX_DIR
from refseg.pipeline.store.layout import IMAGES_DIR, Stamp, finished_stamps
from refseg.pipeline.store.pool import (
    READ_THREADS,
    delete_all,
    map_bounded,
    read_bytes,
    read_tables,
)

__all__ = [
    "INDEX_DIR",
    "PART",
    "Pointer",
    "Snapshot",
    "conform",
    "forget",
    "ids_by_part",
    "load",
    "row_groups",
    "unique_ids",
    "read_pointer",
    "update_index",
]

log = logging.getLogger(__name__)

PART = "part"  # column of the index rows: the part file the row is in
POINTER = "index.json"
_FORMAT = "refseg-index"
#: Segments of one size tier (a factor FANOUT of rows) merged into one.
FANOUT = 4
#: Segments past this many are merged into one.
MAX_SEGMENTS = 24
ROWS_SCHEMA = IMAGES_SCHEMA.append(pa.field(PART, pa.string(), nullable=False))


@dataclass
class Pointer:
    """index.json: ``segments`` file -> rows it holds (oldest first); ``parts`` name ->
    (stamp, segment file, rows)."""

    segments: dict[str, int] = field(default_factory=dict)
    parts: dict[str, tuple[Stamp, str, int]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        order = list(self.segments)
        at = {s: k for k, s in enumerate(order)}
        body = {
            "format": _FORMAT,
            "version": 1,
            "segments": [{"file": s, "rows": n} for s, n in self.segments.items()],
            "parts": {p: [st[0], st[1], at[s], n] for p, (st, s, n) in sorted(self.parts.items())},
        }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Pointer:
        body = json.loads(data)
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            raise ValueError("not a refseg index")
        files = [str(s["file"]) for s in body["segments"]]
        segments = {f: int(s["rows"]) for f, s in zip(files, body["segments"], strict=True)}
        parts = {
            str(p): ((int(v[0]), int(v[1])), files[int(v[2])], int(v[3]))
            for p, v in body["parts"].items()
        }
        return cls(segments, parts)


def _pointer_loc(out: Location) -> Location:
    return out.child(INDEX_DIR, POINTER)


def read_pointer(out: Location) -> Pointer:
    """OUT's index pointer; an empty one when there is none or it cannot be read."""
    try:
        return Pointer.from_json(read_bytes(_pointer_loc(out)))
    except FileNotFoundError:
        return Pointer()
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        log.warning("%s cannot be read (%s): the index is rebuilt", _pointer_loc(out).uri, exc)
        return Pointer()


def _write_pointer(out: Location, pointer: Pointer) -> None:
    write_bytes(_pointer_loc(out), pointer.to_json())


def conform(table: pa.Table, part: str | None = None) -> pa.Table:
    """An images part's rows in IMAGES_SCHEMA (columns of older versions added as nulls),
    plus ``part`` when given."""
    cols = []
    for f in IMAGES_SCHEMA:
        if f.name in table.column_names:
            cols.append(table.column(f.name).cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    if part is None:
        return pa.Table.from_arrays(cols, schema=IMAGES_SCHEMA)
    cols.append(pa.array([part] * table.num_rows, pa.string()))
    return pa.Table.from_arrays(cols, schema=ROWS_SCHEMA)


# segments are immutable (unique names): kept in memory per process, a few at a time
_SEGMENTS: OrderedDict[tuple[str, str], pa.Table] = OrderedDict()
_SEGMENT_CACHE = 32


def _segment(out: Location, name: str) -> pa.Table:
    key = (out.uri, name)
    if key in _SEGMENTS:
        _SEGMENTS.move_to_end(key)
        return _SEGMENTS[key]
    table = pq.read_table(io.BytesIO(read_bytes(out.child(INDEX_DIR, name))))
    table = table.select(ROWS_SCHEMA.names).cast(ROWS_SCHEMA)
    _SEGMENTS[key] = table
    while len(_SEGMENTS) > _SEGMENT_CACHE:
        _SEGMENTS.popitem(last=False)
    return table


def _segment_or_none(out: Location, name: str) -> pa.Table | None:
    try:
        return _segment(out, name)
    except FileNotFoundError:
        return None


@dataclass
class Snapshot:
    """What OUT holds now.

    rows: the images rows of every finished part (ROWS_SCHEMA: IMAGES_SCHEMA + ``part``);
    listed: finished part -> stamp; covered: part -> the segment its rows came from;
    fresh: the parts read on top of the index; pointer: the index as read.
    """

    out: Location
    rows: pa.Table
    listed: dict[str, Stamp]
    covered: dict[str, str]
    fresh: list[str]
    pointer: Pointer

    @property
    def ids(self) -> np.ndarray:
        """int64 image id of each row."""
        return self.rows.column(Col.IMAGE_ID).to_numpy()

    def part_rows(self) -> dict[str, int]:
        """Rows per finished part."""
        counts = pc.value_counts(self.rows.column(PART)).to_pylist()
        return {str(c["values"]): int(c["counts"]) for c in counts}


def load(out: Location, *, threads: int = READ_THREADS) -> Snapshot:
    """Every finished part's images rows: the index where it holds them, the rest read on top.

    Parts of a compaction in progress whose rows are already in its target are left out
    (store/journal.py), so readers that do not hold OUT see each image once too.
    """
    pointer = read_pointer(out)
    listed = finished_stamps(out)
    for name in journal.hidden(journal.read_journal(out), listed):
        listed.pop(name, None)
    covered = {p: e[1] for p, e in pointer.parts.items() if listed.get(p) == e[0]}
    wanted: dict[str, list[str]] = {}
    for p, s in covered.items():
        wanted.setdefault(s, []).append(p)
    tables: list[pa.Table] = []
    segments = map_bounded(lambda s: _segment_or_none(out, s), list(wanted), threads=threads)
    for s, table in zip(wanted, segments, strict=True):
        if table is None:  # superseded since the pointer was read (a reader without the lock)
            for p in wanted[s]:
                del covered[p]
        elif sum(pointer.parts[p][2] for p in wanted[s]) == table.num_rows:
            tables.append(table)  # every row of the segment is live
        else:
            tables.append(table.filter(pc.is_in(table.column(PART), pa.array(wanted[s]))))
    fresh = sorted(p for p in listed if p not in covered)
    locs = [out.child(IMAGES_DIR, p) for p in fresh]
    read = []
    for k, table in read_tables(locs, threads=threads, missing_ok=True):
        if table is not None:  # None: deleted since the listing (a reader without the lock)
            tables.append(conform(table, fresh[k]))
            read.append(fresh[k])
    if len(read) < len(fresh):
        gone = set(fresh) - set(read)
        listed = {p: s for p, s in listed.items() if p not in gone}
    rows = pa.concat_tables(tables) if tables else ROWS_SCHEMA.empty_table()
    rows = rows.combine_chunks()  # one chunk: a take per part must not concatenate them
    return Snapshot(out, rows, listed, covered, read, pointer)


def unique_ids(ids: np.ndarray) -> np.ndarray:
    """Sorted distinct int64 ids (a sort: numpy's hash-based ``unique`` is ~50x slower at
    a million ids)."""
    s = np.sort(np.asarray(ids, dtype=np.int64))
    return s[np.r_[True, s[1:] != s[:-1]]] if len(s) else s


def row_groups(rows: pa.Table) -> dict[str, np.ndarray]:
    """Part name -> int64 positions of its rows in ``rows`` (in row order), parts by name.

    Grouped through the dictionary codes of the ``part`` column (integers sort fast)."""
    if not rows.num_rows:
        return {}
    codes = pc.dictionary_encode(rows.column(PART)).combine_chunks()
    names = codes.dictionary.to_pylist()
    idx = codes.indices.to_numpy()
    order = np.argsort(idx, kind="stable")
    starts = np.searchsorted(idx[order], np.arange(len(names) + 1))
    return {names[c]: order[starts[c] : starts[c + 1]] for c in np.argsort(names)}


def ids_by_part(out: Location) -> dict[str, np.ndarray]:
    """int64 image ids of each finished part, from the index (``load``)."""
    rows = load(out).rows
    ids = rows.column(Col.IMAGE_ID).to_numpy()
    return {p: ids[at] for p, at in row_groups(rows).items()}


def forget(out: Location, names: Iterable[str]) -> None:
    """Drop the parts ``names`` from the index before they are deleted or rewritten; call it
    holding OUT's lock."""
    pointer = read_pointer(out)
    gone = [n for n in names if n in pointer.parts]
    if not gone:
        return
    for n in gone:
        del pointer.parts[n]
    _write_pointer(out, pointer)


def _write_segment(out: Location, rows: pa.Table) -> str:
    name = f"seg-{uuid.uuid4().hex[:16]}.parquet"
    buf = io.BytesIO()
    pq.write_table(rows, buf, compression="zstd", row_group_size=256 * 1024)
    write_bytes(out.child(INDEX_DIR, name), buf.getvalue())
    _SEGMENTS[(out.uri, name)] = rows
    return name


def _merge(
    snap: Snapshot, parts: dict[str, tuple[Stamp, str, int]], merged: list[str]
) -> tuple[str, int]:
    """Write one segment with the live rows of the segments ``merged``; repoint their parts."""
    moved = [p for p, e in parts.items() if e[1] in merged]
    rows = snap.rows.filter(pc.is_in(snap.rows.column(PART), pa.array(moved, pa.string())))
    name = _write_segment(snap.out, rows)
    for p in moved:
        st, _, n = parts[p]
        parts[p] = (st, name, n)
    return name, rows.num_rows


def update_index(out: Location, snapshot: Snapshot | None = None) -> dict[str, Any]:
    """Bring OUT's index up to date with its finished parts; call it holding OUT's lock.

    Writes a segment for the parts read on top (if any), merges segments (module
    docstring), rewrites the pointer, then deletes segments no longer named. Returns counts.
    """
    snap = snapshot if snapshot is not None else load(out)
    old = snap.pointer
    parts = {p: old.parts[p] for p in snap.covered}
    segments = {s: n for s, n in old.segments.items() if s in set(snap.covered.values())}
    written = 0
    if snap.fresh:
        fresh = snap.rows.filter(pc.is_in(snap.rows.column(PART), pa.array(snap.fresh)))
        name = _write_segment(out, fresh)
        segments[name] = fresh.num_rows
        counts = snap.part_rows()
        for p in snap.fresh:
            parts[p] = (snap.listed[p], name, counts.get(p, 0))
        written += fresh.num_rows

    def live() -> dict[str, int]:
        n = dict.fromkeys(segments, 0)
        for _, s, rows in parts.values():
            n[s] += rows
        return n

    order = list(segments)
    while True:  # size tiers: FANOUT segments of one tier become one of the next
        n = live()
        tiers: dict[int, list[str]] = {}
        for s in order:
            tiers.setdefault(int(np.log(max(n[s], 1)) / np.log(FANOUT)), []).append(s)
        full = [names for names in tiers.values() if len(names) >= FANOUT]
        if not full:
            break
        name, rows = _merge(snap, parts, full[0])
        order = [s for s in order if s not in full[0]] + [name]
        segments = {s: (rows if s == name else segments[s]) for s in order}
        written += rows
    n = live()
    if len(order) > MAX_SEGMENTS or sum(segments.values()) > 2 * sum(n.values()) + 1024:
        name, rows = _merge(snap, parts, order)
        order, segments = [name], {name: rows}
        written += rows
    n = live()
    segments = {s: segments[s] for s in order if n[s]}  # a segment of forgotten parts only
    pointer = Pointer(segments, parts)
    if pointer.to_json() != old.to_json():
        _write_pointer(out, pointer)
    _collect(out, set(segments))
    return {"rows": snap.rows.num_rows, "read_on_top": len(snap.fresh), "rows_written": written}


def _collect(out: Location, keep: set[str]) -> None:
    """Delete segment files the pointer does not name (superseded, or left by a kill)."""
    loc = out.child(INDEX_DIR)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError:
        return
    gone = [i.base_name for i in infos if i.base_name.startswith("seg-")]
    delete_all([loc.child(name) for name in gone if name not in keep])
