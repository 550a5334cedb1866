"""``refseg import-review RUN --from FILE --out CORRECTIONS.json``: a review back into the bank.

FILE is either

* a Label Studio JSON export of the tasks ``refseg export RUN --format label-studio``
  wrote (jobs/label_studio.py describes the layout). Per reviewed task (the annotation
  that counts: not skipped, ground truth first, else the latest): a prediction region kept
  with its label is accepted; one deleted is rejected; one given another label is rejected
  for its class and, with its (possibly edited) shape, a new shot of the new label;
  a region a person drew (polygon or brush) is a new shot. Tasks without an annotation
  were not reviewed and change nothing.
* or a CSV with the header ``image_id,instance,verdict``: ``instance`` is the instance's
  0-based rank in its image in RUN (by score, as in ``instances/`` and in the Label Studio
  region ids ``<image_id>_<instance>``), ``verdict`` is ``ok`` or ``wrong``.

CORRECTIONS.json is a COCO file: ``images`` (the run's image URIs as file names),
``categories`` (the run's, plus any new class a person drew) and ``annotations`` with
``"refseg_kind": "shot"`` (new shots) or ``"negative"`` (rejected instances, with the
run's exact mask, as negatives of their class). The same file goes to both flags:

    refseg build-memory --add --out BANK --references CORRECTIONS.json \\
        --negatives CORRECTIONS.json

(each flag takes its own kind). Annotation ids are derived from the image and region, so
importing the same review twice adds nothing twice.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.fs as pafs
from refseg.core import rle as rle_ops
from refseg.core.banks import KIND_KEY
from refseg.jobs.cmd_memory import write_bytes
from refseg.jobs.label_studio import chosen_annotation, region_label, region_mask
from refseg.jobs.run_read import iter_images, run_categories
from refseg.pipeline.schema import image_id_from_uri
from refseg.pipeline.storage import Location, resolve
from refseg.pipeline.store.layout import IMAGES_DIR, iter_tables

__all__ = ["Corrections", "add_import_review_args", "import_review", "run_import_review"]

VERDICTS = ("ok", "wrong")


@dataclass
class Corrections:
    """What a review says, as COCO pieces, and counts of what was seen."""

    categories: dict[int, str]
    images: dict[int, dict[str, Any]] = field(default_factory=dict)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(
        self, kind: str, image: Mapping[str, Any], cid: int, rle: dict[str, Any], key: str
    ) -> None:
        """One shot or negative of category ``cid`` on ``image`` (a run images row)."""
        iid = int(image["image_id"])
        self.images[iid] = {
            "id": iid,
            "file_name": str(image["image_uri"]),
            "width": int(image["width"]),
            "height": int(image["height"]),
        }
        ann = {
            "id": image_id_from_uri(f"refseg-review:{kind}:{iid}:{key}"),
            "image_id": iid,
            "category_id": int(cid),
            "segmentation": rle,
            "bbox": rle_ops.rle_to_bbox([rle])[0].tolist(),
            "area": float(rle_ops.rle_area([rle])[0]),
            "iscrowd": 0,
            KIND_KEY: kind,
            "refseg_source": key,
        }
        self.annotations.append(ann)
        self.counts[f"{kind}s"] += 1

    def category_for(self, name: str) -> int:
        """The id of a class name; a name the run does not know becomes a new class."""
        for cid, n in self.categories.items():
            if n == name:
                return cid
        cid = max([*self.categories, 0]) + 1
        self.categories[cid] = name
        self.counts["new_classes"] += 1
        return cid

    def coco(self, run: str, source: str) -> dict[str, Any]:
        info = {"description": "refseg review corrections", "run": run, "source": source}
        return {
            "info": {**info, "counts": dict(sorted(self.counts.items()))},
            "images": [self.images[i] for i in sorted(self.images)],
            "categories": [{"id": c, "name": n} for c, n in sorted(self.categories.items())],
            "annotations": self.annotations,
        }


def _read_text(uri: str) -> str:
    try:
        with fsspec.open(uri, "r", encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"review file not found: {uri}") from None


def _run_images(out: Location, wanted: set[int]) -> dict[int, tuple[dict, list[dict]]]:
    """(images row, instance rows in run order) of the wanted ok images of the run."""
    return {int(img["image_id"]): (img, rows)
            for img, rows in iter_images(out, image_ids=wanted)}  # fmt: skip


# ------------------------------------------------------------------------------- CSV


def _csv_rows(text: str, source: str) -> Iterator[tuple[int, int, int, str]]:
    """(line, image_id, instance, verdict) of a verdicts CSV."""
    reader = csv.DictReader(io.StringIO(text))
    need = {"image_id", "instance", "verdict"}
    if not reader.fieldnames or not need <= {f.strip() for f in reader.fieldnames}:
        raise ValueError(
            f"{source}: a review CSV needs the header image_id,instance,verdict "
            f"(got {reader.fieldnames})"
        )
    for n, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        verdict = row["verdict"].lower()
        if verdict not in VERDICTS:
            raise ValueError(f"{source} line {n}: verdict {row['verdict']!r} is not ok or wrong")
        try:
            yield n, int(row["image_id"]), int(row["instance"]), verdict
        except ValueError:
            raise ValueError(
                f"{source} line {n}: image_id and instance must be integers, got "
                f"{row['image_id']!r}, {row['instance']!r}"
            ) from None


def _from_csv(text: str, source: str, out: Location, fix: Corrections) -> None:
    rows = list(_csv_rows(text, source))
    found = _run_images(out, {r[1] for r in rows})
    for n, image_id, k, verdict in rows:
        if image_id not in found:
            raise ValueError(f"{source} line {n}: image {image_id} has no ok output in {out.uri}")
        img, insts = found[image_id]
        if not 0 <= k < len(insts):
            raise ValueError(
                f"{source} line {n}: image {image_id} has {len(insts)} instances in "
                f"{out.uri}; there is no instance {k} (instances count from 0)"
            )
        fix.counts[verdict] += 1
        if verdict == "wrong":
            inst = insts[k]
            fix.add("negative", img, inst["category_id"], _rle(inst), f"instance-{k}")


def _rle(row: Mapping[str, Any]) -> dict[str, Any]:
    seg = row["segmentation"]
    return {"size": [int(v) for v in seg["size"]], "counts": seg["counts"]}


# ------------------------------------------------------------------------ Label Studio


def _task_image(task: Mapping[str, Any], by_uri: dict[str, int]) -> int | None:
    data = task.get("data") or {}
    if data.get("refseg_image_id") is not None:
        return int(data["refseg_image_id"])
    return by_uri.get(str(data.get("image")))


def _shown(task: Mapping[str, Any], image_id: int, n: int) -> set[int] | None:
    """Instances the task showed: ``data.refseg_instances``, else the prediction regions'
    ids (predictions exported in full), else None (unknown)."""
    data = task.get("data") or {}
    if isinstance(data.get("refseg_instances"), list):
        return {int(k) for k in data["refseg_instances"]}
    pattern = re.compile(rf"^{image_id}_(\d+)$")
    found: set[int] = set()
    for pred in task.get("predictions") or []:
        for region in pred.get("result", []) if isinstance(pred, Mapping) else []:
            m = pattern.match(str(region.get("id", "")))
            if m and int(m.group(1)) < n:
                found.add(int(m.group(1)))
    return found or None


def _review_task(task: Mapping[str, Any], img: dict, insts: list[dict], fix: Corrections) -> None:
    ann = chosen_annotation(task)
    if ann is None:
        fix.counts["tasks_not_reviewed"] += 1
        return
    fix.counts["tasks_reviewed"] += 1
    iid, h, w = int(img["image_id"]), int(img["height"]), int(img["width"])
    shown = _shown(task, iid, len(insts))
    if shown is None:
        shown = set(range(len(insts)))
        fix.counts["tasks_assumed_all_shown"] += 1
    pattern = re.compile(rf"^{iid}_(\d+)$")
    kept: set[int] = set()
    for region in ann.get("result") or []:
        label = region_label(region)
        if label is None:
            continue
        m = pattern.match(str(region.get("id", "")))
        k = int(m.group(1)) if m and int(m.group(1)) in shown else None
        if k is not None:
            kept.add(k)
            inst = insts[k]
            if label == fix.categories.get(int(inst["category_id"])):
                fix.counts["accepted"] += 1
                continue
            fix.counts["relabelled"] += 1
            fix.add("negative", img, inst["category_id"], _rle(inst), f"instance-{k}")
        mask = region_mask(region, h, w)
        if mask is None or not mask.any():
            fix.counts["regions_without_mask_skipped"] += 1
            continue
        cid = fix.category_for(label)
        rle = rle_ops.encode_masks(np.ascontiguousarray(mask)[None])[0]
        fix.add("shot", img, cid, rle, f"region-{region.get('id')}")
    for k in sorted(shown - kept):
        inst = insts[k]
        fix.counts["rejected"] += 1
        fix.add("negative", img, inst["category_id"], _rle(inst), f"instance-{k}")


def _from_label_studio(text: str, source: str, out: Location, fix: Corrections) -> None:
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is neither a CSV nor JSON: {exc}") from None
    if isinstance(tasks, Mapping):
        tasks = [tasks]
    if not isinstance(tasks, list) or not all(isinstance(t, Mapping) for t in tasks):
        raise ValueError(f"{source}: expected Label Studio's JSON export (a list of tasks)")
    if tasks and all("annotations" not in t and "data" not in t for t in tasks):
        raise ValueError(
            f"{source} has no tasks with data and annotations: export the project from Label "
            'Studio as "JSON" (not JSON_MIN, CSV or COCO)'
        )
    by_uri: dict[str, int] = {}
    if any((t.get("data") or {}).get("refseg_image_id") is None for t in tasks):
        for table in iter_tables(out, IMAGES_DIR, ["image_id", "image_uri"]):
            by_uri.update(zip(table.column("image_uri").to_pylist(),
                              table.column("image_id").to_pylist(), strict=True))  # fmt: skip
    ids = [_task_image(t, by_uri) for t in tasks]
    found = _run_images(out, {i for i in ids if i is not None})
    for task, image_id in zip(tasks, ids, strict=True):
        if image_id is None or image_id not in found:
            fix.counts["tasks_not_in_run"] += 1
            continue
        _review_task(task, *found[image_id], fix)


def import_review(run: str, source: str, *, s3_endpoint: str | None = None) -> dict[str, Any]:
    """The corrections COCO dict of a review file ``source`` of the run folder ``run``."""
    out = resolve(run, s3_endpoint=s3_endpoint)
    if out.fs.get_file_info(out.child(IMAGES_DIR).path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{run} has no images/ parts: is it the --out of `refseg label`?")
    fix = Corrections(categories=dict(run_categories(out)))
    text = _read_text(source)
    if source.lower().endswith(".csv") or text.lstrip().lower().startswith("image_id"):
        _from_csv(text, source, out, fix)
    else:
        _from_label_studio(text, source, out, fix)
    return fix.coco(run, source)


def add_import_review_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="run folder the review was made of")
    parser.add_argument(
        "--from", dest="source", required=True, metavar="FILE",
        help="Label Studio JSON export of the `refseg export --format label-studio` tasks, "
        "or a CSV image_id,instance,verdict (ok|wrong)",
    )  # fmt: skip
    parser.add_argument(
        "--out", required=True, metavar="CORRECTIONS.json",
        help="COCO file of new shots and negatives for `build-memory --add --references ... "
        "--negatives ...`",
    )  # fmt: skip
    parser.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")


def run_import_review(args: argparse.Namespace) -> int:
    coco = import_review(args.run_dir, args.source, s3_endpoint=args.s3_endpoint)
    write_bytes(args.out, (json.dumps(coco, indent=1) + "\n").encode())
    c = coco["info"]["counts"]
    seen = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items()) or "nothing"
    print(
        f"refseg import-review: {c.get('shots', 0)} new shots, {c.get('negatives', 0)} "
        f"negatives ({seen}) -> {args.out}\n"
        f"next: refseg build-memory --add --out BANK --references {args.out} "
        f"--negatives {args.out}"
    )
    return 0
