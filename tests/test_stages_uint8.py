"""The model stages hand the models uint8 squares (a quarter of float32's bytes to the device):
the float conversion happens on the models' device (refseg.core.tensors.images_to_float)."""

from __future__ import annotations

import numpy as np
import torch
from refseg.core.proposals import Proposals
from refseg.pipeline.dataflow.stages import MatchStage, ProposalStage
from refseg.pipeline.schema import Col


def _batch(n: int = 2, size: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    squares = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    squares.setflags(write=False)  # as Ray hands them out
    return {
        Col.IMAGE_ID: np.arange(n),
        Col.IMAGE_URI: np.asarray([f"{i}.jpg" for i in range(n)], dtype=object),
        Col.STATUS: np.asarray(["ok"] * n, dtype=object),
        Col.ERROR: np.asarray([""] * n, dtype=object),
        Col.SQUARE: squares,
        Col.VALID_H: np.full(n, size),
        Col.VALID_W: np.full(n, size),
        Col.HEIGHT: np.full(n, 20),
        Col.WIDTH: np.full(n, 30),
    }


class _Seen(Exception):
    pass


class _Model:
    """Records the images a stage passes."""

    def __init__(self, device: str = "cpu") -> None:
        self.images: list[torch.Tensor] = []
        self.device = torch.device(device)  # a device object only: nothing runs there

    def propose(self, images, valid_hw, orig_hw):
        self.images.append(images)
        side = 8
        return [
            Proposals(torch.zeros(0, side, side), torch.zeros(0), torch.zeros(0, 2), 32, v, o)
            for v, o in zip(valid_hw, orig_hw, strict=True)
        ]

    def target_features(self, images):
        self.images.append(images)
        raise _Seen("recorded")


def test_stages_pass_uint8_squares_to_the_models():
    batch = _batch()
    squares = batch[Col.SQUARE].copy()
    propose = object.__new__(ProposalStage)
    propose.proposer = _Model("cuda")
    out = propose(dict(batch))
    (images,) = propose.proposer.images  # on a GPU: the batch in one call
    assert images.dtype == torch.uint8 and images.shape == (2, 32, 32, 3)
    assert np.array_equal(images.numpy(), squares)
    assert list(out[Col.STATUS]) == ["ok", "ok"]

    propose.proposer = _Model("cpu")
    again = propose(dict(batch))
    calls = propose.proposer.images  # on the CPU: one image a call (its logits freed)
    assert [tuple(c.shape) for c in calls] == [(1, 32, 32, 3)] * 2
    assert all(c.dtype == torch.uint8 for c in calls)
    assert np.array_equal(torch.cat(calls).numpy(), squares)
    assert list(again[Col.PROPOSALS]) == list(out[Col.PROPOSALS])

    match = object.__new__(MatchStage)
    match.matcher = _Model()
    match.names, match.cache_proposals = {}, False
    done = match(dict(out))  # the stub fails after recording: a batch, then image by image
    assert list(done[Col.STATUS]) == ["error", "error"]
    images = match.matcher.images[0]
    assert images.dtype == torch.uint8 and np.array_equal(images.numpy(), squares)
