"""OUT's layout: part files, what is finished, interrupted batches, resume state.

OUT/
  instances/part-<key>.parquet   one row per instance (INSTANCES_SCHEMA)
  images/part-<key>.parquet      one row per input image (IMAGES_SCHEMA); written after the
                                 instances part of the same key: it is the completion marker
  proposals/part-<key>.parquet   with --cache-proposals: the proposal cache of the same
                                 images (refseg.pipeline.dataflow.proposal_cache), written first
  coco_results.json, coco_dataset.json, run.json   each written whole (store/atomic.py)
  lock.json                      who holds OUT while a run is in progress (store/lock.py)

A part's key is a hash of its image ids, so a retried task rewrites the same files. Local
files are written under a dot-name and renamed; object stores publish an object only when
its upload completes. An instances part without its images part is an interrupted batch:
it is ignored and removed on the next run, and its images are processed again. The parts
are written by the dataflow's writer tasks (refseg.pipeline.dataflow.writer).
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
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location, put_atomic

__all__ = [
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


def _list_parts(loc: Location) -> set[str]:
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except (FileNotFoundError, OSError):
        return set()
    return {
        i.base_name
        for i in infos
        if i.type == pafs.FileType.File
        and i.base_name.startswith("part-")
        and i.base_name.endswith(".parquet")
    }


def has_parts(out: Location) -> bool:
    """Whether OUT holds any part, finished or not."""
    return bool(_list_parts(out.child(IMAGES_DIR)) or _list_parts(out.child(INSTANCES_DIR)))


def finished_parts(out: Location) -> list[str]:
    """Names of the parts whose images file (the completion marker) exists."""
    return sorted(_list_parts(out.child(IMAGES_DIR)))


def cached_parts(out: Location) -> list[str]:
    """Names of the finished parts that have a proposal-cache part."""
    return sorted(_list_parts(out.child(PROPOSALS_DIR)) & set(finished_parts(out)))


def remove_orphans(out: Location) -> int:
    """Delete the parts of interrupted batches; return how many. Call it holding OUT's lock.

    An instances (or proposal-cache) part without its images part is a batch cut short: its
    images run again. An images part without its instances part cannot come from a writer
    (the instances part is written first) but from a deletion, e.g. a second run's clean-up
    in earlier versions: it is removed too, so that its images run again rather than the
    COCO assembly failing on the missing part.
    """
    instances, images = _list_parts(out.child(INSTANCES_DIR)), _list_parts(out.child(IMAGES_DIR))
    for name in sorted(images - instances):  # the completion marker first
        out.fs.delete_file(out.child(IMAGES_DIR, name).path)
    finished = images & instances
    batches = images - instances
    for kind, names in ((INSTANCES_DIR, instances), (PROPOSALS_DIR, None)):
        names = _list_parts(out.child(kind)) if names is None else names
        for name in sorted(names - finished):
            out.fs.delete_file(out.child(kind, name).path)
            batches.add(name)
    return len(batches)


def remove_temporaries(out: Location) -> int:
    """Delete the ``.<name>.tmp*`` files that killed writers left in a local OUT."""
    if not out.is_local:
        return 0
    removed = 0
    folders = (INSTANCES_DIR, IMAGES_DIR, PROPOSALS_DIR)
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


def _read_column(loc: Location, names: list[str], columns: list[str]) -> Iterator[pa.Table]:
    for name in names:
        with loc.fs.open_input_file(loc.child(name).path) as f:
            yield pq.read_table(f, columns=columns)


def done_image_ids(out: Location) -> np.ndarray:
    """Sorted int64 ids of every image that already has finished output."""
    parts = [
        t.column(Col.IMAGE_ID).to_numpy()
        for t in _read_column(out.child(IMAGES_DIR), finished_parts(out), [Col.IMAGE_ID])
    ]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def iter_tables(out: Location, kind: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Stream the finished parts of ``instances`` or ``images``, one part at a time."""
    yield from _read_column(out.child(kind), finished_parts(out), columns)  # type: ignore[arg-type]
