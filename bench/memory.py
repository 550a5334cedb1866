"""Peak memory of the driver and of each Ray worker for N and factor*N images.

Each size runs ``refseg.pipeline.job.run_label`` (what ``refseg label`` calls) in a fresh child
process with its own local Ray, the ``tiny`` preset and random weights. While the job runs,
a thread in the driver reads ``VmHWM`` (peak resident set) from ``/proc/<pid>/status`` of
every process under it (raylet, GCS, task workers, the two model actors) every 0.2 s and
keeps the largest value per process; the driver's own ``VmHWM`` is read at the end. RSS
counts the pages of Ray's shared-memory object store that a process has touched.

Streaming means the peak does not grow with the number of images: target ratio <= 1.1
for the driver and for every worker role.

    python bench/memory.py                    # N = 8 and 80 images of 480x640
    python bench/memory.py --n 4 --factor 10 --image-size 240x320
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import _common

TARGET_RATIO = 1.1
ROLES = ("driver", "proposal actor", "match actor", "task workers", "ray system")


def _status_kib(pid: int, key: str, file: str = "status") -> int | None:
    """The kB value of ``key`` in ``/proc/<pid>/<file>`` (``status``, ``smaps_rollup``)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (psutil when installed, else /proc's ppid fields)."""
    try:
        import psutil

        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:
        return []
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                parents[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        out += kids
        frontier = kids
    return out


def role_of(titles: set[str]) -> str:
    """Classify a process from every command line (Ray process title) it showed."""
    text = " ".join(titles)
    if "ProposalStage" in text:
        return "proposal actor"
    if "MatchStage" in text:
        return "match actor"
    if "ray::" in text or "default_worker.py" in text:
        return "task workers"
    return "ray system"


class PeakSampler(threading.Thread):
    """Polls VmHWM of every descendant of this process until ``stop()``."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kib: dict[int, int] = {}
        self.titles: dict[int, set[str]] = {}
        self._stop_event = threading.Event()

    def sample(self) -> None:
        for pid in _descendants(os.getpid()):
            hwm = _status_kib(pid, "VmHWM")
            if hwm is None:
                continue
            self.peak_kib[pid] = max(hwm, self.peak_kib.get(pid, 0))
            title = _cmdline(pid)
            if title:
                self.titles.setdefault(pid, set()).add(title[:200])

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()

    def by_role(self) -> dict[str, dict[str, Any]]:
        roles: dict[str, list[int]] = {}
        for pid, kib in self.peak_kib.items():
            roles.setdefault(role_of(self.titles.get(pid, set())), []).append(kib)
        return {r: {"processes": len(v), "peak_mib": max(v) / 1024} for r, v in roles.items()}


def child(images: str, bank: str, out: str, cpus: int) -> dict[str, Any]:
    """One labelling run under a sampler; returns peaks per role (MiB)."""
    warnings.simplefilter("ignore")
    import ray
    from refseg.core.config import get_preset, replace
    from refseg.pipeline.dataflow.sources import ImageSource
    from refseg.pipeline.job import LabelJob, run_label

    preset = get_preset("tiny")
    model = replace(preset.model, random_weights=True)
    sampler = PeakSampler()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    sampler.start()
    job = LabelJob(bank, ImageSource(images), out, model, preset.method, preset="tiny")
    summary = run_label(job)
    sampler.stop()
    roles = sampler.by_role()
    roles["driver"] = {"processes": 1, "peak_mib": (_status_kib(os.getpid(), "VmHWM") or 0) / 1024}
    ray.shutdown()
    return {"images": summary.images, "seconds": summary.seconds, "roles": roles}


def _link_images(src: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for p in src:
        target = dest / p.name
        if not target.exists():
            try:
                os.link(p, target)
            except OSError:
                target.write_bytes(p.read_bytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=8, help="images of the small run")
    p.add_argument("--factor", type=int, default=10, help="the large run has factor*N images")
    p.add_argument("--image-size", default="480x640", help="image HxW")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of local Ray")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    p.add_argument(
        "--child", nargs=4, metavar=("IMAGES", "BANK", "OUT", "RESULT"), help=argparse.SUPPRESS
    )
    args = p.parse_args(argv)
    if args.child:
        images, bank, out, result = args.child
        Path(result).write_text(json.dumps(child(images, bank, out, args.cpus)))
        return 0

    from refseg.core.config import get_preset, replace

    hw = tuple(int(v) for v in args.image_size.lower().split("x"))
    preset = get_preset("tiny")
    machine = _common.machine_info()
    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        all_images = _common.write_images(root / "all", args.n * args.factor, hw)  # type: ignore[arg-type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bank = _common.tiny_bank(
                root / "bank.safetensors", replace(preset.model, random_weights=True), preset.method
            )
        for n in (args.n, args.n * args.factor):
            _link_images(all_images[:n], root / f"images_{n}")
            result = root / f"result_{n}.json"
            cmd = [sys.executable, __file__, "--cpus", str(args.cpus), "--child"]
            cmd += [str(root / f"images_{n}"), str(bank), str(root / f"out_{n}"), str(result)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            runs[n] = json.loads(result.read_text())
            print(f"  {n} images: {time.perf_counter() - t0:.1f} s", flush=True)
    small, large = runs[args.n], runs[args.n * args.factor]
    rows = []
    for role in ROLES:
        a, b = small["roles"].get(role), large["roles"].get(role)
        if not a or not b:
            continue
        rows.append(
            {
                "role": role,
                "processes": f"{a['processes']}/{b['processes']}",
                f"peak_mib_{args.n}": a["peak_mib"],
                f"peak_mib_{args.n * args.factor}": b["peak_mib"],
                "ratio": b["peak_mib"] / a["peak_mib"],
            }
        )
    print(_common.table(rows))
    worst = max(r["ratio"] for r in rows)
    print(f"\nhighest ratio {worst:.3f} (target <= {TARGET_RATIO}); load {_common.loadavg()}")
    return _common.finish(
        __file__,
        "memory",
        {
            "target_ratio": TARGET_RATIO,
            "image_hw": hw,
            "cpus": args.cpus,
            "runs": runs,
            "rows": rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
