"""The measuring parts of ``gpu.py``: variants applied to built models, timers, checks.

Imported by ``gpu.py`` only after it has found a CUDA device (or ``--cpu-smoke``), so that
the refusal on a machine without CUDA is quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import refseg.core.ops
import torch
from refseg.core.factory import compile_dinov2, compile_sam2
from refseg.core.imaging import PreparedTarget
from refseg.core.instances import Instances
from refseg.core.segmenter import Segmenter
from refseg.core.tensors import stack_targets
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["sync", "configured", "label_all", "StageClock", "count_flops", "compare"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def configured(seg: Segmenter, v: Any) -> Iterator[None]:
    """Set a variant's options on built models; restore them (and uncompile) on exit."""
    method = seg.proposer.method
    new = dataclasses.replace(
        method,
        autocast_bf16=v.bf16,
        prompt_batch=v.prompt_batch,
        merge_resolution="lowres" if v.lowres_merge else "full",
        decoder=v.decoder,
    )
    seg.proposer.method = seg.matcher.method = new
    seg.matcher.encoder.autocast_bf16 = v.bf16
    sam, dino = seg.proposer.model, seg.matcher.encoder.model
    originals = (sam.image_encoder, sam.sam_mask_decoder.transformer, dino.blocks)
    if v.compile:
        compile_sam2(sam)
        compile_dinov2(dino)
    try:
        yield
    finally:
        seg.proposer.method = seg.matcher.method = method
        seg.matcher.encoder.autocast_bf16 = method.autocast_bf16
        sam.image_encoder, sam.sam_mask_decoder.transformer, dino.blocks = originals


def label_all(seg: Segmenter, targets: list[PreparedTarget], batch: int) -> list[Instances]:
    out: list[Instances] = []
    for i in range(0, len(targets), batch):
        out += seg.label_prepared(targets[i : i + batch])
    return out


class StageClock:
    """Wraps the method's steps with synchronised timers (for the breakdown pass only)."""

    NAMES = ("sam2_encode", "sam2_decode", "dinov2", "match", "full_res_masks", "soft_merge")

    def __init__(self, seg: Segmenter, device: torch.device) -> None:
        self.seg, self.device = seg, device
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.proposals = 0

    def _count(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self.proposals += sum(len(p) for p in out)
            return out

        return counted

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds[name] += time.perf_counter() - t0
            return out

        return timed

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        p, m, ops = self.seg.proposer, self.seg.matcher, refseg.core.ops
        saved = ops.soft_merge_scores
        p.propose = self._count(p.propose)  # type: ignore[method-assign]
        p.encode = self._wrap("sam2_encode", p.encode)  # type: ignore[method-assign]
        p.decode = self._wrap("sam2_decode", p.decode)  # type: ignore[method-assign]
        m.target_features = self._wrap("dinov2", m.target_features)  # type: ignore[method-assign]
        m.match = self._wrap("match", m.match)  # type: ignore[method-assign]
        m._full_resolution = self._wrap("full_res_masks", m._full_resolution)  # type: ignore[method-assign]
        ops.soft_merge_scores = self._wrap("soft_merge", ops.soft_merge_scores)
        try:
            yield
        finally:
            for obj, names in (
                (p, ("propose", "encode", "decode")),
                (m, ("target_features", "match", "_full_resolution")),
            ):
                for name in names:
                    delattr(obj, name)
            ops.soft_merge_scores = saved


def count_flops(seg: Segmenter, target: PreparedTarget) -> dict[str, float]:
    """TFLOP of one image: SAM2 encoder, SAM2 decoder (all prompts), DINOv2, total."""
    batch = stack_targets([target])
    out = {}
    for name, fn in (
        ("sam2_encoder", lambda: seg.proposer.encode(batch)),
        ("sam2_total", lambda: seg.proposer.propose(batch, [target.valid_hw], [target.orig_hw])),
        ("dinov2", lambda: seg.matcher.target_features(batch)),
        ("total", lambda: seg.label_prepared([target])),
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        out[name] = counter.get_total_flops() / 1e12
    out["sam2_decoder"] = out.pop("sam2_total") - out["sam2_encoder"]
    return out


def compare(base: list[Instances], other: list[Instances], device: torch.device) -> dict:
    """Greedy mask-IoU pairing within a category, per image; totals over the images."""
    n_base = n_other = matched = 0
    ious: list[float] = []
    dscore: list[float] = []
    for a, b in zip(base, other, strict=True):
        n_base, n_other = n_base + len(a), n_other + len(b)
        if not len(a) or not len(b):
            continue
        ma = torch.from_numpy(a.masks).to(device).flatten(1).float()
        mb = torch.from_numpy(b.masks).to(device).flatten(1).float()
        inter = ma @ mb.T
        union = ma.sum(1)[:, None] + mb.sum(1)[None] - inter
        iou = (inter / union.clamp(min=1)).cpu().numpy()
        iou[a.category_ids[:, None] != b.category_ids[None]] = 0
        used = np.zeros(len(b), bool)
        for i in np.argsort(-a.scores, kind="stable"):
            cand = np.where(used, -1.0, iou[i])
            j = int(cand.argmax())
            if cand[j] >= 0.5:
                used[j] = True
                matched += 1
                ious.append(float(cand[j]))
                dscore.append(abs(float(a.scores[i]) - float(b.scores[j])))
    return {
        "instances_base": n_base,
        "instances": n_other,
        "recall": matched / n_base if n_base else 1.0,
        "precision": matched / n_other if n_other else 1.0,
        "mean_iou": float(np.mean(ious)) if ious else (1.0 if n_base == n_other == 0 else 0.0),
        "max_score_diff": max(dscore, default=0.0),
    }
