"""Helpers of the store tests: OUTs made by the real writer, a filesystem that dies on cue.

* ``make_parts``: finished parts written by ``refseg.pipeline.dataflow.writer.write_parts``
  (the layout every version so far writes), with instances and, optionally, a proposal
  cache, and ``listing`` of the same images.
* ``KillFS``: a pyarrow filesystem over the local disk that raises ``Killed`` (a
  ``BaseException``, as a kill is to the code: no ``except Exception`` catches it) just
  before its ``kill_at``-th change (a write, a move or a delete), so a test can stop an
  operation at every point it changes OUT.
* ``truth``: what OUT holds, read from every part file without the index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from refseg.pipeline.dataflow.writer import write_parts
from refseg.pipeline.identity import Listing
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import Location, resolve

from tests.test_run_outputs import _instances


class Killed(BaseException):
    """The process died here."""


class _Handler(pafs.FileSystemHandler):
    def __init__(self, owner: KillFS) -> None:
        self.owner, self.fs = owner, pafs.LocalFileSystem()

    def _change(self, what: str, path: str) -> None:
        self.owner.changes += 1
        self.owner.log.append((what, path))
        if self.owner.kill_at is not None and self.owner.changes >= self.owner.kill_at:
            raise Killed(f"killed before {what} {path}")

    def get_type_name(self):
        return "killfs"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._change("delete_dir", path)
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._change("delete_dir_contents", path)
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self._change("delete", path)
        self.fs.delete_file(path)

    def move(self, src, dest):
        self._change("move", dest)
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self._change("copy", dest)
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._change("write", path)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


class KillFS:
    """A local OUT seen through a filesystem that dies before its ``kill_at``-th change.

    Its Location is not ``is_local``, so OUT is written as on an object store: parts and
    JSON files by whole-object writes (a temporary name then a move), never in place.
    """

    def __init__(self, root: Path, kill_at: int | None = None) -> None:
        self.kill_at, self.changes, self.log = kill_at, 0, []
        self.fs = pafs.PyFileSystem(_Handler(self))
        self.out = Location(self.fs, str(root), "")


def make_parts(
    out: Location,
    n_images: int,
    *,
    per_part: int = 2,
    start: int = 0,
    cache: bool = False,
    root: str = "/x",
) -> Listing:
    """``n_images`` images ``root/<i>.jpg`` (ids 1000 + i), ``per_part`` per part, 2
    instances each (scores 0.5, 0.6), written by the real writer; their listing."""
    ids = np.arange(1000 + start, 1000 + start + n_images, dtype=np.int64)
    uris = [f"{root}/{i}.jpg" for i in ids]
    for k in range(0, n_images, per_part):
        sl = slice(k, k + per_part)
        n = len(ids[sl])
        batch = {
            Col.IMAGE_ID: ids[sl],
            Col.IMAGE_URI: np.asarray(uris[sl], dtype=object),
            Col.WIDTH: np.full(n, 8),
            Col.HEIGHT: np.full(n, 8),
            Col.STATUS: np.asarray(["ok"] * n, dtype=object),
            Col.ERROR: np.asarray([""] * n, dtype=object),
            Col.N_INSTANCES: np.full(n, 2, dtype=np.int32),
            Col.INSTANCES: np.asarray([_instances(int(i), [0.5, 0.6]) for i in ids[sl]], object),
            Col.FILE_SIZE: np.full(n, 100 + start),
            Col.FILE_MTIME: np.full(n, 7),
            **{c: np.zeros(n) for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE)},
        }
        if cache:
            batch[Col.PROPOSALS] = np.asarray([b"p%d" % i for i in ids[sl]], dtype=object)
            batch[Col.POOLED] = np.asarray([b"f%d" % i for i in ids[sl]], dtype=object)
        write_parts(batch, out=out)
    return Listing.of(uris, ids, np.full(n_images, 100 + start), np.full(n_images, 7))


def read_all(root: Path, kind: str) -> pa.Table | None:
    """Every ``part-*.parquet`` of ``root/kind`` (finished or not), concatenated."""
    files = sorted((root / kind).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def truth(root: Path) -> dict[str, dict[int, int]]:
    """Per kind, image id -> rows of that image, over every part file."""
    out: dict[str, dict[int, int]] = {}
    for kind in ("images", "instances", "proposals"):
        table = read_all(root, kind)
        ids = table.column(Col.IMAGE_ID).to_pylist() if table is not None else []
        out[kind] = {int(i): ids.count(i) for i in set(ids)}
    return out


def local(root: Path) -> Location:
    return resolve(str(root))
