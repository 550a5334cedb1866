"""Memory bank: prototypes, persistence, growth, encoder checks, tiny masks."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from refseg.core.config import get_preset, replace
from refseg.core.factory import build_encoder
from refseg.core.memory_bank import MemoryBank, ShotRecord, TinyMaskError, encode_shot


@pytest.fixture(scope="module")
def encoder():
    p = get_preset("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_encoder(replace(p.model, random_weights=True), p.method)


def _bank(rows: dict[int, list[list[float]]]) -> MemoryBank:
    bank = MemoryBank(encoder="vits14", image_size=112)
    for cid, protos in rows.items():
        for k, v in enumerate(protos):
            bank.add(ShotRecord(cid, 100 + k, 1000 * cid + k), torch.tensor(v), f"class{cid}")
    return bank


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ({5: [[1.0, 0.0], [0.0, 1.0]]}, [[2**-0.5, 2**-0.5]]),
        ({9: [[3.0, 4.0]], 2: [[0.0, 2.0]]}, [[0.0, 1.0], [0.6, 0.8]]),  # ids sorted: 2, 9
        ({1: [[1.0, 1.0], [1.0, 1.0], [4.0, 4.0]]}, [[2**-0.5, 2**-0.5]]),  # any shot count
    ],
)
def test_class_prototypes_normalised_mean_in_ascending_id_order(rows, expected):
    bank = _bank(rows)
    assert bank.category_ids == sorted(rows)
    assert torch.allclose(bank.class_prototypes(), torch.tensor(expected), atol=1e-6)


def test_round_trip_keeps_everything(tmp_path):
    bank = _bank({3: [[1.0, 2.0], [3.0, 4.0]], 90: [[5.0, 6.0]]})
    bank.meta["preset"] = "tiny"
    path = tmp_path / "bank.safetensors"
    bank.save(str(path))
    back = MemoryBank.load(str(path))
    assert back.category_ids == [3, 90] and back.names == bank.names
    assert torch.equal(back.shots[3], bank.shots[3])
    assert back.records[3][1].annotation_id == 3001
    assert back.meta["preset"] == "tiny"
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_merge_adds_classes_and_shots_without_touching_others():
    a = _bank({3: [[1.0, 0.0]]})
    before = a.shots[3].clone()
    a.merge(_bank({7: [[0.0, 1.0]], 3: [[2.0, 2.0]]}))
    assert a.category_ids == [3, 7]
    assert torch.equal(a.shots[3][0], before[0]) and a.shots[3].shape[0] == 2


@pytest.mark.parametrize(
    ("encoder_name", "size"), [("vitl14", 112), ("vits14", 518), ("vits14_reg", 112)]
)
def test_bank_from_another_encoder_is_refused(encoder_name, size):
    with pytest.raises(ValueError, match="rebuild the bank"):
        _bank({1: [[1.0, 0.0]]}).check_encoder(encoder_name, size)


def test_conflicting_category_name_and_garbage_file(tmp_path):
    bank = _bank({1: [[1.0, 0.0]]})
    with pytest.raises(ValueError, match="class1"):
        bank.add(ShotRecord(1, 1, 1), torch.zeros(2), "other name")
    bad = tmp_path / "bank.safetensors"
    bad.write_bytes(b"definitely not safetensors")
    with pytest.raises(ValueError, match="not a refseg memory bank"):
        MemoryBank.load(str(bad))
    with pytest.raises(FileNotFoundError, match="build-memory"):
        MemoryBank.load(str(tmp_path / "missing.safetensors"))


def test_encode_shot_is_soft_masked_mean_and_tiny_mask_is_an_error(encoder):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)
    mask = np.zeros((100, 140), bool)
    mask[20:70, 30:100] = True
    proto = encode_shot(encoder, img, mask, (30, 20, 70, 50))
    assert proto.shape == (encoder.model.embed_dim,) and torch.isfinite(proto).all()
    tiny = np.zeros((100, 140), bool)
    tiny[50, 60] = True
    with pytest.raises(TinyMaskError, match="too small"):
        encode_shot(encoder, img, tiny, (30, 20, 70, 50))  # a 1-pixel mask in a big box
