"""The benchmark scripts keep working: each runs at its smallest size in a subprocess.

No speed is asserted (the machine may be busy); the JSON each writes is checked for the
figures BENCHMARKS.md reports: the rows and columns, the equality figures, finite times
in a plausible range and the ratios that must follow from them. Each check is also run
on broken copies of the real result (rows dropped, times zeroed or NaN, flags off) and
must reject every one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
MAX_MS = 600_000.0  # a time above ten minutes is a broken measurement, not a slow machine


def _run(script: str, *args: str, out_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args, "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=540,  # a safety net only: on a busy 2-core machine decoder.py took 110 s
        env=env,
        check=False,
    )


def _ms(value: object) -> float:
    """A time in milliseconds: finite, positive, plausible."""
    assert isinstance(value, int | float) and math.isfinite(value), value
    assert 0 < value < MAX_MS, value
    return float(value)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _check_pooling(result: dict) -> None:
    (row,) = result["rows"]
    assert row["masks"] == 7 and row["grid"] == 6 and row["dim"] == 32
    patch, naive = _ms(row["patch_ms"]), _ms(row["naive_ms"])
    assert _close(row["ratio"], naive / patch)  # the ratio is of the two times
    assert row["max_abs_diff"] < 1e-4  # the two forms agree
    assert row["min_cosine"] > 0.9999
    assert 0.1 < row["max_abs_feature"] < 1e3  # on features that are not all zero


def _check_bank(result: dict) -> None:
    rows = {(r["classes"], r["shots"]): r for r in result["rows"]}
    assert len(result["rows"]) == 2 and set(rows) == {(1, 1), (2, 1)}
    for (c, s), r in rows.items():
        assert r["total_shots"] == c * s
        assert r["dim"] == 384  # tiny preset: ViT-S/14
        assert r["file_bytes"] > r["total_shots"] * r["dim"] * 4  # prototypes + header
        assert _close(r["bytes_per_shot"], r["file_bytes"] / r["total_shots"])
        assert _close(_ms(r["ms_per_shot"]), _ms(1e3 * r["build_s"]) / r["total_shots"])
        assert r["ntt_bytes_per_shot"] > r["bytes_per_shot"]  # 1024-d prototypes
        assert r["ntt_bytes_per_shot"] < result["paper_bytes_per_shot"] / 100
        assert _close(r["paper_over_ntt"], result["paper_bytes_per_shot"] / r["ntt_bytes_per_shot"])
    assert rows[(2, 1)]["file_bytes"] > rows[(1, 1)]["file_bytes"]  # grows with the bank


def _check_matching(result: dict) -> None:
    (row,) = result["rows"]
    assert (row["proposals"], row["image_hw"]) == (40, "60x80")
    full, lowres = _ms(row["full_ms"]), _ms(row["lowres_ms"])
    assert _close(row["speed-up"], full / lowres)
    assert 0 < row["instances"] <= 40
    assert 0.5 <= row["same_instances"] <= 1.0 and row["max_score_diff"] < 0.1


def _check_decoder(result: dict) -> None:
    rows = {r["variant"]: r for r in result["rows"]}
    assert len(result["rows"]) == 4
    assert set(rows) == {"stock-fp32", "fast-fp32", "stock-bf16", "fast-bf16"}
    base = rows["stock-fp32"]
    for r in rows.values():
        ms = _ms(r["ms_per_prompt"])
        assert len(r["runs_ms"]) == 1 and _close(ms, r["runs_ms"][0])  # --smoke: one pass
        assert _close(r["speedup_vs_stock_fp32"], base["ms_per_prompt"] / ms)
        assert 0 < r["gflop_per_prompt"] < 100 and 0 < r["peak_mib_per_call"] < 1e5
        assert _close(
            r["flop_ratio_vs_stock_fp32"], base["gflop_per_prompt"] / r["gflop_per_prompt"]
        )
    assert base["speedup_vs_stock_fp32"] == 1.0
    for kind in ("stock", "fast"):  # bf16 does the same work as float32
        assert rows[f"{kind}-bf16"]["gflop_per_prompt"] == rows[f"{kind}-fp32"]["gflop_per_prompt"]
    fast = rows["fast-fp32"]
    assert fast["max_abs_logit_diff"] <= 1e-3 and fast["max_iou_diff"] <= 1e-5
    assert fast["same_kept"] == fast["same_best_of_3"] == 1.0
    assert fast["recall"] == fast["precision"] == fast["mean_iou"] == 1.0
    assert fast["flop_ratio_vs_stock_fp32"] > 1.5  # fewer FLOPs (counted, not timed)
    for name in ("stock-bf16", "fast-bf16"):
        r = rows[name]
        assert r["recall"] > 0.9 and r["precision"] > 0.9 and r["mean_iou"] > 0.95, name
        assert 0 < r["max_abs_logit_diff"] < 0.5  # bf16 rounds, but only a little


def _set(path: str, value: object) -> Callable[[dict], None]:
    """A breaker: set ``rows[i].key`` (``path`` = "i.key") of a result to ``value``."""
    i, key = path.split(".", 1)

    def breaker(result: dict) -> None:
        result["rows"][int(i)][key] = value

    return breaker


def _drop_row(result: dict) -> None:
    result["rows"].pop()


# ways each result could come out of a broken script, all of which its check must refuse
BREAKERS: dict[str, list[Callable[[dict], None]]] = {
    "decoder.py": [
        _drop_row,
        _set("1.ms_per_prompt", 0.0),
        _set("2.ms_per_prompt", float("nan")),
        _set("1.same_kept", 0.0),
        _set("3.recall", 0.0),
        _set("1.speedup_vs_stock_fp32", 1.0),
        _set("0.gflop_per_prompt", 0.0),
    ],
    "pooling.py": [
        _drop_row,
        _set("0.patch_ms", 0.0),
        _set("0.naive_ms", float("inf")),
        _set("0.ratio", 1.0),
        _set("0.max_abs_feature", 0.0),
        _set("0.min_cosine", 0.5),
    ],
    "matching.py": [
        _drop_row,
        _set("0.full_ms", 0.0),
        _set("0.lowres_ms", float("nan")),
        _set("0.instances", 0),
        _set("0.speed-up", 0.0),
    ],
    "bank.py": [
        _drop_row,
        _set("0.build_s", 0.0),
        _set("1.ms_per_shot", float("nan")),
        _set("0.dim", 0),
        _set("1.file_bytes", 10),
    ],
}


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
    for breaker in BREAKERS[script]:  # the check can fail: it refuses each broken copy
        broken = copy.deepcopy(data)
        breaker(broken)
        with pytest.raises((AssertionError, ValueError, KeyError)):
            check(broken)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_gpu_script_refuses_without_cuda(tmp_path):
    proc = _run("gpu.py", out_dir=tmp_path)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
    assert not list(tmp_path.iterdir())  # no result written, no figure invented
