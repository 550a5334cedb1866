"""FLOPs per image of the two model stages, counted with ``torch.utils.flop_counter``.

The pipeline runs the method as two GPU stages, each its own actor pool: ``propose`` (SAM2)
and ``match`` (DINOv2 and matching). How many GPUs each pool gets should follow the work
each does per image. This script counts it at a preset (default ``ntt``: SAM2 Hiera-L at
1024, a 32 x 32 prompt grid, DINOv2 ViT-L/14 at 518), float32, random weights (FLOPs do not
depend on them), on the CPU:

  propose  = image encoder (+ SAM2's backbone feature preparation)
             + the decoder's per-image work (fast decoder: ``SharedImageDecoder.prepare``)
             + prompt encoder and mask decoder for every grid prompt
  match    = DINOv2 on the target (resized to 518) + pooling the features inside each
             proposal + scoring, NMS and soft merging (``Matcher.match``)

The prompt part is counted on ``--prompts`` prompts (default 64) and scaled linearly to the
grid: every op of a decoder call is batched over the prompts, so its FLOPs are exactly
proportional to them; the script checks this by counting half as many too (``linear``).
``--prompts 1024`` counts the whole grid at once. ``--full-propose`` also counts one whole
``Sam2Proposer.propose`` call (encoder and every prompt) and compares it with the sum.

Matching is counted on ``--proposals`` synthetic, object-like proposals (ellipses in the
256 x 256 logits) of a ``--image-size`` target, with a ``--classes``-class bank of random
prototypes. Pooling costs a fixed amount per proposal; soft merging grows with the square
of the NMS survivors of one class times the image's pixels, so it depends on the scene.

``torch.utils.flop_counter`` counts matrix products, convolutions and attention (2 FLOPs
per multiply-add; the CPU attention kernel is added to its table, ``EXTRA_FLOP_FORMULAS``);
element-wise ops, norms, softmax and resampling are not counted.

    python bench/flops.py                       # ntt, fast and stock decoder (results/flops.json)
    python bench/flops.py --prompts 1024        # the whole grid counted, no scaling
    python bench/flops.py --preset tiny --out-dir /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from typing import Any

import _common
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def _attention_flop(query, key, value, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Q K^T and P V of ``scaled_dot_product_attention``: (..., Sq, d) x (..., Sk, d)."""
    *lead, s_q, d_q = query.shape
    s_k, d_v = key.shape[-2], value.shape[-1]
    batch = math.prod(lead)
    return 2 * batch * s_q * s_k * (d_q + d_v)


_attention_flop._get_raw = True  # type: ignore[attr-defined]  # takes the tensors

#: Attention kernels ``FlopCounterMode`` does not count by itself (torch 2.14 registers the
#: CUDA ones only): on the CPU ``F.scaled_dot_product_attention`` runs this one, which would
#: otherwise count 0 (ViT-L at 518: 184 GFLOP of attention missed).
EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flop}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU attention kernel."""
    return FlopCounterMode(display=False, custom_mapping=dict(EXTRA_FLOP_FORMULAS))


def count(fn: Any) -> float:
    """GFLOP of ``fn()`` as ``FlopCounterMode`` counts them."""
    return counted(fn)[0]


def counted(fn: Any) -> tuple[float, Any]:
    """(GFLOP, result) of ``fn()``."""
    counter = flop_counter()
    with counter:
        out = fn()
    return counter.get_total_flops() / 1e9, out


def synthetic_proposals(n: int, side: int, input_size: int, orig_hw: tuple[int, int]) -> Any:
    """``n`` object-like proposals: ellipse-shaped (n, side, side) logits, seeded."""
    from refseg.core.proposals import Proposals

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    cy, cx = rng.uniform(0.1, 0.9, (2, n, 1, 1)) * side
    ry, rx = rng.uniform(0.03, 0.3, (2, n, 1, 1)) * side
    logits = (1.0 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2) * 10.0
    return Proposals(
        torch.from_numpy(logits.astype(np.float32)),
        torch.from_numpy(rng.uniform(0.5, 1.0, n).astype(np.float32)),
        torch.from_numpy(rng.uniform(0, input_size, (n, 2)).astype(np.float32)),
        input_size,
        (input_size, input_size),
        orig_hw,
    )


def random_bank(encoder: Any, classes: int) -> Any:
    """A bank of ``classes`` one-shot classes with random prototypes (no encoder run)."""
    from refseg.core.memory_bank import MemoryBank, ShotRecord

    gen = torch.Generator().manual_seed(0)
    bank = MemoryBank(encoder=encoder.name, image_size=encoder.image_size)
    dim = int(encoder.model.num_features)
    for c in range(classes):
        rec = ShotRecord(category_id=c + 1, image_id=c + 1, annotation_id=c + 1)
        bank.add(rec, torch.randn(dim, generator=gen), f"class_{c + 1}")
    return bank


def count_propose(proposer: Any, image: torch.Tensor, prompts: int, full: bool) -> dict:
    """GFLOP of the SAM2 stage for one (1, 3, S, S) image, per part."""
    side = proposer.method.points_per_side
    grid = side * side
    encoder, (emb, hr) = counted(lambda: proposer.encode(image))
    prepare, encoded = counted(lambda: proposer.prepare(emb[:1], [f[:1] for f in hr]))
    points = proposer.grid((proposer.input_size,) * 2)
    prompts = min(prompts, grid)

    def decode(p: int) -> float:
        pts = points[:p, None, :]
        labels = torch.ones(p, 1, dtype=torch.int)
        step = proposer.prompt_batch(tuple(emb.shape[-2:]))
        return count(
            lambda: [
                proposer.decode(encoded, pts[s : s + step], labels[s : s + step])
                for s in range(0, p, step)
            ]
        )

    t0 = time.perf_counter()
    n_flops = decode(prompts)
    seconds = time.perf_counter() - t0
    half = decode(prompts // 2) if prompts >= 2 else n_flops
    per_prompt = n_flops / prompts
    out = {
        "image_encoder": encoder,
        "decoder_per_image": prepare,
        "per_prompt": per_prompt,
        "prompts": grid,
        "prompts_counted": prompts,
        "prompts_scaled": prompts != grid,
        "decode_seconds_counted": seconds,
        # the stock call also recomputes the dense positional encoding once per call
        # (about 1e-6 of a call's FLOPs): linear within 1e-4
        "linear": abs(2 * half - n_flops) <= 1e-4 * n_flops if prompts >= 2 else True,
        "decoder_all_prompts": per_prompt * grid,
    }
    out["total"] = encoder + prepare + per_prompt * grid
    if full:
        s = proposer.input_size
        out["full_propose_counted"] = count(lambda: proposer.propose(image, [(s, s)], [(s, s)]))
    return out


def count_match(matcher: Any, image: torch.Tensor, proposals: Any) -> dict:
    """GFLOP of the matching stage for one image and its proposals, per part."""
    dinov2, feats = counted(lambda: matcher.target_features(image))
    pool, pooled = counted(lambda: matcher.pool(proposals, feats[0]))
    scoring, inst = counted(lambda: matcher.match_pooled(proposals, pooled))
    n = len(proposals)
    return {
        "dinov2": dinov2,
        "pooling": pool,
        "pooling_per_proposal": pool / n if n else 0.0,
        "scoring_nms_merge": scoring,
        "proposals": n,
        "instances": len(inst),
        "total": dinov2 + pool + scoring,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="ntt", help="ntt (default) or tiny")
    p.add_argument("--prompts", type=int, default=64, help="prompts counted, scaled to the grid")
    p.add_argument("--decoders", nargs="+", default=["fast", "stock"], choices=["fast", "stock"])
    p.add_argument("--full-propose", action="store_true", help="also count a whole propose()")
    p.add_argument("--proposals", type=int, default=800, help="synthetic proposals matched")
    p.add_argument("--classes", type=int, default=10, help="classes in the random bank")
    p.add_argument("--image-size", default="480x640", help="target image HxW (matching)")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)

    from refseg.core.config import get_preset, replace
    from refseg.core.factory import build_encoder, build_proposer
    from refseg.core.matching import Matcher

    preset = get_preset(args.preset)
    model = replace(preset.model, device="cpu", random_weights=True)
    hw = tuple(int(v) for v in args.image_size.lower().split("x"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposer = build_proposer(model, preset.method)
        encoder = build_encoder(model, preset.method)
    s = proposer.input_size
    image = torch.rand(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    machine = _common.machine_info()

    propose: dict[str, dict] = {}
    for decoder in args.decoders:
        proposer.method = replace(preset.method, decoder=decoder)
        propose[decoder] = count_propose(proposer, image, args.prompts, args.full_propose)
        print(f"propose ({decoder}): {propose[decoder]['total']:.1f} GFLOP", flush=True)
    proposer.method = preset.method

    matcher = Matcher(encoder, random_bank(encoder, args.classes), preset.method)
    proposals = synthetic_proposals(args.proposals, s // 4, s, hw)  # type: ignore[arg-type]
    match = count_match(matcher, image, proposals)
    print(f"match: {match['total']:.1f} GFLOP", flush=True)

    rows = []
    for decoder, pr in propose.items():
        ratio = pr["total"] / match["total"]
        rows.append(
            {
                "decoder": decoder,
                "sam2_encoder": pr["image_encoder"],
                "decoder_per_image": pr["decoder_per_image"],
                "per_prompt": pr["per_prompt"],
                "all_prompts": pr["decoder_all_prompts"],
                "propose": pr["total"],
                "dinov2": match["dinov2"],
                "pooling": match["pooling"],
                "scoring_nms_merge": match["scoring_nms_merge"],
                "match": match["total"],
                "propose_over_match": ratio,
                "propose_share": ratio / (1 + ratio),
            }
        )
    print(f"\nGFLOP per image, preset {preset.name}, float32 (torch.utils.flop_counter):")
    print(_common.table(rows))
    scaled = [d for d, pr in propose.items() if pr["prompts_scaled"]]
    if scaled:
        counted = propose[scaled[0]]["prompts_counted"]
        print(
            f"prompt part counted on {counted} prompts and scaled to "
            f"{propose[scaled[0]]['prompts']} (exactly linear: "
            f"{all(propose[d]['linear'] for d in scaled)})"
        )
    return _common.finish(
        __file__,
        "flops" if preset.name == "ntt" else f"flops_{preset.name}",
        {
            "preset": preset.name,
            "unit": "GFLOP per image (2 FLOPs per multiply-add), float32",
            "image_hw": hw,
            "sam2_input": s,
            "dinov2_input": encoder.image_size,
            "classes": args.classes,
            "propose": propose,
            "match": match,
            "rows": rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
