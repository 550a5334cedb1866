"""The whole method in one process: targets in, labelled instances out.

The Ray pipeline runs the same pieces (``prepare_targets``, ``Sam2Proposer``,
``Matcher``) as separate stages; this class is the in-process loop that tests, benchmarks
and small jobs use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from refseg_core.config import ResizeMode
from refseg_core.imaging import resize_longest_side, resize_square, to_float_tensor
from refseg_core.instances import Instances
from refseg_core.matching import Matcher
from refseg_core.proposals import Sam2Proposer

__all__ = ["PreparedTarget", "prepare_target", "stack_targets", "Segmenter"]


@dataclass(frozen=True)
class PreparedTarget:
    """A target resized for SAM2: (S, S, 3) uint8 square plus where the image lies in it."""

    square: np.ndarray
    valid_hw: tuple[int, int]
    orig_hw: tuple[int, int]


def prepare_target(image: np.ndarray, size: int, mode: ResizeMode = "square") -> PreparedTarget:
    """Resize an (H, W, 3) uint8 RGB image to the SAM2 input square (PIL bicubic).

    ``square`` stretches to size x size (the paper); ``longest-side`` keeps the aspect
    ratio and pads bottom/right with zeros (SAM2's predictor).
    """
    orig = (int(image.shape[0]), int(image.shape[1]))
    if mode == "square":
        return PreparedTarget(resize_square(image, size), (size, size), orig)
    square, valid = resize_longest_side(image, size)
    return PreparedTarget(square, (int(valid[0]), int(valid[1])), orig)


def stack_targets(targets: Sequence[PreparedTarget]) -> torch.Tensor:
    """(B, 3, S, S) float32 in [0, 1]."""
    return torch.stack([to_float_tensor(t.square) for t in targets])


class Segmenter:
    """SAM2 proposals + DINOv2 matching on a list of images (method.md §3-§4)."""

    def __init__(self, proposer: Sam2Proposer, matcher: Matcher) -> None:
        self.proposer = proposer
        self.matcher = matcher

    def __call__(self, images: Sequence[np.ndarray]) -> list[Instances]:
        """Label (H, W, 3) uint8 RGB images; one Instances per image."""
        m = self.proposer.method
        targets = [prepare_target(im, self.proposer.input_size, m.resize) for im in images]
        return self.label_prepared(targets)

    def label_prepared(self, targets: Sequence[PreparedTarget]) -> list[Instances]:
        if not targets:
            return []
        batch = stack_targets(targets)
        proposals = self.proposer.propose(
            batch, [t.valid_hw for t in targets], [t.orig_hw for t in targets]
        )
        feats = self.matcher.target_features(batch)
        return [self.matcher.match(p, f) for p, f in zip(proposals, feats, strict=True)]
