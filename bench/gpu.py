"""GPU throughput in the paper's setting: float32 against bf16 and the speed options.

The ``ntt`` preset with random weights at real sizes (SAM2 Hiera-L at 1024, DINOv2 ViT-L/14
at 518, a 32x32 prompt grid, 10 one-shot classes) labels synthetic 480x640 images with
``refseg.core.segmenter.Segmenter`` on one GPU. Decoding and RLE encoding (CPU work in the
pipeline) are left out; the clock covers the upload, both models, matching and the masks'
copy back to the host. Every variant runs on the same prepared images after warm-up:

  fp32              the paper's setting (SAM2's own decoder call, prompt batch 256, one
                    image per call, no compile)
  fp32-fast         refseg's default decoder (refseg.core.decoder: each image's shared
                    work once), automatic prompt batch
  bf16              MethodConfig.autocast_bf16 (SAM2 and DINOv2 under bf16 autocast)
  bf16-fast         bf16 with the fast decoder (run natively in bf16)
  fp32-prompts1024  all 1024 prompts of an image in one decoder call
  fp32-images4      4 images per call through both encoders
  fp32-compile      --compile with SAM2's own decoder: torch.compile of the image encoder,
                    SAM2's mask decoder and DINOv2's forward pass
  fp32-fast-compile --compile with the default decoder: the image encoder, the fast
                    decoder's per-prompt work and DINOv2's forward pass
  fp32-fast-tf32    --tf32 with the default decoder: TF32 in float32 matmuls and convolutions
  fp32-lowres       MethodConfig.merge_resolution="lowres": soft merging on the 256x256
                    masks, only the kept top-100 upsampled to the image size
  bf16-all          all of the above together (with the fast decoder)

Each variant's instances are compared with float32's on the first ``--check-images`` images:
instances are paired greedily by mask IoU within a category; ``recall`` is the share of
float32 instances with a partner at IoU >= 0.5, ``precision`` the same the other way.
Tolerance: recall, precision and mean IoU of pairs >= 0.98 for float32 variants, >= 0.90 for
bf16 and TF32 ones. Random weights make the outputs meaningless but keep the work of real weights
except for the number of proposals that pass the IoU filter (printed; ``--weights official``
loads the real checkpoints from the cache).

FLOPs: ``torch.utils.flop_counter`` on one float32 image, and the issue's floor for the
paper's setting, 6.43 TFLOP per image (SAM2-L encoder 1.77 + 1024 prompts decoded 3.65 +
DINOv2-L at 518 1.01); TFLOP/s are both figures times images/s; ``%peak`` is against the
card's dense bf16 peak. Target: >= 25 images/s per H100. GPU utilisation is sampled during
each timed pass (NVML through torch.cuda.utilization, else nvidia-smi, every 0.1 s).
Images go to the GPU as uint8 (``Segmenter``), as in the pipeline.

    python bench/gpu.py                 # every variant, 32 images (CUDA only)
    python bench/gpu.py --bf16          # float32 and bf16 only
    python bench/gpu.py --cpu-smoke     # the script's own check on CPU: tiny preset, 2 images
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import _common
import numpy as np
import torch

FLOOR_TFLOP = {"sam2_encoder": 1.77, "decoder_1024_prompts": 3.65, "dinov2_518": 1.01}
TARGET_IMAGES_PER_S = 25.0
# dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name()
BF16_PEAK = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


@dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    prompt_batch: int = 256
    image_batch: int = 1
    compile: bool = False
    lowres_merge: bool = False
    decoder: str = "stock"
    tf32: bool = False

    @property
    def tolerance(self) -> float:
        return 0.90 if self.bf16 or self.tf32 else 0.98


VARIANTS = {
    v.name: v
    for v in (
        Variant("fp32"),
        Variant("fp32-fast", prompt_batch=0, decoder="fast"),
        Variant("bf16", bf16=True),
        Variant("bf16-fast", bf16=True, prompt_batch=0, decoder="fast"),
        Variant("fp32-prompts1024", prompt_batch=1024),
        Variant("fp32-images4", image_batch=4),
        Variant("fp32-compile", compile=True),
        Variant("fp32-fast-compile", compile=True, prompt_batch=0, decoder="fast"),
        Variant("fp32-fast-tf32", tf32=True, prompt_batch=0, decoder="fast"),
        Variant("fp32-lowres", lowres_merge=True),
        Variant(
            "bf16-all",
            bf16=True,
            prompt_batch=1024,
            image_batch=4,
            compile=True,
            lowres_merge=True,
            decoder="fast",
        ),
    )
}


def bf16_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in BF16_PEAK if key in name), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=32, help="timed images per variant")
    p.add_argument("--warmup", type=int, default=4, help="untimed images per variant first")
    p.add_argument("--check-images", type=int, default=8, help="images compared with fp32")
    p.add_argument("--profile-images", type=int, default=4, help="images of the breakdown")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--bf16", action="store_true", help="only fp32 and bf16, both decoders")
    p.add_argument("--classes", type=int, default=10, help="one-shot classes in the bank")
    p.add_argument("--image-size", default="480x640", help="target image HxW")
    p.add_argument("--weights", choices=["random", "official"], default="random")
    p.add_argument("--tf32", action="store_true", help="TF32 in every variant (--tf32)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny preset on CPU, 2 images")
    p.add_argument("--out-dir", default=None, help="JSON folder (default bench/results)")
    args = p.parse_args(argv)

    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(
            "bench/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine. "
            "No figure was measured. (--cpu-smoke checks the script itself on CPU.)",
            file=sys.stderr,
        )
        return 2
    from _gpu_run import (
        StageClock,
        UtilisationSampler,
        compare,
        configured,
        count_flops,
        label_all,
        sync,
    )
    from refseg.core.config import get_preset, replace
    from refseg.core.factory import build_encoder, build_proposer, set_tf32
    from refseg.core.imaging import prepare_target
    from refseg.core.matching import Matcher
    from refseg.core.segmenter import Segmenter

    variants = (
        ["fp32", "fp32-fast", "bf16", "bf16-fast"]
        if args.bf16
        else list(dict.fromkeys(["fp32", *args.variants]))
    )
    if args.cpu_smoke:
        args.images, args.warmup, args.check_images, args.profile_images = 2, 1, 2, 1
        variants = [v for v in variants if not VARIANTS[v].compile]
        preset = get_preset("tiny")
        device = torch.device("cpu")
    else:
        preset = get_preset("ntt")
        device = torch.device("cuda")
    set_tf32(args.tf32, device)
    hw = tuple(int(v) for v in args.image_size.lower().split("x"))
    model = replace(preset.model, device=device.type, random_weights=args.weights == "random")
    method = preset.method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = build_encoder(model, method)
        seg = Segmenter(
            build_proposer(model, method),
            Matcher(encoder, _common.synthetic_bank(encoder, args.classes), method),
        )
    rng = np.random.default_rng(1)
    images = [
        _common.synthetic_image(rng, hw)  # type: ignore[arg-type]
        for _ in range(args.warmup + args.images)
    ]
    size = seg.proposer.input_size
    targets = [prepare_target(im, size, method.resize) for im in images]
    warm, timed_targets = targets[: args.warmup], targets[args.warmup :]
    machine = _common.machine_info()
    machine["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    machine["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    flops = count_flops(seg, timed_targets[0])
    floor = sum(FLOOR_TFLOP.values()) if preset.name == "ntt" else None  # the paper's sizes
    peak = bf16_peak(device, args.peak_tflops)
    print(f"measured TFLOP/image (fp32): {flops}; issue's floor: {floor}", flush=True)

    rows, base = [], None
    for name in variants:
        v = VARIANTS[name]
        with configured(seg, v, tf32=args.tf32):
            t_warm = time.perf_counter()
            label_all(seg, warm, v.image_batch)
            sync(device)
            warmup_s = time.perf_counter() - t_warm  # with --compile: mostly compiling
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            with UtilisationSampler(device) as util:
                t0 = time.perf_counter()
                results = label_all(seg, timed_targets, v.image_batch)
                sync(device)
                seconds = time.perf_counter() - t0
            prompt_batch = seg.proposer.prompt_batch((size // 16, size // 16))
            clock = StageClock(seg, device)
            with clock.installed():
                label_all(seg, timed_targets[: args.profile_images], v.image_batch)
        checked = results[: args.check_images]
        base = checked if base is None else base
        check = compare(base, checked, device)
        ok = min(check["recall"], check["precision"], check["mean_iou"]) >= v.tolerance
        ips = len(timed_targets) / seconds
        row: dict[str, Any] = {
            "variant": name,
            "images_per_s": ips,
            "ms_per_image": 1e3 / ips,
            "tflops_measured": flops["total"] * ips,
            "tflops_floor": floor * ips if floor else "",
            "pct_bf16_peak": 100 * floor * ips / peak if peak and floor else "",
            "gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda"
            else "",
            "instances_per_image": np.mean([len(r) for r in results]),
            "recall": check["recall"],
            "precision": check["precision"],
            "mean_iou": check["mean_iou"],
            "within_tolerance": ok,
            "warmup_s": warmup_s,
            "prompt_batch": prompt_batch,
            **util.summary(),
        }
        row["stage_ms_per_image"] = {
            k: s / args.profile_images * 1e3 for k, s in clock.seconds.items()
        }
        row["proposals_per_image"] = clock.proposals / args.profile_images
        row["check"] = check
        rows.append(row)
        print(f"  {name}: {ips:.2f} images/s, check ok={ok}", flush=True)
    cols = [
        "variant",
        "images_per_s",
        "ms_per_image",
        "tflops_measured",
        "tflops_floor",
        "pct_bf16_peak",
        "gpu_mem_gib",
        "gpu_util_mean_pct",
        "recall",
        "precision",
        "mean_iou",
        "within_tolerance",
    ]
    print(
        _common.table(
            [
                {
                    "variant": r["variant"],
                    "proposals_per_image": r["proposals_per_image"],
                    "instances_per_image": r["instances_per_image"],
                }
                for r in rows
            ]
        )
    )
    print(_common.table(rows, cols))
    print()
    stage_rows = [{"variant": r["variant"], **r["stage_ms_per_image"]} for r in rows]
    print("ms per image by step (synchronised timers, separate pass):")
    print(_common.table(stage_rows))
    best = max(r["images_per_s"] for r in rows)
    print(
        f"\nbest {best:.2f} images/s (target >= {TARGET_IMAGES_PER_S:.0f} per H100); "
        f"device {machine['cuda'] or 'cpu'}"
    )
    return _common.finish(
        __file__,
        "gpu_cpu_smoke" if args.cpu_smoke else "gpu",
        {
            "preset": preset.name,
            "weights": args.weights,
            "image_hw": hw,
            "classes": args.classes,
            "flops_tflop_per_image": flops,
            "floor_tflop_per_image": FLOOR_TFLOP,
            "bf16_peak_tflops": peak,
            "target_images_per_s": TARGET_IMAGES_PER_S,
            "rows": rows,
            "machine": machine,
        },
        argv,
        args.out_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
