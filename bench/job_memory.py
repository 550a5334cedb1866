"""The whole job's memory (issue 18 item 4, 5): `refseg label` as a user runs it, PSS summed.

Runs ``refseg build-memory`` then ``refseg label`` (the CLI, a child process with its own
local Ray) at the ``ntt`` preset with random weights and ``--nms-iou 1.0`` (every proposal
survives NMS, as many distinct objects do with real weights). While the label command
runs, this process reads the proportional set size (``Pss`` of ``/proc/<pid>/smaps_rollup``)
of the command and of every process under it (GCS, raylet, Ray's task workers, the SAM2
and DINOv2 actors) every ``--interval`` seconds. PSS shares each shared page (the object
store, libraries) among the processes that map it, so the sum is the job's real footprint,
with nothing counted twice. Reported: the largest sum seen, each role's largest PSS, the
images labelled, error rows and seconds.

Cases (``--cases``):

* ``six``: the six first images of the bundled sample data (``refseg demo``'s, 144 x 192);
* ``48mp``: one synthetic 6000 x 8000 JPEG (issue 18 item 5: labelled, no error row).

    python bench/job_memory.py                       # both cases
    python bench/job_memory.py --cases six --torch-threads 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common
from memory import _cmdline, _descendants, _status_kib, role_of

REFSEG = [sys.executable, "-m", "refseg"]
PAPER_GIB = 11.0  # the paper's code, one process, same six images (issue 18 item 4)


class PssSampler(threading.Thread):
    """Sums PSS over ``root`` and its descendants every ``interval`` seconds."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_sum_kib = 0
        self.peak_kib: dict[int, int] = {}
        self.titles: dict[int, set[str]] = {}
        self.samples = 0
        self._stop_event = threading.Event()

    def sample(self) -> None:
        total = 0
        for pid in [self.root, *_descendants(self.root)]:
            kib = _status_kib(pid, "Pss", "smaps_rollup")
            if kib is None:
                continue
            total += kib
            self.peak_kib[pid] = max(kib, self.peak_kib.get(pid, 0))
            if title := _cmdline(pid)[:200]:
                self.titles.setdefault(pid, set()).add(title)
        self.peak_sum_kib = max(self.peak_sum_kib, total)
        self.samples += 1

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def by_role(self) -> dict[str, dict[str, Any]]:
        roles: dict[str, list[int]] = {}
        for pid, kib in self.peak_kib.items():
            role = "driver" if pid == self.root else role_of(self.titles.get(pid, set()))
            roles.setdefault(role, []).append(kib)
        return {
            r: {
                "processes": len(v),
                "peak_pss_mib": max(v) / 1024,
                "sum_of_peaks_mib": sum(v) / 1024,
            }
            for r, v in roles.items()
        }


def _run(cmd: list[str], interval: float, log: Path) -> tuple[int, float, PssSampler]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = PssSampler(proc.pid, interval)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    return rc, time.perf_counter() - t0, sampler


def _rows_of(out: Path) -> tuple[int, list[str]]:
    import pyarrow.parquet as pq

    parts = sorted((out / "images").glob("part-*.parquet"))
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    return len(rows), [f"{r['image_uri']}: {r['error']}" for r in rows if r["status"] != "ok"]


def _case_images(case: str, root: Path, sample_images: Path) -> Path:
    folder = root / f"images_{case}"
    folder.mkdir(parents=True, exist_ok=True)
    if case == "six":
        for p in sorted(sample_images.iterdir())[:6]:
            (folder / p.name).write_bytes(p.read_bytes())
    elif case == "48mp":
        _common.write_images(folder, 1, (6000, 8000))
    else:
        raise SystemExit(f"unknown case {case!r}: six or 48mp")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["six", "48mp"])
    p.add_argument("--preset", default="ntt")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="local Ray CPUs")
    p.add_argument("--extra", default="", help="more `refseg label` flags, one string")
    p.add_argument("--name", default="job_memory")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)

    from refseg.jobs.sample_data import make_sample_data

    machine = _common.machine_info()
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_sample_data(root / "sample", n_images=6)
        bank = root / "bank.safetensors"
        common = ["--preset", args.preset, "--random-weights"]
        build = [*REFSEG, "build-memory", "--references", str(data.references), "--images"]
        build += [str(data.references_dir), "--out", str(bank), *common]
        subprocess.run(build, check=True)
        for case in args.cases:
            images = _case_images(case, root, data.images)
            out = root / f"out_{case}"
            cmd = [*REFSEG, "label", "--memory", str(bank), "--images", str(images)]
            cmd += ["--out", str(out), *common, "--nms-iou", "1.0"]
            cmd += ["--num-cpus", str(args.num_cpus), *args.extra.split()]
            rc, seconds, sampler = _run(cmd, args.interval, root / f"{case}.log")
            n_rows, errors = _rows_of(out) if out.exists() else (0, [])
            tail = (root / f"{case}.log").read_text()[-3000:]
            runs[case] = {
                "command": " ".join(cmd[2:]),
                "returncode": rc,
                "seconds": seconds,
                "samples": sampler.samples,
                "roles": sampler.by_role(),
                "log_tail": tail if rc else "",
            }
            rows.append(
                {
                    "case": case,
                    "rc": rc,
                    "rows": n_rows,
                    "error_rows": len(errors),
                    "seconds": seconds,
                    "peak_pss_sum_gib": sampler.peak_sum_kib / 2**20,
                    "paper_gib": PAPER_GIB if case == "six" else None,
                }
            )
            runs[case]["errors"] = errors
            print(f"{case}: rc {rc}, {seconds:.0f} s, errors {errors}", flush=True)
            print(_common.table([rows[-1]]), flush=True)
            if rc:
                print(tail, file=sys.stderr)
            payload = {"rows": rows, "runs": runs, "machine": machine, "partial": True}
            _common.save_result(args.name, payload, args.out_dir)  # each case as it ends
    print(_common.table(rows))
    for case, run in runs.items():
        print(f"\n{case}: peak PSS per role (MiB)")
        role_rows = [{"role": r, **v} for r, v in sorted(run["roles"].items())]
        print(_common.table(role_rows))
    print(f"\nload {_common.loadavg()}")
    return _common.finish(
        __file__,
        args.name,
        {"rows": rows, "runs": runs, "machine": machine, "partial": False},
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
