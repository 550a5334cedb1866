"""Output layout of a labelling run, its atomic part writer, resume state and COCO files.

OUT/
  instances/part-<key>.parquet   one row per instance (INSTANCES_SCHEMA)
  images/part-<key>.parquet      one row per input image (IMAGES_SCHEMA); written after the
                                 instances part of the same key: it is the completion marker
  proposals/part-<key>.parquet   with --cache-proposals: the proposal cache of the same
                                 images (pipeline.proposal_cache), written first
  coco_results.json, coco_dataset.json, run.json   each written whole (pipeline/atomic.py)
  lock.json                      who holds OUT while a run is in progress (pipeline/lock.py)

A part's key is a hash of its image ids, so a retried task rewrites the same files. Local
files are written under a dot-name and renamed; object stores publish an object only when
its upload completes. An instances part without its images part is an interrupted batch:
it is ignored and removed on the next run, and its images are processed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.atomic import atomic_output
from pipeline.proposal_cache import PROPOSALS_DIR, cache_table
from pipeline.schema import IMAGES_SCHEMA, INSTANCES_SCHEMA, Col, image_columns
from pipeline.storage import Location, put_atomic
from refseg_core.coco import write_json_array

__all__ = [
    "instances_blob",
    "write_parts",
    "finished_parts",
    "has_parts",
    "cached_parts",
    "done_image_ids",
    "remove_orphans",
    "remove_temporaries",
    "write_coco",
]

INSTANCES_DIR, IMAGES_DIR = "instances", "images"


def part_key(image_ids: np.ndarray) -> str:
    ids = np.sort(np.asarray(image_ids, dtype=np.int64))
    return hashlib.sha256(ids.tobytes()).hexdigest()[:20]


def _write_table(loc: Location, table: pa.Table) -> None:
    """Write parquet so that a reader never sees a partial file."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    put_atomic(loc, buf.getvalue())


def _images_table(batch: dict[str, np.ndarray]) -> pa.Table:
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
        _write_table(out.child(PROPOSALS_DIR, f"part-{key}.parquet"), cache_table(batch))
    tables = [pa.ipc.open_stream(b).read_all() for b in batch[Col.INSTANCES] if len(b)]
    inst = pa.concat_tables(tables) if tables else INSTANCES_SCHEMA.empty_table()
    images = _images_table(batch)
    _write_table(out.child(INSTANCES_DIR, f"part-{key}.parquet"), inst.cast(INSTANCES_SCHEMA))
    _write_table(out.child(IMAGES_DIR, f"part-{key}.parquet"), images)
    return {
        Col.IMAGE_ID: images.column(Col.IMAGE_ID).to_numpy(),
        Col.STATUS: np.asarray(images.column(Col.STATUS).to_pylist(), dtype=object),
        Col.N_INSTANCES: images.column(Col.N_INSTANCES).to_numpy(),
        Col.SECONDS: images.column(Col.SECONDS).to_numpy(),
    }


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


def _annotation_rows(out: Location) -> Iterator[dict[str, Any]]:
    for table in iter_tables(out, INSTANCES_DIR):
        for r in table.to_pylist():
            yield {
                "image_id": int(r[Col.IMAGE_ID]),
                "category_id": int(r["category_id"]),
                "bbox": [float(v) for v in r["bbox"]],
                "score": float(r["score"]),
                "segmentation": {
                    "size": list(r["segmentation"]["size"]),
                    "counts": r["segmentation"]["counts"],
                },
                "area": float(r["area"]),
            }


def write_coco(out: Location, categories: list[dict[str, Any]]) -> dict[str, int]:
    """Assemble coco_results.json and coco_dataset.json by streaming over the parts.

    Each file replaces the previous one whole (``atomic_output``): a failure or a kill
    during the assembly leaves the previous file or none, never a partial one.
    """
    t0 = time.perf_counter()
    with atomic_output(out.child("coco_results.json")) as f:
        n_results = write_json_array(_utf8(f), _annotation_rows(out))
        f.write(b"\n")

    def images() -> Iterator[dict[str, Any]]:
        for table in iter_tables(out, IMAGES_DIR):
            for r in table.to_pylist():
                if r[Col.STATUS] == "ok":
                    yield {
                        "id": int(r[Col.IMAGE_ID]),
                        "file_name": r[Col.IMAGE_URI],
                        "width": int(r[Col.WIDTH]),
                        "height": int(r[Col.HEIGHT]),
                    }

    with atomic_output(out.child("coco_dataset.json")) as f:
        write = _utf8(f)
        write('{"info": {"description": "refseg labels"}, "categories": ')
        write(json.dumps(categories))
        write(', "images": ')
        n_images = write_json_array(write, images())
        write(', "annotations": ')
        rows = _annotation_rows(out)
        write_json_array(write, ({"id": k, "iscrowd": 0, **r} for k, r in enumerate(rows, 1)))
        write("}\n")
    return {"results": n_results, "images": n_images, "seconds": time.perf_counter() - t0}


def _utf8(stream: Any) -> Callable[[str], Any]:
    """``write(text)`` for a binary output stream."""
    return lambda text: stream.write(text.encode("utf-8"))
