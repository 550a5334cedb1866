"""Build the method's objects from configs: the one entry point jobs and stages use."""

from __future__ import annotations

import logging

import torch
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.features import DinoEncoder
from refseg.core.models import build_dinov2, build_sam2
from refseg.core.proposals import Sam2Proposer

__all__ = ["resolve_device", "build_proposer", "build_encoder", "set_tf32", "COMPILE_BACKEND"]

log = logging.getLogger(__name__)

# Random weights are drawn from this seed so that a memory bank and a labelling run made
# with --random-weights use the same (random) encoder: the plumbing then still matches.
RANDOM_WEIGHTS_SEED = 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


#: ``torch.compile``'s backend for ``ModelConfig.compile``: what it compiles is the code that
#: runs (``Sam2Proposer``: the image encoder and the decoder's per-prompt work;
#: ``DinoEncoder``: the encoder's forward pass).
COMPILE_BACKEND = "inductor"


def set_tf32(enabled: bool, device: str | torch.device) -> None:
    """``MethodConfig.tf32`` for this process's models on ``device``.

    On CUDA it sets both TF32 switches, for cuBLAS matrix products and for cuDNN
    convolutions, to ``enabled``: off means strict float32 everywhere (PyTorch's own
    default allows TF32 in cuDNN convolutions). The switches are per process, so each model
    actor sets them when it builds its model. Elsewhere it changes nothing (logged when
    TF32 was asked for).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        if enabled:
            log.info("tf32: no effect on %s (a CUDA matmul mode); running float32", dev)
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def build_proposer(model: ModelConfig, method: MethodConfig) -> Sam2Proposer:
    if model.random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
    device = resolve_device(model.device)
    set_tf32(method.tf32, device)
    loaded = build_sam2(
        model.sam2_config,
        model.sam2_checkpoint,
        device=device,
        image_size=model.sam2_image_size,
        random_weights=model.random_weights,
    )
    backend = COMPILE_BACKEND if model.compile else None
    proposer = Sam2Proposer(loaded.model, method, compile_backend=backend)
    proposer.checkpoint_sha256 = loaded.sha256  # type: ignore[attr-defined]
    return proposer


def build_encoder(model: ModelConfig, method: MethodConfig) -> DinoEncoder:
    if model.random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED + 1)
    device = resolve_device(model.device)
    set_tf32(method.tf32, device)
    loaded = build_dinov2(
        model.dinov2_model,
        model.dinov2_checkpoint,
        device=device,
        image_size=model.dinov2_image_size,
        random_weights=model.random_weights,
    )
    return DinoEncoder(
        loaded,
        model.dinov2_image_size,
        autocast_bf16=method.autocast_bf16,
        compile_backend=COMPILE_BACKEND if model.compile else None,
    )
