"""Input datasets: a folder or URI prefix, a manifest of URIs, or a COCO image list.

Every source yields rows ``image_id, image_uri, bytes`` (plus ``error`` when a file could
not be fetched). Images that already have output are left out before their bytes are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import ray.data

from pipeline.schema import Col, image_id_from_uri
from pipeline.storage import Location, resolve
from refseg_core.coco import load_coco

__all__ = ["ImageSource", "IMAGE_EXTENSIONS", "read_source", "NothingToDo"]

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "tif", "tiff", "webp", "gif", "ppm", "pgm"]


class NothingToDo(Exception):
    """Every input image already has output."""


@dataclass(frozen=True)
class ImageSource:
    """Where the target images are.

    images: a folder, a URI prefix (s3://bucket/prefix, gs://...), or a manifest
        (``.txt``: one URI per line; ``.parquet``: a ``uri`` or ``image_uri`` column and an
        optional ``image_id``). With ``targets``: the root that COCO file names are under.
    targets: a COCO JSON whose ``images`` list the targets (ids are kept).
    """

    images: str
    targets: str | None = None
    s3_endpoint: str | None = None
    all_files: bool = False

    @property
    def kind(self) -> str:
        if self.targets:
            return "coco"
        low = self.images.lower()
        if low.endswith((".txt", ".lst", ".csv")):
            return "manifest-text"
        if low.endswith(".parquet"):
            return "manifest-parquet"
        return "prefix"


class _SkipDone:
    """Ray reader path filter: drop files whose image id already has output."""

    def __init__(self, loc: Location, done: np.ndarray) -> None:
        self.loc, self.done = loc, done

    def __call__(self, paths: list[str]) -> list[str]:
        if not len(self.done):
            return paths
        ids = np.fromiter((image_id_from_uri(self.loc.uri_of(p)) for p in paths), np.int64)
        return [p for p, hit in zip(paths, np.isin(ids, self.done), strict=True) if not hit]


def _with_ids(batch: dict[str, np.ndarray], *, loc: Location) -> dict[str, np.ndarray]:
    uris = [loc.uri_of(str(p)) for p in batch["path"]]
    return {
        Col.IMAGE_ID: np.fromiter((image_id_from_uri(u) for u in uris), np.int64, len(uris)),
        Col.IMAGE_URI: np.asarray(uris, dtype=object),
        Col.BYTES: batch[Col.BYTES],
        Col.ERROR: np.asarray([""] * len(uris), dtype=object),
    }


def _transient(exc: Exception) -> bool:
    """An object-store error worth retrying: Ray Data's list (network, throttling, 503s)."""
    return any(p in str(exc) for p in ray.data.DataContext.get_current().retried_io_errors)


def fetch_bytes(batch: dict[str, np.ndarray], *, s3_endpoint: str | None) -> dict:
    """Read each row's ``image_uri``; a failed read becomes an ``error`` text.

    A transient store error is raised instead: an error row would mark the image done for
    good, while the raised error makes Ray Data retry the batch (see graph.py) and, if the
    store stays down, stops the job so that a rerun reads the image again.
    """
    data, errors = [], []
    for uri in batch[Col.IMAGE_URI]:
        try:
            loc = resolve(str(uri), s3_endpoint=s3_endpoint)
            with loc.fs.open_input_stream(loc.path) as f:
                data.append(f.read())
            errors.append("")
        except Exception as exc:
            if _transient(exc):
                raise
            data.append(b"")
            errors.append(f"{uri}: could not be read ({type(exc).__name__}: {exc})")
    return {
        Col.IMAGE_ID: np.asarray(batch[Col.IMAGE_ID], dtype=np.int64),
        Col.IMAGE_URI: np.asarray(batch[Col.IMAGE_URI], dtype=object),
        Col.BYTES: np.asarray(data, dtype=object),
        Col.ERROR: np.asarray(errors, dtype=object),
    }


def _uri_rows(batch: dict[str, np.ndarray], *, column: str, base: str | None) -> dict:
    uris = [str(u).strip() for u in batch[column]]
    if base:
        uris = [u if "://" in u or u.startswith("/") else f"{base.rstrip('/')}/{u}" for u in uris]
    ids = batch.get(Col.IMAGE_ID)
    if ids is None:
        ids = np.fromiter((image_id_from_uri(u) for u in uris), np.int64, len(uris))
    return {Col.IMAGE_ID: np.asarray(ids, np.int64), Col.IMAGE_URI: np.asarray(uris, object)}


def _drop_done(batch: dict[str, np.ndarray], *, done_ref: list) -> dict[str, np.ndarray]:
    keep = ~np.isin(np.asarray(batch[Col.IMAGE_ID], np.int64), ray.get(done_ref[0]))
    return {k: np.asarray(v)[keep] for k, v in batch.items()}


def read_source(src: ImageSource, *, done: np.ndarray, fetch_cpus: float) -> ray.data.Dataset:
    """The input dataset of rows (image_id, image_uri, bytes, error), done images left out.

    Raises:
        NothingToDo: every input already has output.
    """
    kind = src.kind
    if kind == "prefix":
        loc = resolve(src.images, s3_endpoint=src.s3_endpoint)
        try:
            ds = ray.data.read_binary_files(
                loc.path,
                include_paths=True,
                filesystem=loc.fs,
                file_extensions=None if src.all_files else IMAGE_EXTENSIONS,
                partition_filter=_SkipDone(loc, done),  # type: ignore[arg-type]
            )
        except ValueError as exc:
            if len(done) and ("partition_filter" in str(exc) or "file_extensions" in str(exc)):
                raise NothingToDo(f"all images under {src.images} already have output") from exc
            raise ValueError(f"--images {src.images}: {exc}") from exc
        return ds.map_batches(_with_ids, fn_kwargs={"loc": loc}, num_cpus=fetch_cpus)
    if kind == "coco":
        coco = load_coco(src.targets)  # type: ignore[arg-type]
        rows = [
            {Col.IMAGE_ID: int(im["id"]), "file_name": im["file_name"]} for im in coco["images"]
        ]
        ds = ray.data.from_items(rows)
        ds = ds.map_batches(_uri_rows, fn_kwargs={"column": "file_name", "base": src.images})
    elif kind == "manifest-text":
        ds = ray.data.read_text(src.images).filter(lambda r: bool(r["text"].strip()))
        ds = ds.map_batches(_uri_rows, fn_kwargs={"column": "text", "base": None})
    else:
        ds = ray.data.read_parquet(src.images)
        col = "uri" if "uri" in ds.schema().names else Col.IMAGE_URI
        ds = ds.map_batches(_uri_rows, fn_kwargs={"column": col, "base": None})
    if len(done):
        ds = ds.map_batches(_drop_done, fn_kwargs={"done_ref": [ray.put(done)]})
    return ds.map_batches(
        fetch_bytes, fn_kwargs={"s3_endpoint": src.s3_endpoint}, num_cpus=fetch_cpus
    )
