"""bench/corpus_scale.py keeps working: ``--quick`` on local disk, in a subprocess.

No timing is asserted (the machine may be busy); the JSON is checked for the figures
BENCHMARKS.md section 9 reports, and for what must hold whatever the speed: a nightly
rerun reads a bounded number of objects and writes in proportion to its new images.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "corpus_scale.py"


def test_corpus_scale_quick_local(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--stores", "local", "--out-dir", str(tmp_path),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "corpus_scale_quick.json").read_text())
    runs = [r["run"] for r in result["rows"]]
    assert runs == ["first", "compact", "nightly", "nightly"]
    first, _, *nightly = result["rows"]
    assert first["objects_read"] >= 63  # the first rerun reads every part once: no index yet
    for row in nightly:
        assert row["new_images"] == 100 and row["bookkeeping_s"] > 0
        assert row["objects_read"] < 63  # the index and the new parts, not every part
        assert 0 < row["peak_rss_mb"] < 2048
    assert "| store | done" in proc.stdout
