"""Image identity: one file, one canonical URI, one image id, listed once.

* ``canonical_uri``: local paths and ``file://`` URIs become absolute, normalised (``/./``,
  ``a/../``) paths with every symlink resolved; ``s3a://`` becomes ``s3://`` and ``gcs://``
  ``gs://``. Object-store keys are kept literally (``a//b`` and ``a/./b`` are other keys
  there). The image id is ``image_id_from_uri`` of this URI: a file that was never reached
  through a symlink keeps the id earlier versions gave it.
* ``walk_local``: a folder listed recursively, following symlinks but entering each folder
  once (a loop such as ``sub/loop -> ..`` is not followed) and never OUT.
* ``unique``: the entries of a listing, manifest or COCO list with repeats dropped (one
  warning with the count); an id given to two files, or one file under two ids, is an
  error naming both entries.
* ``coco_file_uri``: a COCO ``file_name`` under the images root, refused when it is an
  absolute path or URI or leaves the root (``../``), unless ``allow_outside_root``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
from refseg.pipeline.schema import image_id_from_uri

__all__ = [
    "Listing",
    "canonical_uri",
    "coco_file_uri",
    "is_under",
    "unique",
    "walk_local",
]

log = logging.getLogger(__name__)

_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True)
class Listing:
    """The targets of a run, one row per file.

    uris: canonical URIs; ids: int64 image ids; sizes / mtimes: int64 bytes and
    modification time in ns since the epoch, -1 where unknown (e.g. a missing file).
    """

    uris: list[str]
    ids: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    ids_given: bool = False  # the ids come from the source (COCO, a Parquet manifest)

    def __len__(self) -> int:
        return len(self.uris)

    @classmethod
    def of(
        cls,
        uris: list[str],
        ids: np.ndarray,
        sizes: np.ndarray | None = None,
        mtimes: np.ndarray | None = None,
    ) -> Listing:
        n = len(uris)
        unknown = np.full(n, -1, np.int64)
        return cls(
            list(uris),
            np.asarray(ids, dtype=np.int64),
            unknown.copy() if sizes is None else np.asarray(sizes, dtype=np.int64),
            unknown.copy() if mtimes is None else np.asarray(mtimes, dtype=np.int64),
        )

    def take(self, keep: np.ndarray) -> Listing:
        """The rows where the boolean mask ``keep`` is true."""
        idx = np.nonzero(keep)[0]
        return dataclasses.replace(
            self,
            uris=[self.uris[i] for i in idx],
            ids=self.ids[idx],
            sizes=self.sizes[idx],
            mtimes=self.mtimes[idx],
        )


def canonical_uri(uri: str) -> str:
    """The one spelling of an image's URI (see the module docstring)."""
    text = str(uri).strip()
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = unquote(parsed.path) if scheme == "file" else text
        return os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    rest = (parsed.netloc + parsed.path).rstrip("/")
    if scheme in ("s3", "s3a"):
        return f"s3://{rest}"
    if scheme in ("gs", "gcs"):
        return f"gs://{rest}"
    raise ValueError(
        f"unsupported URI scheme {scheme!r} in {text!r}: use a local path, s3://, or gs://"
    )


def is_under(uri: str, folder: str) -> bool:
    """Whether canonical ``uri`` is ``folder`` (a canonical URI) or inside it."""
    base = folder.rstrip("/")
    return uri == base or uri.startswith(base + "/")


def _dir_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass
class Walk:
    """What ``walk_local`` found: real path -> (size, mtime_ns), and what it left out."""

    files: dict[str, tuple[int, int]]
    repeats: int = 0  # files reached under a second name (symlinks)
    linked_folders: int = 0  # folders reached a second time (symlink loops, links)
    out_skipped: bool = False


def walk_local(root: str, *, keep: Callable[[str], bool], out: str | None = None) -> Walk:
    """Every file under the folder ``root`` whose name passes ``keep``, recursively.

    Symlinks are followed, but each folder (by device and inode) is entered once, so loops
    end and a linked folder is listed once; files inside hidden folders (``.git/``...) are
    left out, and so is the folder ``out`` (a run's OUT inside its own images). Files are
    keyed by their real path: a file reached under two names is listed once.
    """
    walk = Walk({})
    seen: set[tuple[int, int]] = set()
    out_key = _dir_key(out) if out else None
    stack = [root]
    while stack:
        folder = stack.pop()
        key = _dir_key(folder)
        if key is None:
            continue
        if key == out_key:
            walk.out_skipped = True
            continue
        if key in seen:
            walk.linked_folders += 1
            continue
        seen.add(key)
        real_folder = os.path.realpath(folder)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s (%s): its images are left out", folder, exc)
            continue
        subfolders = []
        for entry in entries:
            try:
                if entry.is_dir():
                    if not entry.name.startswith("."):
                        subfolders.append(entry.path)
                    continue
                if not entry.is_file() or not keep(entry.name):
                    continue
                real = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(real_folder, entry.name)
                )
                st = entry.stat()
            except OSError:  # a broken link, or removed while listing
                continue
            if real in walk.files:
                walk.repeats += 1
                continue
            walk.files[real] = (st.st_size, st.st_mtime_ns)
        stack.extend(reversed(subfolders))
    return walk


def unique(
    uris: Sequence[str], ids: np.ndarray | None, *, names: Sequence[str], what: str
) -> tuple[list[str], np.ndarray]:
    """Drop repeated entries; refuse conflicting ids. ``uris`` are canonical.

    Args:
        uris: canonical URI of each entry.
        ids: the ids the entries carry (COCO, a Parquet manifest's ``image_id``), or None
            to derive each from its URI.
        names: how each entry is written in its source, for messages.
        what: the source, e.g. ``"--targets t.json"``.

    Returns:
        (URIs, int64 ids) with each file once, in first-seen order.

    Raises:
        ValueError: one id given to two files, or one file under two ids; the message
            names both entries.
    """
    if ids is None:
        ids = np.fromiter((image_id_from_uri(u) for u in uris), np.int64, len(uris))
    ids = np.asarray(ids, dtype=np.int64)
    by_uri: dict[str, int] = {}
    by_id: dict[int, int] = {}
    keep: list[int] = []
    for i, (uri, iid) in enumerate(zip(uris, ids.tolist(), strict=True)):
        j = by_uri.get(uri)
        if j is not None and int(ids[j]) != iid:
            raise ValueError(
                f"{what}: entries {names[j]!r} (image id {int(ids[j])}) and {names[i]!r} "
                f"(image id {iid}) are the same file {uri}: list each image once"
            )
        k = by_id.get(iid)
        if k is not None and uris[k] != uri:
            raise ValueError(
                f"{what}: image id {iid} is given to {names[k]!r} and to {names[i]!r}: "
                "each image needs its own id"
            )
        if j is None:
            by_uri[uri], by_id[iid] = i, i
            keep.append(i)
    repeats = len(uris) - len(keep)
    if repeats:
        log.warning(
            "%s: %d entries name a file already listed (repeats, or other spellings of "
            "its path): each file is labelled once",
            what,
            repeats,
        )
    return [uris[i] for i in keep], ids[keep]


def _leaves_root(name: str) -> bool:
    norm = posixpath.normpath(name)
    return norm == ".." or norm.startswith("../")


def coco_file_uri(root: str, file_name: str, *, allow_outside_root: bool, what: str) -> str:
    """The URI of a COCO ``file_name`` under the images root ``root``.

    Raises:
        ValueError: ``file_name`` is absolute, a URI, or climbs out of ``root`` with
            ``..``, and ``allow_outside_root`` is false.
    """
    name = str(file_name)
    absolute = "://" in name or name.startswith(("/", "\\")) or bool(_DRIVE.match(name))
    if absolute or _leaves_root(name):
        if not allow_outside_root:
            kind = "is an absolute path or URI" if absolute else "leaves the images root"
            raise ValueError(
                f"{what}: file_name {name!r} {kind} (--images {root}): COCO file names "
                "must be relative paths under --images; pass --allow-outside-root to read "
                "files outside it"
            )
        if absolute:
            return name
    base = root.rstrip("/")
    scheme, sep, path = base.partition("://")
    if not sep:
        return os.path.normpath(os.path.join(base, name))
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, name))}"
