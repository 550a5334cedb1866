"""SAM2's mask decoder at the paper's setting: SAM2's own call against refseg's fast path.

One image embedding per model (a synthetic image through the model's own encoder, float32)
and the paper's 32 x 32 point grid (1024 prompts), decoded by four variants through
``refseg.core.proposals.Sam2Proposer``:

  stock-fp32   SAM2's ``sam_mask_decoder(..., repeat_image=True)``, prompt batch 256 (the paper)
  fast-fp32    refseg.core.decoder.SharedImageDecoder (the default), automatic prompt batch
  stock-bf16   SAM2's call under bf16 autocast
  fast-bf16    the fast path in bf16 (``--autocast-bf16``)

Per variant: ms per prompt (median over ``--repeats`` passes over all prompts, the variants
alternating within each pass), GFLOP per prompt (``torch.utils.flop_counter``; the fast
path's once-per-image work shared over the prompts), peak memory of one decoder call
(CUDA: max allocated; CPU: peak RSS over the call in a fresh process, Linux
``clear_refs``), and against
stock-fp32 on every prompt: max abs logit difference, max IoU difference, the same
best-of-three choice (prompts whose top two IoUs lie within 1e-5 left out), the same
proposals kept by the 0.4 IoU filter (IoUs within 1e-5 of it left out), and for bf16 the
mask-IoU pairing of the kept proposals (recall, precision, mean IoU, as bench/gpu.py does
for instances). ``--batches`` adds a sweep of the fast path's prompt batch.

    python bench/decoder.py                          # Hiera-T and Hiera-L at 1024, 1024 prompts
    python bench/decoder.py --batches 8 16 32 64 256 # plus the prompt-batch sweep
    python bench/decoder.py --end-to-end             # refseg label --preset ntt, 4 images
    python bench/decoder.py --smoke                  # the script's own check (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

VARIANTS = {  # name -> (decoder, bf16)
    "stock-fp32": ("stock", False),
    "fast-fp32": ("fast", False),
    "stock-bf16": ("stock", True),
    "fast-bf16": ("fast", True),
}
TIE = 1e-5
IOU_FILTER = 0.4


def _proposer(model: torch.nn.Module, name: str, batch: int = 0) -> Any:
    from refseg.core.config import MethodConfig
    from refseg.core.proposals import Sam2Proposer

    decoder, bf16 = VARIANTS[name]
    method = MethodConfig(decoder=decoder, autocast_bf16=bf16, prompt_batch=batch)
    return Sam2Proposer(model, method)


def _decode_all(proposer: Any, image: Any, points: torch.Tensor) -> Iterator[tuple]:
    """(start, logits (B, 3, h, w), iou (B, 3)) per prompt batch of ``proposer``."""
    step = proposer.prompt_batch(tuple(image.embed.shape[-2:]))
    for s in range(0, len(points), step):
        pts = points[s : s + step]
        labels = torch.ones(len(pts), 1, dtype=torch.int)
        yield (s, *proposer.decode(image, pts[:, None, :], labels))


def _run(proposer: Any, embed: tuple, points: torch.Tensor) -> None:
    image = proposer.prepare(*embed)
    for _ in _decode_all(proposer, image, points):
        pass
    if proposer.device.type == "cuda":
        torch.cuda.synchronize(proposer.device)


@contextlib.contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak bytes above the start of the block (CUDA allocator, or Linux peak RSS)."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["mib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        return
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    except OSError:
        yield out
        return

    def kib(key: str) -> int:
        line = next(ln for ln in status.read_text().splitlines() if ln.startswith(key))
        return int(line.split()[1])

    start = kib("VmRSS:")
    yield out
    out["mib"] = (kib("VmHWM:") - start) / 1024


def _flops_per_prompt(proposer: Any, embed: tuple, points: torch.Tensor, n: int) -> float:
    """GFLOP per prompt: the once-per-image work over ``len(points)``, plus one batch."""
    with FlopCounterMode(display=False) as prep:
        image = proposer.prepare(*embed)
    pts = points[:n]
    with FlopCounterMode(display=False) as dec:
        proposer.decode(image, pts[:, None, :], torch.ones(len(pts), 1, dtype=torch.int))
    total = prep.get_total_flops() / len(points) + dec.get_total_flops() / len(pts)
    return total / 1e9


def _pairing(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Greedy mask-IoU pairing of two sets of (N, h, w) bool masks (as bench/gpu.py)."""
    if not len(a) or not len(b):
        same = len(a) == len(b)
        return {"recall": float(same), "precision": float(same), "mean_iou": float(same)}
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    iou = (inter / (fa.sum(1)[:, None] + fb.sum(1)[None] - inter).clamp(min=1)).numpy()
    used, ious = np.zeros(len(b), bool), []
    for i in range(len(a)):
        cand = np.where(used, -1.0, iou[i])
        j = int(cand.argmax())
        if cand[j] >= 0.5:
            used[j] = True
            ious.append(float(cand[j]))
    return {
        "recall": len(ious) / len(a),
        "precision": len(ious) / len(b),
        "mean_iou": float(np.mean(ious)) if ious else 0.0,
    }


def _check(model: torch.nn.Module, embed: tuple, points: torch.Tensor, names: list[str]) -> dict:
    """Every variant against stock-fp32 on every prompt (batches of 64, outputs not kept)."""
    ref = _proposer(model, "stock-fp32", 64)
    others = {n: _proposer(model, n, 64) for n in names if n != "stock-fp32"}
    images = {n: p.prepare(*embed) for n, p in {"stock-fp32": ref, **others}.items()}
    stats = {n: {"dlogit": 0.0, "diou": 0.0, "best": [0, 0], "kept": [0, 0]} for n in others}
    masks: dict[str, list[torch.Tensor]] = {n: [] for n in ["stock-fp32", *others]}
    for s, low, iou in _decode_all(ref, images["stock-fp32"], points):
        best = iou.argmax(1)
        ar = torch.arange(len(best))
        top2 = iou.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > TIE
        keep = iou[ar, best] > IOU_FILTER
        far = (iou[ar, best] - IOU_FILTER).abs() > TIE
        masks["stock-fp32"].append((low[ar, best][keep] > 0).cpu())
        pts = points[s : s + len(best)][:, None, :]
        for n, p in others.items():
            lo, io = p.decode(images[n], pts, torch.ones(len(pts), 1, dtype=torch.int))
            st = stats[n]
            st["dlogit"] = max(st["dlogit"], float((lo - low).abs().max()))
            st["diou"] = max(st["diou"], float((io - iou).abs().max()))
            b = io.argmax(1)
            st["best"][0] += int((b == best)[clear].sum())
            st["best"][1] += int(clear.sum())
            k = io[ar, b] > IOU_FILTER
            st["kept"][0] += int((k == keep)[far].sum())
            st["kept"][1] += int(far.sum())
            masks[n].append((lo[ar, b][k] > 0).cpu())
    ref_masks = torch.cat(masks["stock-fp32"])
    out = {}
    for n, st in stats.items():
        out[n] = {
            "max_abs_logit_diff": st["dlogit"],
            "max_iou_diff": st["diou"],
            "same_best_of_3": st["best"][0] / max(st["best"][1], 1),
            "same_kept": st["kept"][0] / max(st["kept"][1], 1),
            **_pairing(ref_masks, torch.cat(masks[n])),
        }
    return out


def _embedding(config: str, size: int, device: str) -> tuple[torch.nn.Module, tuple]:
    from refseg.core.config import MethodConfig, ModelConfig
    from refseg.core.factory import build_proposer

    model_cfg = ModelConfig(
        sam2_config=config, sam2_image_size=size, random_weights=True, device=device
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposer = build_proposer(model_cfg, MethodConfig())
    img = _common.synthetic_image(np.random.default_rng(0), (size, size))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    embed, high_res = proposer.encode(x)
    return proposer.model, (embed, high_res)


def _peak(config: str, name: str, batch: int, args: argparse.Namespace) -> float | str:
    """MiB of one decoder call of ``batch`` prompts. On CPU in a fresh process whose
    allocator returns every large block (``MALLOC_MMAP_THRESHOLD_``), so that the peak RSS
    is the call's own; on CUDA from the allocator's peak."""
    if args.device != "cpu":
        model, embed = _embedding(config, args.size, args.device)
        points = _grid(args)
        p = _proposer(model, name, batch)
        _run(p, embed, points[:2])
        with _peak_memory(p.device) as mem:
            _run(p, embed, points[:batch])
        return mem.get("mib", "")
    cmd = [sys.executable, __file__, "--peak-of", config, name, str(batch), "--size",
           str(args.size), "--points-per-side", str(args.points_per_side)]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _peak_child(args: argparse.Namespace) -> int:
    config, name, batch = args.peak_of[0], args.peak_of[1], int(args.peak_of[2])
    model, embed = _embedding(config, args.size, "cpu")
    points = _grid(args)
    p = _proposer(model, name, batch)
    _run(p, embed, points[:2])  # builds the bf16 copy and warms up
    with _peak_memory(p.device) as mem:
        _run(p, embed, points[:batch])
    print(mem.get("mib", float("nan")))
    return 0


def _grid(args: argparse.Namespace) -> torch.Tensor:
    from refseg.core import ops

    return ops.point_grid(args.points_per_side, args.size, args.size)


def bench_model(config: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from refseg.core import ops

    model, embed = _embedding(config, args.size, args.device)
    points = ops.point_grid(args.points_per_side, args.size, args.size)
    names = list(args.variants)
    print(
        f"{config}: {len(points)} prompts at {args.size}; checking against stock-fp32", flush=True
    )
    check = _check(model, embed, points, names)
    rows = {n: {"config": config, "variant": n} for n in names}
    for n in names:
        p = _proposer(model, n)
        rows[n]["prompt_batch"] = p.prompt_batch(tuple(embed[0].shape[-2:]))
        rows[n]["gflop_per_prompt"] = _flops_per_prompt(p, embed, points, min(64, len(points)))
        rows[n]["peak_mib_per_call"] = _peak(config, n, rows[n]["prompt_batch"], args)
        rows[n].update(check.get(n, {}))
    runs: dict[str, list[float]] = {n: [] for n in names}
    proposers = {n: _proposer(model, n) for n in names}
    for n in names:  # warm-up
        _run(proposers[n], embed, points[:32])
    for r in range(args.repeats):
        for n in names if r % 2 == 0 else names[::-1]:  # alternate, and swap the order
            t0 = time.perf_counter()
            _run(proposers[n], embed, points)
            runs[n].append(1e3 * (time.perf_counter() - t0) / len(points))
            print(f"  repeat {r}: {n} {runs[n][-1]:.1f} ms/prompt", flush=True)
    base_ms = statistics.median(runs["stock-fp32"]) if "stock-fp32" in runs else None
    base_fl = rows.get("stock-fp32", {}).get("gflop_per_prompt")
    for n in names:
        ms = statistics.median(runs[n])
        rows[n]["ms_per_prompt"] = ms
        rows[n]["runs_ms"] = runs[n]
        rows[n]["speedup_vs_stock_fp32"] = base_ms / ms if base_ms else ""
        rows[n]["flop_ratio_vs_stock_fp32"] = (
            base_fl / rows[n]["gflop_per_prompt"] if base_fl else ""
        )
    return list(rows.values())


def batch_sweep(config: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    from refseg.core import ops

    model, embed = _embedding(config, args.size, args.device)
    points = ops.point_grid(args.points_per_side, args.size, args.size)[: max(args.batches)]
    runs: dict[int, list[float]] = {b: [] for b in args.batches}
    proposers = {b: _proposer(model, "fast-fp32", b) for b in args.batches}
    _run(proposers[args.batches[0]], embed, points[:16])
    for r in range(args.repeats):
        for b in args.batches if r % 2 == 0 else args.batches[::-1]:
            t0 = time.perf_counter()
            _run(proposers[b], embed, points)
            runs[b].append(1e3 * (time.perf_counter() - t0) / len(points))
    return [
        {"config": config, "variant": "fast-fp32", "prompt_batch": b,
         "ms_per_prompt": statistics.median(v), "runs_ms": v}
        for b, v in runs.items()
    ]  # fmt: skip


COLUMNS = [
    "config", "variant", "prompt_batch", "ms_per_prompt", "speedup_vs_stock_fp32",
    "gflop_per_prompt", "flop_ratio_vs_stock_fp32", "peak_mib_per_call", "max_abs_logit_diff",
    "max_iou_diff", "same_best_of_3", "same_kept", "recall", "precision", "mean_iou",
]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["sam2_hiera_t", "sam2_hiera_l"])
    p.add_argument("--size", type=int, default=1024, help="SAM2 input side")
    p.add_argument("--device", default="cpu", help="cpu or cuda (TF32 matmuls stay off)")
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all prompts")
    p.add_argument("--batches", type=int, nargs="*", default=[], help="fast-path batch sweep")
    p.add_argument("--end-to-end", action="store_true", help="refseg label runs instead")
    p.add_argument("--images", type=int, default=4, help="--end-to-end: target images")
    p.add_argument("--rounds", type=int, default=1, help="--end-to-end: alternating rounds")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the script's own check")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    p.add_argument("--peak-of", nargs=3, help=argparse.SUPPRESS)  # CONFIG VARIANT BATCH
    args = p.parse_args(argv)
    if args.peak_of:
        return _peak_child(args)
    if args.end_to_end:
        from _label_runs import end_to_end

        return end_to_end(args, argv)
    if args.smoke:
        args.configs, args.size, args.points_per_side, args.repeats = ["sam2.1_hiera_t"], 256, 4, 1
        args.batches = args.batches and [4, 16]
    machine = _common.machine_info()
    rows = [r for c in args.configs for r in bench_model(c, args)]
    print(_common.table(rows, COLUMNS))
    sweep = []
    if args.batches:
        sweep = batch_sweep(args.configs[0], args)
        print("\nfast-fp32 prompt batch sweep:")
        print(_common.table(sweep, ["config", "prompt_batch", "ms_per_prompt"]))
    name = "decoder_smoke" if args.smoke else "decoder"
    payload = {"rows": rows, "batch_sweep": sweep, "machine": machine, "size": args.size}
    return _common.finish(__file__, name, payload, argv, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
