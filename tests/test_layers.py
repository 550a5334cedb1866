"""One-way layers: refseg_core never imports Ray (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = sorted(p.stem for p in (ROOT / "refseg_core").glob("*.py") if p.stem != "__init__")


def test_importing_every_core_module_does_not_import_ray():
    code = (
        "import sys, importlib\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module('refseg_core.' + m)\n"
        "bad = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        "print(len(sys.modules)); assert not bad, bad\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(CORE_MODULES) >= 10


def test_core_sources_have_no_ray_import_lines():
    for path in (ROOT / "refseg_core").glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith("import ray") or s.startswith("from ray")), (path, line)
