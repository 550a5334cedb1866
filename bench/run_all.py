"""Run the CPU benchmarks one after another (``make bench``), then the GPU one on CUDA.

Each script runs in its own process with its default sizes (``--quick``: the smallest
sizes, a smoke run of a few minutes at most), prints its table and writes
``bench/results/<name>.json``. The load average before each is printed: timings taken on
a busy machine are not worth keeping.

    python bench/run_all.py
    python bench/run_all.py --quick --only pooling bank
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve().parent
QUICK = {
    "pooling": ["--grid", "16", "--dim", "384", "--mask-size", "64", "--n", "50", "--repeats", "1"],
    "bank": ["--classes", "1", "2", "--shots", "1", "2", "--image-size", "120x160"],
    "memory": ["--n", "2", "--factor", "4", "--image-size", "120x160"],
    "pipeline_overhead": ["--n", "6", "--image-size", "120x160"],
    "matching": ["--preset", "tiny", "--classes", "2", "--proposals", "50", "--sizes", "120x160"],
    "rematch": ["--n", "4", "--rounds", "1", "--image-size", "120x160", "--no-warmup"],
    "gpu": ["--images", "8", "--warmup", "2", "--bf16"],
}
CPU = ("pooling", "matching", "bank", "pipeline_overhead", "memory", "rematch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smallest sizes (smoke run)")
    p.add_argument("--only", nargs="+", choices=[*CPU, "gpu"], help="run these only")
    p.add_argument(
        "--out-dir",
        default=None,
        help="JSON folder (default bench/results; with --quick a new temporary folder, so that "
        "smoke figures never replace measured ones)",
    )
    args = p.parse_args(argv)
    out_dir = args.out_dir or (tempfile.mkdtemp(prefix="refseg-bench-") if args.quick else None)
    import torch

    names = list(args.only or CPU)
    if args.only is None and torch.cuda.is_available():
        names.append("gpu")
    elif args.only is None:
        print("no CUDA device: bench/gpu.py skipped (no GPU figure measured)")
    failed = []
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *(QUICK[name] if args.quick else [])]
        cmd += ["--out-dir", out_dir] if out_dir else []
        print(f"\n=== {name} (load {_common.loadavg()}): {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, check=False).returncode
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"\nresults in {out_dir or _common.RESULTS}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
