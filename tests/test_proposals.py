"""SAM2 proposals on the real tiny architecture, and their exact compact transport form."""

from __future__ import annotations

import warnings

import pytest
import torch
from refseg.core.config import MethodConfig, get_preset, replace
from refseg.core.factory import build_proposer
from refseg.core.proposals import Proposals
from refseg.core.transport import decode_proposals, encode_proposals


@pytest.fixture(scope="module")
def tiny_model():
    p = get_preset("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_proposer(replace(p.model, random_weights=True), p.method).model


@pytest.mark.parametrize(
    ("points", "batch", "iou", "no_mem"),
    [(4, 5, 0.0, False), (3, 64, "median", True), (2, 1, 2.0, False)],
)
def test_propose_shapes_filters_and_all_prompts(tiny_model, points, batch, iou, no_mem):
    from refseg.core.proposals import Sam2Proposer

    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    valid, orig = [(256, 256), (256, 128)], [(50, 60), (9, 9)]

    def propose(threshold: float):
        m = MethodConfig(
            points_per_side=points,
            prompt_batch=batch,
            iou_threshold=threshold,
            add_no_mem_embed=no_mem,
        )
        return Sam2Proposer(tiny_model, m).propose(image, valid, orig)

    if iou != "median":  # 0.0: every prompt passes (random weights predict IoUs > 0); 2.0: none
        out = propose(iou)
        assert [len(p) for p in out] == [points * points if iou == 0.0 else 0] * 2
        for p in out:
            assert p.logits.shape[1:] == (64, 64) and not torch.isnan(p.logits).any()
            assert p.iou.shape == (len(p),) and bool((p.iou > iou).all())
        if iou == 0.0:  # also the last partial batch; the grid covers each valid region
            assert 128 < float(out[0].points[:, 0].max()) <= 256
            assert 64 < float(out[1].points[:, 0].max()) <= 128  # the second is 128 wide
        return
    # halfway between two predicted IoUs near the median: some prompts pass, some do not
    every = propose(-1.0)
    ious = torch.cat([e.iou for e in every]).sort().values
    k = next(j for j in range(len(ious) // 2, len(ious) - 1) if ious[j + 1] - ious[j] > 1e-5)
    cut = float(ious[k] + ious[k + 1]) / 2
    out = propose(cut)
    for p, e in zip(out, every, strict=True):
        keep = e.iou > cut
        assert len(p) == int(keep.sum())  # exactly the prompts above the threshold
        assert torch.equal(p.points, e.points[keep])
        assert torch.allclose(p.iou, e.iou[keep]) and torch.allclose(p.logits, e.logits[keep])
    assert 0 < sum(len(p) for p in out) < 2 * points * points


@pytest.mark.parametrize(
    ("valid_hw", "orig_hw"),
    [
        ((256, 200), (300, 250)),  # longest-side, enlarging
        ((256, 200), (30, 25)),  # longest-side, shrinking (bilinear sampling)
        ((256, 256), (300, 250)),  # square, enlarging
        ((256, 256), (97, 411)),  # square, shrinking one axis (antialiased)
        ((256, 256), (20, 9)),  # square, shrinking both axes a lot
    ],
)
def test_transport_form_is_exact_at_the_original_size(valid_hw, orig_hw):
    from refseg.core.imaging import ResizeInfo
    from refseg.core.tensors import lowres_to_original

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(
        torch.randn(6, 1, 8, 8, generator=g), size=(64, 64), mode="bilinear"
    )[:, 0]
    mode = "square" if valid_hw == (256, 256) else "longest-side"
    info = ResizeInfo(orig_hw, 256, mode, valid_hw)
    for logits in (smooth, torch.randn(3, 64, 64, generator=g), torch.zeros(0, 64, 64)):
        p = Proposals(
            logits, torch.rand(len(logits)), torch.rand(len(logits), 2), 256, valid_hw, orig_hw
        )
        q = decode_proposals(encode_proposals(p))
        assert (q.input_size, q.valid_hw, q.orig_hw) == (256, valid_hw, orig_hw)
        assert torch.equal(q.iou, p.iou) and torch.equal(q.logits > 0, p.logits > 0)
        assert torch.equal(
            lowres_to_original(q.logits, info) > 0, lowres_to_original(logits, info) > 0
        )


def test_transport_band_is_needed_when_shrinking():
    """Without the widened band, antialiased shrinking would change the masks."""
    from refseg.core.imaging import ResizeInfo
    from refseg.core.tensors import lowres_to_original

    g = torch.Generator().manual_seed(4)
    logits = torch.nn.functional.interpolate(
        torch.randn(8, 1, 6, 6, generator=g), size=(64, 64), mode="bilinear"
    )[:, 0]
    orig = (11, 13)
    info = ResizeInfo(orig, 256, "square", (256, 256))
    fg = logits > 0
    f = fg[:, None].float()
    boundary = (
        torch.nn.functional.max_pool2d(f, 3, 1, 1) != -torch.nn.functional.max_pool2d(-f, 3, 1, 1)
    )[:, 0]
    narrow = torch.where(fg, 1e4, -1e4)
    narrow[boundary] = logits[boundary]
    exact = lowres_to_original(logits, info) > 0
    assert not torch.equal(lowres_to_original(narrow, info) > 0, exact)
    q = decode_proposals(
        encode_proposals(Proposals(logits, torch.rand(8), torch.rand(8, 2), 256, (256, 256), orig))
    )
    assert torch.equal(lowres_to_original(q.logits, info) > 0, exact)


def test_transport_form_is_compact():
    # object-like masks (discs) are compact: a fraction of dense float32 logits
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    discs = torch.stack([r**2 - (xx - 32) ** 2 - (yy - 30) ** 2 for r in (5.0, 12.0, 25.0)])
    p = Proposals(discs, torch.rand(3), torch.rand(3, 2), 256, (256, 256), (300, 300))
    assert len(encode_proposals(p)) < discs.numel() * 4 / 5


def test_normalisation_constants_are_sam2s_own():
    from refseg.core.proposals import SAM2_MEAN, SAM2_STD
    from sam2.utils.transforms import SAM2Transforms

    t = SAM2Transforms(resolution=64, mask_threshold=0.0)
    assert list(SAM2_MEAN) == list(t.mean) and list(SAM2_STD) == list(t.std)
