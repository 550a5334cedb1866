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

Planning reads OUT's index (store/index.py: a few objects plus the parts written since it
was last updated), never every part, and matches rows to the listing with array
operations, so that its cost grows with the number of images only through a few passes
over arrays.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from refseg.pipeline.identity import Listing, canonical_uri
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import compaction, index, layout
from refseg.pipeline.store.layout import IMAGES_DIR, INSTANCES_DIR, PROPOSALS_DIR, part_key
from refseg.pipeline.store.pool import delete_all, read_table
from refseg.pipeline.store.record import check_fingerprint, write_run_record

__all__ = ["Plan", "begin_run", "plan_rerun", "retire", "settle", "tidy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """listing: the targets, with recorded ids kept; done: int64 ids whose rows stay."""

    listing: Listing
    done: np.ndarray
    changed: int = 0
    retried: int = 0
    duplicates: int = 0


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    return np.asarray(table.column(name).fill_null(-1).to_numpy(), dtype=np.int64)


def _canonical_many(uris: list[str]) -> list[str | None]:
    """``canonical_uri`` of each URI (None: not a URI refseg reads), one ``realpath`` per
    local folder plus one ``lstat`` per file, instead of a ``realpath`` per file."""
    folders: dict[str, str] = {}
    out: list[str | None] = []
    for uri in uris:
        if "://" in uri or not uri.startswith("/"):
            try:
                out.append(canonical_uri(uri))
            except ValueError:
                out.append(None)
            continue
        folder, name = os.path.split(uri)
        real = folders.get(folder)
        if real is None:
            real = folders[folder] = os.path.realpath(folder)
        path = os.path.join(real, name)
        out.append(os.path.realpath(path) if os.path.islink(path) else path)
    return out


def _match(rows: pa.Table, listing: Listing, by_id: bool) -> np.ndarray:
    """For each recorded row, the position in the listing of its image (-1: not listed)."""
    ids = rows.column(Col.IMAGE_ID).to_numpy()
    k = np.full(len(ids), -1, np.int64)
    if len(listing):
        order = np.argsort(listing.ids, kind="stable")
        sorted_ids = listing.ids[order]
        queries = np.argsort(ids)  # sorted queries: a search in order, not at random
        pos = np.empty(len(ids), np.int64)
        pos[queries] = np.searchsorted(sorted_ids, ids[queries])
        pos = np.minimum(pos, len(sorted_ids) - 1)
        hit = sorted_ids[pos] == ids
        k[hit] = order[pos[hit]]
    if by_id:
        return k
    listed = pa.array(listing.uris, pa.string())
    hit = np.nonzero(k >= 0)[0]
    if len(hit):  # ids come from URIs: the same id under another spelling is another file
        same = pc.equal(listed.take(pa.array(k[hit])), rows.column(Col.IMAGE_URI).take(hit))
        k[hit[~same.to_numpy(zero_copy_only=False)]] = -1
    missed = np.nonzero(k < 0)[0]
    if len(missed):  # an older spelling of a listed file?
        by_uri = {u: i for i, u in enumerate(listing.uris)}
        uris = rows.column(Col.IMAGE_URI).take(missed).to_pylist()
        for r, canon in zip(missed.tolist(), _canonical_many(uris), strict=True):
            k[r] = by_uri.get(canon, -1) if canon is not None else -1
    return k


def plan_rerun(
    out: Location,
    listing: Listing,
    *,
    retry_errors: bool,
    snapshot: index.Snapshot | None = None,
) -> Plan:
    """Decide what runs again, and remove the rows it replaces (see the module docstring).

    Rows are matched by id when the listing's ids come from the source, else by canonical
    URI. Reads OUT's index (``snapshot`` when the caller has loaded it). Call it holding
    OUT's lock.
    """
    rows = (snapshot if snapshot is not None else index.load(out)).rows
    if not rows.num_rows:
        return Plan(listing, np.zeros(0, np.int64))
    k = _match(rows, listing, listing.ids_given)
    row_ids = rows.column(Col.IMAGE_ID).to_numpy()
    found = np.nonzero(k >= 0)[0]
    kk = k[found]
    # per listed image, its rows: the one under the listed id first, else the first row
    first = found[np.lexsort((found, row_ids[found] != listing.ids[kk], kk))]
    head = np.ones(len(first), bool)
    head[1:] = k[first[1:]] != k[first[:-1]]
    keep, dupes = first[head], first[~head]
    at = k[keep]
    ids = listing.ids.copy()
    ids[at] = row_ids[keep]
    ok = pc.fill_null(pc.equal(rows.column(Col.STATUS), "ok"), False).to_numpy(zero_copy_only=False)
    sizes, mtimes = _int_column(rows, Col.FILE_SIZE), _int_column(rows, Col.FILE_MTIME)
    then_s, then_m = sizes[keep], mtimes[keep]
    now_s, now_m = listing.sizes[at], listing.mtimes[at]
    known_then = np.minimum(then_s, then_m) >= 0
    known_now = np.minimum(now_s, now_m) >= 0
    differ = np.where(known_then, (then_s != now_s) | (then_m != now_m), ~ok[keep])
    changed = known_now & differ  # replaced, or an error row of a file that was missing then
    retried = ~changed & ~ok[keep] if retry_errors else np.zeros(len(keep), bool)
    redo = changed | retried
    if len(dupes):
        log.warning(
            "removing %d duplicate rows left by earlier runs: one row per image", len(dupes)
        )
    if changed.any():
        log.warning(
            "%d images changed since they were labelled (size or modification time): "
            "their old rows are removed and they run again",
            int(changed.sum()),
        )
    if retried.any():
        log.info("%d earlier error rows run again (--retry-errors)", int(retried.sum()))
    gone = np.concatenate([dupes, keep[redo]])
    drop: dict[str, set[int]] = defaultdict(set)
    for part, iid in zip(
        rows.column(index.PART).take(gone).to_pylist(), row_ids[gone].tolist(), strict=True
    ):
        drop[part].add(int(iid))
    retire(out, drop)
    return Plan(
        dataclasses.replace(listing, ids=ids),
        index.unique_ids(row_ids[keep[~redo]]),
        int(changed.sum()),
        int(retried.sum()),
        len(dupes),
    )


def retire(out: Location, drop: dict[str, set[int]]) -> int:
    """Remove the rows (and instances) of ``drop[part] = image ids`` from those finished
    parts; return how many image rows were removed. Call it holding OUT's lock."""
    drop = {name: gone for name, gone in drop.items() if gone}
    if not drop:
        return 0
    index.forget(out, drop)  # before any of these parts changes (store/index.py)
    removed = 0
    cached = set(layout.cached_parts(out))
    for name, gone in sorted(drop.items()):
        # the proposal cache's part (--cache-proposals) first, as the writer does
        dirs = ([PROPOSALS_DIR] if name in cached else []) + [INSTANCES_DIR, IMAGES_DIR]
        tables = {d: read_table(out.child(d, name)) for d in dirs}
        gone_arr = pa.array(sorted(gone), pa.int64())
        kept = {
            d: t.filter(pc.invert(pc.is_in(t.column(Col.IMAGE_ID), gone_arr)))
            for d, t in tables.items()
        }
        removed += tables[IMAGES_DIR].num_rows - kept[IMAGES_DIR].num_rows
        delete_all([out.child(IMAGES_DIR, name)])  # the marker first (docstring)
        if kept[IMAGES_DIR].num_rows:
            key = part_key(kept[IMAGES_DIR].column(Col.IMAGE_ID).to_numpy())
            for d in dirs:
                layout.write_table(out.child(d, f"part-{key}.parquet"), kept[d])
        delete_all([out.child(d, name) for d in dirs[:-1]])
    return removed


def tidy(out: Location) -> int:
    """Repair what a killed run or compaction left: finish or undo the compaction in
    progress, remove temporary files and the parts of interrupted batches. Returns the
    number of interrupted batches removed. Call it holding OUT's lock."""
    compaction.recover(out)
    layout.remove_temporaries(out)
    return layout.remove_orphans(out)


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
    2. Repair what a kill left (``tidy``): a compaction in progress, temporary files, the
       parts of interrupted batches.
    3. List the targets (each file once, OUT's own files never) and decide what runs again.
    """
    recorded = check_fingerprint(out, start["fingerprint"], has_parts=layout.has_parts(out))
    if recorded != start["fingerprint"]:
        write_run_record(out, start)
    removed = tidy(out)
    if removed:
        log.warning("removed %d parts of interrupted batches; their images run again", removed)
    return plan_rerun(out, list_targets(), retry_errors=retry_errors)


def settle(out: Location, *, compact: bool = True) -> index.Snapshot:
    """Before the COCO files: one row per image id, every finished part whole, the index
    up to date (and small parts merged past the threshold, ``compact``).

    Ray workers of a driver that was killed can finish a part write after the driver is
    gone, and so after the next run has read what is done: that image then has a row of
    each run, or a completion marker whose instances part the next run's clean-up had
    deleted. Run when this run's own writes are over, holding OUT's lock; returns the
    settled index, for the COCO files and the run's totals (nothing writes images rows
    after it, so they need not read the index again).
    """
    tidy(out)
    snap = index.load(out)
    ids = snap.ids
    drop: dict[str, set[int]] = defaultdict(set)
    if len(index.unique_ids(ids)) < len(ids):
        first: dict[int, str] = {}
        for part, at in index.row_groups(snap.rows).items():  # the first part by name keeps it
            for iid in ids[at].tolist():
                if first.setdefault(iid, part) != part:
                    drop[part].add(iid)
    if drop:
        log.warning(
            "removing %d rows of images labelled twice (by an earlier run's workers that "
            "outlived their driver)",
            sum(len(v) for v in drop.values()),
        )
        retire(out, drop)
        snap = index.load(out)
    if compact and compaction.compact(out, snapshot=snap, full=False)["groups"]:
        snap = index.load(out)
    index.update_index(out, snap)
    return snap
