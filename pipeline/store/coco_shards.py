"""COCO shards: OUT's labels as COCO files of a bounded number of images, one per part.

OUT/coco/
  index.json                      the shards: for each part, its file, the part's stamp
                                  (store/layout.py), and its image and annotation counts;
                                  plus the categories; written whole, after the shards
  shard-<part key>-<stamp>.json   a COCO dataset of the ok images of one part: ``info``,
                                  ``categories``, ``images``, ``annotations`` (RLE masks,
                                  ``score`` kept, ids 1..n within the shard)

A part holds at most ``compaction.COMPACT_ROWS`` images once merged (writers' parts are
smaller), so every shard loads in pycocotools in ordinary memory: ``COCO(path)`` for the
dataset, or ``gt.loadRes(COCO(path).dataset["annotations"])`` as results. A rerun writes the
shards of new or rewritten parts only (a part whose stamp no longer matches), then the index,
then deletes shards of parts that are gone: a reader who goes through ``index.json`` always
finds whole files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from refseg.core.coco import write_json_array
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import index
from refseg.pipeline.store.atomic import atomic_output, write_bytes
from refseg.pipeline.store.layout import INSTANCES_DIR, Stamp
from refseg.pipeline.store.pool import delete_all, map_bounded, read_bytes, read_table

__all__ = ["COCO_DIR", "annotation_rows", "image_rows", "read_shard_index", "update_shards"]

log = logging.getLogger(__name__)

COCO_DIR = "coco"
SHARD_INDEX = "index.json"
_FORMAT = "refseg-coco-shards"
_ANN_COLUMNS = ["image_id", "category_id", "bbox", "score", "segmentation", "area"]
#: Shards built at once (JSON encoding holds the GIL: more threads only overlap the I/O,
#: and each holds a part's annotations as Python objects).
SHARD_THREADS = 4


def read_shard_index(out: Location) -> dict[str, Any]:
    """coco/index.json as a dict (``{}`` when there is none or it cannot be read)."""
    try:
        body = json.loads(read_bytes(out.child(COCO_DIR, SHARD_INDEX)))
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        log.warning("%s cannot be read (%s): every shard is written again", out.uri, exc)
        return {}
    return body if isinstance(body, dict) and body.get("format") == _FORMAT else {}


def annotation_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    """COCO result dicts of an instances table (without ``id``), columns read once each."""
    cols = {c: table.column(c).to_pylist() for c in _ANN_COLUMNS}
    for iid, cid, bbox, score, seg, area in zip(*(cols[c] for c in _ANN_COLUMNS), strict=True):
        yield {
            "image_id": int(iid),
            "category_id": int(cid),
            "bbox": [float(v) for v in bbox],
            "score": float(score),
            "segmentation": {"size": list(seg["size"]), "counts": seg["counts"]}
            if seg is not None
            else None,
            "area": float(area),
        }


def image_rows(rows: pa.Table) -> Iterator[dict[str, Any]]:
    """COCO image dicts of the ok rows of an images table."""
    ok = rows.filter(pc.equal(rows.column(Col.STATUS), "ok"))
    cols = [ok.column(c).to_pylist() for c in (Col.IMAGE_ID, Col.IMAGE_URI, Col.WIDTH, Col.HEIGHT)]
    for iid, uri, w, h in zip(*cols, strict=True):
        yield {"id": int(iid), "file_name": uri, "width": int(w), "height": int(h)}


def _shard_name(part: str, stamp: Stamp) -> str:
    key = part.removeprefix("part-").removesuffix(".parquet")
    tag = hashlib.sha256(f"{stamp[0]}:{stamp[1]}".encode()).hexdigest()[:8]
    return f"shard-{key}-{tag}.json"


def _write_shard(
    out: Location, part: str, stamp: Stamp, images: pa.Table, categories: list[dict[str, Any]]
) -> dict[str, Any]:
    name = _shard_name(part, stamp)
    inst = read_table(out.child(INSTANCES_DIR, part), _ANN_COLUMNS)
    info = {"description": "refseg labels", "part": part}
    with atomic_output(out.child(COCO_DIR, name)) as f:

        def write(text: str) -> None:
            f.write(text.encode("utf-8"))

        write(f'{{"info": {json.dumps(info)}, "categories": {json.dumps(categories)}, ')
        write('"images": ')
        n_images = write_json_array(write, image_rows(images))
        write(', "annotations": ')
        anns = ({"id": k, "iscrowd": 0, **a} for k, a in enumerate(annotation_rows(inst), 1))
        n_ann = write_json_array(write, anns)
        write("}\n")
    return {"file": name, "stamp": list(stamp), "images": n_images, "annotations": n_ann}


def update_shards(
    out: Location,
    categories: list[dict[str, Any]],
    snapshot: index.Snapshot,
    *,
    threads: int = SHARD_THREADS,
) -> dict[str, Any]:
    """Write the shards of parts without a current one, then coco/index.json, then delete
    shards no longer named; call it holding OUT's lock. Returns counts."""
    old = read_shard_index(out)
    same = old.get("categories") == categories
    shards = {
        p: e
        for p, e in (old.get("shards") or {}).items()
        if same and p in snapshot.listed and tuple(e["stamp"]) == snapshot.listed[p]
    }
    todo = sorted(p for p in snapshot.listed if p not in shards)
    if todo:
        rows = snapshot.rows.combine_chunks()  # a take per part must not concatenate chunks
        at = index.row_groups(rows)  # positions only: a part's rows taken when written

        def one(p: str) -> tuple[str, dict[str, Any]]:
            images = rows.take(pa.array(at[p]))
            return p, _write_shard(out, p, snapshot.listed[p], images, categories)

        shards.update(map_bounded(one, todo, threads=threads))
    body = {"format": _FORMAT, "version": 1, "categories": categories, "shards": shards}
    if todo or body != old:
        write_bytes(out.child(COCO_DIR, SHARD_INDEX), json.dumps(body, sort_keys=True).encode())
    _collect(out, {e["file"] for e in shards.values()})
    return {
        "shards": len(shards),
        "shards_written": len(todo),
        "images": sum(e["images"] for e in shards.values()),
        "annotations": sum(e["annotations"] for e in shards.values()),
    }


def _collect(out: Location, keep: set[str]) -> None:
    loc = out.child(COCO_DIR)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    except OSError:
        return
    gone = [i.base_name for i in infos if i.base_name.startswith("shard-")]
    delete_all([loc.child(name) for name in gone if name not in keep])
