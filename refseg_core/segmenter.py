"""The whole method in one process: targets in, labelled instances out.

The Ray pipeline runs the same pieces (``prepare_targets``, ``Sam2Proposer``,
``Matcher``) as separate stages; this class is the in-process loop that tests, benchmarks
and small jobs use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from refseg.core.imaging import PreparedTarget, prepare_target
from refseg.core.instances import Instances
from refseg.core.matching import Matcher
from refseg.core.proposals import Sam2Proposer
from refseg.core.tensors import stack_targets_uint8

__all__ = ["Segmenter"]


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
        batch = stack_targets_uint8(targets)  # converted to float on the models' device
        proposals = self.proposer.propose(
            batch, [t.valid_hw for t in targets], [t.orig_hw for t in targets]
        )
        feats = self.matcher.target_features(batch)
        return [self.matcher.match(p, f) for p, f in zip(proposals, feats, strict=True)]
