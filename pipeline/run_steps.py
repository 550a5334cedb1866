"""Steps that ``refseg label`` and ``refseg rematch`` share: the configuration fingerprint,
store checks, draining a running dataset into counts and progress, one clear message for a
job that stopped, and the totals over OUT's parts."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import numpy as np
import pyarrow.compute as pc
import ray.data
from refseg.core.config import (
    RUNTIME_METHOD_FIELDS,
    RUNTIME_MODEL_FIELDS,
    MethodConfig,
    ModelConfig,
)
from refseg.core.memory_bank import MemoryBank
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location
from refseg.pipeline.store import index
from refseg.pipeline.store.coco_files import write_coco
from refseg.pipeline.store.progress import ProgressReporter
from refseg.pipeline.store.record import package_versions

__all__ = [
    "check_reachable",
    "complete_record",
    "config_fingerprint",
    "drain",
    "new_counts",
    "stopped",
    "totals",
]


def _changed(obj: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config's fields that differ from their defaults (so a new field keeps old runs)."""
    return {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.name not in ignore and getattr(obj, f.name) != f.default
    }


def config_fingerprint(model: ModelConfig, method: MethodConfig, bank_sha: str) -> str:
    """What decides the labels: settings that differ from the defaults, and the bank.

    Where and how fast the models run (``RUNTIME_MODEL_FIELDS``, ``RUNTIME_METHOD_FIELDS``:
    the same masks up to float rounding) is left out, as a rematch ignores them too.
    """
    cfg: dict[str, Any] = {
        "model": _changed(model, ignore=RUNTIME_MODEL_FIELDS),
        "method": _changed(method, ignore=RUNTIME_METHOD_FIELDS),
    }
    cfg["bank_sha256"] = bank_sha
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def check_reachable(loc: Location, what: str) -> None:
    """Fail fast, before Ray starts, when a store is down (retries would take minutes)."""
    try:
        loc.fs.get_file_info(loc.path)
    except Exception as exc:
        raise ConnectionError(
            f"cannot reach the {what} {loc.uri}: {exc}. Check the endpoint "
            "(--s3-endpoint / AWS_ENDPOINT_URL) and credentials; no work was started"
        ) from exc


# "OSError: When uploading ..." lines of a (remote) traceback; the innermost cause comes first
_ERROR_LINE = re.compile(r"^\s*(?:\w+\.)*(\w*(?:Error|Exception)): (.+)$")


def stopped(exc: Exception, out: Location) -> Exception:
    """One clear message for a job that failed mid-run (Ray's errors hold remote tracebacks).

    The root cause's first line, the retries Ray Data made, what is kept and how to resume.
    A root cause that is an ``OSError`` (an object store that stayed down through every
    retry) gives an ``OSError``, anything else a ``RuntimeError``.
    """
    lines = str(exc).splitlines()
    roots = [m for m in map(_ERROR_LINE.match, lines) if m and not m[0].lstrip().startswith("ray.")]
    if roots:
        name, first = roots[0].group(1), roots[0].group(2).strip()
    else:
        name, first = type(exc).__name__, (lines or [""])[0].strip()
    tries = [ln.strip().rstrip(".") for ln in lines if "attempts (total backoff" in ln]
    if tries:
        first = f"{first} ({tries[0]})"
    cls = getattr(builtins, name, None)
    kind = OSError if isinstance(cls, type) and issubclass(cls, OSError) else RuntimeError
    return kind(
        f"the labelling job stopped: {name}: {first}. Images with finished output in "
        f"{out.uri} are kept; once the cause is fixed, rerun the same command: only the "
        "unfinished images run again"
    )


def new_counts() -> dict[str, int]:
    """This run's counts, as ``drain`` fills them and run.json records them."""
    return {"images": 0, "ok": 0, "errors": 0, "instances": 0}


def drain(
    ds: ray.data.Dataset, out: Location, progress: ProgressReporter, counts: dict[str, int]
) -> None:
    """Run ``ds`` (per-image summary rows) to the end, adding to ``counts`` and ``progress``.

    Raises what ``stopped`` makes of a failure: the job's work so far is kept in OUT.
    """
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch[Col.IMAGE_ID])
            n_err = int(np.sum(batch[Col.STATUS] != "ok"))
            counts["images"] += n
            counts["errors"] += n_err
            counts["ok"] += n - n_err
            counts["instances"] += int(np.sum(batch[Col.N_INSTANCES]))
            progress.add(n, n_err)
    except Exception as exc:
        raise stopped(exc, out) from exc


def totals(out: Location, snapshot: index.Snapshot | None = None) -> dict[str, Any]:
    """run.json's counts over every images row of OUT (its index: ``snapshot`` when the
    caller holds it, as after ``settle``), in Arrow: no Python object per row."""
    rows = (snapshot if snapshot is not None else index.load(out)).rows
    ok = int(pc.sum(pc.equal(rows.column(Col.STATUS), "ok")).as_py() or 0)
    n_instances = pc.sum(rows.column(Col.N_INSTANCES)).as_py() or 0
    cols = [Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE]
    stages = {  # NaN (not timed) counts as nothing, as np.nansum
        key: float(pc.sum(pc.if_else(pc.is_nan(rows.column(c)), 0.0, rows.column(c))).as_py() or 0)
        for key, c in zip(("decode", "propose", "match", "encode"), cols, strict=True)
    }
    return {
        "images": rows.num_rows,
        "ok": ok,
        "errors": rows.num_rows - ok,
        "instances": int(n_instances),
        "stage_seconds": stages,
    }


def complete_record(
    out: Location,
    *,
    fingerprint: str,
    preset: str | None,
    config: dict[str, Any],
    random_weights: bool,
    bank: MemoryBank,
    bank_sha: str,
    counts: dict[str, int],
    more_counts: dict[str, Any],
    seconds: float,
    checkpoints: Any = None,
    snapshot: index.Snapshot | None = None,
) -> dict[str, Any]:
    """Write OUT's COCO files over every image; return the fields of a complete run.json
    that ``refseg label`` and ``refseg rematch`` share (each adds its own, then writes it).
    """
    categories = [{"id": c, "name": bank.names[c]} for c in bank.category_ids]
    try:
        coco_stats = write_coco(out, categories, snapshot=snapshot)
    except OSError as exc:
        said = " ".join(str(exc).split())
        raise OSError(
            f"every image is labelled, but writing the COCO files to {out.uri} failed: "
            f"{type(exc).__name__}: {said}; rerun the same command to write them "
            "(no image is labelled again)"
        ) from exc
    total = totals(out, snapshot)
    return {
        "fingerprint": fingerprint,
        "status": "complete",
        "preset": preset,
        "config": config,
        "random_weights": random_weights,
        "warnings": ["random weights: results are meaningless"] if random_weights else [],
        "versions": package_versions(),
        "checkpoints": checkpoints,
        "memory_bank": {"sha256": bank_sha, **bank.describe(), "meta": bank.meta},
        "references": [
            {**dataclasses.asdict(r), "category_name": bank.names[c], "image_uri": r.file_name}
            for c in bank.category_ids
            for r in bank.records[c]
        ],
        "counts": {"this_run": counts, "total": total, **more_counts},
        "timings": {
            "seconds": seconds,
            "coco_json_seconds": coco_stats["seconds"],
            "images_per_second": counts["images"] / seconds if seconds else 0.0,
            "stage_seconds": total.pop("stage_seconds"),
        },
        "ray": {"address": os.environ.get("RAY_ADDRESS", "local")},
    }
