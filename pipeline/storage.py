"""Filesystems for inputs and outputs: local paths, s3:// (with endpoint override), gs://.

Everything the pipeline reads or writes goes through a ``pyarrow.fs.FileSystem`` plus a
path without scheme, so Ray Data's readers and our writers see the same thing.
"""

from __future__ import annotations

import functools
import os
import posixpath
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = ["Location", "resolve", "join", "endpoint_from_env", "put_atomic"]


def endpoint_from_env() -> str | None:
    """``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (S3-compatible stores, moto, MinIO)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it; ``uri`` is the canonical form users see."""

    fs: pafs.FileSystem
    path: str
    scheme: str  # "" for local, "s3", "gs"
    endpoint: str | None = None  # the S3 endpoint URL the filesystem was made for

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def child(self, *parts: str) -> Location:
        return Location(self.fs, join(self.path, *parts), self.scheme, self.endpoint)

    def uri_of(self, path: str) -> str:
        """Canonical URI of a path returned by this filesystem (e.g. by a Ray reader)."""
        return f"{self.scheme}://{path}" if self.scheme else path


def join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if base else posixpath.join(*parts)


@functools.lru_cache(maxsize=16)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme or "http"
        kwargs.setdefault("region", "us-east-1")
    # Credentials come from the environment/instance profile through pyarrow's own chain;
    # they are never copied into configs, logs or run.json. One filesystem per endpoint
    # and process (cached): fetch tasks resolve every image URI.
    return pafs.S3FileSystem(**kwargs)


@functools.lru_cache(maxsize=1)
def _gcs() -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem()


def resolve(uri: str, *, s3_endpoint: str | None = None) -> Location:
    """Filesystem and path for a local path, ``file://``, ``s3://`` or ``gs://`` URI."""
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        return Location(pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), "")
    path = (parsed.netloc + parsed.path).rstrip("/")
    if scheme in ("s3", "s3a"):
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        endpoint = s3_endpoint or endpoint_from_env()
        return Location(_s3(endpoint, region), path, "s3", endpoint)
    if scheme in ("gs", "gcs"):
        return Location(_gcs(), path, "gs")
    raise ValueError(
        f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, s3://, or gs://"
    )


def put_atomic(loc: Location, data: bytes) -> None:
    """Write ``data`` to ``loc`` so that a reader sees the old content or the new, never part.

    Local: written to a hidden ``.NAME.tmp-<random>`` beside it (two writers of one part,
    e.g. a retried task and a late original, never share it), then renamed over it. Object
    stores (s3://, gs://) publish an object only when its upload completes: one whole-object
    put. (The JSON outputs use ``refseg.pipeline.store.atomic``, which also spools large files and
    fsyncs; parts and progress.json are small and written often.)
    """
    if isinstance(loc.fs, pafs.LocalFileSystem):
        parent, name = loc.path.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
        loc.fs.create_dir(parent, recursive=True)
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        loc.fs.move(tmp, loc.path)
    else:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
