"""``refseg export``: a labelling run's instances as YOLO-seg, COCO or Label Studio files.

Reads the run folder ``OUT`` (local path or URI) written by ``refseg label`` part by part
(jobs/run_read.py): the images rows from OUT's index (only ``status == "ok"`` images are
exported) and the ``instances/part-*.parquet`` of the parts that hold them, a bounded number
at a time. Memory holds a few parts at a time, at any corpus size.

A subset is chosen at export: an instance is kept when its score is at least the threshold
of its class (``--class-thresholds``), else at least ``--score-threshold``, and its class is
one of ``--categories`` (default: all); ``--images FILE`` keeps the images it lists (image
ids or URIs, one per line), reading only the parts that hold them.

Formats (written under ``--dest``, a local folder, default ``OUT/export-<format>``):

* ``yolo-seg``: Ultralytics segmentation labels ``labels/<stem>.txt``, one line per
  instance ``class x1 y1 x2 y2 ...`` (the outer boundary of the mask's largest 8-connected
  component, pixel-corner coordinates divided by the image width/height); an empty file
  for an image without instances. ``data.yaml`` (class index = position in the sorted
  category ids) and ``images.txt`` (the images, in label order). ``--link-images`` links
  local images into ``images/`` so that Ultralytics' images -> labels path rule holds.
* ``coco``: ``annotations.json``, a COCO dataset (RLE masks, ``score`` kept), streamed in
  one pass over the parts (annotations spooled to a temporary file behind the images).
* ``label-studio``: ``tasks.json`` (tasks with ``polygonlabels`` predictions, points in
  percent of the image size, ``model_version`` "refseg") and ``label_config.xml``. Region
  ids are ``<image_id>_<k>``, k the instance's rank in its image in the run, and each
  task's data lists the ranks it shows (``refseg_instances``), so that ``refseg
  import-review`` can read the reviewed export back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import posixpath
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np
import pyarrow.fs as pafs
import yaml
from refseg.core import rle as rle_ops
from refseg.core.coco import write_json_array
from refseg.core.polygon import mask_polygon
from refseg.jobs.export_select import (
    Thresholds,
    parse_categories,
    parse_class_thresholds,
    read_image_list,
)
from refseg.jobs.run_read import iter_images, run_categories
from refseg.pipeline.storage import resolve
from refseg.pipeline.store.atomic import atomic_text
from refseg.pipeline.store.layout import IMAGES_DIR

__all__ = [
    "FORMATS",
    "ExportSummary",
    "Thresholds",
    "add_export_args",
    "export_run",
    "iter_images",
    "parse_class_thresholds",
    "run_categories",
    "run_export",
]


FORMATS = ("yolo-seg", "coco", "label-studio")
MODEL_VERSION = "refseg"


@dataclass
class ExportSummary:
    format: str
    dest: str
    images: int = 0
    kept: int = 0
    dropped: int = 0

    def line(self) -> str:
        return (
            f"refseg export: {self.format}, {self.images} images, {self.kept} instances kept, "
            f"{self.dropped} below threshold; written to {self.dest}"
        )


def _kept(rows: list[dict[str, Any]], th: Thresholds, s: ExportSummary) -> list[dict[str, Any]]:
    kept = [r for r in rows if th.keep(r["category_id"], r["score"])]
    s.kept += len(kept)
    s.dropped += len(rows) - len(kept)
    return kept


def _polygon(row: dict[str, Any]) -> np.ndarray:
    seg = row.get("segmentation")
    if seg is None:  # a box-only result: its box is the polygon
        x, y, w, h = row["bbox"]
        return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], dtype=np.float64)
    return mask_polygon(rle_ops.decode_rle(seg))


# --------------------------------------------------------------------------- writers


Items = Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]


def _write_yolo(items: Items, dest: Path, th: Thresholds, cats: dict[int, str], link: bool):
    s = ExportSummary("yolo-seg", str(dest))
    index = {cid: k for k, cid in enumerate(sorted(cats))}
    (dest / "labels").mkdir(parents=True, exist_ok=True)
    listed, used = [], set()
    for img, rows in items:
        w, h = float(img["width"]), float(img["height"])
        lines = []
        for r in _kept(rows, th, s):
            poly = _polygon(r)
            if len(poly) < 3:
                continue
            xy = np.clip(poly / [w, h], 0.0, 1.0).reshape(-1)
            lines.append(" ".join([str(index[int(r["category_id"])])] + [f"{v:.6f}" for v in xy]))
        stem = posixpath.splitext(posixpath.basename(str(img["image_uri"])))[0] or "image"
        stem = f"{stem}_{img['image_id']}" if stem in used else stem  # same name, other folder
        used.add(stem)
        (dest / "labels" / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines))
        uri = str(img["image_uri"])
        if link and "://" not in uri:
            target = dest / "images" / f"{stem}{os.path.splitext(uri)[1]}"
            target.parent.mkdir(exist_ok=True)
            target.unlink(missing_ok=True)
            target.symlink_to(os.path.abspath(uri))
            uri = str(target)
        listed.append(uri)
        s.images += 1
    (dest / "images.txt").write_text("".join(f"{u}\n" for u in listed))
    data = {
        "path": str(dest.resolve()),
        "train": "images.txt",
        "val": "images.txt",
        "nc": len(index),
        "names": {k: cats[cid] for cid, k in index.items()},
        "category_ids": {k: cid for cid, k in index.items()},
        "thresholds": {"default": th.default, "per_class": th.per_class},
    }
    (dest / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return s


def _write_coco(items: Items, dest: Path, th: Thresholds, cats: dict[int, str]):
    """One pass: images written as they come, annotations spooled to a temporary file and
    appended behind them (memory: one part's rows)."""
    s = ExportSummary("coco", str(dest))
    info = {"description": "refseg export", "thresholds": {"default": th.default}}
    info["thresholds"]["per_class"] = {str(c): t for c, t in th.per_class.items()}
    keep = cats if th.only is None else {c: n for c, n in cats.items() if c in th.only}
    categories = [{"id": c, "name": n} for c, n in keep.items()]

    def images(spool: Any) -> Iterator[dict[str, Any]]:
        k = 0
        for img, rows in items:
            s.images += 1
            for r in _kept(rows, th, s):
                k += 1
                ann = {
                    "id": k,
                    "image_id": int(r["image_id"]),
                    "category_id": int(r["category_id"]),
                    "bbox": [float(v) for v in r["bbox"]],
                    "area": float(r["area"]),
                    "iscrowd": 0,
                    "score": float(r["score"]),
                }
                if r["segmentation"] is not None:
                    seg = r["segmentation"]
                    ann["segmentation"] = {"size": list(seg["size"]), "counts": seg["counts"]}
                spool.write(("," if k > 1 else "") + "\n" + json.dumps(ann, allow_nan=False))
            yield {
                "id": int(img["image_id"]),
                "file_name": img["image_uri"],
                "width": int(img["width"]),
                "height": int(img["height"]),
            }

    with (
        atomic_text(resolve(str(dest / "annotations.json"))) as f,
        tempfile.TemporaryFile("w+", encoding="utf-8") as spool,
    ):
        f.write(f'{{"info": {json.dumps(info)}, "categories": {json.dumps(categories)}, ')
        f.write('"images": ')
        write_json_array(f.write, images(spool))
        f.write(', "annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, f)
        f.write("\n]}\n" if s.kept else "]}\n")
    return s


def _write_label_studio(items: Items, dest: Path, th: Thresholds, cats: dict[int, str]):
    s = ExportSummary("label-studio", str(dest))

    def tasks() -> Iterator[dict[str, Any]]:
        for img, rows in items:
            s.images += 1
            w, h = int(img["width"]), int(img["height"])
            results, shown = [], []
            kept = {id(r) for r in _kept(rows, th, s)}
            for k, r in enumerate(rows):  # k: the instance's rank in its image in the run
                poly = _polygon(r) if id(r) in kept else ()
                if len(poly) < 3:
                    continue
                shown.append(k)
                pts = np.clip(poly / [w, h] * 100.0, 0.0, 100.0).round(4).tolist()
                value = {"points": pts, "closed": True, "polygonlabels": [cats[r["category_id"]]]}
                item = {"id": f"{img['image_id']}_{k}", "type": "polygonlabels", "value": value}
                item.update(from_name="label", to_name="image", image_rotation=0)
                item.update(original_width=w, original_height=h, score=float(r["score"]))
                results.append(item)
            score = float(np.mean([r["score"] for r in results])) if results else 0.0
            pred = {"model_version": MODEL_VERSION, "score": score, "result": results}
            data = {"image": img["image_uri"], "refseg_image_id": int(img["image_id"])}
            data["refseg_instances"] = shown  # what the task shows (`refseg import-review`)
            yield {"data": data, "predictions": [pred]}

    with atomic_text(resolve(str(dest / "tasks.json"))) as f:
        write_json_array(f.write, tasks())
        f.write("\n")
    labels = "\n".join(f"    <Label value={quoteattr(n)}/>" for n in cats.values())
    (dest / "label_config.xml").write_text(
        '<View>\n  <Image name="image" value="$image"/>\n'
        f'  <PolygonLabels name="label" toName="image">\n{labels}\n  </PolygonLabels>\n</View>\n'
    )
    return s


def export_run(
    out: str,
    fmt: str,
    *,
    dest: str | None = None,
    score_threshold: float = 0.0,
    class_thresholds: str | Mapping[str, float] | None = None,
    link_images: bool = False,
    s3_endpoint: str | None = None,
    categories: str | None = None,
    images: str | Collection[int] | None = None,
) -> ExportSummary:
    """Export the run folder ``out`` in format ``fmt`` (one of ``FORMATS``) into ``dest``.

    ``categories``: class names or ids to keep (``"person,3"``); ``images``: a file of image
    ids or URIs, or the ids, to keep (module docstring).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not math.isfinite(score_threshold):
        raise ValueError(f"--score-threshold must be finite, got {score_threshold}")
    loc = resolve(out, s3_endpoint=s3_endpoint)
    if loc.fs.get_file_info(loc.child(IMAGES_DIR).path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{out} has no images/ parts: is it the --out of `refseg label`?")
    if dest is None:
        if loc.scheme:
            raise ValueError(f"{out} is remote: pass --dest, a local folder")
        dest = os.path.join(loc.path, f"export-{fmt}")
    raw = (
        class_thresholds
        if isinstance(class_thresholds, Mapping)
        else parse_class_thresholds(class_thresholds)
    )
    cats = run_categories(loc)
    th = Thresholds.resolve(score_threshold, {str(k): v for k, v in raw.items()}, cats)
    th = dataclasses.replace(th, only=parse_categories(categories, cats))
    ids, uris = read_image_list(images) if isinstance(images, str) else (images, None)
    items = iter_images(loc, image_ids=ids, image_uris=uris)
    path = Path(dest)
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "yolo-seg":
        return _write_yolo(items, path, th, cats, link_images)
    if fmt == "coco":
        return _write_coco(items, path, th, cats)
    return _write_label_studio(items, path, th, cats)


def add_export_args(parser: argparse.ArgumentParser) -> None:
    """Add ``refseg export``'s arguments to ``parser``."""
    parser.add_argument("run_dir", metavar="OUT", help="run folder written by `refseg label`")
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format")
    parser.add_argument(
        "--dest", metavar="DIR", default=None,
        help="local folder to write (default OUT/export-<format>)",
    )  # fmt: skip
    parser.add_argument(
        "--score-threshold", metavar="T", type=float, default=0.0,
        help="keep instances scoring at least T (default 0: all)",
    )  # fmt: skip
    parser.add_argument(
        "--class-thresholds", metavar="SPEC", default=None,
        help='per-class thresholds overriding --score-threshold: "person=0.5,dog=0.3" or a '
        "YAML/JSON file mapping class name or id to a threshold",
    )  # fmt: skip
    parser.add_argument(
        "--categories", metavar="NAMES", default=None,
        help='keep only these classes: names or ids, comma-separated ("person,dog")',
    )  # fmt: skip
    parser.add_argument(
        "--images", metavar="FILE", default=None,
        help="keep only the images FILE lists: image ids or URIs, one per line",
    )  # fmt: skip
    parser.add_argument(
        "--link-images", action="store_true",
        help="yolo-seg: symlink local images into DEST/images/ beside DEST/labels/",
    )  # fmt: skip
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")


def run_export(args: argparse.Namespace) -> int:
    """Run ``refseg export`` from parsed arguments; print a summary line; return 0."""
    summary = export_run(
        args.run_dir,
        args.format,
        dest=args.dest,
        score_threshold=args.score_threshold,
        class_thresholds=args.class_thresholds,
        link_images=args.link_images,
        s3_endpoint=getattr(args, "s3_endpoint", None),
        categories=getattr(args, "categories", None),
        images=getattr(args, "images", None),
    )
    print(summary.line())
    return 0
