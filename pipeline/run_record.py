"""run.json: resolved config, versions, checkpoint hashes, counts, timings (no secrets)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
import re
from typing import Any

from pipeline.storage import Location

__all__ = ["package_versions", "scrub", "write_run_record", "read_run_record"]

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
    data = json.dumps(scrub(record), indent=2, sort_keys=True, default=str).encode()
    loc = out.child("run.json")
    if hasattr(loc.fs, "create_dir"):
        loc.fs.create_dir(out.path, recursive=True)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)


def read_run_record(out: Location) -> dict[str, Any] | None:
    loc = out.child("run.json")
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None
