"""run.json: resolved config, versions, checkpoint hashes, counts, timings (no secrets)."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import logging
import platform
import re
from typing import Any

from refseg.pipeline.storage import Location
from refseg.pipeline.store.atomic import write_bytes

__all__ = [
    "RunRecordError",
    "check_fingerprint",
    "package_versions",
    "read_run_record",
    "scrub",
    "start_record",
    "write_run_record",
]

log = logging.getLogger(__name__)
RUN_JSON = "run.json"

_PACKAGES = ("refseg", "torch", "torchvision", "sam2", "timm", "ray", "pyarrow", "pycocotools")
# user:password@ in URIs, and values of keys that look like credentials
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_KEY = re.compile(r"(secret|password|token|credential|access_key|session)", re.I)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def scrub(value: Any) -> Any:
    """Copy of a JSON-like value with credentials removed from URIs and secret-like keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {
            k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v else scrub(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return _USERINFO.sub("<redacted>@", value)
    return value


def write_run_record(out: Location, record: dict[str, Any]) -> None:
    """Write OUT/run.json whole (a reader never sees a partial file), credentials removed."""
    data = json.dumps(scrub(record), indent=2, sort_keys=True, default=str).encode()
    write_bytes(out.child(RUN_JSON), data)


class RunRecordError(ValueError):
    """OUT/run.json exists but is not a run record (e.g. cut short by an old writer)."""


def read_run_record(out: Location) -> dict[str, Any] | None:
    """OUT/run.json as a dict, or None when there is none.

    Raises:
        RunRecordError: the file is not valid JSON, or not a JSON object.
    """
    loc = out.child(RUN_JSON)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            data = f.read()
    except (FileNotFoundError, OSError):
        return None
    try:
        record = json.loads(data)
    except ValueError as exc:
        problem = f"is not valid JSON ({exc}; {len(data)} bytes: cut short by a write?)"
    else:
        if isinstance(record, dict):
            return record
        problem = f"holds a JSON {type(record).__name__}, not a run record"
    raise RunRecordError(
        f"{loc.uri} {problem}. It records the configuration that labelled the images in "
        f"{out.uri}, so this run cannot check that its settings match. If this command has "
        f"the same settings as that run, delete {loc.uri} and rerun (finished images are "
        "kept); otherwise use a new --out"
    )


def check_fingerprint(out: Location, fingerprint: str, *, has_parts: bool) -> str | None:
    """Refuse to add to OUT labels made with another configuration.

    OUT's configuration is the fingerprint in its run.json, which a run writes before its
    first part (``start_record``). With no part in OUT yet, nothing can be mixed: a new
    configuration, or an unreadable run.json, is simply replaced. Returns the fingerprint
    run.json records (None: none).

    Raises:
        ValueError: OUT holds parts and run.json has another fingerprint.
        RunRecordError: OUT holds parts and run.json cannot be read.
    """
    try:
        previous = read_run_record(out)
    except RunRecordError as exc:
        if has_parts:
            raise
        log.warning("%s; OUT has no labels yet, so it is replaced", exc)
        return None
    recorded = (previous or {}).get("fingerprint")
    if has_parts and recorded not in (None, fingerprint):
        raise ValueError(
            f"{out.uri} holds a run with another configuration or memory bank "
            f"(fingerprint {recorded} != {fingerprint}): use a new --out, "
            "or delete the old outputs to relabel"
        )
    return recorded


def start_record(fingerprint: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The run.json written before any part: the fingerprint, ``status: running``, when."""
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"fingerprint": fingerprint, "status": "running", "started_at": started, **fields}
