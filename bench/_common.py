"""Helpers shared by the benchmark scripts: machine facts, tables, JSON results, data.

Every script runs as ``python bench/<name>.py`` from a clean clone: this module puts the
repository root on ``sys.path`` so that ``refseg.core``, ``pipeline`` and ``jobs`` import
without an install.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402

__all__ = [
    "ROOT",
    "RESULTS",
    "loadavg",
    "machine_info",
    "timed",
    "table",
    "save_result",
    "synthetic_image",
    "write_images",
    "synthetic_bank",
    "tiny_bank",
]


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (``/proc/loadavg``); empty where unavailable."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def _cpu_flags() -> list[str]:
    """The CPU flags that decide bf16 and fp32 matmul speed (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in _ISA_FLAGS if f in have]


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info() -> dict[str, Any]:
    """What the figures came from: CPU, cores, memory, GPU, versions, date, load."""
    import torch

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_start": loadavg(),
    }
    try:  # psutil is not a dependency: read /proc/meminfo (Linux)
        kib = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
        info["memory_gib"] = round(int(kib) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Wall seconds of ``fn()``: median, min and all runs after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median": statistics.median(runs), "min": min(runs), "runs": runs}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts), in ``columns`` order (default: first row's keys)."""
    if not rows:
        return "(no rows)"
    cols = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def finish(
    script: str,
    name: str,
    payload: dict[str, Any],
    argv: Sequence[str] | None,
    out_dir: str | Path | None,
) -> int:
    """A script's last step: record the command that reproduces it, save, say where."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", f"bench/{Path(script).name}", *args])
    path = save_result(name, {"command": command, **payload}, out_dir)
    print(f"wrote {path}")
    return 0


def save_result(name: str, payload: dict[str, Any], out_dir: str | Path | None = None) -> Path:
    """Write ``payload`` plus the machine's load at the end to ``<out_dir>/<name>.json``."""
    folder = Path(out_dir) if out_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    payload.setdefault("machine", {})["loadavg_end"] = loadavg()
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def synthetic_image(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a colour gradient with a few filled ellipses and rectangles.

    Photo-like enough that JPEG sizes and decode times are realistic (noise is not).
    """
    from PIL import Image, ImageDraw

    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (xx / max(w - 1, 1) + yy / max(h - 1, 1))[..., None] / 2
    base = (c0 * (1 - t) + c1 * t).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        x1, y1 = x0 + rng.uniform(w * 0.05, w * 0.4), y0 + rng.uniform(h * 0.05, h * 0.4)
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    return np.asarray(img)


def write_images(
    folder: Path, n: int, hw: tuple[int, int] = (480, 640), *, seed: int = 0
) -> list[Path]:
    """``n`` synthetic JPEGs (quality 90) named ``img_00000.jpg``...; image i depends on i."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.jpg"
        if not p.exists():
            arr = synthetic_image(np.random.default_rng((seed, i)), hw)
            Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def synthetic_bank(encoder: Any, n_classes: int = 2) -> Any:
    """A ``MemoryBank`` of ``n_classes`` one-shot classes, each from a synthetic image."""
    from refseg.core.memory_bank import MemoryBank, ShotRecord, encode_shot

    rng = np.random.default_rng(0)
    bank = MemoryBank(encoder=encoder.name, image_size=encoder.image_size)
    for c in range(n_classes):
        img = synthetic_image(rng, (240, 320))
        mask = np.zeros((240, 320), bool)
        mask[40 + c % 10 * 5 : 160, 60 : 220 - c % 10 * 5] = True
        ys, xs = np.nonzero(mask)
        box = (float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1))
        rec = ShotRecord(category_id=c + 1, image_id=c + 1, annotation_id=c + 1)
        bank.add(rec, encode_shot(encoder, img, mask, box), f"class_{c + 1}")
    return bank


def tiny_bank(path: Path, model: Any, method: Any, n_classes: int = 2) -> Path:
    """``synthetic_bank`` with the encoder ``build_encoder`` gives for ``model``, saved.

    Built as ``tests/conftest.py`` builds its tiny bank (random weights are seeded, so the
    labelling run's encoder is the same one).
    """
    from refseg.core.factory import build_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = build_encoder(model, method)
    bank = synthetic_bank(enc, n_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    bank.save(str(path))
    return path
