"""The benchmark scripts keep working: each runs at its smallest size in a subprocess.

No timing is asserted (the machine may be busy); the JSON each writes is checked for the
figures BENCHMARKS.md reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str, out_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _check_pooling(result: dict) -> None:
    (row,) = result["rows"]
    assert row["masks"] == 7 and row["grid"] == 6
    assert row["patch_ms"] > 0 and row["naive_ms"] > 0 and row["ratio"] > 0
    assert row["max_abs_diff"] < 1e-4  # the two forms agree
    assert row["min_cosine"] > 0.9999


def _check_bank(result: dict) -> None:
    rows = {(r["classes"], r["shots"]): r for r in result["rows"]}
    assert set(rows) == {(1, 1), (2, 1)}
    for (c, s), r in rows.items():
        assert r["total_shots"] == c * s
        assert r["dim"] == 384  # tiny preset: ViT-S/14
        assert r["file_bytes"] > r["total_shots"] * r["dim"] * 4  # prototypes + header
        assert r["ntt_bytes_per_shot"] > r["bytes_per_shot"]  # 1024-d prototypes
        assert r["ntt_bytes_per_shot"] < result["paper_bytes_per_shot"] / 100


def _check_matching(result: dict) -> None:
    (row,) = result["rows"]
    assert (row["proposals"], row["image_hw"]) == (40, "60x80")
    assert row["full_ms"] > 0 and row["lowres_ms"] > 0 and row["instances"] > 0
    assert 0.5 <= row["same_instances"] <= 1.0 and row["max_score_diff"] < 0.1


def _check_decoder(result: dict) -> None:
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"stock-fp32", "fast-fp32", "stock-bf16", "fast-bf16"}
    for r in rows.values():
        assert r["ms_per_prompt"] > 0 and r["gflop_per_prompt"] > 0
    fast = rows["fast-fp32"]
    assert fast["max_abs_logit_diff"] <= 1e-3 and fast["same_kept"] == 1.0
    assert fast["flop_ratio_vs_stock_fp32"] > 1.5  # fewer FLOPs (counted, not timed)
    assert rows["fast-bf16"]["recall"] > 0.9


CASES = [
    (
        "decoder.py",
        ["--smoke"],
        "decoder_smoke.json",
        _check_decoder,
    ),
    (
        "pooling.py",
        ["--grid", "6", "--dim", "32", "--mask-size", "24", "--n", "7", "--repeats", "1"],
        "pooling.json",
        _check_pooling,
    ),
    (
        "matching.py",
        ["--preset", "tiny", "--classes", "2", "--proposals", "40", "--sizes", "60x80"],
        "matching.json",
        _check_matching,
    ),
    (
        "bank.py",
        ["--classes", "1", "2", "--shots", "1", "--image-size", "64x80"],
        "bank.json",
        _check_bank,
    ),
]


@pytest.mark.parametrize(("script", "args", "result", "check"), CASES, ids=[c[0] for c in CASES])
def test_script_runs_and_writes_json(tmp_path, script, args, result, check):
    proc = _run(script, *args, out_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # printed a table
    data = json.loads((tmp_path / result).read_text())
    assert data["command"].startswith(f"python bench/{script}")
    assert data["machine"]["host_cpus"] >= 1 and data["machine"]["loadavg_end"] is not None
    check(data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_refuses_without_cuda(tmp_path):
    proc = _run("gpu.py", out_dir=tmp_path)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())  # no result written, no figure invented
