"""Reading a labelling run for export and import-review: the index picks, a pool reads.

The images rows come from OUT's index (refseg.pipeline.store.index: a few objects plus the
parts written since it was updated), so a subset of images costs the parts that hold them,
not the whole run; instances parts are read a bounded number at a time
(refseg.pipeline.store.pool), in part order, one part's rows in memory per step. Parts of
a compaction in progress whose rows are already in its target are left out.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import index
from refseg.pipeline.store.layout import INSTANCES_DIR
from refseg.pipeline.store.pool import READ_THREADS, read_tables
from refseg.pipeline.store.record import read_run_record

__all__ = ["iter_images", "run_categories"]

IMAGE_COLUMNS = ["image_id", "image_uri", "width", "height", "status"]
INSTANCE_COLUMNS = ["image_id", "category_id", "score", "bbox", "segmentation", "area"]


def run_categories(out: Location) -> dict[int, str]:
    """Category id -> name: the run's references (run.json); without them (a run that
    never finished), every category found in its instances."""
    cats: dict[int, str] = {}
    for ref in (read_run_record(out) or {}).get("references") or []:
        if "category_id" in ref:
            cats[int(ref["category_id"])] = str(ref.get("category_name", ref["category_id"]))
    if cats:
        return dict(sorted(cats.items()))
    parts = sorted(index.load(out).listed)
    locs = [out.child(INSTANCES_DIR, p) for p in parts]
    for _, table in read_tables(locs, ["category_id", "category_name"], missing_ok=True):
        if table is None:
            continue
        ids, names = (table.column(c).to_pylist() for c in ("category_id", "category_name"))
        for cid, cname in zip(ids, names, strict=True):
            cats.setdefault(int(cid), str(cname) if cname is not None else str(cid))
    return dict(sorted(cats.items()))


def _by_part(rows: pa.Table) -> list[tuple[str, pa.Table]]:
    """The rows of each part, parts by name, rows in their order within the part."""
    rows = rows.combine_chunks()  # a take per part must not concatenate the chunks each time
    return [(p, rows.take(pa.array(at))) for p, at in index.row_groups(rows).items()]


def iter_images(
    out: Location,
    *,
    image_ids: Collection[int] | None = None,
    image_uris: Collection[str] | None = None,
    threads: int = READ_THREADS,
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(image row, its instance rows in run order) of every ok image, part by part; with
    ``image_ids`` and/or ``image_uris``, of the images they name only."""
    rows = index.load(out).rows
    rows = rows.filter(pc.fill_null(pc.equal(rows.column(Col.STATUS), "ok"), False))
    if image_ids is not None or image_uris is not None:
        wanted = pa.array(sorted({int(i) for i in image_ids or ()}), pa.int64())
        keep = pc.is_in(rows.column(Col.IMAGE_ID), wanted)
        if image_uris:
            named = pa.array(sorted(set(image_uris)), pa.string())
            keep = pc.or_(keep, pc.is_in(rows.column(Col.IMAGE_URI), named))
        rows = rows.filter(keep)
    parts = _by_part(rows.select([*IMAGE_COLUMNS, index.PART]))
    locs = [out.child(INSTANCES_DIR, name) for name, _ in parts]
    for k, inst in read_tables(locs, INSTANCE_COLUMNS, threads=threads, missing_ok=True):
        by_image: dict[int, list[dict[str, Any]]] = {}
        for row in inst.to_pylist() if inst is not None else []:
            by_image.setdefault(int(row["image_id"]), []).append(row)
        for img in parts[k][1].select(IMAGE_COLUMNS).to_pylist():
            yield img, by_image.get(int(img["image_id"]), [])
