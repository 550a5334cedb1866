"""COCO I/O and evaluation: load annotation files, read reference shots, stream results
JSON, run pycocotools' COCOeval restricted to a class split.

Category ids are the dataset's own ids everywhere (never positions in a list). Boxes are
COCO ``xywh`` in pixels. Paths may be local paths or fsspec URIs (``s3://...``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
import numpy as np
from refseg.core import rle as rle_ops

__all__ = [
    "STAT_NAMES",
    "ReferenceShot",
    "categories_by_id",
    "category_names",
    "evaluate",
    "format_eval",
    "images_by_id",
    "load_coco",
    "load_references",
    "load_results",
    "write_json_array",
    "write_results",
]

# The 12 numbers of COCOeval.stats, in its order.
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def _is_local(uri: str | os.PathLike[str]) -> bool:
    protocol, _ = fsspec.core.split_protocol(str(uri))
    return protocol in (None, "file", "local")


def _read_json(uri: str | os.PathLike[str]) -> Any:
    with fsspec.open(str(uri), "r", encoding="utf-8") as f:
        return json.load(f)


def load_coco(uri_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a COCO annotation JSON (local path or fsspec URI) as a dict.

    The dict must have ``images`` and ``categories`` lists; ``annotations`` defaults to [].
    """
    data = _read_json(uri_or_path)
    if not isinstance(data, dict) or "images" not in data or "categories" not in data:
        raise ValueError(f"{uri_or_path} is not a COCO annotation file (needs images, categories)")
    data.setdefault("annotations", [])
    return data


def categories_by_id(ann: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Category id -> category dict; duplicate ids raise ``ValueError``."""
    out: dict[int, dict[str, Any]] = {}
    for cat in ann.get("categories", []):
        cid = int(cat["id"])
        if cid in out:
            raise ValueError(f"category id {cid} appears twice in 'categories'")
        out[cid] = cat
    return out


def category_names(ann: Mapping[str, Any]) -> dict[int, str]:
    """Category id -> name."""
    return {cid: str(c["name"]) for cid, c in categories_by_id(ann).items()}


def images_by_id(ann: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Image id -> image dict; duplicate ids raise ``ValueError``."""
    out: dict[int, dict[str, Any]] = {}
    for img in ann.get("images", []):
        iid = int(img["id"])
        if iid in out:
            raise ValueError(f"image id {iid} appears twice in 'images'")
        out[iid] = img
    return out


@dataclass(frozen=True)
class ReferenceShot:
    """One reference instance.

    ``bbox`` is COCO xywh pixels. ``segmentation`` is the annotation's own (polygons, RLE or
    uncompressed RLE), or None for a box-only reference (needs ``masks-from-boxes``).
    ``mask_generated`` is True when the mask was made by SAM2 from the box.
    """

    image_id: int
    file_name: str
    annotation_id: int
    category_id: int
    bbox: tuple[float, float, float, float]
    segmentation: dict[str, Any] | list[Any] | None
    height: int
    width: int
    mask_generated: bool = False


def _check_category_ids(ann: Mapping[str, Any], category_ids: Iterable[int]) -> list[int]:
    known = categories_by_id(ann)
    ids = sorted({int(c) for c in category_ids})
    unknown = [c for c in ids if c not in known]
    if unknown:
        raise ValueError(f"unknown category ids {unknown}; the file has {sorted(known)}")
    return ids


def load_references(
    ann: Mapping[str, Any], *, category_ids: Iterable[int] | None = None
) -> list[ReferenceShot]:
    """The reference shots of a COCO dict, in file order, optionally of some categories only.

    An annotation whose image is missing raises ``ValueError``; so does one without
    ``bbox`` and without segmentation.
    """
    images = images_by_id(ann)
    wanted = None if category_ids is None else set(_check_category_ids(ann, category_ids))
    shots = []
    for a in ann.get("annotations", []):
        cid = int(a["category_id"])
        if wanted is not None and cid not in wanted:
            continue
        img = images.get(int(a["image_id"]))
        if img is None:
            raise ValueError(
                f"annotation {a.get('id')} refers to image {a['image_id']}, not in 'images'"
            )
        h, w = int(img["height"]), int(img["width"])
        seg = a.get("segmentation")
        if seg is not None and len(seg) == 0:
            seg = None
        bbox = a.get("bbox")
        if not bbox:
            if seg is None:
                raise ValueError(f"annotation {a.get('id')} has neither bbox nor segmentation")
            bbox = rle_ops.rle_to_bbox([rle_ops.annotation_to_rle(a, h, w)])[0].tolist()
        shots.append(
            ReferenceShot(
                image_id=int(img["id"]),
                file_name=str(img["file_name"]),
                annotation_id=int(a["id"]),
                category_id=cid,
                bbox=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])),
                segmentation=seg,
                height=h,
                width=w,
                mask_generated=bool(a.get("mask_generated", False)),
            )
        )
    return shots


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes):
        return obj.decode("utf-8")
    raise TypeError(f"cannot write {type(obj)!r} to JSON")


def write_json_array(write: Callable[[str], Any], items: Iterable[Any]) -> int:
    """Stream a JSON array, one item per line, through ``write``; returns the item count.

    The one JSON writer of refseg's outputs (COCO results and datasets, exports), so a
    corpus-sized file is never held in memory. numpy scalars and arrays are accepted; a NaN
    or infinite number raises ``ValueError`` naming the item (strict JSON has neither).
    """
    n = 0
    write("[")
    for item in items:
        try:
            text = json.dumps(item, allow_nan=False, default=_json_default)
        except ValueError as e:
            brief = (
                {k: v for k, v in item.items() if k != "segmentation"}
                if isinstance(item, Mapping)
                else item
            )
            raise ValueError(f"item {n} has a NaN or infinite number: {brief}") from e
        write((",\n" if n else "\n") + text)  # one call per item
        n += 1
    write("\n]" if n else "]")
    return n


def _write_items(results: Iterable[Mapping[str, Any]], f: IO[str]) -> int:
    n = write_json_array(f.write, results)
    f.write("\n")
    return n


def write_results(results: Iterable[Mapping[str, Any]], uri: str | os.PathLike[str]) -> int:
    """Write a COCO results JSON array item by item; returns the number of items.

    Local paths are written to a temporary name in the same folder and renamed at the end,
    so a crash never leaves a partial file under ``uri``. Other URIs go through fsspec
    (object stores publish the object on close). NaN scores raise ``ValueError``.
    """
    if not _is_local(uri):
        with fsspec.open(str(uri), "w", encoding="utf-8") as f:
            return _write_items(results, f)
    path = Path(fsspec.core.strip_protocol(str(uri)) if "://" in str(uri) else uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = _write_items(results, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return n


def load_results(uri: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a COCO results JSON array."""
    data = _read_json(uri)
    if not isinstance(data, list):
        raise ValueError(f"{uri} is not a COCO results file (a JSON array)")
    return data


def _coco_from_dict(data: Mapping[str, Any]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dict(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_results(
    results: Sequence[Mapping[str, Any]], gt: Mapping[str, Any], iou_types: Sequence[str]
) -> None:
    image_ids = set(images_by_id(gt))
    bad_images = sorted({int(r["image_id"]) for r in results} - image_ids)
    if bad_images:
        raise ValueError(
            f"{len(bad_images)} result image ids are not in the ground truth, e.g. "
            f"{bad_images[:10]}"
        )
    known = set(categories_by_id(gt))
    bad_cats = sorted({int(r["category_id"]) for r in results} - known)
    if bad_cats:
        raise ValueError(
            f"result category ids {bad_cats[:10]} are not in the ground truth categories "
            f"{sorted(known)} (category ids must be the dataset's ids, not list positions)"
        )
    for key, iou_type in (("segmentation", "segm"), ("bbox", "bbox")):
        if iou_type in iou_types and any(key not in r for r in results):
            raise ValueError(f"iou type {iou_type!r} needs '{key}' in every result")


def _segmentations_as_rle(results: list[dict[str, Any]], gt: Mapping[str, Any]) -> None:
    """Every result's segmentation as compressed RLE at its GT image's size, in place.

    pycocotools' ``loadRes`` takes compressed RLE only; polygons and uncompressed RLE are
    rasterised as its ``annToRLE`` does for ground truth (``frPyObjects`` at the image's
    height and width, ``merge`` of several polygons).
    """
    images = images_by_id(gt)
    for k, r in enumerate(results):
        img = images[int(r["image_id"])]
        try:
            hw = int(img["height"]), int(img["width"])
            r["segmentation"] = rle_ops.segmentation_to_rle(r["segmentation"], *hw)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"result {k} (image {r['image_id']}): unusable segmentation ({exc}); "
                f"accepted: {rle_ops.SEGMENTATION_FORMS}"
            ) from None


def _results_coco(gt_coco: Any, results: list[dict[str, Any]], gt: Mapping[str, Any]) -> Any:
    if not results:
        # pycocotools' loadRes fails on an empty list; an empty result set is valid.
        empty = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
        return _coco_from_dict(empty)
    with contextlib.redirect_stdout(io.StringIO()):
        return gt_coco.loadRes(results)


def evaluate(
    gt: Mapping[str, Any] | str | os.PathLike[str],
    results: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    *,
    category_ids: Sequence[int] | None = None,
    iou_types: Sequence[str] = ("bbox", "segm"),
) -> dict[str, dict[str, Any]]:
    """COCO AP of ``results`` against ``gt`` with pycocotools, over ``category_ids`` only.

    Args:
        gt: a COCO annotation dict, path or URI (not modified).
        results: COCO results entries, or a path/URI of a results JSON. Segmentations may
            be compressed RLE, uncompressed RLE or polygons (``rle.SEGMENTATION_FORMS``).
        category_ids: the categories evaluated (``params.catIds``); None: all of ``gt``'s.
            Results of other categories are ignored.
        iou_types: any of "bbox", "segm". For "segm" the results' boxes are dropped so that
            the small/medium/large ranges use the mask area (as detectron2 does).

    Returns:
        ``{iou_type: {"stats": {name: value for STAT_NAMES}, "per_class": {category_id: AP},
        "summary": COCOeval.summarize() text, "category_names": {id: name}}}``. Values are
        pycocotools' own: AP 0.0 where a class has ground truth and no correct result, -1.0
        where a class has no ground truth.
    """
    from pycocotools.cocoeval import COCOeval

    gt_dict = load_coco(gt) if isinstance(gt, (str, os.PathLike)) else gt
    res = load_results(results) if isinstance(results, (str, os.PathLike)) else list(results)
    for t in iou_types:
        if t not in ("bbox", "segm"):
            raise ValueError(f"iou type must be 'bbox' or 'segm', got {t!r}")
    cat_ids = (
        sorted(categories_by_id(gt_dict))
        if category_ids is None
        else _check_category_ids(gt_dict, category_ids)
    )
    _check_results(res, gt_dict, iou_types)
    gt_anns = gt_dict.get("annotations", [])
    for field in ("bbox", "area", "iscrowd") + (("segmentation",) if "segm" in iou_types else ()):
        lacking = [a.get("id") for a in gt_anns if field not in a]
        if lacking:
            raise ValueError(f"ground truth annotations {lacking[:10]} lack '{field}'")
    # Shallow copies: COCOeval writes 'ignore' and RLE segmentations into annotation dicts.
    gt_coco = _coco_from_dict({**gt_dict, "annotations": [dict(a) for a in gt_anns]})
    names = category_names(gt_dict)
    report: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        items = [dict(r) for r in res]
        if iou_type == "segm":
            for r in items:
                r.pop("bbox", None)
            _segmentations_as_rle(items, gt_dict)
        evaluator = COCOeval(gt_coco, _results_coco(gt_coco, items, gt_dict), iou_type)
        evaluator.params.catIds = cat_ids
        summary = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
        precision = evaluator.eval["precision"]  # (T, R, K, A, M)
        per_class: dict[int, float] = {}
        for k, cid in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[int(cid)] = float(np.mean(p)) if p.size else -1.0
        report[iou_type] = {
            "stats": {n: float(v) for n, v in zip(STAT_NAMES, evaluator.stats, strict=True)},
            "per_class": per_class,
            "summary": summary.getvalue(),
            "category_names": {c: names[c] for c in cat_ids},
        }
    return report


def _pct(v: float) -> str:
    return "   n/a" if v < 0 or math.isnan(v) else f"{100 * v:6.2f}"


def format_eval(report: Mapping[str, Mapping[str, Any]]) -> str:
    """Human-readable report: COCOeval's summary per iou type plus a per-class AP table."""
    lines: list[str] = []
    for iou_type, entry in report.items():
        lines.append(f"== {iou_type} ==")
        lines.append(str(entry["summary"]).rstrip("\n"))
        names = {int(k): v for k, v in entry.get("category_names", {}).items()}
        per_class = {int(k): float(v) for k, v in entry["per_class"].items()}
        width = max([len("category")] + [len(names.get(c, "")) for c in per_class])
        lines.append(f"{'id':>5}  {'category':<{width}}  {'AP':>6}")
        for cid in sorted(per_class):
            lines.append(f"{cid:>5}  {names.get(cid, '?'):<{width}}  {_pct(per_class[cid])}")
        lines.append("")
    return "\n".join(lines)
