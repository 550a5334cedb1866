"""Streaming reads of a run folder for the report: class stats, image summary, samples."""

from __future__ import annotations

import html
import json
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from refseg.core import coco
from refseg.pipeline.storage import Location, resolve
from refseg.pipeline.store import index, journal, layout

THUMB_SIDE = 512  # long side of an overlay, px
REF_SIDE = 160  # long side of a reference crop, px
N_BINS = 20  # score histogram bins over [0, 1]; scores outside are clipped into the end bins
MAX_ERRORS = 500  # error rows listed (the lowest image ids); the total is always shown
MAX_INSTANCES_PER_TILE = 100  # highest-scoring instances drawn per image
MAX_REFS_PER_CLASS = 12
FILL_ALPHA = 0.45
_THREADS = 4
# 20 distinct colours (RGB), picked by ``category_id % 20``: the same class, the same colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 225, 25), (128, 0, 0), (170, 255, 195),
    (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128), (255, 99, 71),
)  # fmt: skip


def class_colour(category_id: int) -> tuple[int, int, int]:
    """The fixed RGB colour of a category id."""
    return PALETTE[int(category_id) % len(PALETTE)]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------- reading the run folder


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts)


def _store(out: str) -> Location | None:
    """OUT as refseg's store sees it, for a local path, s3:// or gs:// (else None)."""
    try:
        return resolve(out)
    except ValueError:  # another fsspec scheme (memory://, ...): a folder of Parquet files
        return None


def _parquet_dataset(out: str, sub: str) -> ds.Dataset | None:
    """The ``OUT/sub/*.parquet`` files as one dataset, or None when there are none.

    pyarrow's scanner reads the files a bounded number at a time. On a refseg OUT, the
    ``images`` rows come from its index once it has one (refseg.pipeline.store.index: a
    few objects plus the parts written since), and parts of a compaction in progress whose
    rows are already in its target are left out.
    """
    fs, root = fsspec.core.url_to_fs(_join(out, sub))
    if not fs.isdir(root):
        return None
    loc = _store(out)
    if loc is not None and sub == layout.IMAGES_DIR and index.read_pointer(loc).parts:
        return ds.dataset(index.load(loc).rows.drop_columns([index.PART]))
    hidden = set()
    if loc is not None:
        hidden = journal.hidden(journal.read_journal(loc), layout.finished_parts(loc))
    names = sorted(fs.ls(root, detail=False))
    files = [
        p
        for p in names
        if p.endswith(".parquet")
        and not posixpath.basename(p).startswith(("_", "."))
        and posixpath.basename(p) not in hidden
    ]
    return ds.dataset(files, filesystem=fs, format="parquet") if files else None


def _batches(dataset: ds.Dataset | None, columns: Sequence[str], **kw: Any) -> Iterator[Any]:
    if dataset is None:
        return
    present = [c for c in columns if c in dataset.schema.names]
    yield from dataset.to_batches(columns=present, batch_size=65_536, **kw)


def _read_json(uri: str) -> Any:
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        return json.load(f)


@dataclass
class ClassStats:
    """Streaming per-class statistics: count, score sum and a histogram over [0, 1]."""

    name: str
    count: int = 0
    above: int = 0
    score_sum: float = 0.0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))


def class_stats(instances: ds.Dataset | None, score_threshold: float) -> dict[int, ClassStats]:
    """Per-class stats of all instances, reading only category and score columns."""
    stats: dict[int, ClassStats] = {}
    for batch in _batches(instances, ["category_id", "category_name", "score"]):
        if batch.num_rows == 0:
            continue
        cats = batch.column("category_id").to_numpy(zero_copy_only=False).astype(np.int64)
        scores = batch.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
        names = batch.column("category_name") if "category_name" in batch.schema.names else None
        uniq, first, inverse = np.unique(cats, return_index=True, return_inverse=True)
        bins = np.clip((scores * N_BINS).astype(np.int64), 0, N_BINS - 1)
        hist = np.zeros((len(uniq), N_BINS), dtype=np.int64)
        np.add.at(hist, (inverse, bins), 1)
        above = np.bincount(inverse, weights=scores >= score_threshold, minlength=len(uniq))
        sums = np.bincount(inverse, weights=scores, minlength=len(uniq))
        for k, cid in enumerate(uniq.tolist()):
            if cid not in stats:
                name = names[int(first[k])].as_py() if names is not None else None
                stats[cid] = ClassStats(name=name or f"class {cid}")
            s = stats[cid]
            s.count += int(hist[k].sum())
            s.above += int(above[k])
            s.score_sum += float(sums[k])
            s.hist += hist[k]
    return stats


@dataclass(frozen=True)
class ImageRow:
    image_id: int
    image_uri: str
    width: int | None = None
    height: int | None = None
    status: str = "ok"
    error: str | None = None
    n_instances: int | None = None


@dataclass
class ImageSummary:
    """Counts of the images table, the sampled rows and the first error rows."""

    n_images: int | None = None
    n_ok: int | None = None
    n_errors: int | None = None
    sample: list[ImageRow] = field(default_factory=list)
    errors: list[ImageRow] = field(default_factory=list)


def _smallest(batch: Any, keys: Sequence[np.ndarray], k: int, where: np.ndarray) -> list[ImageRow]:
    """The ``k`` rows of ``batch`` where ``where`` holds, smallest by ``keys`` (last primary)."""
    idx = np.nonzero(where)[0]
    idx = idx[np.lexsort([key[idx] for key in keys])][:k]
    return [ImageRow(**r) for r in batch.take(pa.array(idx, pa.int64())).to_pylist()]


def _sample_order(row: ImageRow) -> tuple[int, int]:
    """Images with instances first, then ok ones without, then errors; by id within."""
    rank = 0 if (row.n_instances or 0) > 0 else 1
    return (rank if row.status == "ok" else 2, row.image_id)


def summarise_images(
    images: ds.Dataset | None, instances: ds.Dataset | None, max_images: int
) -> ImageSummary:
    """Stream the images table: counts, the ``max_images`` sample, the first errors.

    Without an images table the sample is the lowest image ids found in the instances.
    """
    summary, sample = ImageSummary(), []
    if images is None:
        for batch in _batches(instances, ["image_id", "image_uri"]):
            ids = batch.column("image_id").to_numpy(zero_copy_only=False)
            _, first = np.unique(ids, return_index=True)
            rows = _smallest(batch, [ids[first]], max_images, np.ones(len(first), bool))
            known = {r.image_id for r in sample}
            sample = sorted(sample + [r for r in rows if r.image_id not in known],
                            key=lambda r: r.image_id)[:max_images]  # fmt: skip
        summary.sample = sample
        return summary
    summary.n_images = summary.n_ok = summary.n_errors = 0
    columns = ["image_id", "image_uri", "width", "height", "status", "error", "n_instances"]
    for batch in _batches(images, columns):
        ids = batch.column("image_id").to_numpy(zero_copy_only=False)
        names = batch.schema.names
        ok = np.ones(len(ids), bool)
        if "status" in names:
            ok = pc.fill_null(pc.equal(batch.column("status"), "ok"), False)
            ok = ok.to_numpy(zero_copy_only=False)
        n = np.ones(len(ids), np.int64)
        if "n_instances" in names:
            n = pc.fill_null(batch.column("n_instances"), 0).to_numpy(zero_copy_only=False)
        rank = np.where(ok, np.where(n > 0, 0, 1), 2)
        summary.n_images += len(ids)
        summary.n_ok += int(ok.sum())
        summary.n_errors += int((~ok).sum())
        bad = _smallest(batch, [ids], MAX_ERRORS, ~ok)
        summary.errors = sorted(summary.errors + bad, key=lambda r: r.image_id)[:MAX_ERRORS]
        rows = _smallest(batch, [ids, rank], max_images, np.ones(len(ids), bool))
        sample = sorted(sample + rows, key=_sample_order)[:max_images]
    summary.sample = sample
    return summary


def sampled_instances(
    instances: ds.Dataset | None, image_ids: Sequence[int], score_threshold: float
) -> dict[int, list[dict[str, Any]]]:
    """Instance rows (score >= threshold) of the given images, by image id, best first."""
    out: dict[int, list[dict[str, Any]]] = {int(i): [] for i in image_ids}
    if instances is None or not image_ids:
        return out
    cols = ["image_id", "category_id", "category_name", "score", "bbox", "segmentation"]
    filt = ds.field("image_id").isin(list(image_ids)) & (ds.field("score") >= score_threshold)
    for batch in _batches(instances, cols, filter=filt):
        for row in batch.to_pylist():
            out[int(row["image_id"])].append(row)
    for rows in out.values():
        rows.sort(key=lambda r: -r["score"])
    return out


def ground_truth_for(
    gt: Mapping[str, Any], image_ids: Sequence[int]
) -> tuple[dict[int, list[dict[str, Any]]], dict[int, str], dict[int, dict[str, Any]]]:
    """GT annotations of the given images, category names and image dicts of a COCO dict."""
    wanted = {int(i) for i in image_ids}
    anns: dict[int, list[dict[str, Any]]] = {i: [] for i in wanted}
    for a in gt.get("annotations", []):
        if int(a["image_id"]) in wanted:
            anns[int(a["image_id"])].append(a)
    images = {i: img for i, img in coco.images_by_id(gt).items() if i in wanted}
    return anns, coco.category_names(gt), images


# ---------------------------------------------------------------- drawing
