"""``bench/decoder.py --end-to-end``: ``refseg label --preset ntt`` with each decoder.

The paper's setting with Hiera-T (``--sam2-config sam2_hiera_t``, 1024 input, 32 x 32 grid)
and DINOv2 ViT-L/14 at 518, random weights, on the same synthetic 480 x 640 images: one
``refseg label`` process per variant and round, the variants alternating (and their order
swapped every round), each into its own OUT. Wall seconds per image include Ray's start and
the model builds; ``propose_s_per_image`` is the SAM2 stage's own time from run.json.
Instances are compared with the stock run's by the mask-IoU pairing of bench/gpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common
import numpy as np

E2E_VARIANTS = {  # name -> extra refseg label flags
    "stock": ["--decoder", "stock"],
    "fast": [],
    "fast-bf16": ["--autocast-bf16"],
}


@dataclass(frozen=True)
class _Found:
    """What ``_gpu_run.compare`` reads of an image's instances."""

    masks: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def _instances(out: Path, image_ids: list[int]) -> list[_Found]:
    from pycocotools import mask as mask_utils

    rows = json.loads((out / "coco_results.json").read_text())
    found = []
    for image_id in image_ids:
        mine = [r for r in rows if r["image_id"] == image_id]
        masks = [mask_utils.decode(r["segmentation"]).astype(bool) for r in mine]
        found.append(
            _Found(
                masks=np.stack(masks) if masks else np.zeros((0, 1, 1), bool),
                category_ids=np.array([r["category_id"] for r in mine]),
                scores=np.array([r["score"] for r in mine], dtype=np.float32),
            )
        )
    return found


def _label(variant: str, images: Path, bank: Path, out: Path) -> float:
    cmd = [
        sys.executable, "-m", "refseg", "label", "--preset", "ntt", "--sam2-config",
        "sam2_hiera_t", "--random-weights", "--memory", str(bank), "--images", str(images),
        "--out", str(out), *E2E_VARIANTS[variant],
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(
        cmd, check=True, cwd=_common.ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    return time.perf_counter() - t0


def end_to_end(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch
    from _gpu_run import compare
    from refseg.core.config import get_preset, replace

    work = Path(tempfile.mkdtemp(prefix="refseg-e2e-"))
    images = work / "images"
    _common.write_images(images, args.images)
    preset = get_preset("ntt")
    model = replace(preset.model, sam2_config="sam2_hiera_t", random_weights=True)
    bank = _common.tiny_bank(work / "bank.safetensors", model, preset.method, n_classes=3)
    machine = _common.machine_info()
    variants = list(E2E_VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            out = work / f"out_{v}_{r}"
            seconds = _label(v, images, bank, out)
            record = json.loads((out / "run.json").read_text())
            stages = record["timings"]["stage_seconds"]
            runs[v].append({"seconds": seconds, "propose": stages["propose"], "out": out})
            print(
                f"round {r}: {v} {seconds:.1f} s ({seconds / args.images:.1f} s/image)", flush=True
            )
    image_ids = sorted(
        {
            row["image_id"]
            for row in json.loads((runs["stock"][0]["out"] / "coco_results.json").read_text())
        }
    )
    base = _instances(runs["stock"][0]["out"], image_ids)
    stock_s = statistics.median(x["seconds"] for x in runs["stock"])
    rows = []
    for v in variants:
        s = statistics.median(x["seconds"] for x in runs[v])
        check = compare(base, _instances(runs[v][0]["out"], image_ids), torch.device("cpu"))
        rows.append(
            {
                "variant": v,
                "flags": " ".join(E2E_VARIANTS[v]) or "(default)",
                "s_per_image": s / args.images,
                "propose_s_per_image": statistics.median(x["propose"] for x in runs[v])
                / args.images,
                "speedup_vs_stock": stock_s / s,
                "runs_s": [round(x["seconds"], 1) for x in runs[v]],
                "recall": check["recall"],
                "precision": check["precision"],
                "mean_iou": check["mean_iou"],
                "max_score_diff": check["max_score_diff"],
                "instances": check["instances"],
            }
        )
    print(_common.table(rows))
    payload = {"images": args.images, "rounds": args.rounds, "rows": rows, "machine": machine}
    return _common.finish(
        __file__.replace("_label_runs", "decoder"), "decoder_e2e", payload, argv, args.out_dir
    )
