"""Patch-resolution pooling against upsample-then-average on the same masks.

``refseg.core.ops.pool_features`` averages bilinearly upsampled DINOv2 features inside each
mask without building the (H, W, D) map; ``pool_features_naive`` is the paper's form
(upsample to the mask size, then average). Both get the same features and masks; the
script reports their times, the ratio and the largest absolute difference.

Defaults are the paper's matching step: a 37x37 grid of 1024-d features (ViT-L at 518) and
256x256 low-resolution SAM2 masks, for 100, 400 and 1024 proposals (1024 = every prompt
of a 32x32 grid survives). Masks are random filled ellipses of 1-40% of the image, drawn
with a fixed seed. Target: ratio >= 20.

    python bench/pooling.py                    # paper sizes
    python bench/pooling.py --grid 8 --dim 384 --mask-size 64 --n 10 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import sys

import _common
import torch
from refseg.core import ops

TARGET_RATIO = 20.0


def random_masks(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, size, size) bool filled ellipses with random centres and radii."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = torch.rand(n, 2, generator=g) * size
    r = (0.05 + torch.rand(n, 2, generator=g) * 0.3) * size
    dy = (yy[None] - c[:, 0, None, None]) / r[:, 0, None, None]
    dx = (xx[None] - c[:, 1, None, None]) / r[:, 1, None, None]
    return dy**2 + dx**2 <= 1


def measure(
    grid: int, dim: int, mask_size: int, n: int, repeats: int, seed: int = 0
) -> dict[str, float | int]:
    """One row: both forms on the same (grid, grid, dim) features and n masks."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(grid, grid, dim, generator=g)
    masks = random_masks(n, mask_size, seed)
    fast = _common.timed(lambda: ops.pool_features(feats, masks), repeats)
    naive = _common.timed(lambda: ops.pool_features_naive(feats, masks), repeats)
    a, b = ops.pool_features(feats, masks), ops.pool_features_naive(feats, masks)
    diff = (a - b).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
    return {
        "grid": grid,
        "dim": dim,
        "mask_size": mask_size,
        "masks": n,
        "patch_ms": fast["median"] * 1e3,
        "naive_ms": naive["median"] * 1e3,
        "ratio": naive["median"] / fast["median"],
        "max_abs_diff": diff,
        "max_abs_feature": feats.abs().max().item(),
        "min_cosine": cos,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", type=int, default=37, help="feature grid side (37: ViT-L/14 at 518)")
    p.add_argument("--dim", type=int, default=1024, help="feature dimension (1024: ViT-L)")
    p.add_argument("--mask-size", type=int, default=256, help="mask side (256: SAM2 low-res)")
    p.add_argument("--n", type=int, nargs="+", default=[100, 400, 1024], help="masks per call")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per form (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = _common.machine_info()
    rows = [measure(args.grid, args.dim, args.mask_size, n, args.repeats) for n in args.n]
    print(_common.table(rows))
    worst = min(r["ratio"] for r in rows)
    print(f"\nlowest ratio {worst:.1f}x (target >= {TARGET_RATIO:.0f}x); load {_common.loadavg()}")
    return _common.finish(
        __file__,
        "pooling",
        {
            "target_ratio": TARGET_RATIO,
            "rows": rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
