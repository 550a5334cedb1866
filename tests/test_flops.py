"""bench/flops.py: the per-stage FLOP counts add up, attention is counted on the CPU, and
counting part of the prompts then scaling gives what counting them all gives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def flops():
    sys.path.insert(0, str(BENCH))
    try:
        import flops as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_cpu_attention_is_counted(flops):
    q, k, v = torch.rand(2, 4, 9, 8), torch.rand(2, 4, 5, 8), torch.rand(2, 4, 5, 6)
    by_kernel = flops.count(lambda: F.scaled_dot_product_attention(q, k, v))
    by_products = flops.count(lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    assert by_kernel == by_products == 2 * 2 * 4 * 9 * 5 * (8 + 6) / 1e9


def test_tiny_counts_add_up(flops, tmp_path):
    args = ["--preset", "tiny", "--prompts", "16", "--full-propose", "--proposals", "30"]
    assert flops.main([*args, "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "flops_tiny.json").read_text())
    assert result["command"].startswith("python bench/flops.py --preset tiny")
    for decoder, p in result["propose"].items():
        assert p["prompts"] == 64 and p["prompts_counted"] == 16 and p["linear"], decoder
        parts = p["image_encoder"] + p["decoder_per_image"] + p["per_prompt"] * p["prompts"]
        assert p["total"] == pytest.approx(parts, rel=1e-12)
        # 16 prompts counted and scaled == one whole propose() call counted (the stock
        # call adds a per-call positional encoding, ~1e-5 of the total here)
        assert p["full_propose_counted"] == pytest.approx(p["total"], rel=1e-4), decoder
    m = result["match"]
    assert m["proposals"] == 30 and m["dinov2"] > 0 and m["pooling"] > 0
    assert m["total"] == pytest.approx(m["dinov2"] + m["pooling"] + m["scoring_nms_merge"])
    fast, stock = result["propose"]["fast"], result["propose"]["stock"]
    assert fast["per_prompt"] < stock["per_prompt"]  # the fast decoder's saving
    row = next(r for r in result["rows"] if r["decoder"] == "fast")
    assert row["propose_over_match"] == pytest.approx(fast["total"] / m["total"])
