"""Rematch against a full relabel: same images, same new bank, one process, alternating.

The question a user asks after changing the memory bank: how much faster is ``refseg
rematch`` (matching the cached proposals and pooled features against the new bank) than
``refseg label`` of the same images with that bank (SAM2 + DINOv2 + matching)?

1. ``refseg.pipeline.job.run_label`` with ``cache_proposals=True`` and bank A makes the cache
   (timed, reported as "label --cache-proposals").
2. Then ``--rounds`` rounds, the two sides in alternating order, both with bank B (one
   class more than A): ``run_label`` without cache (a full relabel), and
   ``refseg.pipeline.rematch.run_rematch`` of the cache. Both are what the two commands call; both
   times include the actors' start-up, reading, writing parts, COCO JSON and run.json. Ray
   is started before the clock, and an untimed 2-image run absorbs Ray Data's one-off
   session start (``--no-warmup`` skips it). Each round checks that both sides wrote the
   same instances (categories and masks equal, largest score difference printed).
3. Bytes per image of the cache, read from the Parquet metadata of ``OUT/proposals/``
   (zstd-compressed column chunks, as stored): the proposals (``transport.encode_proposals``) and
   the pooled features that the cache stores, and, for the choice, the target's DINOv2
   feature map (h x w x D float32) stored the same way, measured on ``--map-images``
   images of the same run. Since random weights give speckled masks (a worst case for the
   proposals' boundary logits), the same number of object-like proposals (random ellipses
   of ``bench/matching.py``, 1-40 % of the image each) is stored the same way too.

Random weights (no checkpoint needed). With random weights nearly every grid prompt passes
SAM2's IoU filter and masks are speckled, so proposal bytes are a worst case.

``--rematch-settings`` runs several ``PipelineSettings`` of the rematch against the same
full relabel (``default`` or overrides such as ``match_actors=2,match_torch_threads=1``);
the first gives the headline speed-up.

    python bench/rematch.py                                    # tiny, 120 images, 2 rounds
    python bench/rematch.py --preset ntt --sam2-config sam2_hiera_t --n 2 --rounds 1 \\
        --no-warmup --image-size 240x320
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import _common
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pipeline_overhead import parse_settings
from refseg.core.config import get_preset, replace
from refseg.core.imaging import decode_image, prepare_target
from refseg.core.tensors import stack_targets
from refseg.core.transport import encode_proposals
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import ImageSource
from refseg.pipeline.job import LabelJob, ensure_ray, run_label
from refseg.pipeline.rematch import RematchJob, configs_of, open_cache, run_rematch

TARGET_SPEEDUP = 5.0


def _instances(out: Path) -> dict[int, list[tuple[int, str, float]]]:
    files = sorted((out / "instances").glob("part-*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    by: dict[int, list[tuple[int, str, float]]] = {}
    for r in rows:
        by.setdefault(r["image_id"], []).append(
            (r["category_id"], r["segmentation"]["counts"], r["score"])
        )
    return by


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Same images, categories and masks in the same order; the largest score difference."""
    x, y = _instances(a), _instances(b)
    same = set(x) == set(y) and all(
        [(c, m) for c, m, _ in x[i]] == [(c, m) for c, m, _ in y[i]] for i in x
    )
    pairs = [(s, t) for i in x if i in y for (_, _, s), (_, _, t) in zip(x[i], y[i], strict=False)]
    diff = max((abs(s - t) for s, t in pairs), default=0.0)
    return {
        "same_instances": same,
        "max_score_diff": float(diff),
        "instances": sum(map(len, x.values())),
    }


def column_bytes(folder: Path, columns: list[str]) -> dict[str, int]:
    """Stored (compressed) bytes of each column over every Parquet file in ``folder``."""
    out = dict.fromkeys(columns, 0)
    for f in sorted(folder.glob("part-*.parquet")):
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                if col.path_in_schema in out:
                    out[col.path_in_schema] += col.total_compressed_size
    return out


def feature_map_bytes(paths: list[Path], model: Any, method: Any) -> dict[str, float]:
    """Per image: the DINOv2 feature map stored as a zstd Parquet binary column, and raw."""
    from refseg.core.factory import build_encoder
    from refseg.core.matching import Matcher
    from refseg.core.memory_bank import MemoryBank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = build_encoder(model, method)
    bank = _common.synthetic_bank(enc, 1)
    matcher = Matcher(enc, MemoryBank.from_bytes(bank.to_bytes()), method)
    blobs = []
    for p in paths:
        t = prepare_target(decode_image(p.read_bytes()), model.sam2_image_size, method.resize)
        feats = matcher.target_features(stack_targets([t]))[0]  # (h, w, D)
        blobs.append(np.ascontiguousarray(feats.numpy(), dtype="<f4").tobytes())
    buf = io.BytesIO()
    pq.write_table(pa.table({"features": pa.array(blobs, pa.binary())}), buf, compression="zstd")
    return {
        "stored": len(buf.getvalue()) / len(paths),
        "raw": float(np.mean([len(b) for b in blobs])),
        "shape": list(feats.shape),
    }


def ellipse_proposal_bytes(n: int, model: Any) -> float:
    """Stored bytes of one image's ``n`` object-like proposals (``transport.encode_proposals``)."""
    import torch
    from matching import random_logits
    from refseg.core.proposals import Proposals

    size = model.sam2_image_size
    logits = random_logits(n, size // 4)
    props = Proposals(logits, torch.full((n,), 0.9), torch.zeros(n, 2), size, (size, size),
                      (480, 640))  # fmt: skip
    buf = io.BytesIO()
    table = pa.table({"proposals": pa.array([encode_proposals(props)], pa.binary())})
    pq.write_table(table, buf, compression="zstd")
    return float(len(buf.getvalue()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "ntt"])
    p.add_argument("--sam2-config", default=None, help="override the preset's SAM2 config")
    p.add_argument("--n", type=int, default=120, help="images (default 120)")
    p.add_argument("--image-size", default="480x640", help="HxW of the synthetic JPEGs")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--classes", type=int, default=2, help="classes of bank A (B has one more)")
    p.add_argument("--map-images", type=int, default=8, help="images for the feature-map size")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--rematch-settings", nargs="+", default=["default"], metavar="SPEC",
        help="rematch PipelineSettings to run, each 'default' or overrides; the first gives "
        "the headline speed-up",
    )  # fmt: skip
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)
    hw = tuple(int(v) for v in args.image_size.split("x"))
    preset = get_preset(args.preset)
    model = replace(preset.model, random_weights=True, sam2_config=args.sam2_config)
    method = preset.method
    machine = _common.machine_info()
    settings = PipelineSettings()
    import ray

    with tempfile.TemporaryDirectory(prefix="refseg-bench-rematch-") as tmp:
        root = Path(tmp)
        paths = _common.write_images(root / "images", args.n, hw)  # type: ignore[arg-type]
        bank_a = str(_common.tiny_bank(root / "a.safetensors", model, method, args.classes))
        bank_b = str(_common.tiny_bank(root / "b.safetensors", model, method, args.classes + 1))

        def label(bank: str, out: Path, images: Path, cache: bool = False) -> float:
            job = LabelJob(bank, ImageSource(str(images)), str(out), model, method, settings,
                           preset=args.preset, cache_proposals=cache)  # fmt: skip
            t0 = time.perf_counter()
            run_label(job)
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        ensure_ray(args.cpus)
        ray_start = time.perf_counter() - t0
        first = None
        if args.warmup:
            warm = root / "warm"
            warm.mkdir()
            for path in paths[:2]:
                (warm / path.name).write_bytes(path.read_bytes())
            first = label(bank_a, root / "out_warm", warm)
        cached = root / "cached"
        cache_s = label(bank_a, cached, root / "images", cache=True)
        print(f"label --cache-proposals (bank A): {args.n} images in {cache_s:.1f} s", flush=True)
        cache = open_cache(str(cached))
        preset_name, r_model, r_method = configs_of(cache)

        variants = {f"rematch[{s}]": parse_settings(s) for s in args.rematch_settings}

        def rematch(out: Path, side: str) -> float:
            job = RematchJob(cache, bank_b, str(out), r_model, r_method,
                             settings=variants[side], preset=preset_name)  # fmt: skip
            t0 = time.perf_counter()
            run_rematch(job)
            return time.perf_counter() - t0

        rows, speedups = [], []
        sides = ["label", *variants]
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            res: dict[str, Any] = {}
            for side in order:
                load = _common.loadavg()[:1]
                out = root / f"out_{rnd}_{sides.index(side)}"
                if side == "label":
                    s = label(bank_b, out, root / "images")
                else:
                    s = rematch(out, side)
                res[side] = {"seconds": s, "load": max(load + _common.loadavg()[:1]), "out": out}
                print(f"  round {rnd}, {side}: {s:.1f} s", flush=True)
            speedups.append(res["label"]["seconds"] / res[sides[1]]["seconds"])
            for side in sides:
                r = res[side]
                row = {"round": rnd, "side": "full label (bank B)" if side == "label" else
                       f"{side} (bank B)", "images": args.n, "seconds": r["seconds"],
                       "images_per_s": args.n / r["seconds"], "load": r["load"],
                       "speedup": "", "same_instances": "", "max_score_diff": ""}  # fmt: skip
                if side != "label":
                    check = compare(res["label"]["out"], r["out"])
                    row["speedup"] = res["label"]["seconds"] / r["seconds"]
                    row["same_instances"] = check["same_instances"]
                    row["max_score_diff"] = check["max_score_diff"]
                rows.append(row)
        ray.shutdown()
        ok = pq.read_table(cached / "proposals", columns=["status", "n_proposals", "n_pooled",
                                                         "feature_dim"]).to_pylist()  # fmt: skip
        ok = [r for r in ok if r["status"] == "ok"]
        stored = column_bytes(cached / "proposals", ["proposals", "pooled"])
        fmap = feature_map_bytes(paths[: args.map_images], model, method)
    per = {k: v / len(ok) for k, v in stored.items()}
    size = {
        "preset": args.preset,
        "sam2_config": model.sam2_config,
        "images": len(ok),
        "proposals_per_img": float(np.mean([r["n_proposals"] for r in ok])),
        "pooled_per_img": float(np.mean([r["n_pooled"] for r in ok])),
        "D": ok[0]["feature_dim"],
        "proposals_bytes": per["proposals"],
        "proposals_bytes_ellipses": ellipse_proposal_bytes(
            round(float(np.mean([r["n_proposals"] for r in ok]))), model
        ),
        "pooled_bytes": per["pooled"],
        "feature_map_bytes": fmap["stored"],
        "feature_map_raw": fmap["raw"],
        "cache_bytes": per["proposals"] + per["pooled"],
        "pooled/map": per["pooled"] / fmap["stored"],
    }
    print(_common.table(rows))
    print("\nproposal cache, bytes per image (stored, zstd Parquet):")
    print(_common.table([size]))
    med = statistics.median(speedups)
    print(
        f"\nrematch speed-up over a full relabel, median of {len(speedups)} round(s): "
        f"{med:.2f}x (target >= {TARGET_SPEEDUP}x at tiny, 120 images); cache run "
        f"{cache_s:.1f} s; not counted: Ray start {ray_start:.1f} s, warm-up {first or 0:.1f} s;"
        f" load now {_common.loadavg()}"
    )
    return _common.finish(
        __file__,
        f"rematch_{args.preset}",
        {
            "target_speedup": TARGET_SPEEDUP,
            "speedup": med,
            "speedups": speedups,
            "cache_run_seconds": cache_s,
            "ray_start_seconds": ray_start,
            "warmup_run_seconds": first,
            "image_hw": hw,
            "rows": rows,
            "bytes": size,
            "feature_map_shape": fmap["shape"],
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
