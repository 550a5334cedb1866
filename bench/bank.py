"""Memory bank: file size and build time against shots per class and classes.

Each cell builds a bank through ``refseg.core.references.build_memory_bank`` (the path of
``refseg build-memory``: COCO references with polygon masks, JPEGs read from disk, one
DINOv2 forward per shot) with the chosen preset's encoder and random weights, saves it and
reports the file size and build time. The bank stores one D-dim prototype per shot plus
its provenance (ids, box, RLE of the mask) in the safetensors header.

The same records with 1024-d prototypes (ViT-L, the paper's encoder) give the size at the
paper's setting without running ViT-L: the file size depends on D and on the records only.
The paper's code keeps a 37x37x1024 float32 feature map per shot: 5.6 MB.

    python bench/bank.py                                   # tiny encoder, 1-20 classes
    python bench/bank.py --classes 1 --shots 1 --image-size 64x80   # smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common
import numpy as np
import torch
from PIL import Image
from refseg.core.config import get_preset, replace
from refseg.core.factory import build_encoder
from refseg.core.memory_bank import MemoryBank
from refseg.core.references import build_memory_bank

PAPER_BYTES_PER_SHOT = 37 * 37 * 1024 * 4  # 5,607,424 B: the paper's per-shot feature map
NTT_DIM = 1024


def write_references(root: Path, n_classes: int, shots: int, hw: tuple[int, int]) -> dict[str, Any]:
    """COCO references: one JPEG per shot, one polygon (an octagon) per image."""
    h, w = hw
    images, anns = [], []
    for k in range(n_classes * shots):
        image_id = k + 1
        name = f"ref_{k:05d}.jpg"
        path = root / name
        if not path.exists():
            arr = _common.synthetic_image(np.random.default_rng((7, k)), hw)
            Image.fromarray(arr).save(path, quality=90)
        cx, cy, r = w / 2, h / 2, 0.35 * min(h, w)
        angles = np.linspace(0, 2 * np.pi, 9)[:-1]
        poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).reshape(-1)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        anns.append(
            {
                "id": image_id,
                "image_id": image_id,
                "category_id": k % n_classes + 1,
                "segmentation": [poly.round(2).tolist()],
                "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                "area": float(np.pi * r * r),
                "iscrowd": 0,
            }
        )
    cats = [{"id": c + 1, "name": f"class_{c + 1}"} for c in range(n_classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def widened(bank: MemoryBank, dim: int) -> MemoryBank:
    """The same records with random ``dim``-d prototypes (file size at another encoder)."""
    out = MemoryBank(encoder=bank.encoder, image_size=bank.image_size, meta=dict(bank.meta))
    g = torch.Generator().manual_seed(0)
    for cid in bank.category_ids:
        for rec in bank.records[cid]:
            out.add(rec, torch.randn(dim, generator=g), bank.names[cid])
    return out


def measure(
    encoder: Any, root: Path, n_classes: int, shots: int, hw: tuple[int, int]
) -> dict[str, Any]:
    refs = write_references(root, n_classes, shots, hw)
    t0 = time.perf_counter()
    bank = build_memory_bank(encoder, refs, str(root))
    seconds = time.perf_counter() - t0
    path = root / f"bank_{n_classes}x{shots}.safetensors"
    bank.save(str(path))
    size = path.stat().st_size
    n = len(bank)
    ntt_size = len(widened(bank, NTT_DIM).to_bytes())
    return {
        "classes": n_classes,
        "shots": shots,
        "total_shots": n,
        "dim": bank.dim,
        "file_bytes": size,
        "bytes_per_shot": size / n,
        "build_s": seconds,
        "ms_per_shot": seconds / n * 1e3,
        "ntt_file_bytes": ntt_size,
        "ntt_bytes_per_shot": ntt_size / n,
        "paper_over_ntt": PAPER_BYTES_PER_SHOT / (ntt_size / n),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", help="preset whose DINOv2 encodes the shots")
    p.add_argument("--classes", type=int, nargs="+", default=[1, 5, 20])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--image-size", default="480x640", help="reference image HxW")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hw = tuple(int(v) for v in args.image_size.lower().split("x"))
    preset = get_preset(args.preset)
    model = replace(preset.model, random_weights=True, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = build_encoder(model, preset.method)
    logging.getLogger("refseg.core").setLevel(logging.ERROR)
    machine = _common.machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.classes:
            for s in args.shots:
                rows.append(measure(encoder, Path(tmp), c, s, hw))  # type: ignore[arg-type]
                print(f"  {c} classes x {s} shots: {rows[-1]['build_s']:.2f} s", flush=True)
    cols = ["classes", "shots", "dim", "file_bytes", "bytes_per_shot", "build_s", "ms_per_shot"]
    print(_common.table(rows, cols))
    print()
    print(_common.table(rows, ["classes", "shots", "ntt_bytes_per_shot", "paper_over_ntt"]))
    print(
        f"\npaper: {PAPER_BYTES_PER_SHOT / 1e6:.2f} MB per shot (37x37x1024 float32); "
        f"encoder {encoder.name} at {encoder.image_size}px; load {_common.loadavg()}"
    )
    return _common.finish(
        __file__,
        "bank",
        {
            "preset": args.preset,
            "encoder": encoder.name,
            "encoder_image_size": encoder.image_size,
            "reference_image_hw": hw,
            "paper_bytes_per_shot": PAPER_BYTES_PER_SHOT,
            "rows": rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
