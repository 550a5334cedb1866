"""``refseg compact OUT``: merge OUT's small parts into large ones and bring its index and
COCO shards up to date.

Runs also happen automatically past a threshold at the end of every ``refseg label`` or
``refseg rematch`` (pipeline/store/compaction.py); this command merges every small part at
once, e.g. after upgrading an OUT written by an earlier version. It holds OUT as a run does
(a run in progress on OUT refuses it, and it refuses a run), repairs what a killed run or
compaction left first, and can be stopped at any point and run again.
"""

from __future__ import annotations

import argparse
import time

from refseg.pipeline.storage import resolve
from refseg.pipeline.store import compaction, index, layout
from refseg.pipeline.store.coco_files import write_coco
from refseg.pipeline.store.coco_shards import read_shard_index
from refseg.pipeline.store.lock import hold_out
from refseg.pipeline.store.redo import tidy

__all__ = ["add_compact_args", "compact_out", "run_compact"]


def add_compact_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder or URI of `refseg label`")
    parser.add_argument("--s3-endpoint", default=None, metavar="URL", help="S3-compatible endpoint")
    parser.add_argument(
        "--take-over-lock",
        action="store_true",
        help="take over OUT's S3 lease held by another run (only when that run is gone)",
    )


def compact_out(out: str, *, s3_endpoint: str | None = None, take_over: bool = False) -> str:
    """Compact the run folder ``out``; return the summary line."""
    loc = resolve(out, s3_endpoint=s3_endpoint)
    if not layout.has_parts(loc):
        raise FileNotFoundError(f"{loc.uri} has no parts: is it the --out of `refseg label`?")
    t0 = time.perf_counter()
    before = len(layout.finished_parts(loc))
    with hold_out(loc, take_over=take_over) as lock:
        tidy(loc)
        stats = compaction.compact(loc, full=True)
        lock.check()
        snap = index.load(loc)
        index.update_index(loc, snap)
        categories = read_shard_index(loc).get("categories")
        if categories is not None:  # the COCO shards follow the parts they are made of
            write_coco(loc, categories, snapshot=snap)
    after = len(layout.finished_parts(loc))
    return (
        f"refseg compact: {stats['parts_merged']} parts merged into {stats['groups']} "
        f"({stats['rows']} images); {before} -> {after} parts in {loc.uri} "
        f"({time.perf_counter() - t0:.1f} s)"
    )


def run_compact(args: argparse.Namespace) -> int:
    print(compact_out(args.out, s3_endpoint=args.s3_endpoint, take_over=args.take_over_lock))
    return 0
