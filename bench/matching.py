"""Matching at the paper's sizes on CPU: soft merging at full resolution against at 256².

``Matcher.match`` (method.md §4.2-§4.7) runs on the same proposals and features twice:

* ``full``: the paper's order: every NMS survivor is upsampled to the image size, soft
  merging measures IoS on those full-resolution masks, then the top 100 are kept.
* ``lowres`` (``MethodConfig.merge_resolution="lowres"``): soft merging measures IoS on
  the 256x256 masks; only the kept top 100 are upsampled.

Inputs (``--preset ntt``): DINOv2 ViT-L/14 features at 518 (random weights, on a
synthetic image) and a bank of ``--classes`` one-shot classes built by the same encoder;
``--proposals`` random ellipse logits at 256x256 with SAM-like predicted IoUs. For each
original image size the script reports ms per image (median of ``--repeats``), the peak
growth of this process's resident memory during the call (sampled every 2 ms), and how far
``lowres`` is from ``full``: the share of instances (category and full-resolution mask)
both keep and the largest score difference among them.

    python bench/matching.py                                   # 480x640 and 1024x1365
    python bench/matching.py --sizes 2048x2730 --proposals 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import _common
import numpy as np
import torch
from refseg.core.config import get_preset, replace
from refseg.core.factory import build_encoder
from refseg.core.imaging import prepare_target
from refseg.core.instances import Instances
from refseg.core.matching import Matcher
from refseg.core.proposals import Proposals
from refseg.core.tensors import stack_targets


def random_logits(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """(n, size, size) ellipse logits (positive inside), 1-40 % of the image each."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    c = torch.rand(n, 2, generator=g) * size
    r = (0.05 + torch.rand(n, 2, generator=g) * 0.3) * size
    dy = (yy[None] - c[:, 0, None, None]) / r[:, 0, None, None]
    dx = (xx[None] - c[:, 1, None, None]) / r[:, 1, None, None]
    return 4 * (1 - dy**2 - dx**2)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_growth(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), peak RSS growth in MiB while it ran), RSS sampled every 2 ms."""
    base = peak = _rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        done.set()
        t.join()
    return out, (max(peak, _rss()) - base) / 2**20


def agreement(full: Instances, low: Instances) -> dict[str, float]:
    def keys(inst: Instances) -> dict[tuple[int, str], float]:  # equal RLEs: equal masks
        return {
            (int(inst.category_ids[k]), str(inst.rles[k]["counts"])): float(inst.scores[k])
            for k in range(len(inst))
        }

    a, b = keys(full), keys(low)
    both = set(a) & set(b)
    return {
        "same_instances": len(both) / max(len(a), 1),
        "max_score_diff": max((abs(a[k] - b[k]) for k in both), default=0.0),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["480x640", "1024x1365"], help="image HxW")
    p.add_argument("--proposals", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--classes", type=int, default=10, help="one-shot classes in the bank")
    p.add_argument("--preset", default="ntt", help="ntt (the paper's sizes) or tiny (smoke)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    model = replace(preset.model, random_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = build_encoder(model, preset.method)
        bank = _common.synthetic_bank(encoder, args.classes)
    rng = np.random.default_rng(1)
    image = _common.synthetic_image(rng, (480, 640))
    target = prepare_target(image, model.sam2_image_size, preset.method.resize)
    full_m = Matcher(encoder, bank, preset.method)
    low_m = Matcher(encoder, bank, dataclasses.replace(preset.method, merge_resolution="lowres"))
    feats = full_m.target_features(stack_targets([target]))[0]
    machine = _common.machine_info()
    rows = []
    for n in args.proposals:
        logits = random_logits(n, model.sam2_image_size // 4)  # SAM2's low-res mask size
        iou = 0.4 + 0.6 * torch.rand(n, generator=torch.Generator().manual_seed(n))
        for size in args.sizes:
            hw = tuple(int(v) for v in size.lower().split("x"))
            s = model.sam2_image_size
            props = Proposals(logits, iou, torch.zeros(n, 2), s, (s, s), hw)  # type: ignore[arg-type]
            row: dict[str, Any] = {"proposals": n, "image_hw": size}
            results = {}
            for name, matcher in (("full", full_m), ("lowres", low_m)):
                results[name], mib = peak_growth(lambda m=matcher, p=props: m.match(p, feats))
                t = _common.timed(lambda m=matcher, p=props: m.match(p, feats), args.repeats)
                row[f"{name}_ms"] = t["median"] * 1e3
                row[f"{name}_peak_mib"] = mib
            row["speed-up"] = row["full_ms"] / row["lowres_ms"]
            row["instances"] = len(results["full"])
            row.update(agreement(results["full"], results["lowres"]))
            rows.append(row)
            print(f"  {n} proposals, {size}: done", flush=True)
    print(_common.table(rows))
    print(f"\nload {_common.loadavg()}; torch threads {torch.get_num_threads()}")
    return _common.finish(
        __file__,
        "matching",
        {
            "classes": args.classes,
            "preset": args.preset,
            "rows": rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
