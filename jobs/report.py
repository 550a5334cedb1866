"""``refseg report``: one self-contained, offline HTML review page of a labelling run.

Reads a run folder ``OUT`` (local path or fsspec URI) written by ``refseg label``:
``instances/*.parquet`` (one row per instance, ``INSTANCES_SCHEMA``), ``images/*.parquet``
(one row per input image), ``run.json`` (optional ``"references"``). Only files whose name
ends in ``.parquet`` and does not start with ``_`` or ``.`` are read.

Memory stays bounded on big runs: counts, score histograms and the image sample are computed
by streaming record batches of a few columns; full instance rows (masks) are read only for
the sampled image ids. Overlays are drawn at most ``THUMB_SIDE`` px on the long side and
embedded as base64 JPEG data URIs; the page has no script and no external resource (its
Content-Security-Policy allows only inline styles and ``data:`` images).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import fsspec
import numpy as np
from refseg.core import coco
from refseg.jobs.report_data import (
    _THREADS,
    MAX_INSTANCES_PER_TILE,
    _join,
    _parquet_dataset,
    _read_json,
    class_stats,
    ground_truth_for,
    sampled_instances,
    summarise_images,
)
from refseg.jobs.report_render import (
    TileInput,
    _references,
    build_page,
    render_tile,
)

if TYPE_CHECKING:
    from refseg.jobs.report_compare import RunComparison


def write_report(
    out: str,
    *,
    ground_truth: str | dict | None = None,
    score_threshold: float = 0.0,
    max_images: int = 48,
    dest: str | None = None,
    compare: str | RunComparison | None = None,
) -> str:
    """Write the review page of the run folder ``out``; return its path/URI.

    Args:
        out: run folder (local path or fsspec URI) with ``instances/``, ``images/``,
            ``run.json``.
        ground_truth: a COCO annotation file (path/URI) or dict with the run's image ids;
            its masks are drawn beside the predictions.
        score_threshold: instances scoring below it are not drawn (they still count).
        max_images: images in the overlay grid (lowest ids, images with instances first).
        dest: where to write; default ``out/report.html``.
        compare: an earlier run of the same images (e.g. before a rematch with a corrected
            bank), or its ``compare_runs`` result; the page gets a ``Changes`` section
            (jobs/report_compare.py).
    """
    if not np.isfinite(score_threshold):
        raise ValueError(f"score_threshold must be finite, got {score_threshold}")
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    instances, images = _parquet_dataset(out, "instances"), _parquet_dataset(out, "images")
    run = _read_json(_join(out, "run.json"))
    if instances is None and images is None and run is None:
        raise FileNotFoundError(
            f"{out} has no instances/*.parquet, images/*.parquet or run.json: "
            "is it the --out folder of `refseg label`?"
        )
    run = run if isinstance(run, dict) else {}
    gt = coco.load_coco(ground_truth) if isinstance(ground_truth, str) else ground_truth
    changes = ""
    if compare is not None:
        from refseg.jobs.report_compare import compare_html, compare_runs

        if isinstance(compare, str):
            compare = compare_runs(out, compare, score_threshold)
        changes = compare_html(compare)
    stats = class_stats(instances, score_threshold)
    summary = summarise_images(images, instances, max_images)
    ids = [r.image_id for r in summary.sample]
    insts = sampled_instances(instances, ids, score_threshold)
    gt_parts = ground_truth_for(gt, ids) if gt is not None else None
    jobs = []
    for r in summary.sample:
        gt_in = None
        if gt_parts is not None:
            gt_in = (gt_parts[0][r.image_id], gt_parts[2].get(r.image_id), gt_parts[1])
        jobs.append(TileInput(r, insts[r.image_id], MAX_INSTANCES_PER_TILE, gt_in))
    with ThreadPoolExecutor(_THREADS) as pool:
        tiles = list(pool.map(render_tile, jobs))
    refs_html = _references(run.get("references") or [])
    page = build_page(
        out,
        stats=stats,
        summary=summary,
        tiles=tiles,
        refs_html=refs_html,
        run=run,
        threshold=score_threshold,
        has_gt=gt is not None,
        changes_html=changes,
    )
    target = dest or _join(out, "report.html")
    with fsspec.open(target, "w", encoding="utf-8") as f:
        f.write(page)
    return target


def add_report_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``refseg report``'s arguments to ``parser``."""
    parser.add_argument("run_dir", metavar="OUT", help="run folder written by `refseg label`")
    parser.add_argument(
        "--ground-truth", metavar="GT.json", default=None,
        help="COCO annotation file with the same image ids, drawn beside the predictions",
    )  # fmt: skip
    parser.add_argument(
        "--score-threshold", metavar="T", type=float, default=0.0,
        help="hide instances scoring below T in the overlays (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--max-images", metavar="N", type=int, default=48,
        help="images in the overlay grid (default 48)",
    )  # fmt: skip
    parser.add_argument(
        "--out", metavar="PATH", dest="dest", default=None,
        help="where to write the page (default OUT/report.html)",
    )  # fmt: skip
    parser.add_argument(
        "--compare", metavar="OLD", default=None,
        help="an earlier run of the same images: show what changed (instances per class "
        "before and after, images labelled differently); also printed",
    )  # fmt: skip
    return parser


def run_report(args: argparse.Namespace) -> int:
    """Run ``refseg report`` from parsed arguments; print the page's path; return 0.

    With ``--compare OLD`` the changes are printed too.
    """
    compare = None
    if args.compare:
        from refseg.jobs.report_compare import compare_runs, compare_text

        compare = compare_runs(args.run_dir, args.compare, args.score_threshold)
        print(compare_text(compare))
    path = write_report(
        args.run_dir,
        ground_truth=args.ground_truth,
        score_threshold=args.score_threshold,
        max_images=args.max_images,
        dest=args.dest,
        compare=compare,
    )
    print(path)
    return 0
