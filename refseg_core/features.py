"""DINOv2 feature extraction around a built timm model."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from refseg.core.models import LoadedModel, dinov2_mean_std, dinov2_patch_tokens

__all__ = ["DinoEncoder"]


class DinoEncoder:
    """Patch features of the last block after the final norm (method.md §1.4).

    Args:
        loaded: a DINOv2 model from ``refseg.core.models.build_dinov2``.
        image_size: the square input side (518 in the paper; a multiple of 14).
        autocast_bf16: run the backbone under bf16 autocast.
        compile_backend: a ``torch.compile`` backend (``"inductor"``, or a callable) for the
            encoder's forward pass (patch embedding, blocks, final norm); ``None``: eager.
            The model itself is left as it is.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        image_size: int,
        *,
        autocast_bf16: bool = False,
        compile_backend: str | Callable[..., Any] | None = None,
    ):
        if image_size % 14:
            raise ValueError(f"DINOv2 image size must be a multiple of 14, got {image_size}")
        self.model = loaded.model
        self.name = loaded.name
        self.checkpoint_sha256 = loaded.sha256
        self.image_size = image_size
        self.device = next(self.model.parameters()).device
        mean, std = dinov2_mean_std(self.model)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.autocast_bf16 = autocast_bf16
        self._patch_tokens: Callable[[torch.Tensor], torch.Tensor] = partial(
            dinov2_patch_tokens, self.model
        )
        if compile_backend is not None:
            self._patch_tokens = torch.compile(self._patch_tokens, backend=compile_backend)

    @property
    def grid(self) -> int:
        return self.image_size // 14

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] at S = image_size -> (B, S/14, S/14, D) float32."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} inputs, got {tuple(images.shape)}"
            )
        x = (images.to(self.device, torch.float32) - self._mean) / self._std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            return self._patch_tokens(x).float()
