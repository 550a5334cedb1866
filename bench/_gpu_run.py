"""The measuring parts of ``gpu.py``: variants applied to built models, timers, checks.

Imported by ``gpu.py`` only after it has found a CUDA device (or ``--cpu-smoke``), so that
the refusal on a machine without CUDA is quick.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import refseg.core.ops
import refseg.core.rle
import torch
from flops import flop_counter
from refseg.core.factory import COMPILE_BACKEND, set_tf32
from refseg.core.features import DinoEncoder
from refseg.core.imaging import PreparedTarget
from refseg.core.instances import Instances
from refseg.core.models import LoadedModel
from refseg.core.proposals import Sam2Proposer
from refseg.core.segmenter import Segmenter
from refseg.core.tensors import stack_targets

__all__ = [
    "sync",
    "configured",
    "label_all",
    "StageClock",
    "UtilisationSampler",
    "count_flops",
    "compare",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def configured(seg: Segmenter, v: Any, *, tf32: bool = False) -> Iterator[None]:
    """Set a variant's options on built models; restore them (and uncompile) on exit.

    TF32 is on for the variant when ``v.tf32`` or ``tf32`` (every variant) is set."""
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
    proposer, encoder = seg.proposer, seg.matcher.encoder
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(tf32 or v.tf32, proposer.device)
    if v.compile:  # what --compile builds: the same models, compiled where they run
        seg.proposer = Sam2Proposer(proposer.model, new, compile_backend=COMPILE_BACKEND)
        loaded = LoadedModel(encoder.model, encoder.name, None, encoder.checkpoint_sha256, True)
        seg.matcher.encoder = DinoEncoder(
            loaded, encoder.image_size, autocast_bf16=v.bf16, compile_backend=COMPILE_BACKEND
        )
    try:
        yield
    finally:
        seg.proposer, seg.matcher.encoder = proposer, encoder
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
        seg.proposer.method = seg.matcher.method = method
        seg.matcher.encoder.autocast_bf16 = method.autocast_bf16


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


class UtilisationSampler:
    """GPU utilisation (% of time a kernel ran) sampled every ``interval`` s in a thread.

    Reads ``torch.cuda.utilization`` (NVML, through the ``nvidia-ml-py`` package) or, where
    that fails, ``nvidia-smi --query-gpu=utilization.gpu``. ``summary()``: mean, min, max
    and the sample count; empty when neither source answers (or on CPU).
    """

    def __init__(self, device: torch.device, interval: float = 0.1) -> None:
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        if self.source in ("", "nvml"):
            try:
                value = float(torch.cuda.utilization(self.device))
                self.source = "nvml"
                return value
            except Exception:
                if self.source == "nvml":
                    return None
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return None
        index = self.device.index or 0
        out = subprocess.run(
            [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-i={index}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        try:
            self.source = "nvidia-smi"
            return float(out.splitlines()[0])
        except (ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            value = self._read()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> UtilisationSampler:
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        return {
            "gpu_util_mean_pct": float(np.mean(self.samples)),
            "gpu_util_min_pct": float(np.min(self.samples)),
            "gpu_util_max_pct": float(np.max(self.samples)),
            "gpu_util_samples": len(self.samples),
            "gpu_util_source": self.source,
        }


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
        counter = flop_counter()  # CUDA's attention kernels are in its own table
        with counter:
            fn()
        out[name] = counter.get_total_flops() / 1e12
    out["sam2_decoder"] = out.pop("sam2_total") - out["sam2_encoder"]
    return out


def _masks(inst: Instances) -> np.ndarray:
    """(N, H, W) bool masks: dense ones, or decoded from the RLEs matching returns."""
    if inst.masks is not None:
        return inst.masks
    return np.stack([refseg.core.rle.decode_rle(r) for r in inst.rles or ()]).astype(bool)


def compare(base: list[Instances], other: list[Instances], device: torch.device) -> dict:
    """Greedy mask-IoU pairing within a category, per image; totals over the images."""
    n_base = n_other = matched = 0
    ious: list[float] = []
    dscore: list[float] = []
    for a, b in zip(base, other, strict=True):
        n_base, n_other = n_base + len(a), n_other + len(b)
        if not len(a) or not len(b):
            continue
        ma = torch.from_numpy(_masks(a)).to(device).flatten(1).float()
        mb = torch.from_numpy(_masks(b)).to(device).flatten(1).float()
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
