"""Matching at real photo sizes: today's dense path against the windowed one, side by side.

For each image size (0.3, 1, 12 and 48 MP), number of surviving proposals (100, 800) and
kind of proposal, one fresh process per path runs ``PooledMatcher`` once on the same
proposals and pooled features and reports the matching seconds (the call, RLE encoding of
the kept masks included) and the peak growth of its resident memory during the call:

* ``today``: ``PooledMatcher._match_pooled_dense`` (every survivor upsampled to the whole
  image, K x H x W bool, then RLE-encoded), the path before issue 18;
* ``new``: ``PooledMatcher.match_pooled`` (each mask inside its window, RLE one at a time).

Kinds: ``ellipse``, object-like proposals (random ellipses written as 256 x 256 low-res
logits, as real SAM2 weights give compact objects); ``speckle``, frame-filling speckled
masks, the worst case, as random SAM2 weights give: by default real proposals of a randomly
initialised SAM2 Hiera-T at 1024 with the paper's 32 x 32 grid (computed once, about a
minute), or synthetic speckles with ``--synthetic-speckles``. Survivors are exact: NMS at
IoU 1.0 keeps every proposal, and pooled features near a class prototype score > 0.

The two paths' outputs are compared (categories, boxes, RLE strings, scores within 1e-6).
``today`` is skipped where its estimated peak (K x H x W bytes and its float buffers)
exceeds ``--today-max-gib`` or 80 % of the memory available, and the estimate is recorded.

    python bench/large_images.py --quick          # 0.3 MP, 100 survivors (a smoke test)
    python bench/large_images.py                   # the full table (hours at 48 MP, speckled)
    python bench/large_images.py --sizes 3000x4000 --survivors 800 --kinds ellipse
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common

SIZES = ["480x640", "864x1152", "3000x4000", "6000x8000"]
DIM, CLASSES = 64, 3


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def today_estimate(hw: tuple[int, int], k: int, top: int = 100) -> int:
    """Bytes today's path holds at its peak: K + top bool masks, 16 float32 masks while
    upsampling, and the overlap count's float copy of k x 2**18 pixels."""
    px = hw[0] * hw[1]
    return (k + min(k, top)) * px + 16 * 4 * px + k * 2**18 * 4


# ------------------------------------------------------------------ one case, in a child


def _logits(kind: str, k: int, speckle_file: str | None) -> Any:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(k)
    if kind == "ellipse":
        yy, xx = torch.meshgrid(torch.arange(256) + 0.5, torch.arange(256) + 0.5, indexing="ij")
        c = torch.rand(k, 2, generator=g) * 256
        r = (0.02 + torch.rand(k, 2, generator=g) * 0.2) * 256
        out = torch.empty((k, 256, 256))
        for s in range(0, k, 64):  # bounded temporaries
            dy = (yy[None] - c[s : s + 64, 0, None, None]) / r[s : s + 64, 0, None, None]
            dx = (xx[None] - c[s : s + 64, 1, None, None]) / r[s : s + 64, 1, None, None]
            out[s : s + 64] = 4 * (1 - dy**2 - dx**2)
        return out
    if speckle_file:
        from refseg.core.transport import decode_proposals

        logits = decode_proposals(Path(speckle_file).read_bytes()).logits
        logits = logits[(logits > 0).flatten(1).any(dim=1)]
        if logits.shape[0] < k:
            raise SystemExit(f"the SAM2 proposals hold {logits.shape[0]} masks, {k} asked")
        return logits[:k].clone()
    base = torch.randn(k, 1, 32, 32, generator=g)
    up = F.interpolate(base, size=(256, 256), mode="bilinear")[:, 0]
    return up + 0.3 * torch.randn(k, 256, 256, generator=g)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Match one image once in this process; time, memory growth and an output signature."""
    import torch
    from refseg.core import rle as rle_ops
    from refseg.core.config import MethodConfig
    from refseg.core.matching import PooledMatcher
    from refseg.core.memory_bank import MemoryBank, ShotRecord
    from refseg.core.proposals import Proposals

    torch.set_num_threads(case["threads"])
    hw, k = tuple(case["hw"]), case["survivors"]
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(encoder="vits14", image_size=56)
    for c in range(CLASSES):
        bank.add(ShotRecord(c + 1, c, c), torch.randn(DIM, generator=g), f"class_{c + 1}")
    logits = _logits(case["kind"], k, case.get("speckle_file"))
    iou = 0.5 + 0.5 * torch.rand(k, generator=g)
    props = Proposals(logits, iou, torch.zeros(k, 2), 1024, (1024, 1024), hw)  # type: ignore[arg-type]
    protos = bank.class_prototypes()[torch.randint(CLASSES, (k,), generator=g)]
    pooled = 4 * protos + torch.randn(k, DIM, generator=g)
    method = MethodConfig(nms_iou=1.0, max_nms=k, merge_resolution=case["merge"])
    matcher = PooledMatcher(bank, method)
    if case["path"] == "today":

        def call() -> Any:
            return matcher._match_pooled_dense(props, pooled).with_rles(drop_masks=True)

    else:

        def call() -> Any:
            return matcher.match_pooled(props, pooled)

    # warm-up on a small image: imports (torchvision's NMS), the device check of the
    # windowed path; the timed call then pays only what each image pays
    small = Proposals(logits[:8], iou[:8], torch.zeros(8, 2), 1024, (1024, 1024), (64, 96))
    matcher._match_pooled_dense(small, pooled[:8])
    matcher.match_pooled(small, pooled[:8])
    base, peak, done = _rss(), [_rss()], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    inst = call()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    sampler.join()
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    top = max(peak[0], max_after if max_after > max_before else 0)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_growth_mib": (top - base) / 2**20,
        "rss_before_mib": base / 2**20,
        "survivors": k,
        "instances": [
            [
                int(inst.category_ids[i]),
                float(inst.scores[i]),
                [float(v) for v in inst.boxes[i]],
                hashlib.sha1(str(inst.rles[i]["counts"]).encode()).hexdigest(),
            ]
            for i in range(len(inst))
        ],
        "mask_area_share": float(rle_ops.rle_area(inst.rles).mean() / (hw[0] * hw[1]))
        if len(inst)
        else 0.0,
    }


# ------------------------------------------------------------------ the parent


def child(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--case", json.dumps(case)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {out.returncode}: {' '.join(tail)[:300]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_outputs(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """(same instances, boxes and masks in the same order; largest score difference)."""
    ia, ib = a["instances"], b["instances"]
    if len(ia) != len(ib):
        return False, float("inf")
    same = all(x[0] == y[0] and x[2] == y[2] and x[3] == y[3] for x, y in zip(ia, ib, strict=True))
    diff = max((abs(x[1] - y[1]) for x, y in zip(ia, ib, strict=True)), default=0.0)
    return same, diff


def sam2_speckles(folder: Path) -> Path:
    """Proposals of a randomly initialised SAM2 Hiera-T (the paper's 32 x 32 grid, 1024)."""
    import warnings

    import numpy as np
    from refseg.core.config import get_preset, replace
    from refseg.core.factory import build_proposer
    from refseg.core.imaging import prepare_target
    from refseg.core.tensors import stack_targets
    from refseg.core.transport import encode_proposals

    path = folder / "sam2_random_proposals.bin"
    preset = get_preset("ntt")
    model = replace(preset.model, random_weights=True, sam2_config="sam2_hiera_t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposer = build_proposer(model, preset.method)
    image = _common.synthetic_image(np.random.default_rng(0), (768, 1024))
    target = prepare_target(image, 1024, "square")
    props = proposer.propose(stack_targets([target]), [target.valid_hw], [(768, 1024)])[0]
    path.write_bytes(encode_proposals(props))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="0.3 MP, 100 survivors, synthetic")
    p.add_argument("--sizes", nargs="+", default=SIZES, help="image HxW")
    p.add_argument("--survivors", type=int, nargs="+", default=[100, 800])
    p.add_argument("--kinds", nargs="+", default=["ellipse", "speckle"])
    p.add_argument("--merge", default="full", choices=["full", "lowres"])
    p.add_argument("--paths", nargs="+", default=["today", "new"])
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds per case")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    p.add_argument("--today-max-gib", type=float, default=14.0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--synthetic-speckles", action="store_true")
    p.add_argument("--speckle-file", help="SAM2 proposals saved by an earlier run (transport)")
    p.add_argument("--name", default="large_images", help="result file name")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.quick:
        args.sizes, args.survivors, args.synthetic_speckles = ["480x640"], [100], True
    machine = _common.machine_info()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        speckle_file = args.speckle_file
        if "speckle" in args.kinds and not args.synthetic_speckles and not speckle_file:
            t0 = time.perf_counter()
            speckle_file = str(sam2_speckles(Path(tmp)))
            print(f"SAM2 random-weight proposals: {time.perf_counter() - t0:.0f} s", flush=True)
        for kind in args.kinds:
            for size in args.sizes:
                hw = [int(v) for v in size.lower().split("x")]
                for k in args.survivors:
                    rows.append(_measure(args, kind, hw, k, speckle_file))
                    partial = {"rows": rows, "partial": True, "machine": machine}
                    _common.save_result(args.name, partial, args.out_dir)  # kept if cut short
    print(_common.table(rows))
    print(f"\nload {_common.loadavg()}")
    payload = {"merge": args.merge, "threads": args.threads, "rows": rows, "machine": machine}
    return _common.finish(__file__, args.name, payload, argv, args.out_dir)


def _measure(args: Any, kind: str, hw: list[int], k: int, speckle_file: str | None) -> dict:
    case = {"kind": kind, "hw": hw, "survivors": k, "merge": args.merge, "threads": args.threads}
    if kind == "speckle" and speckle_file:
        case["speckle_file"] = speckle_file
    row: dict[str, Any] = {
        "kind": kind + ("" if kind == "ellipse" or speckle_file else " (synthetic)"),
        "mp": round(hw[0] * hw[1] / 1e6, 1),
        "image": f"{hw[0]}x{hw[1]}",
        "survivors": k,
    }
    est = today_estimate((hw[0], hw[1]), k)
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in args.paths}
    for _ in range(args.repeats):  # alternating: today, new, today, new...
        for path in args.paths:
            if path == "today" and est > min(args.today_max_gib * 2**30, 0.8 * _available()):
                runs[path].append({"error": f"skipped: needs ~{est / 2**30:.1f} GiB"})
                continue
            runs[path].append(child({**case, "path": path}, args.timeout))
    for path, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            row[f"{path}_s"] = results[0]["error"] if results else "not run"
            continue
        row[f"{path}_s"] = sorted(r["seconds"] for r in ok)[len(ok) // 2]
        row[f"{path}_cpu_s"] = sorted(r["cpu_seconds"] for r in ok)[len(ok) // 2]
        row[f"{path}_peak_mib"] = max(r["peak_growth_mib"] for r in ok)
    row["today_estimate_mib"] = est / 2**20
    good = {p: [r for r in rs if "error" not in r] for p, rs in runs.items()}
    if good.get("today") and good.get("new"):
        row["speed-up"] = row["today_s"] / row["new_s"]
        row["cpu_speed-up"] = row["today_cpu_s"] / row["new_cpu_s"]
        row["equal"], row["max_score_diff"] = same_outputs(good["today"][0], good["new"][0])
    if good.get("new"):
        row["instances"] = len(good["new"][0]["instances"])
        row["mean_mask_share"] = good["new"][0]["mask_area_share"]
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
