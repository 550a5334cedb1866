"""OUT's COCO files, assembled by streaming over the finished parts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from refseg.core.coco import write_json_array
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store.atomic import atomic_output
from refseg.pipeline.store.layout import IMAGES_DIR, INSTANCES_DIR, iter_tables

__all__ = ["write_coco"]


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
