"""Probes of a labelling run on Ray: Ray Data's stats, the actors' timeline, import time.

Used by ``pipeline_overhead.py``; kept apart so that each file stays short.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _common
from refseg.pipeline.dataflow.settings import PipelineSettings

__all__ = ["pipeline_run", "operator_seconds", "actor_timeline", "import_seconds"]


class _Capture(logging.Handler):
    """Keeps the text of Ray Data's log records (its execution stats among them)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.text.append(record.getMessage())


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_OPERATOR = re.compile(
    r"Operator \d+ (?P<name>[^\n]+?): [^\n]*\n\* Remote wall time: [^\n]*?"
    r"(?P<value>[0-9.]+)(?P<unit>us|ms|s) total"
)


def operator_seconds(log_text: str) -> dict[str, float]:
    """Total remote wall seconds per operator from Ray Data's execution stats text."""
    return {m["name"]: float(m["value"]) * _UNITS[m["unit"]] for m in _OPERATOR.finditer(log_text)}


def pipeline_run(
    images: Path, bank: str, out: str, model: Any, method: Any, settings: PipelineSettings
) -> dict[str, Any]:
    """``run_label`` on the running local Ray; seconds, counts and stage seconds."""
    import ray.data
    from refseg.pipeline.dataflow.sources import ImageSource
    from refseg.pipeline.job import LabelJob, run_label

    ctx = ray.data.DataContext.get_current()
    ctx.enable_auto_log_stats = True
    capture = _Capture()
    logging.getLogger("ray.data").addHandler(capture)
    t_start = time.time()
    try:
        job = LabelJob(
            bank, ImageSource(str(images)), out, model, method, settings=settings, preset="tiny"
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = run_label(job)
    finally:
        logging.getLogger("ray.data").removeHandler(capture)
    record = json.loads((Path(out) / "run.json").read_text())
    ops = operator_seconds("\n".join(capture.text))
    stages = dict(record["timings"]["stage_seconds"])
    stages["write"] = next((v for k, v in ops.items() if "write_parts" in k), None)
    return {
        "seconds": summary.seconds,
        "images": summary.images,
        "errors": summary.errors,
        "instances": summary.instances,
        "stage_seconds": stages,
        "ray_data_operator_seconds": ops,
        "resources": record["config"]["resources"],
        **actor_timeline(t_start),
    }


def actor_timeline(t_start: float) -> dict[str, float | None]:
    """Start-up and steady-state window of the model actors, from ``ray.timeline()``.

    ``startup_seconds``: job start to the first batch a model actor receives (actor
    processes, imports, model builds, first read and decode). ``steady_seconds``: from
    there to the end of the last batch of any model actor (every image went through both
    models in this window). ``actor_init_seconds``: the longest actor ``__init__``,
    imports included.
    """
    import ray

    calls = [
        e for e in ray.timeline() if e.get("ph") == "X" and e.get("ts", 0) / 1e6 >= t_start - 1
    ]
    batches = [e for e in calls if e["name"] == "submit"]
    inits = [e["dur"] / 1e6 for e in calls if e["name"] == "__init__"]
    if not batches:
        return {"startup_seconds": None, "steady_seconds": None, "actor_init_seconds": None}
    first = min(e["ts"] for e in batches) / 1e6
    last = max(e["ts"] + e["dur"] for e in batches) / 1e6
    return {
        "startup_seconds": first - t_start,
        "steady_seconds": last - first,
        "actor_init_seconds": max(inits, default=None),
    }


def import_seconds() -> float:
    """Wall time of ``import refseg.pipeline.dataflow.stages`` (torch, sam2, timm...) in a
    fresh process.

    Every Ray worker that runs a stage pays it; the bare loop pays it once, before its clock.
    """
    code = "import time; t = time.perf_counter(); import refseg.pipeline.dataflow.stages; "
    code += "print(time.perf_counter() - t)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=_common.ROOT, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])
