"""§2 and §4 of the method against a plain, slow transcription of ``method.md``.

The transcriptions below are written from the specification only: loops, explicit index
arithmetic and a hand-written greedy NMS, on inputs small enough for that to be quick. The
code under test is ``MemoryBank.class_prototypes`` (§2) and ``Matcher.match`` (§4), with
its ``lowres`` merging option. §1 and §3 (shot prototypes, SAM 2 proposals) are in
``test_stages_reference_models.py``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from doubles import colour_dino_encoder
from refseg.core import rle
from refseg.core.config import MethodConfig
from refseg.core.matching import Matcher
from refseg.core.memory_bank import MemoryBank, ShotRecord
from refseg.core.proposals import Proposals

from tests.stages_reference_util import DINO_SIZE, PALETTE

# ------------------------------------------------------------------ §2 class prototypes


def _bank(shots_per_class: dict[int, int], dim: int, seed: int) -> MemoryBank:
    gen = torch.Generator().manual_seed(seed)
    bank = MemoryBank(encoder="vits14", image_size=DINO_SIZE)
    order = [
        c
        for k in range(max(shots_per_class.values()))
        for c in shots_per_class
        if k < shots_per_class[c]
    ]
    for i, cid in enumerate(order):  # interleaved: shots of a class arrive at different times
        proto = torch.randn(dim, generator=gen) + 2.0 * torch.eye(dim)[cid % dim]
        bank.add(ShotRecord(cid, image_id=i, annotation_id=i), proto, f"class{cid}")
    return bank


@pytest.mark.parametrize("shots", [{90: 3, 3: 1, 17: 5}, {17: 1}, {3: 2, 90: 2}])
def test_class_prototypes_match_transcription(shots):
    bank = _bank(shots, dim=8, seed=len(shots))
    assert bank.category_ids == sorted(shots)
    expected = []
    for cid in sorted(shots):
        rows = bank.shots[cid]
        assert rows.shape[0] == shots[cid]
        mean = [
            sum(float(rows[k, d]) for k in range(rows.shape[0])) / rows.shape[0] for d in range(8)
        ]
        norm = math.sqrt(sum(v * v for v in mean))
        expected.append([v / norm for v in mean])
    assert torch.allclose(bank.class_prototypes(), torch.tensor(expected), atol=1e-6)


# ------------------------------------------------------------------ §4 matching


def _box(mask: torch.Tensor, inclusive: bool) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    end = 0 if inclusive else 1
    return [float(xs.min()), float(ys.min()), float(xs.max() + end), float(ys.max() + end)]


def _box_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_match(logits, iou, features, prototypes, orig_hw, method):
    """§4.2-§4.7 transcribed. Returns [(category index, score, full-res mask, box, iou)].

    With ``method.merge_resolution == "lowres"`` (refseg's option, not the paper's), §4.6
    measures IoS on the low-res masks ``logits > 0`` instead of the full-resolution ones.
    """
    inclusive = method.box_convention == "ntt"
    n, h, w = logits.shape
    up = F.interpolate(features.permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0]
    cands = []
    for i in range(n):
        mask = logits[i] > 0
        if not bool(mask.any()):
            continue  # an empty mask has no feature (its score would be 0)
        pooled = up[:, mask].double().mean(dim=1)
        f = pooled / math.sqrt(float((pooled * pooled).sum()))
        sims = [max(0.0, float((f * p.double()).sum())) for p in prototypes]
        label = max(range(len(sims)), key=lambda c: (sims[c], -c))
        cands.append(
            {"i": i, "f": f, "label": label, "score": sims[label], "box": _box(mask, inclusive)}
        )
    cands.sort(key=lambda c: -float(iou[c["i"]]))  # NMS ranks by SAM's predicted IoU
    kept = []
    for c in cands:
        same = [k for k in kept if k["label"] == c["label"]]
        if all(_box_iou(c["box"], k["box"]) <= method.nms_iou for k in same):
            kept.append(c)
    kept = [c for c in kept[: method.max_nms] if c["score"] > 0]
    for c in kept:
        up_logits = F.interpolate(
            logits[c["i"]][None, None], size=orig_hw, mode="bilinear", antialias=True
        )
        c["mask"] = up_logits[0, 0] > 0
    lowres = method.merge_resolution == "lowres"
    for pos, c in enumerate(kept):  # soft merging in NMS order, within each class
        ios = 0.0
        mc = logits[c["i"]] > 0 if lowres else c["mask"]
        for k in kept[:pos]:
            if k["label"] != c["label"]:
                continue
            mk = logits[k["i"]] > 0 if lowres else k["mask"]
            inter = float((mc & mk).sum()) / float(mc.sum())
            cos = min(1.0, max(0.0, float((c["f"] * k["f"]).sum())))
            ios = max(ios, inter * cos)
        c["merged"] = c["score"] * (1.0 - ios) ** method.merge_power
    kept.sort(key=lambda c: -c["merged"])
    return [
        (c["label"], c["merged"], c["mask"], _box(c["mask"], inclusive), float(iou[c["i"]]))
        for c in kept[: method.max_instances]
    ]


def _random_proposals(seed, n, size=32):
    """Ellipse logits (N, size, size), with shifted copies (for NMS) and nested ones."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    params = []
    for _ in range(n):
        cx, cy = (4 + (size - 8) * torch.rand(2, generator=gen)).tolist()
        rx, ry = (2.5 + size / 4 * torch.rand(2, generator=gen)).tolist()
        params.append((cx, cy, rx, ry))
    params += [(cx + 1, cy, rx, ry) for cx, cy, rx, ry in params[: n // 4]]  # near-duplicates
    params += [(cx, cy, rx / 3 + 1, ry / 3 + 1) for cx, cy, rx, ry in params[: n // 4]]  # nested
    logits = torch.stack(
        [4 * (1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2) for cx, cy, rx, ry in params]
    )
    logits[-1] = -1.0  # one empty proposal
    iou = 0.4 + 0.6 * torch.rand(len(params), generator=gen)
    return logits, iou


def _features(prototypes, seed, g=6):
    """(g, g, D): quadrant-wise class prototypes plus noise, so that labels are spatial."""
    gen = torch.Generator().manual_seed(seed)
    c, d = prototypes.shape
    feats = 0.6 * torch.randn(g, g, d, generator=gen)
    for i in range(g):
        for j in range(g):
            feats[i, j] += 2 * prototypes[(2 * i // g + 2 * (2 * j // g)) % c]
    return feats


@pytest.mark.parametrize(
    ("box_convention", "max_nms", "max_instances", "soft_merge", "seed", "merge_at", "orig_hw"),
    [
        ("ntt", 800, 100, True, 0, "full", (45, 70)),
        ("standard", 800, 100, True, 1, "full", (45, 70)),
        ("standard", 6, 100, True, 2, "full", (45, 70)),
        ("ntt", 800, 4, True, 3, "full", (45, 70)),
        ("standard", 800, 100, False, 4, "full", (45, 70)),
        ("ntt", 800, 100, True, 0, "lowres", (45, 70)),
        ("standard", 800, 5, True, 1, "lowres", (45, 70)),
        # originals smaller than the low-res masks in a dimension: antialiased resize (§4.5)
        ("ntt", 800, 100, True, 5, "full", (20, 70)),
        ("ntt", 800, 100, True, 6, "full", (13, 9)),
    ],
)
def test_matching_matches_transcription(
    box_convention, max_nms, max_instances, soft_merge, seed, merge_at, orig_hw
):
    bank = _bank({90: 2, 3: 1, 17: 3}, dim=16, seed=seed)
    method = MethodConfig(
        box_convention=box_convention,
        max_nms=max_nms,
        max_instances=max_instances,
        soft_merge=soft_merge,
        merge_resolution=merge_at,
    )
    matcher = Matcher(colour_dino_encoder(PALETTE, DINO_SIZE), bank, method)
    logits, iou = _random_proposals(seed, 24)
    props = Proposals(logits, iou, torch.zeros(len(iou), 2), 128, (128, 128), orig_hw)
    feats = _features(bank.class_prototypes(), seed)
    # without merging the transcription skips §4.6: (1 - IoS) ** 0 == 1
    spec = method if soft_merge else dataclasses.replace(method, merge_power=0.0)
    expected = reference_match(logits, iou, feats, bank.class_prototypes(), orig_hw, spec)
    got = matcher.match(props, feats)
    assert len(expected) > 1
    assert len(got) == len(expected)
    ids = sorted(bank.category_ids)
    for k, (label, score, mask, box, pred_iou) in enumerate(expected):
        assert int(got.category_ids[k]) == ids[label]
        assert float(got.scores[k]) == pytest.approx(score, abs=1e-5)
        assert np.array_equal(rle.decode_rle(got.rles[k]), mask.numpy())
        assert got.boxes[k].tolist() == box
        assert float(got.proposal_iou[k]) == pytest.approx(pred_iou, abs=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lowres_merging_stays_close_to_the_paper(seed):
    """The speed option changes only the IoS of §4.6: same instances, scores within 0.05."""
    bank = _bank({90: 2, 3: 1, 17: 3}, dim=16, seed=seed)
    logits, iou = _random_proposals(seed, 24)
    orig_hw = (90, 140)
    props = Proposals(logits, iou, torch.zeros(len(iou), 2), 128, (128, 128), orig_hw)
    feats = _features(bank.class_prototypes(), seed)
    enc = colour_dino_encoder(PALETTE, DINO_SIZE)
    full = Matcher(enc, bank, MethodConfig()).match(props, feats)
    low = Matcher(enc, bank, MethodConfig(merge_resolution="lowres")).match(props, feats)
    assert len(full) == len(low) > 5

    def key(inst, k):
        return (int(inst.category_ids[k]), rle.decode_rle(inst.rles[k]).tobytes())

    by_mask = {key(full, k): float(full.scores[k]) for k in range(len(full))}
    assert {key(low, k) for k in range(len(low))} == set(by_mask)
    diffs = [abs(float(low.scores[k]) - by_mask[key(low, k)]) for k in range(len(low))]
    assert max(diffs) < 0.05
    assert sum(d > 0 for d in diffs) > 0  # the IoS did differ somewhere: a real comparison


def test_matching_exercises_nms_and_merging():
    """The random inputs above do reach §4.4 and §4.6 (a guard on the test's own data)."""
    bank = _bank({90: 2, 3: 1, 17: 3}, dim=16, seed=0)
    logits, iou = _random_proposals(0, 24)
    feats = _features(bank.class_prototypes(), 0)
    method = MethodConfig(box_convention="ntt")
    out = reference_match(logits, iou, feats, bank.class_prototypes(), (45, 70), method)
    flat = reference_match(
        logits,
        iou,
        feats,
        bank.class_prototypes(),
        (45, 70),
        dataclasses.replace(method, merge_power=0.0),
    )
    assert len(out) < logits.shape[0] - 1  # NMS removed some
    assert len({e[0] for e in out}) > 1  # several classes
    assert sorted(e[1] for e in out) != pytest.approx(sorted(e[1] for e in flat))  # merged


def test_matching_keeps_a_fully_merged_instance_with_score_zero():
    """A mask inside a same-class mask with the same feature: IoS = 1, merged score 0."""
    bank = _bank({3: 1, 17: 1}, dim=4, seed=0)
    method = MethodConfig()
    matcher = Matcher(colour_dino_encoder(PALETTE, DINO_SIZE), bank, method)
    yy, xx = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    radii = torch.tensor([12.0, 4.0]).view(2, 1, 1)
    logits = 4 * (1 - ((xx - 16) ** 2 + (yy - 16) ** 2) / radii**2)
    iou = torch.tensor([0.9, 0.8])
    feats = bank.class_prototypes()[0].expand(6, 6, 4).clone()  # one feature everywhere
    expected = reference_match(logits, iou, feats, bank.class_prototypes(), (40, 40), method)
    assert [e[1] for e in expected] == pytest.approx([1.0, 0.0])
    props = Proposals(logits, iou, torch.zeros(2, 2), 128, (128, 128), (40, 40))
    got = matcher.match(props, feats)
    assert got.scores.tolist() == pytest.approx([e[1] for e in expected], abs=1e-5)


def test_matching_without_any_proposal_is_empty():
    bank = _bank({3: 1}, dim=4, seed=0)
    matcher = Matcher(colour_dino_encoder(PALETTE, DINO_SIZE), bank, MethodConfig())
    props = Proposals(
        -torch.ones(3, 32, 32), torch.ones(3), torch.zeros(3, 2), 128, (128, 128), (20, 30)
    )
    got = matcher.match(props, torch.randn(6, 6, 4))
    assert len(got) == 0 and got.image_size == (20, 30)
