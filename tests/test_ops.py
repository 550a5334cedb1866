"""Table-driven tests of the pure tensor functions, each against a plain transcription."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from refseg.core import ops


@pytest.mark.parametrize(
    ("n", "size", "first", "second", "last"),
    [
        (32, 1024, (0.5, 0.5), (0.5, 33.5), (1023.5, 1023.5)),
        (8, 256, (0.5, 0.5), (0.5, 255 / 7 + 0.5), (255.5, 255.5)),
        (1, 64, (0.5, 0.5), None, (0.5, 0.5)),
    ],
)
def test_point_grid_is_x_major_linspace_plus_half(n, size, first, second, last):
    g = ops.point_grid(n, size)
    assert g.shape == (n * n, 2)
    assert torch.allclose(g[0], torch.tensor(first))
    if second is not None:
        assert torch.allclose(g[1], torch.tensor(second, dtype=torch.float32))
    assert torch.allclose(g[-1], torch.tensor(last))


def test_point_grid_rectangular_valid_region():
    g = ops.point_grid(4, 100, 200)  # height 100, width 200
    assert g[:, 0].max() == pytest.approx(199.5)
    assert g[:, 1].max() == pytest.approx(99.5)


def _mask(h, w, boxes):
    m = torch.zeros((len(boxes), h, w), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        m[i, y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize(
    ("boxes", "inclusive", "expected"),
    [
        ([(2, 3, 5, 9)], False, [(2, 3, 5, 9)]),
        ([(2, 3, 5, 9)], True, [(2, 3, 4, 8)]),
        ([(0, 0, 10, 10)], False, [(0, 0, 10, 10)]),
        ([(7, 7, 8, 8)], True, [(7, 7, 7, 7)]),
        ([(0, 0, 0, 0)], False, [(0, 0, 0, 0)]),  # empty mask
    ],
)
def test_masks_to_boxes(boxes, inclusive, expected):
    got = ops.masks_to_boxes(_mask(10, 10, boxes), inclusive=inclusive)
    assert got.tolist() == [list(map(float, e)) for e in expected]


def test_masks_to_boxes_matches_pycocotools_standard_box():
    import numpy as np
    from pycocotools import mask as mask_utils

    m = _mask(20, 30, [(3, 4, 17, 19)])
    rle = mask_utils.encode(np.asfortranarray(m[0].numpy().astype(np.uint8)))
    x, y, w, h = mask_utils.toBbox(rle)
    got = ops.masks_to_boxes(m)[0].tolist()
    assert got == [x, y, x + w, y + h]


@pytest.mark.parametrize(
    ("boxes", "rank", "labels", "expected"),
    [
        # two overlapping boxes of one class: the higher-ranked survives
        ([(0, 0, 10, 10), (1, 1, 10, 10)], [0.5, 0.9], [0, 0], [1]),
        # same boxes, different classes: both survive, in rank order
        ([(0, 0, 10, 10), (1, 1, 10, 10)], [0.5, 0.9], [0, 1], [1, 0]),
        # disjoint boxes: both
        ([(0, 0, 5, 5), (6, 6, 10, 10)], [0.9, 0.5], [0, 0], [0, 1]),
    ],
)
def test_classwise_nms_ranks_by_given_key(boxes, rank, labels, expected):
    keep = ops.classwise_nms(
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(rank),
        torch.tensor(labels),
        0.5,
        800,
    )
    assert keep.tolist() == expected


def test_classwise_nms_max_keep_and_empty():
    boxes = torch.tensor([[i * 10.0, 0, i * 10 + 5, 5] for i in range(5)])
    keep = ops.classwise_nms(boxes, torch.arange(5.0), torch.zeros(5, dtype=torch.long), 0.5, 3)
    assert keep.tolist() == [4, 3, 2]
    empty = ops.classwise_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0).long(), 0.5, 3)
    assert empty.numel() == 0


@pytest.mark.parametrize(("h", "w", "H", "W"), [(37, 37, 256, 256), (8, 8, 64, 64), (5, 7, 40, 23)])
def test_bilinear_operator_equals_interpolate(h, w, H, W):
    x = torch.randn(h, w, dtype=torch.float64)
    want = F.interpolate(x[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    uy = ops.bilinear_operator(h, H, dtype=torch.float64)
    ux = ops.bilinear_operator(w, W, dtype=torch.float64)
    assert torch.allclose(uy @ x @ ux.T, want, atol=1e-12)


@pytest.mark.parametrize(("h", "H", "D", "N"), [(37, 256, 16, 5), (8, 64, 32, 7), (6, 50, 4, 3)])
def test_patch_pooling_equals_upsample_then_average(h, H, D, N):
    """The paper upsamples features to the mask size and averages: same numbers."""
    torch.manual_seed(h)
    feats = torch.randn(h, h, D, dtype=torch.float64)
    masks = torch.rand(N, H, H) > 0.7
    masks[0] = False  # an empty mask gives zeros in both forms
    fast = ops.pool_features(feats, masks)
    # plain transcription of the paper's form
    up = F.interpolate(feats.permute(2, 0, 1)[None], size=(H, H), mode="bilinear")[0]
    for i in range(N):
        m = masks[i]
        want = up[:, m].mean(dim=1) if m.any() else torch.zeros(D, dtype=torch.float64)
        assert torch.allclose(fast[i], want, atol=1e-10), i
    assert torch.allclose(ops.pool_features_naive(feats, masks), fast, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
@pytest.mark.parametrize("float_masks", [False, True])
def test_patch_pooling_chunks_and_mask_dtypes_agree(chunk, float_masks):
    """Every chunk size (incl. a partial last chunk) and float masks give the same result."""
    torch.manual_seed(0)
    feats = torch.randn(5, 7, 6, dtype=torch.float64)
    masks = torch.rand(20, 40, 23) > 0.6
    masks[3] = False
    want = ops.pool_features_naive(feats, masks)
    m = masks.double() if float_masks else masks
    got = ops.pool_features(feats, m, chunk=chunk)
    assert got.shape == (20, 6) and torch.allclose(got, want, atol=1e-10)
    assert torch.equal(got[3], torch.zeros(6, dtype=torch.float64))
    assert ops.pool_features(feats, masks[:0], chunk=chunk).shape == (0, 6)


def test_cosine_scores_clamped_at_zero():
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    s = ops.cosine_scores(f, p)
    assert torch.allclose(s, torch.tensor([[1.0, 0.0], [0.0, 0.0], [2**-0.5, 2**-0.5]]))


def test_upsample_masks_thresholds_bilinear_logits():
    logits = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]])
    m = ops.upsample_masks(logits, (2, 4))
    assert m.tolist() == [[[False, False, True, True], [False, False, True, True]]]
    assert ops.upsample_masks(torch.zeros(0, 2, 2), (5, 5)).shape == (0, 5, 5)


def _soft_merge_reference(masks, feats, labels, scores, power):
    out = scores.clone()
    f = F.normalize(feats, dim=-1)
    for i in range(len(scores)):
        ios = 0.0
        for j in range(i):
            if labels[j] != labels[i]:
                continue
            inter = (masks[i] & masks[j]).sum().item()
            area = masks[i].sum().item()
            sim = min(max(float(f[i] @ f[j]), 0.0), 1.0)
            ios = max(ios, inter / max(area, 1) * sim)
        out[i] = scores[i] * (1 - ios) ** power
    return out


@pytest.mark.parametrize(("seed", "chunk"), [(0, 2**18), (1, 2**18), (2, 2**18), (0, 7), (1, 144)])
def test_soft_merge_matches_plain_transcription(seed, chunk, monkeypatch):
    """Also with the overlap counts summed over pixel chunks (7: a partial last chunk)."""
    monkeypatch.setattr(ops, "OVERLAP_CHUNK", chunk)
    g = torch.Generator().manual_seed(seed)
    n = 9
    masks = torch.rand(n, 12, 12, generator=g) > 0.5
    feats = torch.randn(n, 6, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    scores = torch.rand(n, generator=g)
    got = ops.soft_merge_scores(masks, feats, labels, scores, 0.5)
    want = _soft_merge_reference(masks, feats, labels, scores, 0.5)
    assert torch.allclose(got, want, atol=1e-6)


def test_soft_merge_identical_masks_never_nan():
    masks = torch.ones(3, 4, 4, dtype=torch.bool)
    feats = torch.ones(3, 8) * 0.3  # cosine can round a hair above 1
    out = ops.soft_merge_scores(masks, feats, torch.zeros(3).long(), torch.ones(3), 0.5)
    assert not torch.isnan(out).any()
    assert out[0] == 1.0 and torch.all(out[1:] < 1e-3)
