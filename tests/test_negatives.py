"""Negative references: a look-alike labelled as a class before, and not after, negatives.

The scene is the synthetic one of ``tests/test_synthetic_scene.py`` (its doubles and shape
helpers) plus a distractor colour close to red, so close that ColourDino's feature of it
points mostly along red's axis: the paper's method labels the distractors red. A negative
reference of red made from one distractor shape must remove those labels and leave every
other instance as it was (same category, mask and score).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from doubles import ShapeSam, colour_dino_encoder
from refseg.core import ops, rle
from refseg.core.config import MethodConfig
from refseg.core.instances import Instances
from refseg.core.matching import Matcher
from refseg.core.memory_bank import MemoryBank
from refseg.core.proposals import Sam2Proposer
from refseg.core.references import build_memory_bank
from refseg.core.segmenter import Segmenter
from test_synthetic_scene import (
    BACKGROUNDS,
    CLASS_COLOURS,
    CLASSES,
    GRID,
    SAM_SIZE,
    _annotation,
    _coco,
    _place_shapes,
)

RED = 3
DISTRACTOR = (228, 58, 50)  # 0.044 from red in RGB: ColourDino gives it cos ~0.6 to red
FAKE = 0  # "category" of the distractor shapes in the scene (never a class of the bank)
COLOURS = {**{cid: c for cid, (_, c) in CLASSES.items()}, FAKE: DISTRACTOR}
HW = [(140, 180), (160, 160), (120, 200), (150, 150)]
# finer patches than the reference tests' 224: at 16 x 16 patches the features of a small
# target shape blend so much background that a real red shape is closer to the distractor's
# prototype (made from a crop, at high resolution) than to red's; at 32 x 32 they do not
DINO_SIZE = 448


def _render(hw, background, shapes) -> np.ndarray:
    img = np.empty((*hw, 3), dtype=np.uint8)
    img[:] = background
    for cid, mask in shapes:
        img[mask] = COLOURS[cid]
    return img


@pytest.fixture(scope="module")
def scene():
    """Targets with one shape of each class and two distractors; references; a negative."""
    rng = np.random.default_rng(5)
    images, targets = {}, []
    for i, hw in enumerate(HW):
        shapes = _place_shapes(rng, hw, 5, classes=[RED, 17, 90, FAKE, FAKE])
        assert [c for c, _ in shapes].count(FAKE) == 2, "could not place the shapes"
        images[f"target_{i}.png"] = _render(hw, BACKGROUNDS[i % len(BACKGROUNDS)], shapes)
        targets.append((f"target_{i}.png", shapes))
    refs_img, refs_ann, neg_img, neg_ann = [], [], [], []
    for k, cid in enumerate([*CLASSES, FAKE]):
        hw, name = (100, 120), f"ref_{cid}.png"
        shapes = _place_shapes(rng, hw, 1, classes=[cid])
        images[name] = _render(hw, BACKGROUNDS[(k + 1) % len(BACKGROUNDS)], shapes)
        info = {"id": 50 + k, "file_name": name, "height": hw[0], "width": hw[1]}
        if cid == FAKE:  # the distractor shape, annotated as "not red"
            neg_img.append(info)
            neg_ann.append(_annotation(800, info["id"], RED, shapes[0][1]))
        else:
            refs_img.append(info)
            refs_ann.append(_annotation(900 + k, info["id"], cid, shapes[0][1]))
    return {
        "images": images,
        "targets": targets,
        "references": _coco(refs_img, refs_ann),
        "negatives": _coco(neg_img, neg_ann),
    }


@pytest.fixture(scope="module")
def encoder():
    return colour_dino_encoder(CLASS_COLOURS, image_size=DINO_SIZE)


@pytest.fixture(scope="module")
def banks(scene, encoder):
    load = scene["images"].__getitem__
    plain = build_memory_bank(encoder, scene["references"], "", load_image=load)
    with_neg = MemoryBank.from_bytes(plain.to_bytes())
    build_memory_bank(
        encoder, scene["negatives"], "", bank=with_neg, negatives=True, load_image=load
    )
    return plain, with_neg


def _label(scene, encoder, bank, **method) -> list[Instances]:
    m = MethodConfig(
        points_per_side=GRID,
        prompt_batch=64,
        box_convention="standard",
        decoder="stock",  # the double stands in for SAM2's own decoder call
        **method,
    )
    sam = ShapeSam([*CLASS_COLOURS, DISTRACTOR, *BACKGROUNDS], image_size=SAM_SIZE).eval()
    seg = Segmenter(Sam2Proposer(sam, m), Matcher(encoder, bank, m))
    found = seg([scene["images"][name] for name, _ in scene["targets"]])
    return [  # the matcher gives RLEs; these tests compare dense masks
        dataclasses.replace(i, masks=np.stack([rle.decode_rle(r) for r in i.rles]))
        if len(i)
        else Instances.empty(i.image_size, with_masks=True)
        for i in found
    ]


@pytest.fixture(scope="module")
def before(scene, encoder, banks):
    return _label(scene, encoder, banks[0])


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _on(inst: Instances, masks: list[np.ndarray]) -> np.ndarray:
    """(N,) bool: instances whose mask covers one of ``masks`` (IoU > 0.5)."""
    return np.array([any(_iou(m, t) > 0.5 for t in masks) for m in inst.masks], dtype=bool)


def test_bank_keeps_negatives_beside_the_shots(banks):
    plain, with_neg = banks
    assert (
        plain.class_negatives() is None
        and plain.to_bytes() == MemoryBank.from_bytes(plain.to_bytes()).to_bytes()
    )

    def version(data: bytes) -> int:
        n = int.from_bytes(data[:8], "little")
        return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["refseg"])["version"]

    # a bank without negatives is written as before (format 1, which older refseg reads)
    assert version(plain.to_bytes()) == 1 and version(with_neg.to_bytes()) == 2
    back = MemoryBank.from_bytes(with_neg.to_bytes())
    assert sorted(back.negatives) == [RED] and back.negatives[RED].shape == (1, len(CLASSES))
    assert back.negative_records[RED][0].annotation_id == 800
    assert torch.equal(back.shots[RED], plain.shots[RED]) and len(back) == len(plain)
    assert back.describe()["negatives"] == {"red": 1}


def test_distractor_is_red_before_and_unlabelled_after(scene, encoder, banks, before):
    after = _label(scene, encoder, banks[1])
    n_fake = n_red = 0
    for (_, shapes), b, a in zip(scene["targets"], before, after, strict=True):
        fakes = [m for c, m in shapes if c == FAKE]
        on_b, on_a = _on(b, fakes), _on(a, fakes)
        # before: every distractor is found and called red (the paper's method)
        assert on_b.sum() >= len(fakes) and set(b.category_ids[on_b].tolist()) == {RED}
        n_fake += int(on_b.sum())
        assert not on_a.any(), "a distractor kept a label after negatives were added"
        # every instance elsewhere is unchanged: category, mask and score
        rest_b, rest_a = b[~on_b], a[~on_a]
        assert rest_b.category_ids.tolist() == rest_a.category_ids.tolist()
        assert np.array_equal(rest_b.masks, rest_a.masks)
        np.testing.assert_allclose(rest_a.scores, rest_b.scores, atol=1e-6)
        # the real red shape is still red
        real = [m for c, m in shapes if c == RED]
        assert (_on(a, real) & (a.category_ids == RED)).any()
        n_red += 1
    assert n_fake >= 2 * len(scene["targets"]) and n_red == len(scene["targets"])


def test_a_margin_below_every_gap_leaves_results_unchanged(scene, encoder, banks, before):
    same = _label(scene, encoder, banks[1], negative_margin=-2.0)  # cosines differ by < 2
    for b, s in zip(before, same, strict=True):
        assert b.category_ids.tolist() == s.category_ids.tolist()
        assert np.array_equal(b.masks, s.masks) and np.array_equal(b.scores, s.scores)


@pytest.mark.parametrize(
    ("feature", "negative", "margin", "expected"),
    [
        ([1.0, 0.0], [0.6, 0.8], 0.0, [False, False]),  # cos to red 1, to its negative 0.6
        ([0.6, 0.8], [0.6, 0.8], 0.0, [True, False]),  # the negative itself: red ruled out
        ([0.96, 0.28], [0.6, 0.8], 0.0, [False, False]),  # 0.8 to the negative < 0.96 to red
        ([0.96, 0.28], [0.6, 0.8], 0.2, [True, False]),  # ... but not by more than 0.2
    ],
)
def test_negative_rule_table(feature, negative, margin, expected):
    # classes: red along x, green along y; one negative, of red
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    blocked = ops.negative_blocked(
        torch.tensor([feature]), protos, torch.tensor([negative]), torch.tensor([0]), margin
    )
    assert blocked[0].tolist() == expected


def test_negative_of_a_class_the_bank_lacks_is_refused(scene, encoder, banks):
    plain, _ = banks
    bank = MemoryBank.from_bytes(plain.to_bytes())
    neg = {**scene["negatives"], "categories": [{"id": 4, "name": "nothing"}]}
    neg["annotations"] = [{**a, "category_id": 4} for a in neg["annotations"]]
    with pytest.raises(ValueError, match="no shots of"):
        build_memory_bank(
            encoder, neg, "", bank=bank, negatives=True, load_image=scene["images"].__getitem__
        )
