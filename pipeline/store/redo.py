"""What a rerun must do again, and the removal of the rows it replaces.

A listed image is done when OUT's finished images parts hold a row for it. It is done
again (its row and instances removed first, so that one image keeps one id and one row)
when its file's size or modification time differ from those recorded in its row, when
its row is an error row recorded without them (the file was missing, or the row is from
a version that did not record them) and the file is there now, or, with
``retry_errors``, when its row is an error row.

Rows are matched to the listing by image id where the ids come from the source (COCO,
a Parquet manifest's ``image_id``), else by canonical URI: an image recorded under an
older spelling of its path (before symlinks were resolved) keeps its recorded id, and
further rows of the same file under other ids (earlier versions listed a file once per
spelling) are removed.

Removal rewrites a part without the rows: the old images part (the completion marker)
is deleted first, then the kept rows are written as a new part (proposal cache where the
run keeps one, instances, then images), then the old parts are deleted. At any
interruption the parts on OUT are consistent: at worst some kept images lose their marker
and run again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from refseg.pipeline.identity import Listing, canonical_uri
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import layout
from refseg.pipeline.store.layout import (
    IMAGES_DIR,
    INSTANCES_DIR,
    PROPOSALS_DIR,
    finished_parts,
    part_key,
)
from refseg.pipeline.store.record import check_fingerprint, write_run_record

__all__ = ["Plan", "begin_run", "plan_rerun", "retire", "settle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """listing: the targets, with recorded ids kept; done: int64 ids whose rows stay."""

    listing: Listing
    done: np.ndarray
    changed: int = 0
    retried: int = 0
    duplicates: int = 0


def _read(loc: Location) -> pa.Table:
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_table(f)


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, -1, np.int64)
    return np.asarray(table.column(name).fill_null(-1).to_numpy(), dtype=np.int64)


@dataclass(frozen=True)
class _Rows:
    parts: list[str]
    ids: np.ndarray
    uris: list[str]
    ok: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray


def _recorded(out: Location) -> _Rows:
    parts, ids, uris, ok, sizes, mtimes = [], [], [], [], [], []
    for name in finished_parts(out):
        t = _read(out.child(IMAGES_DIR, name))
        parts += [name] * t.num_rows
        ids.append(t.column(Col.IMAGE_ID).to_numpy())
        uris += [str(u) for u in t.column(Col.IMAGE_URI).to_pylist()]
        ok.append(np.asarray(t.column(Col.STATUS).to_pylist(), dtype=object) == "ok")
        sizes.append(_int_column(t, Col.FILE_SIZE))
        mtimes.append(_int_column(t, Col.FILE_MTIME))
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
    return _Rows(
        parts, cat(ids, np.int64), uris, cat(ok, bool), cat(sizes, np.int64), cat(mtimes, np.int64)
    )


def _match(rows: _Rows, listing: Listing, by_id: bool) -> list[list[int]]:
    """For each listed image, the indices of the recorded rows of the same image."""
    matches: list[list[int]] = [[] for _ in range(len(listing))]
    position = {int(i): k for k, i in enumerate(listing.ids.tolist())}
    by_uri = {u: k for k, u in enumerate(listing.uris)}
    for r, (iid, uri) in enumerate(zip(rows.ids.tolist(), rows.uris, strict=True)):
        k = position.get(int(iid))
        if not by_id and (k is None or listing.uris[k] != uri):  # another spelling?
            try:
                k = by_uri.get(canonical_uri(uri))
            except ValueError:
                k = None
        if k is not None:
            matches[k].append(r)
    return matches


def plan_rerun(out: Location, listing: Listing, *, retry_errors: bool) -> Plan:
    """Decide what runs again, and remove the rows it replaces (see the module docstring).

    Rows are matched by id when the listing's ids come from the source, else by canonical
    URI. Call it holding OUT's lock.
    """
    rows = _recorded(out)
    if not len(rows.ids):
        return Plan(listing, np.zeros(0, np.int64))
    ids = listing.ids.copy()
    done: list[int] = []
    drop: dict[str, set[int]] = defaultdict(set)
    changed = retried = duplicates = 0
    for k, found in enumerate(_match(rows, listing, listing.ids_given)):
        if not found:
            continue
        keep = next((r for r in found if rows.ids[r] == ids[k]), found[0])
        for r in found:
            if r != keep:
                drop[rows.parts[r]].add(int(rows.ids[r]))
                duplicates += 1
        ids[k] = rows.ids[keep]
        then, now = (rows.sizes[keep], rows.mtimes[keep]), (listing.sizes[k], listing.mtimes[k])
        known_then, known_now = min(then) >= 0, min(now) >= 0
        if known_now and (then != now if known_then else not rows.ok[keep]):
            changed += 1  # replaced, or an error row of a file that was missing then
        elif retry_errors and not rows.ok[keep]:
            retried += 1
        else:
            done.append(int(ids[k]))
            continue
        drop[rows.parts[keep]].add(int(ids[k]))
    if duplicates:
        log.warning(
            "removing %d duplicate rows left by earlier runs: one row per image", duplicates
        )
    if changed:
        log.warning(
            "%d images changed since they were labelled (size or modification time): "
            "their old rows are removed and they run again",
            changed,
        )
    if retried:
        log.info("%d earlier error rows run again (--retry-errors)", retried)
    retire(out, drop)
    return Plan(
        dataclasses.replace(listing, ids=ids),
        np.unique(np.asarray(done, np.int64)),
        changed,
        retried,
        duplicates,
    )


def retire(out: Location, drop: dict[str, set[int]]) -> int:
    """Remove the rows (and instances) of ``drop[part] = image ids`` from those finished
    parts; return how many image rows were removed. Call it holding OUT's lock."""
    removed = 0
    cached = set(layout.cached_parts(out)) if drop else set()
    for name, gone in sorted(drop.items()):
        if not gone:
            continue
        # the proposal cache's part (--cache-proposals) first, as the writer does
        dirs = ([PROPOSALS_DIR] if name in cached else []) + [INSTANCES_DIR, IMAGES_DIR]
        tables = {d: _read(out.child(d, name)) for d in dirs}
        gone_arr = pa.array(sorted(gone), pa.int64())
        kept = {
            d: t.filter(pc.invert(pc.is_in(t.column(Col.IMAGE_ID), gone_arr)))
            for d, t in tables.items()
        }
        removed += tables[IMAGES_DIR].num_rows - kept[IMAGES_DIR].num_rows
        out.fs.delete_file(out.child(IMAGES_DIR, name).path)  # the marker first (docstring)
        if kept[IMAGES_DIR].num_rows:
            key = part_key(kept[IMAGES_DIR].column(Col.IMAGE_ID).to_numpy())
            for d in dirs:
                layout.write_table(out.child(d, f"part-{key}.parquet"), kept[d])
        for d in dirs[:-1]:
            out.fs.delete_file(out.child(d, name).path)
    return removed


def begin_run(
    out: Location,
    start: dict[str, Any],
    list_targets: Callable[[], Listing],
    *,
    retry_errors: bool,
) -> Plan:
    """What a run does to OUT before its first part; call it holding OUT's lock.

    1. Refuse another configuration, then record this one: run.json with the fingerprint
       and ``status: running`` (``start``), unless it holds this fingerprint already, so
       that an interrupted run still names the configuration of its parts.
    2. Remove temporary files and the parts of interrupted batches.
    3. List the targets (each file once, OUT's own files never) and decide what runs again.
    """
    recorded = check_fingerprint(out, start["fingerprint"], has_parts=layout.has_parts(out))
    if recorded != start["fingerprint"]:
        write_run_record(out, start)
    layout.remove_temporaries(out)
    removed = layout.remove_orphans(out)
    if removed:
        log.warning("removed %d parts of interrupted batches; their images run again", removed)
    return plan_rerun(out, list_targets(), retry_errors=retry_errors)


def settle(out: Location) -> int:
    """Before the COCO files: one row per image id, every finished part whole.

    Ray workers of a driver that was killed can finish a part write after the driver is
    gone, and so after the next run has read what is done: that image then has a row of
    each run, or a completion marker whose instances part the next run's clean-up had
    deleted. Run when this run's own writes are over, holding OUT's lock; returns the
    number of rows and parts removed.
    """
    removed = layout.remove_orphans(out)
    first: dict[int, str] = {}
    drop: dict[str, set[int]] = defaultdict(set)
    for name in finished_parts(out):
        ids = _read(out.child(IMAGES_DIR, name)).column(Col.IMAGE_ID).to_pylist()
        for iid in ids:
            if first.setdefault(int(iid), name) != name:
                drop[name].add(int(iid))
    if drop:
        log.warning(
            "removing %d rows of images labelled twice (by an earlier run's workers that "
            "outlived their driver)",
            sum(len(v) for v in drop.values()),
        )
    return removed + retire(out, drop)
