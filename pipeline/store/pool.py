"""Reading many of OUT's objects from the driver: a bounded thread pool, never one at a time.

``read_tables(locs)`` yields ``(index, table)`` in the order given while at most
``threads`` reads are in flight and at most ``2 * threads`` tables wait to be consumed, so
memory stays bounded however many objects there are. Each object is fetched with one
streaming read (on S3 one GET of the whole object, no HEAD; parts are small) and parsed
from memory. ``delete_all`` deletes many objects (on S3 1,000 per request).
"""

from __future__ import annotations

import contextlib
import io
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from refseg.pipeline.storage import Location
from refseg.pipeline.store import s3_objects

__all__ = ["READ_THREADS", "delete_all", "map_bounded", "read_bytes", "read_table", "read_tables"]

#: Reads in flight at once (object stores answer many requests in parallel; local disks
#: gain little past this).
READ_THREADS = 16

T = TypeVar("T")
R = TypeVar("R")


def read_bytes(loc: Location) -> bytes:
    """The whole content of one object (on S3 one GET; ``FileNotFoundError`` if missing)."""
    if loc.scheme == "s3":
        got = s3_objects.get(loc.endpoint, loc.path)
        if got is None:
            raise FileNotFoundError(f"{loc.uri}: no such object")
        return got[0]
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def delete_all(locs: Sequence[Location]) -> None:
    """Delete the files ``locs`` in the order given (on S3 1,000 per request, in order);
    missing ones are no error."""
    s3 = [loc for loc in locs if loc.scheme == "s3"]
    if s3:
        s3_objects.delete_many(s3[0].endpoint, [loc.path for loc in s3])
    for loc in locs:
        if loc.scheme != "s3":
            with contextlib.suppress(FileNotFoundError):
                loc.fs.delete_file(loc.path)


def read_table(loc: Location, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet object, fetched whole and parsed in memory (``columns``: all if None)."""
    data = read_bytes(loc)
    return pq.read_table(io.BytesIO(data), columns=list(columns) if columns else None)


def map_bounded(
    fn: Callable[[T], R], items: Iterable[T], *, threads: int = READ_THREADS
) -> Iterator[R]:
    """``fn`` over ``items`` in a pool of ``threads``, results in order, bounded look-ahead."""
    items = iter(items)
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_tables(
    locs: Sequence[Location],
    columns: Sequence[str] | None = None,
    *,
    threads: int = READ_THREADS,
    missing_ok: bool = False,
) -> Iterator[tuple[int, pa.Table | None]]:
    """``(k, table of locs[k])`` for every k, in order; None for a missing object when
    ``missing_ok`` (else ``FileNotFoundError``)."""

    def one(k: int) -> tuple[int, pa.Table | None]:
        try:
            return k, read_table(locs[k], columns)
        except FileNotFoundError:
            if missing_ok:
                return k, None
            raise

    yield from map_bounded(one, range(len(locs)), threads=threads)
