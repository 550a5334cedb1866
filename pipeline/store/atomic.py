"""Whole-file writes: a reader sees the previous version or the new one, never a partial one.

``atomic_output(loc)`` yields a binary stream; the file appears under its name only when
the ``with`` block ends without an error:

* local: written to ``.<name>.tmp-<random>`` beside it, flushed to disk, then renamed over
  the name (``os.replace``, atomic on POSIX); on an error the temporary file is removed;
* S3: spooled (memory, then a local temporary file past 32 MiB) and uploaded as one
  object (``s3_objects.upload_whole``); on an error nothing is uploaded;
* other stores (gs://): written to a temporary name, then moved over the name.

A process killed mid-write leaves at most a ``.<name>.tmp-*`` file (locally), never a
truncated ``<name>``.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

from refseg.pipeline.storage import Location
from refseg.pipeline.store import s3_objects

__all__ = ["atomic_output", "atomic_text", "write_bytes", "TMP_MARK"]

#: Temporary names are ``.<name>`` + TMP_MARK + a random suffix.
TMP_MARK = ".tmp-"
_SPOOL_BYTES = 32 * 1024 * 1024


def _tmp_path(path: str) -> str:
    parent, _, name = path.rpartition("/")
    return f"{parent}/.{name}{TMP_MARK}{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_output(loc: Location) -> Iterator[IO[bytes]]:
    """A binary stream whose content replaces ``loc`` whole when the block succeeds."""
    if loc.is_local:
        os.makedirs(os.path.dirname(loc.path) or ".", exist_ok=True)
        tmp = _tmp_path(loc.path)
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    elif loc.scheme == "s3":
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
            yield spool  # type: ignore[misc]
            spool.seek(0)
            s3_objects.upload_whole(loc.endpoint, loc.path, spool)  # type: ignore[arg-type]
    else:
        tmp = _tmp_path(loc.path)
        try:
            with loc.fs.open_output_stream(tmp) as f:
                yield f  # type: ignore[misc]
            loc.fs.move(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(Exception):
                loc.fs.delete_file(tmp)
            raise


@contextlib.contextmanager
def atomic_text(loc: Location) -> Iterator[IO[str]]:
    """``atomic_output`` as a UTF-8 text stream."""
    with atomic_output(loc) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")  # type: ignore[arg-type]
        yield text
        text.flush()
        text.detach()


def write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` as the whole content of ``loc`` (see ``atomic_output``)."""
    with atomic_output(loc) as f:
        f.write(data)
