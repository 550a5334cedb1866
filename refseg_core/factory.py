"""Build the method's objects from configs: the one entry point jobs and stages use."""

from __future__ import annotations

import torch
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.features import DinoEncoder
from refseg.core.models import build_dinov2, build_sam2
from refseg.core.proposals import Sam2Proposer

__all__ = ["resolve_device", "build_proposer", "build_encoder", "compile_sam2", "compile_dinov2"]

# Random weights are drawn from this seed so that a memory bank and a labelling run made
# with --random-weights use the same (random) encoder: the plumbing then still matches.
RANDOM_WEIGHTS_SEED = 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def compile_sam2(sam: torch.nn.Module) -> None:
    """torch.compile SAM2's image encoder and mask decoder transformer, in place."""
    sam.image_encoder = torch.compile(sam.image_encoder)
    sam.sam_mask_decoder.transformer = torch.compile(sam.sam_mask_decoder.transformer)


def compile_dinov2(vit: torch.nn.Module) -> None:
    """torch.compile the transformer blocks of a timm ViT, in place."""
    vit.blocks = torch.compile(vit.blocks)


def build_proposer(model: ModelConfig, method: MethodConfig) -> Sam2Proposer:
    if model.random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
    loaded = build_sam2(
        model.sam2_config,
        model.sam2_checkpoint,
        device=resolve_device(model.device),
        image_size=model.sam2_image_size,
        random_weights=model.random_weights,
    )
    if model.compile:
        compile_sam2(loaded.model)
    proposer = Sam2Proposer(loaded.model, method)
    proposer.checkpoint_sha256 = loaded.sha256  # type: ignore[attr-defined]
    return proposer


def build_encoder(model: ModelConfig, method: MethodConfig) -> DinoEncoder:
    if model.random_weights:
        torch.manual_seed(RANDOM_WEIGHTS_SEED + 1)
    loaded = build_dinov2(
        model.dinov2_model,
        model.dinov2_checkpoint,
        device=resolve_device(model.device),
        image_size=model.dinov2_image_size,
        random_weights=model.random_weights,
    )
    if model.compile:
        compile_dinov2(loaded.model)
    return DinoEncoder(loaded, model.dinov2_image_size, autocast_bf16=method.autocast_bf16)
