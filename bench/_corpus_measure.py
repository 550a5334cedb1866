"""One measured rerun of ``bench/corpus_scale.py``, in its own process (peak memory is its own).

A rerun as ``refseg label`` does it to OUT, minus the models: ``begin_run`` (run.json,
repairs, planning against the listing of every image), the new images' parts written by
the real writer (``write_parts``: the labelling, timed apart), then ``settle`` (clean-up,
automatic compaction, index), ``write_coco`` (shards, whole files while small) and the
totals plus run.json. ``--compact`` measures ``refseg compact OUT`` instead.

Counted: seconds per step, peak RSS of this process, bytes read (every object the store
opens goes through a counting filesystem), bytes and objects written and deleted (the files
of OUT before and after each step), and on S3 the requests moto's server logged between
markers this process sends.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from refseg.pipeline.dataflow.writer import write_parts  # noqa: E402
from refseg.pipeline.run_steps import totals  # noqa: E402
from refseg.pipeline.storage import Location  # noqa: E402
from refseg.pipeline.store import index, layout, redo  # noqa: E402
from refseg.pipeline.store.coco_files import write_coco  # noqa: E402
from refseg.pipeline.store.record import start_record, write_run_record  # noqa: E402

from bench._corpus_data import CATEGORIES, label_batch, listing_of  # noqa: E402

READ = Counter()


def _counting(base: type) -> type:
    class Counting(base):  # type: ignore[misc, valid-type]
        """Counts the objects the store opens and their bytes (read whole, then served)."""

        def open_input_stream(self, path, *a, **kw):
            data = super().open_input_stream(path, *a, **kw).read()
            READ["objects"] += 1
            READ["bytes"] += len(data)
            return pa.BufferReader(data)

        def open_input_file(self, path, *a, **kw):
            return self.open_input_stream(path)

        def get_file_info(self, what):
            READ["listings" if isinstance(what, pafs.FileSelector) else "stats"] += 1
            return super().get_file_info(what)

    return Counting


def _count_s3_gets() -> None:
    """The store reads S3 objects with one GET each (s3_objects.get): count those too."""
    from refseg.pipeline.store import s3_objects

    real = s3_objects.get

    def get(endpoint: str | None, path: str) -> tuple[bytes, str] | None:
        got = real(endpoint, path)
        READ["objects"] += 1
        READ["bytes"] += len(got[0]) if got else 0
        return got

    s3_objects.get = get  # type: ignore[assignment]


def location(uri: str, endpoint: str | None) -> Location:
    if uri.startswith("s3://"):
        fs = _counting(pafs.S3FileSystem)(
            endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1"
        )
        return Location(fs, uri[5:], "s3", endpoint)
    return Location(_counting(pafs.LocalFileSystem)(), uri, "")


def files(out: Location) -> dict[str, tuple[int, int]]:
    """Every file under OUT: path -> (size, mtime ns). (The measurement's own listing, not
    counted; retried, as a loaded moto server can time out on a listing of many objects.)"""
    selector = pafs.FileSelector(out.path, recursive=True, allow_not_found=True)
    for attempt in range(5):
        try:
            infos = pafs.FileSystem.get_file_info(out.fs, selector)
            break
        except OSError:
            if attempt == 4:
                raise
            time.sleep(5)
    return {i.path: (i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}


def _mark(out: Location, text: str) -> None:
    """A request moto's log shows, to find this step's requests in it (S3 only)."""
    if out.scheme == "s3":
        out.fs.get_file_info(out.child(f"__mark__{text}").path)


def step(out: Location, name: str, fn: Any, steps: dict[str, Any]) -> Any:
    before, read = files(out), READ.copy()
    _mark(out, f"{name}-begin")
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    _mark(out, f"{name}-end")
    after = files(out)
    changed = [p for p, s in after.items() if before.get(p) != s]
    steps[name] = {
        "seconds": seconds,
        "bytes_read": READ["bytes"] - read["bytes"],
        "objects_read": READ["objects"] - read["objects"],
        "listings": READ["listings"] - read["listings"],
        "bytes_written": sum(after[p][0] for p in changed),
        "objects_written": len(changed),
        "objects_deleted": len(set(before) - set(after)),
    }
    return result


def _warm_up() -> None:
    """The steps once on a tiny OUT, untimed: imports and first calls are not bookkeeping."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Location(pafs.LocalFileSystem(), tmp, "")
        listing = listing_of(40)
        write_parts(label_batch(listing, np.arange(32)), out=out)
        redo.begin_run(out, start_record("w", {}), lambda: listing, retry_errors=False)
        redo.settle(out)
        write_coco(out, CATEGORIES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--endpoint", default=None)
    ap.add_argument("--done", type=int, required=True, help="images listed before this run")
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--compact", action="store_true", help="measure `refseg compact OUT`")
    args = ap.parse_args()
    imports_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _warm_up()
    _count_s3_gets()
    out = location(args.out, args.endpoint)
    steps: dict[str, Any] = {}
    if args.compact:
        from refseg.pipeline.store import compaction

        def compact() -> None:
            redo.tidy(out)
            compaction.compact(out, full=True)
            snap = index.load(out)
            index.update_index(out, snap)
            write_coco(out, CATEGORIES, snapshot=snap)

        step(out, "compact", compact, steps)
    else:
        listing = listing_of(args.done + args.new)
        start = start_record("bench", {"preset": "bench"})
        plan = step(
            out,
            "plan",
            lambda: redo.begin_run(out, start, lambda: listing, retry_errors=False),
            steps,
        )
        todo = np.nonzero(~np.isin(listing.ids, plan.done))[0]  # positions in the listing
        t0 = time.perf_counter()
        for k in range(0, len(todo), 32):  # the labelling: the writer tasks' parts
            write_parts(label_batch(listing, todo[k : k + 32]), out=out)
        label_seconds = time.perf_counter() - t0
        settled = step(out, "settle", lambda: redo.settle(out), steps)
        step(out, "coco", lambda: write_coco(out, CATEGORIES, snapshot=settled), steps)

        def record() -> None:  # the totals over OUT and run.json, as the job's record
            counts = totals(out, settled)
            write_run_record(out, {**start, "status": "complete", "counts": counts})

        step(out, "record", record, steps)
        steps["labelled"] = {"images": len(todo), "seconds": label_seconds}
        steps["done_before"] = len(plan.done)
    steps["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steps["imports_rss_bytes"] = imports_rss  # the job's modules (torch, Ray) before any step
    steps["parts_after"] = len(layout.finished_parts(out))
    steps["files_after"] = len(files(out))
    print(json.dumps(steps))


if __name__ == "__main__":
    main()
