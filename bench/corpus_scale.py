"""Corpus scale (issue 19): what a nightly rerun's bookkeeping costs as OUT grows.

For each N (images already done) and store (local disk, moto's S3 server on loopback):

1. OUT is made in the real part layout, as every version so far wrote it (32 images a
   part, 5 instances an image, no index): ``bench/_corpus_data.py``.
2. ``first``: the first rerun after the upgrade, with NEW new images (it builds the index,
   writes every part's COCO shard once, merges up to AUTO_MAX_ROWS rows).
3. ``compact``: ``refseg compact OUT`` (once, to reach the steady layout at once).
4. ``nightly``: two reruns with NEW new images each: the scheduled case, the targets.

Each rerun runs in its own process (``bench/_corpus_measure.py``): the store operations
``refseg label`` does around the labelling (plan, settle, COCO files, run record), the new
images' parts written by the real writer in between (not bookkeeping: timed apart). The
source listing is given (a folder of N files lists in seconds, an S3 prefix in N/1000
requests): it is not part of the figures.

    python bench/corpus_scale.py --quick            # smoke: N = 2,000, 100 new
    python bench/corpus_scale.py                    # N = 10k, 100k, 1M; 1,000 new
    python bench/corpus_scale.py --steady           # nightly reruns only, from the steady layout

Figures: bookkeeping seconds (plan + settle + coco + record), driver peak RSS, MB and
objects read and written, and on S3 the requests moto logged during those steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refseg.pipeline.storage import Location, resolve
from refseg.pipeline.store.compaction import COMPACT_ROWS

from bench._common import ROOT, loadavg, save_result, table
from bench._corpus_data import PER_PART, generate, listing_of

STEPS = ("plan", "settle", "coco", "record")
_LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Moto:
    """moto's S3 server on 127.0.0.1, its request log kept in a file."""

    def __init__(self, work: Path) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if not exe:
            raise SystemExit("moto_server not found: install the dev extras (make setup)")
        self.log = work / "moto.log"
        port = 5000 + os.getpid() % 1000
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )
        for _ in range(150):
            try:
                urllib.request.urlopen(self.url, timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
            AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=self.url,
        )  # fmt: skip

    def bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=name)

    def requests(self, out_prefix: str) -> dict[str, dict[str, int]]:
        """Requests per step: those between the step's begin and end markers."""
        counts: dict[str, Counter] = {}
        current = None
        for line in _ANSI.sub("", self.log.read_text()).splitlines():
            m = _LINE.search(line)
            if not m:
                continue
            method, path = m.groups()
            mark = re.search(r"__mark__(\w+)-(begin|end)", path)
            if mark:
                current = mark.group(1) if mark.group(2) == "begin" else None
                continue
            if current and path.startswith(out_prefix):
                kind = "LIST" if "list-type" in path else method
                counts.setdefault(current, Counter())[kind] += 1
        self.log.write_text("")  # the next run starts a new count
        return {k: dict(v) for k, v in counts.items()}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def _measure(uri: str, endpoint: str | None, done: int, new: int, compact: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "_corpus_measure.py"), "--out", uri]
    cmd += ["--done", str(done), "--new", str(new)]
    cmd += ["--endpoint", endpoint] if endpoint else []
    cmd += ["--compact"] if compact else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(store: str, n: int, phase: str, m: dict, requests: dict | None) -> dict[str, Any]:
    steps = [s for s in (*STEPS, "compact") if s in m]
    total = {k: sum(m[s][k] for s in steps) for k in m[steps[0]] if k != "seconds"}
    row: dict[str, Any] = {"store": store, "done": n, "run": phase}
    for s in STEPS:
        row[f"{s}_s"] = m[s]["seconds"] if s in m else None
    row["bookkeeping_s"] = sum(m[s]["seconds"] for s in steps)
    row["peak_rss_mb"] = m["peak_rss_bytes"] / 2**20
    row["imports_rss_mb"] = m.get("imports_rss_bytes", 0) / 2**20
    row["read_mb"] = total["bytes_read"] / 2**20
    row["objects_read"] = total["objects_read"]
    row["written_mb"] = total["bytes_written"] / 2**20
    row["objects_written"] = total["objects_written"]
    row["objects_deleted"] = total["objects_deleted"]
    row["new_images"] = m.get("labelled", {}).get("images", 0)
    row["files_after"] = m["files_after"]
    if requests is not None:
        per = Counter()
        for s in steps:
            per.update(requests.get(s, {}))
        row["requests"] = sum(per.values())
        row["requests_by_kind"] = dict(per)
    return row


def run_store(
    store: str, sizes: list[int], new: int, work: Path, moto: Moto | None, steady: bool = False
) -> list:
    rows = []
    for n in sizes:
        if moto is not None:
            bucket = f"corpus-{n}-{int(time.time())}"
            moto.bucket(bucket)
            uri, endpoint = f"s3://{bucket}/out", moto.url
        else:
            uri, endpoint = str(work / f"out-{n}"), None
        out: Location = resolve(uri, s3_endpoint=endpoint)
        t0 = time.perf_counter()
        per_part = COMPACT_ROWS if steady else PER_PART
        parts = generate(out, listing_of(n), 0, n, threads=32 if moto else 4, per_part=per_part)
        print(f"[{store}] N={n}: {parts} parts generated in {time.perf_counter() - t0:.0f} s")
        if moto:
            moto.requests("/")  # generation's requests are not counted
        done = n
        phases = [("first", False), ("compact", True)]
        if steady:  # parts as compaction leaves them; index and shards built, not measured
            _measure(uri, endpoint, done, 0, True)
            phases = []
        for phase, compact in [*phases, ("nightly", False), ("nightly", False)]:
            m = _measure(uri, endpoint, done, new, compact)
            req = moto.requests(f"/{uri.split('/')[2]}") if moto else None
            row = _row(store, done, phase, m, req)
            rows.append(row)
            print(json.dumps(row), flush=True)
            done += 0 if compact else new
        if moto is None:
            shutil.rmtree(work / f"out-{n}", ignore_errors=True)
        else:
            out.fs.delete_dir_contents(out.path, missing_dir_ok=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="N done, comma-separated")
    ap.add_argument("--new", type=int, default=1000, help="new images per rerun")
    ap.add_argument("--stores", default="local,s3", help="local, s3 (moto) or both")
    ap.add_argument("--s3-sizes", default=None, help="N for S3 (default: --sizes)")
    ap.add_argument("--quick", action="store_true", help="N = 2,000 and 100 new: a smoke run")
    ap.add_argument(
        "--steady", action="store_true",
        help="start from OUT as compaction leaves it (parts of COMPACT_ROWS images, index and "
        "shards built unmeasured) and measure the nightly reruns only",
    )  # fmt: skip
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out-dir", default=None, help="where to write corpus_scale*.json")
    ap.add_argument("--name", default=None, help="result name (default corpus_scale[_quick])")
    args = ap.parse_args(argv)
    sizes = [2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    s3_sizes = (
        sizes if args.s3_sizes is None or args.quick else [int(s) for s in args.s3_sizes.split(",")]
    )
    new = 100 if args.quick else args.new
    work = Path(args.work or tempfile.mkdtemp(prefix="corpus-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    started = loadavg()
    for store in args.stores.split(","):
        moto = Moto(work) if store == "s3" else None
        try:
            rows += run_store(store, s3_sizes if moto else sizes, new, work, moto, args.steady)
        finally:
            if moto:
                moto.stop()
    columns = ["store", "done", "run", *(f"{s}_s" for s in STEPS), "bookkeeping_s",
               "peak_rss_mb", "read_mb", "written_mb", "objects_read", "objects_written",
               "requests"]  # fmt: skip
    print(table(rows, columns))
    payload = {"new_per_run": new, "rows": rows, "machine": {"loadavg_start": started}}
    name = args.name or ("corpus_scale_quick" if args.quick else "corpus_scale")
    print("wrote", save_result(name, payload, args.out_dir))
    return payload


if __name__ == "__main__":
    main()
