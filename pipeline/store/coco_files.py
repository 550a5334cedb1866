"""OUT's COCO outputs: shards always, whole-corpus files while OUT is small.

* ``coco/``: one COCO shard per part, written only for new or rewritten parts
  (store/coco_shards.py), so a rerun writes COCO bytes in proportion to its new images.
* ``coco_results.json`` (a results list) and ``coco_dataset.json`` (images, categories,
  annotations with scores), assembled by streaming over the parts, while OUT holds at most
  ``WHOLE_MAX_IMAGES`` ok images. Past that they are removed (they would be rewritten
  whole on every rerun and be too large for pycocotools): the shards and ``refseg export
  --format coco`` (any subset, streaming) take their place.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow.compute as pc
import pyarrow.fs as pafs
from refseg.core.coco import write_json_array
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import index
from refseg.pipeline.store.atomic import atomic_output
from refseg.pipeline.store.coco_shards import annotation_rows, image_rows, update_shards
from refseg.pipeline.store.layout import INSTANCES_DIR
from refseg.pipeline.store.pool import delete_all, read_tables

__all__ = ["WHOLE_FILES", "WHOLE_MAX_IMAGES", "write_coco"]

log = logging.getLogger(__name__)

#: OUT's whole-corpus COCO files are written while it holds at most this many ok images.
WHOLE_MAX_IMAGES = 10_000
WHOLE_FILES = ("coco_results.json", "coco_dataset.json")


def _annotation_rows(out: Location, parts: list[str]) -> Iterator[dict[str, Any]]:
    locs = [out.child(INSTANCES_DIR, p) for p in parts]
    for _, table in read_tables(locs):
        yield from annotation_rows(table)  # type: ignore[arg-type]


def write_coco(
    out: Location,
    categories: list[dict[str, Any]],
    *,
    snapshot: index.Snapshot | None = None,
    whole_max_images: int = WHOLE_MAX_IMAGES,
) -> dict[str, Any]:
    """Write OUT's COCO shards, and its whole-corpus COCO files while it is small.

    Each file replaces the previous one whole (``atomic_output``): a failure or a kill
    during the assembly leaves the previous file or none, never a partial one. Call it
    holding OUT's lock, after ``redo.settle``. Returns counts and seconds.
    """
    t0 = time.perf_counter()
    snap = snapshot if snapshot is not None else index.load(out)
    stats: dict[str, Any] = update_shards(out, categories, snap)
    rows = snap.rows
    n_ok = int(pc.sum(pc.equal(rows.column(Col.STATUS), "ok")).as_py() or 0)
    stats["whole"] = n_ok <= whole_max_images
    if stats["whole"]:
        parts = sorted(snap.listed)
        with atomic_output(out.child(WHOLE_FILES[0])) as f:
            stats["results"] = write_json_array(_utf8(f), _annotation_rows(out, parts))
            f.write(b"\n")
        ordered = rows.take(pc.sort_indices(rows, [(index.PART, "ascending")]))
        with atomic_output(out.child(WHOLE_FILES[1])) as f:
            write = _utf8(f)
            write('{"info": {"description": "refseg labels"}, "categories": ')
            write(json.dumps(categories))
            write(', "images": ')
            stats["images"] = write_json_array(write, image_rows(ordered))
            write(', "annotations": ')
            anns = _annotation_rows(out, parts)
            write_json_array(write, ({"id": k, "iscrowd": 0, **r} for k, r in enumerate(anns, 1)))
            write("}\n")
    else:
        stats["results"] = stats["annotations"]
        for name in WHOLE_FILES:
            if out.fs.get_file_info(out.child(name).path).type == pafs.FileType.File:
                delete_all([out.child(name)])
                log.warning(
                    "%s holds %d images, more than %d: %s is no longer written; the COCO "
                    "shards in %s (or `refseg export --format coco`) hold the labels",
                    out.uri,
                    n_ok,
                    whole_max_images,
                    name,
                    out.child("coco").uri,
                )
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _utf8(stream: Any) -> Callable[[str], Any]:
    """``write(text)`` for a binary output stream."""
    return lambda text: stream.write(text.encode("utf-8"))
