"""OUT's layout: part files, what is finished, interrupted batches, resume state.

OUT/
  instances/part-<key>.parquet   one row per instance (INSTANCES_SCHEMA)
  images/part-<key>.parquet      one row per input image (IMAGES_SCHEMA); written after the
                                 instances part of the same key: it is the completion marker
  proposals/part-<key>.parquet   with --cache-proposals: the proposal cache of the same
                                 images (refseg.pipeline.dataflow.proposal_cache), written first
  index/                         a compact index of the images rows (store/index.py) and
                                 the journal of a compaction in progress (store/journal.py)
  coco/                          COCO shards, one per part, and their index (store/coco_shards.py)
  coco_results.json, coco_dataset.json, run.json   each written whole (store/atomic.py);
                                 the two COCO files while OUT is small (store/coco_files.py)
  lock.json                      who holds OUT while a run is in progress (store/lock.py)

A part's key is a hash of its image ids, so a retried task rewrites the same files. Local
files are written under a dot-name and renamed; object stores publish an object only when
its upload completes. An instances part without its images part is an interrupted batch:
it is ignored and removed on the next run, and its images are processed again. The parts
are written by the dataflow's writer tasks (refseg.pipeline.dataflow.writer); compaction
(store/compaction.py) merges small parts into large ones of the same schema.

A part's *stamp* is its (size in bytes, modification time in ns) as a listing reports them
(local: stat; S3: the LIST response, so no request per file): the index and the COCO shards
record the stamp of each part they were built from and rebuild what no longer matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from refseg.pipeline.storage import Location, put_atomic

__all__ = [
    "Stamp",
    "list_stamps",
    "finished_stamps",
    "IMAGES_DIR",
    "INSTANCES_DIR",
    "PROPOSALS_DIR",
    "part_key",
    "write_table",
    "finished_parts",
    "has_parts",
    "cached_parts",
    "done_image_ids",
    "iter_tables",
    "live_parts",
    "remove_orphans",
    "remove_temporaries",
]

INSTANCES_DIR, IMAGES_DIR = "instances", "images"
PROPOSALS_DIR = "proposals"  # with --cache-proposals (refseg.pipeline.dataflow.proposal_cache)


def part_key(image_ids: np.ndarray) -> str:
    ids = np.sort(np.asarray(image_ids, dtype=np.int64))
    return hashlib.sha256(ids.tobytes()).hexdigest()[:20]


def write_table(loc: Location, table: pa.Table) -> None:
    """Write parquet so that a reader never sees a partial file."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    put_atomic(loc, buf.getvalue())


#: (size in bytes, modification time in ns since the epoch; -1 where the store gives none)
Stamp = tuple[int, int]


def list_stamps(loc: Location) -> dict[str, Stamp]:
    """``part-*.parquet`` files of the folder ``loc`` and their stamps: one listing
    (on S3, one LIST request per 1,000 files), no request per file."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return {}
    return {
        i.base_name: (int(i.size), int(i.mtime_ns) if i.mtime_ns is not None else -1)
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.startswith("part-")
        and i.base_name.endswith(".parquet")
    }


def finished_stamps(out: Location) -> dict[str, Stamp]:
    """The finished parts (their images file exists) and the stamps of their images files."""
    return list_stamps(out.child(IMAGES_DIR))


def _list_parts(loc: Location) -> set[str]:
    return set(list_stamps(loc))


def has_parts(out: Location) -> bool:
    """Whether OUT holds any part, finished or not."""
    return bool(_list_parts(out.child(IMAGES_DIR)) or _list_parts(out.child(INSTANCES_DIR)))


def finished_parts(out: Location) -> list[str]:
    """Names of the parts whose images file (the completion marker) exists."""
    return sorted(_list_parts(out.child(IMAGES_DIR)))


def cached_parts(out: Location) -> list[str]:
    """Names of the finished parts that have a proposal-cache part (those of a compaction
    in progress whose rows are already in its target left out, as ``live_parts``)."""
    return sorted(_list_parts(out.child(PROPOSALS_DIR)) & set(live_parts(out)))


def remove_orphans(out: Location) -> int:
    """Delete the parts of interrupted batches; return how many. Call it holding OUT's lock.

    An instances (or proposal-cache) part without its images part is a batch cut short: its
    images run again. An images part without its instances part cannot come from a writer
    (the instances part is written first) but from a deletion, e.g. a second run's clean-up
    in earlier versions: it is removed too, so that its images run again rather than the
    COCO assembly failing on the missing part.
    """
    from refseg.pipeline.store import index  # the index imports this module
    from refseg.pipeline.store.pool import delete_all

    instances, images = _list_parts(out.child(INSTANCES_DIR)), _list_parts(out.child(IMAGES_DIR))
    if images - instances:
        index.forget(out, images - instances)  # before the parts go (store/index.py)
    delete_all([out.child(IMAGES_DIR, n) for n in sorted(images - instances)])  # markers first
    finished = images & instances
    batches = images - instances
    for kind, names in ((INSTANCES_DIR, instances), (PROPOSALS_DIR, None)):
        names = _list_parts(out.child(kind)) if names is None else names
        delete_all([out.child(kind, n) for n in sorted(names - finished)])
        batches |= names - finished
    return len(batches)


def remove_temporaries(out: Location) -> int:
    """Delete the ``.<name>.tmp*`` files that killed writers left in a local OUT."""
    if not out.is_local:
        return 0
    removed = 0
    folders = (INSTANCES_DIR, IMAGES_DIR, PROPOSALS_DIR, "index", "coco")
    for folder in (out.path, *(out.child(f).path for f in folders)):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if name.startswith(".") and ".tmp" in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
    return removed


def done_image_ids(out: Location) -> np.ndarray:
    """Sorted int64 ids of every image that already has finished output (from OUT's index,
    store/index.py: a few objects plus the parts written since it was updated)."""
    from refseg.pipeline.store import index

    return index.unique_ids(index.load(out).ids)


def iter_tables(out: Location, kind: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream the rows of the finished parts of ``instances`` or ``images``.

    ``images`` rows come from OUT's index (store/index.py), in tables of up to 64k rows;
    ``instances`` parts are read a bounded number at a time (store/pool.py), in order.
    """
    from refseg.pipeline.store import index, pool

    if kind == IMAGES_DIR:
        rows = index.load(out).rows
        rows = rows.select(columns) if columns else rows.drop_columns([index.PART])
        yield from (pa.Table.from_batches([b]) for b in rows.to_batches(64 * 1024))
        return
    names = live_parts(out)
    for _, table in pool.read_tables([out.child(kind, n) for n in names], columns):
        yield table  # type: ignore[misc]


def live_parts(out: Location) -> list[str]:
    """The finished parts a reader should read: those of a compaction in progress whose rows
    are already in its target left out (store/journal.py)."""
    from refseg.pipeline.store import journal

    finished = finished_parts(out)
    hidden = journal.hidden(journal.read_journal(out), finished)
    return [p for p in finished if p not in hidden]
