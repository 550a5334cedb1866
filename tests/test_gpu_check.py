"""bench/gpu_check.sh, the one prepared GPU check, checked here without a GPU: it stops with
one line on a machine without CUDA, it asks bench/gpu.py for variants that exist, and what
it runs imports without Ray (the GPU machine's image has none)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
CUDA_TESTS = ["tests/test_gpu_path.py", "tests/test_transport.py", "tests/test_decoder.py"]


def test_scripts_parse():
    for name in ("gpu_check.sh", "gpu_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "bench" / name)], check=True)


def test_check_stops_with_one_line_without_a_gpu(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with the basic tools and no nvidia-smi
    bin_dir.mkdir()
    for tool in ("date", "tee", "mkdir", "dirname", "timeout", "ls"):
        path = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if path:
            (bin_dir / tool).symlink_to(path)
    env = {**os.environ, "PATH": str(bin_dir), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["/bin/bash", str(SCRIPT), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr  # the script tees both into its log
    failed = [ln for ln in output.splitlines() if "gpu_check: FAILED" in ln]
    assert len(failed) == 1 and "nvidia-smi not found" in failed[0]
    record = (tmp_path / "out" / "gpu_check.json").read_text()
    assert '"outcome": "failed: nvidia-smi not found' in record


def test_check_asks_for_variants_gpu_py_has():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    asked = set()
    for args in re.findall(r"--variants ([\w\- ]+?) --out-dir", SCRIPT.read_text()):
        asked |= set(args.split())
    assert {"fp32", "fp32-fast", "fp32-fast-tf32", "bf16-fast", "fp32-fast-compile"} <= asked
    assert asked <= set(gpu.VARIANTS)


def test_what_the_check_runs_imports_without_ray():
    """refseg.core, bench/gpu.py's modules and the CUDA test files import with ``ray``
    blocked (``import ray`` raises), and pytest collects the CUDA tests."""
    code = f"""
import sys
sys.modules["ray"] = None
sys.path.insert(0, {str(ROOT / "bench")!r})
import refseg.core.factory, refseg.core.segmenter, refseg.core.transport
import gpu, _gpu_run, flops
import pytest
rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                  "-k", "cuda", *{CUDA_TESTS!r}])
assert "ray" not in [m for m in sys.modules if sys.modules[m] is not None]
sys.exit(rc)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\b\d+/\d+ tests collected|\b\d+ tests? collected", proc.stdout)
