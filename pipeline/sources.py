"""Input datasets: a folder or URI prefix, a manifest of URIs, or a COCO image list.

Every source yields rows ``image_id, image_uri, bytes, error`` (``error`` says why a file
could not be fetched). Images that already have output are left out before their bytes are
read.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from pipeline.schema import Col, image_id_from_uri
from pipeline.storage import Location, resolve
from refseg_core.coco import load_coco

__all__ = ["ImageSource", "IMAGE_EXTENSIONS", "list_images", "read_source", "NothingToDo"]

#: Rows per fetch task for small jobs; larger listings use at most MAX_FETCH_BLOCKS blocks.
FETCH_BLOCK_ROWS = 8
MAX_FETCH_BLOCKS = 4096

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


def list_images(loc: Location, *, all_files: bool = False) -> list[str]:
    """Every image under a folder or URI prefix, recursively, as sorted canonical URIs.

    Files are kept by extension (any case; ``all_files`` keeps every file). Names starting
    with ``_`` or ``.`` are listed like any other (camera files such as ``_DSC0001.jpg``);
    only files inside hidden folders (``.git/``, ``.ipynb_checkpoints/``...) are left out.
    A single file is a listing of one.
    """
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--images {loc.uri}: no such file, folder or prefix")
    if info.type == pafs.FileType.File:
        return [loc.uri]
    selector = pafs.FileSelector(loc.path, recursive=True)
    base = selector.base_dir.rstrip("/")
    exts = {f".{e}" for e in IMAGE_EXTENSIONS}
    paths = []
    for f in loc.fs.get_file_info(selector):
        if not f.is_file:
            continue
        folders = f.path[len(base) :].strip("/").split("/")[:-1]
        if any(part.startswith(".") for part in folders):
            continue
        if all_files or posixpath.splitext(f.base_name)[1].lower() in exts:
            paths.append(f.path)
    return [loc.uri_of(p) for p in sorted(paths)]


def _manifest_uris(src: ImageSource) -> tuple[list[str], np.ndarray | None]:
    """URIs (and ids, when the manifest has them) listed by a text or Parquet manifest."""
    loc = resolve(src.images, s3_endpoint=src.s3_endpoint)
    if src.kind == "manifest-text":
        with loc.fs.open_input_stream(loc.path) as f:
            lines = f.read().decode("utf-8").splitlines()
        return [u.strip() for u in lines if u.strip()], None
    table = pq.read_table(loc.path, filesystem=loc.fs)
    col = "uri" if "uri" in table.column_names else Col.IMAGE_URI
    if col not in table.column_names:
        raise ValueError(
            f"--images {src.images}: a Parquet manifest needs a 'uri' or 'image_uri' column "
            f"(it has {table.column_names})"
        )
    uris = [str(u).strip() for u in table.column(col).to_pylist()]
    ids = table.column(Col.IMAGE_ID).to_numpy() if Col.IMAGE_ID in table.column_names else None
    return uris, ids


def _listing(src: ImageSource) -> tuple[list[str], np.ndarray]:
    """(URIs, image ids) of every target the source names."""
    ids: np.ndarray | None = None
    if src.kind == "prefix":
        uris = list_images(
            resolve(src.images, s3_endpoint=src.s3_endpoint), all_files=src.all_files
        )
    elif src.kind == "coco":
        images = load_coco(src.targets)["images"]  # type: ignore[arg-type]
        base = src.images.rstrip("/")
        uris = [str(im["file_name"]) for im in images]
        uris = [u if "://" in u or u.startswith("/") else f"{base}/{u}" for u in uris]
        ids = np.asarray([int(im["id"]) for im in images], dtype=np.int64)
    else:
        uris, ids = _manifest_uris(src)
    if ids is None:
        ids = np.fromiter((image_id_from_uri(u) for u in uris), np.int64, len(uris))
    return uris, np.asarray(ids, dtype=np.int64)


def _blocks(table: pa.Table) -> list[pa.Table]:
    """Split the listing so that many fetch tasks run at once (one task per block)."""
    rows = max(FETCH_BLOCK_ROWS, -(-table.num_rows // MAX_FETCH_BLOCKS))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def read_source(
    src: ImageSource,
    *,
    done: np.ndarray,
    fetch_cpus: float,
    on_listed: Callable[[int], object] | None = None,
) -> ray.data.Dataset:
    """The input dataset of rows (image_id, image_uri, bytes, error), done images left out.

    The targets are listed in the driver (as Ray's own file readers do), done ones are
    dropped there, and the rest are fetched by parallel CPU tasks. ``on_listed`` is called
    with the number of images left to process (0 before ``NothingToDo``).

    Raises:
        NothingToDo: every input already has output.
        ValueError / FileNotFoundError: the source names no image.
    """
    uris, ids = _listing(src)
    if not uris:
        hint = "" if src.all_files or src.kind != "prefix" else " (--all-files reads every file)"
        raise ValueError(
            f"--images {src.images}: no image found; looked for {', '.join(IMAGE_EXTENSIONS)}{hint}"
        )
    keep = ~np.isin(ids, done) if len(done) else np.ones(len(ids), dtype=bool)
    if on_listed is not None:
        on_listed(int(keep.sum()))
    if not keep.any():
        raise NothingToDo(f"all {len(ids)} images of {src.images} already have output")
    table = pa.table(
        {
            Col.IMAGE_ID: pa.array(ids[keep], pa.int64()),
            Col.IMAGE_URI: pa.array([u for u, k in zip(uris, keep, strict=True) if k], pa.string()),
        }
    )
    ds = ray.data.from_arrow(_blocks(table))
    return ds.map_batches(
        fetch_bytes, fn_kwargs={"s3_endpoint": src.s3_endpoint}, num_cpus=fetch_cpus
    )
