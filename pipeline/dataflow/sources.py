"""Input datasets: a folder or URI prefix, a manifest of URIs, or a COCO image list.

Every source yields rows ``image_id, image_uri, bytes, error`` (``error`` says why a file
could not be fetched) plus ``file_size, file_mtime_ns`` of the file as listed. Targets are
listed once each under their canonical URI (pipeline/identity.py), OUT left out; images
that already have output are left out before their bytes are read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data
from refseg.core.coco import load_coco
from refseg.pipeline.identity import (
    Listing,
    canonical_uri,
    coco_file_uri,
    is_under,
    unique,
    walk_local,
)
from refseg.pipeline.schema import Col, image_id_from_uri
from refseg.pipeline.storage import Location, resolve

__all__ = [
    "ImageSource",
    "IMAGE_EXTENSIONS",
    "list_images",
    "list_targets",
    "read_source",
    "NothingToDo",
]

log = logging.getLogger(__name__)

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
    targets: a COCO JSON whose ``images`` list the targets (ids are kept). Its file names
        must be relative paths under ``images`` unless ``allow_outside_root``.
    """

    images: str
    targets: str | None = None
    s3_endpoint: str | None = None
    all_files: bool = False
    allow_outside_root: bool = False

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
    out = {
        Col.IMAGE_ID: np.asarray(batch[Col.IMAGE_ID], dtype=np.int64),
        Col.IMAGE_URI: np.asarray(batch[Col.IMAGE_URI], dtype=object),
        Col.BYTES: np.asarray(data, dtype=object),
        Col.ERROR: np.asarray(errors, dtype=object),
    }
    for key in (Col.FILE_SIZE, Col.FILE_MTIME):
        if key in batch:
            out[key] = np.asarray(batch[key], dtype=np.int64)
    return out


def list_images(loc: Location, *, all_files: bool = False) -> list[str]:
    """Every image under a folder or URI prefix, recursively, as sorted canonical URIs.

    Files are kept by extension (any case; ``all_files`` keeps every file). Names starting
    with ``_`` or ``.`` are listed like any other (camera files such as ``_DSC0001.jpg``);
    only files inside hidden folders (``.git/``, ``.ipynb_checkpoints/``...) are left out.
    A single file is a listing of one. Local folders: see ``identity.walk_local``.
    """
    return _list_prefix(loc, all_files=all_files, out=None).uris


def _wanted(all_files: bool) -> Callable[[str], bool]:
    exts = {f".{e}" for e in IMAGE_EXTENSIONS}
    return lambda name: all_files or posixpath.splitext(name)[1].lower() in exts


def _list_prefix(loc: Location, *, all_files: bool, out: Location | None) -> Listing:
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"--images {loc.uri}: no such file, folder or prefix")
    if info.type == pafs.FileType.File:
        uri = canonical_uri(loc.uri)
        return Listing.of([uri], np.asarray([image_id_from_uri(uri)]), [info.size], [info.mtime_ns])
    keep = _wanted(all_files)
    if loc.is_local:
        walk = walk_local(loc.path, keep=keep, out=out.path if out and out.is_local else None)
        seen_twice = [
            f"{n} {what}"
            for n, what in (
                (walk.repeats, "files reached under a second name (symlinks)"),
                (walk.linked_folders, "folders reached a second time (symlink loops or links)"),
            )
            if n
        ]
        if seen_twice:
            log.warning("--images %s: %s: each is listed once", loc.uri, " and ".join(seen_twice))
        if walk.out_skipped:
            log.info("--images %s: the run's own OUT inside it is not listed", loc.uri)
        uris = sorted(walk.files)
        stats = np.asarray([walk.files[u] for u in uris], dtype=np.int64).reshape(-1, 2)
        ids = np.fromiter((image_id_from_uri(u) for u in uris), np.int64, len(uris))
        return Listing.of(uris, ids, stats[:, 0], stats[:, 1])
    selector = pafs.FileSelector(loc.path, recursive=True)
    base = selector.base_dir.rstrip("/")
    out_uri = canonical_uri(out.uri) if out is not None else None
    found: dict[str, tuple[int, int]] = {}
    for f in loc.fs.get_file_info(selector):
        if not f.is_file:
            continue
        folders = f.path[len(base) :].strip("/").split("/")[:-1]
        if any(part.startswith(".") for part in folders) or not keep(f.base_name):
            continue
        uri = canonical_uri(loc.uri_of(f.path))
        if out_uri is None or not is_under(uri, out_uri):
            found[uri] = (f.size, f.mtime_ns if f.mtime_ns is not None else -1)
    uris = sorted(found)
    ids = np.fromiter((image_id_from_uri(u) for u in uris), np.int64, len(uris))
    return Listing.of(uris, ids, [found[u][0] for u in uris], [found[u][1] for u in uris])


#: Parquet manifest columns that give each file's size (bytes) and modification time: an
#: integer of ns since the epoch, or a timestamp (as in an S3 Inventory report).
SIZE_COLUMNS = (Col.FILE_SIZE, "size")
MTIME_COLUMNS = (Col.FILE_MTIME, "mtime_ns", "last_modified_date", "last_modified", "mtime")


def _manifest_stats(table: pa.Table, what: str) -> np.ndarray | None:
    """(n, 2) int64 size and mtime in ns of each manifest row (-1: null), or None when the
    manifest does not carry both."""
    size = next((c for c in SIZE_COLUMNS if c in table.column_names), None)
    mtime = next((c for c in MTIME_COLUMNS if c in table.column_names), None)
    if size is None or mtime is None:
        return None
    t = table.column(mtime)
    if pa.types.is_timestamp(t.type):
        t = t.cast(pa.timestamp("ns", tz=t.type.tz)).cast(pa.int64())
    elif not pa.types.is_integer(t.type) or mtime not in (Col.FILE_MTIME, "mtime_ns"):
        raise ValueError(
            f"{what}: column {mtime!r} must be a timestamp, or integer ns in "
            f"{Col.FILE_MTIME!r} / 'mtime_ns' (it is {t.type})"
        )
    cols = [table.column(size).cast(pa.int64()), t]
    return np.stack([np.asarray(c.fill_null(-1).to_numpy(), np.int64) for c in cols], axis=1)


def _manifest_uris(src: ImageSource) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """URIs, ids (when the manifest has them) and (n, 2) sizes and mtimes (when a Parquet
    manifest carries them: ``SIZE_COLUMNS``, ``MTIME_COLUMNS``) of a text or Parquet
    manifest."""
    loc = resolve(src.images, s3_endpoint=src.s3_endpoint)
    if src.kind == "manifest-text":
        with loc.fs.open_input_stream(loc.path) as f:
            lines = f.read().decode("utf-8").splitlines()
        return [u.strip() for u in lines if u.strip()], None, None
    table = pq.read_table(loc.path, filesystem=loc.fs)
    col = "uri" if "uri" in table.column_names else Col.IMAGE_URI
    if col not in table.column_names:
        raise ValueError(
            f"--images {src.images}: a Parquet manifest needs a 'uri' or 'image_uri' column "
            f"(it has {table.column_names})"
        )
    uris = [str(u).strip() for u in table.column(col).to_pylist()]
    ids = table.column(Col.IMAGE_ID).to_numpy() if Col.IMAGE_ID in table.column_names else None
    return uris, ids, _manifest_stats(table, f"--images {src.images}")


def _entries(src: ImageSource, out: Location | None) -> Listing:
    """Every target the source names, once, OUT left out; stats only where listed."""
    if src.kind == "prefix":
        return _list_prefix(
            resolve(src.images, s3_endpoint=src.s3_endpoint), all_files=src.all_files, out=out
        )
    ids: np.ndarray | None
    stats = None
    if src.kind == "coco":
        what = f"--targets {src.targets}"
        images = load_coco(src.targets)["images"]  # type: ignore[arg-type]
        names = [str(im["file_name"]) for im in images]
        raw = [
            coco_file_uri(
                src.images, n, allow_outside_root=src.allow_outside_root, what=f"{what}, id {i}"
            )
            for n, i in zip(names, (im["id"] for im in images), strict=True)
        ]
        ids = np.asarray([int(im["id"]) for im in images], dtype=np.int64)
    else:
        what = f"--images {src.images}"
        raw, ids, stats = _manifest_uris(src)
        names = raw
    given = ids is not None
    canon = [canonical_uri(u) for u in raw]
    uris, ids = unique(canon, ids, names=names, what=what)
    listing = dataclasses.replace(Listing.of(uris, ids), ids_given=given)
    if stats is not None:  # the manifest's own sizes and times: no request per file
        first = {u: k for k, u in reversed(list(enumerate(canon)))}
        at = np.asarray([first[u] for u in uris], dtype=np.int64)
        listing = dataclasses.replace(
            listing, sizes=stats[at, 0].copy(), mtimes=stats[at, 1].copy()
        )
    if out is not None:
        out_uri = canonical_uri(out.uri)
        inside = np.asarray([is_under(u, out_uri) for u in uris], dtype=bool)
        if inside.any():
            log.warning(
                "%s: %d entries are files of the run's own OUT %s: they are not labelled",
                what,
                int(inside.sum()),
                out.uri,
            )
            listing = listing.take(~inside)
    return listing


def _listing(src: ImageSource) -> tuple[list[str], np.ndarray]:
    """(canonical URIs, image ids) of every target the source names, each once."""
    listing = _entries(src, None)
    return listing.uris, listing.ids


#: Threads that ask an object store for the size and time of manifest entries.
STAT_THREADS = 32


def _stat(uri: str, s3_endpoint: str | None) -> tuple[int, int]:
    try:
        if "://" not in uri:
            st = os.stat(uri)
            return st.st_size, st.st_mtime_ns
        loc = resolve(uri, s3_endpoint=s3_endpoint)
        info = loc.fs.get_file_info(loc.path)
    except (OSError, ValueError):
        return -1, -1
    if info.type != pafs.FileType.File:
        return -1, -1
    return info.size, info.mtime_ns if info.mtime_ns is not None else -1


def list_targets(src: ImageSource, *, out: Location | None = None) -> Listing:
    """The run's targets: each file once, under its canonical URI, with its size and time.

    A folder or prefix listing gives the sizes and times, and so does a Parquet manifest
    that carries them (``SIZE_COLUMNS`` and ``MTIME_COLUMNS``, e.g. an S3 Inventory
    report); other manifest and COCO entries are asked for them (local: a stat each;
    object stores: one request each, STAT_THREADS at a time). Files of ``out`` are never
    listed.

    Raises:
        ValueError / FileNotFoundError: the source names no image, or names them wrongly.
    """
    listing = _entries(src, out)
    if not len(listing):
        hint = "" if src.all_files or src.kind != "prefix" else " (--all-files reads every file)"
        raise ValueError(
            f"--images {src.images}: no image found; looked for {', '.join(IMAGE_EXTENSIONS)}{hint}"
        )
    unknown = np.nonzero((listing.sizes < 0) | (listing.mtimes < 0))[0]
    if src.kind != "prefix" and len(unknown):
        with ThreadPoolExecutor(STAT_THREADS) as pool:
            stats = list(pool.map(lambda k: _stat(listing.uris[k], src.s3_endpoint), unknown))
        arr = np.asarray(stats, dtype=np.int64).reshape(-1, 2)
        sizes, mtimes = listing.sizes.copy(), listing.mtimes.copy()
        sizes[unknown], mtimes[unknown] = arr[:, 0], arr[:, 1]
        listing = dataclasses.replace(listing, sizes=sizes, mtimes=mtimes)
    return listing


def _blocks(table: pa.Table) -> list[pa.Table]:
    """Split the listing so that many fetch tasks run at once (one task per block)."""
    rows = max(FETCH_BLOCK_ROWS, -(-table.num_rows // MAX_FETCH_BLOCKS))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def read_source(
    src: ImageSource,
    *,
    done: np.ndarray,
    fetch_cpus: float,
    listing: Listing | None = None,
    on_listed: Callable[[int], object] | None = None,
) -> ray.data.Dataset:
    """The input dataset of rows (image_id, image_uri, bytes, error, file_size,
    file_mtime_ns), done images left out.

    The targets are listed in the driver (as Ray's own file readers do; ``listing`` when
    the caller has it already), done ones are dropped there, and the rest are fetched by
    parallel CPU tasks. ``on_listed`` is called with the number of images left to process
    (0 before ``NothingToDo``).

    Raises:
        NothingToDo: every input already has output.
        ValueError / FileNotFoundError: the source names no image.
    """
    listing = listing if listing is not None else list_targets(src)
    ids = listing.ids
    keep = ~np.isin(ids, done) if len(done) else np.ones(len(ids), dtype=bool)
    if on_listed is not None:
        on_listed(int(keep.sum()))
    if not keep.any():
        raise NothingToDo(f"all {len(ids)} images of {src.images} already have output")
    todo = listing.take(keep)
    table = pa.table(
        {
            Col.IMAGE_ID: pa.array(todo.ids, pa.int64()),
            Col.IMAGE_URI: pa.array(todo.uris, pa.string()),
            Col.FILE_SIZE: pa.array(todo.sizes, pa.int64()),
            Col.FILE_MTIME: pa.array(todo.mtimes, pa.int64()),
        }
    )
    ds = ray.data.from_arrow(_blocks(table))
    return ds.map_batches(
        fetch_bytes, fn_kwargs={"s3_endpoint": src.s3_endpoint}, num_cpus=fetch_cpus
    )
