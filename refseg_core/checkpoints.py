"""Where checkpoints come from: the official registry, the local cache and URI resolution.

A checkpoint *spec* is one of

* a local path (``/data/sam2_hiera_large.pt``),
* an fsspec URI (``file://``, ``s3://``, ``gs://``, ``https://``...); remote files are copied
  once into the cache directory,
* the name of an official checkpoint (``sam2.1_hiera_large``, ``dinov2_vitl14``): the file
  must already be in the cache (``refseg checkpoints download NAME`` puts it there).

Meta publishes no checksums for SAM 2 or DINOv2 files, so ``OfficialCheckpoint.sha256`` is
``None`` for all of them. :func:`download` then records the hash it computed in a sidecar
file (``FILENAME.sha256``) and later resolutions of that official name check against it.
Every resolution returns the SHA-256 of the file it resolved, for the run's records.

Nothing here loads weights: that is ``refseg.core.models``' job.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

Family = Literal["sam2", "dinov2"]

_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2"
_DINOV2_BASE = "https://dl.fbaipublicfiles.com/dinov2"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One file published by Meta.

    ``arch`` is the sam2 config short name (``sam2_hiera_l``, ``sam2.1_hiera_t``) or the
    DINOv2 model name (``vitl14``, ``vitl14_reg``) the file belongs to.
    """

    name: str
    family: Family
    arch: str
    url: str
    sha256: str | None
    filename: str


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """A checkpoint file on local disk: ``path`` to read, ``uri`` to record, its ``sha256``."""

    path: Path
    uri: str
    sha256: str


def _official_table() -> dict[str, OfficialCheckpoint]:
    table: list[OfficialCheckpoint] = []
    sizes = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}
    for version, folder in (("sam2", "072824"), ("sam2.1", "092824")):
        for short, size in sizes.items():
            filename = f"{version}_hiera_{size}.pt"
            table.append(
                OfficialCheckpoint(
                    name=filename.removesuffix(".pt"),
                    family="sam2",
                    arch=f"{version}_hiera_{short}",
                    url=f"{_SAM2_BASE}/{folder}/{filename}",
                    sha256=None,
                    filename=filename,
                )
            )
    for arch in ("vits14", "vitb14", "vitl14", "vitg14"):
        for suffix, file_suffix in (("", ""), ("_reg", "_reg4")):
            filename = f"dinov2_{arch}{file_suffix}_pretrain.pth"
            table.append(
                OfficialCheckpoint(
                    name=f"dinov2_{arch}{suffix}",  # torch.hub's entry-point name
                    family="dinov2",
                    arch=f"{arch}{suffix}",
                    url=f"{_DINOV2_BASE}/dinov2_{arch}/{filename}",
                    sha256=None,
                    filename=filename,
                )
            )
    return {c.name: c for c in table}


OFFICIAL: dict[str, OfficialCheckpoint] = _official_table()


def default_checkpoint_for(family: Family, arch: str) -> OfficialCheckpoint | None:
    """The official checkpoint of ``family`` for ``arch`` (``sam2_hiera_l``, ``vitl14``...)."""
    for ckpt in OFFICIAL.values():
        if ckpt.family == family and ckpt.arch == arch:
            return ckpt
    return None


def cache_dir() -> Path:
    """``$REFSEG_CACHE`` or ``~/.cache/refseg/checkpoints`` (not created here)."""
    env = os.environ.get("REFSEG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "refseg" / "checkpoints"


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (memoised on path, size and mtime)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        _HASH_MEMO[key] = digest.hexdigest()
    return _HASH_MEMO[key]


def verify_sha256(path: str | Path, expected: str, *, actual: str | None = None) -> None:
    """Raise ``ValueError`` unless the file's SHA-256 is ``expected`` (case-insensitive).

    ``actual`` skips re-hashing when the caller already knows the file's hash.
    """
    actual = actual if actual is not None else sha256_file(path)
    if actual.lower() != expected.strip().lower():
        raise ValueError(
            f"SHA-256 mismatch for {path}: expected {expected.strip().lower()}, got {actual}"
        )


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _how_to_get(ckpt: OfficialCheckpoint) -> str:
    return f"run `refseg checkpoints download {ckpt.name}` or fetch {ckpt.url} into {cache_dir()}"


def _resolve_official(ckpt: OfficialCheckpoint) -> ResolvedCheckpoint:
    path = cache_dir() / ckpt.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"official checkpoint {ckpt.name!r} is not in the cache ({path}); {_how_to_get(ckpt)}"
        )
    digest = sha256_file(path)
    sidecar = _sidecar(path)
    recorded = sidecar.read_text().split()[:1] if sidecar.is_file() else []
    expected = ckpt.sha256 or (recorded[0] if recorded else None)
    if expected is not None:
        verify_sha256(path, expected, actual=digest)
    return ResolvedCheckpoint(path=path, uri=ckpt.url, sha256=digest)


def _atomic_copy(src: IO[bytes], dest: Path, *, total: int | None, progress: bool) -> str:
    """Stream ``src`` into ``dest`` through a temporary file; return the SHA-256 written."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    bar = _progress_bar(dest.name, total) if progress else None
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def _progress_bar(desc: str, total: int | None):  # -> tqdm-like object
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with sam2
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr)


def _resolve_uri(uri: str) -> ResolvedCheckpoint:
    import fsspec

    fs, fs_path = fsspec.core.url_to_fs(uri)
    if "file" in _protocols(fs):
        path = Path(fs_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path} (from {uri})")
        return ResolvedCheckpoint(path=path, uri=uri, sha256=sha256_file(path))
    if not fs.isfile(fs_path):
        raise FileNotFoundError(f"checkpoint not found: {uri}")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = cache_dir() / "remote" / f"{key}-{Path(fs_path).name}"
    size = fs.size(fs_path)
    if not (dest.is_file() and (size is None or dest.stat().st_size == size)):
        with fs.open(fs_path, "rb") as src:
            _atomic_copy(src, dest, total=size, progress=False)
    return ResolvedCheckpoint(path=dest, uri=uri, sha256=sha256_file(dest))


def _protocols(fs: object) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def resolve_checkpoint(spec: str) -> ResolvedCheckpoint:
    """Turn a local path, an fsspec URI or an official name into a local file and its hash.

    An existing local file wins over an official name of the same spelling. Raises
    ``FileNotFoundError`` for a missing path, a missing remote object, or an official
    checkpoint not yet in the cache (the message says how to download it), and
    ``ValueError`` when a downloaded official file no longer matches its recorded hash.
    """
    if "://" in spec:
        return _resolve_uri(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return ResolvedCheckpoint(path=path, uri=path.resolve().as_uri(), sha256=sha256_file(path))
    if spec in OFFICIAL:
        return _resolve_official(OFFICIAL[spec])
    hint = "" if os.sep in spec or path.suffix else f"; official names: {', '.join(OFFICIAL)}"
    raise FileNotFoundError(f"checkpoint not found: {path}{hint}")


def download(name: str, *, progress: bool = True) -> Path:
    """Download official checkpoint ``name`` into :func:`cache_dir`; return its path.

    The file is written to a temporary name and renamed when complete. A file already in
    the cache is kept (and checked against its known or recorded hash). When
    ``OFFICIAL[name].sha256`` is known, a mismatch deletes the download and raises
    ``ValueError``; the computed hash is always recorded in ``FILENAME.sha256``.
    """
    try:
        ckpt = OFFICIAL[name]
    except KeyError:
        raise ValueError(f"unknown checkpoint {name!r}; choose one of {sorted(OFFICIAL)}") from None
    dest = cache_dir() / ckpt.filename
    if dest.is_file():
        return _resolve_official(ckpt).path
    with urllib.request.urlopen(ckpt.url) as response:
        length = response.headers.get("Content-Length")
        digest = _atomic_copy(
            response, dest, total=int(length) if length else None, progress=progress
        )
    if ckpt.sha256 is not None:
        try:
            verify_sha256(dest, ckpt.sha256, actual=digest)
        except ValueError:
            dest.unlink(missing_ok=True)
            raise
    _sidecar(dest).write_text(f"{digest}  {ckpt.filename}\n")
    return dest


def _checkpoint_sha(family: str, arch: str, spec: str | None) -> str | None:
    if spec is None:
        official = default_checkpoint_for(family, arch)  # type: ignore[arg-type]
        if official is None:
            return None  # the models layer names the problem when it builds
        spec = official.name
    return resolve_checkpoint(spec).sha256


def model_checkpoints_sha256(model: Any) -> dict[str, str | None]:
    """SHA-256 of the SAM2 and DINOv2 files ``model`` (a ``ModelConfig``) would load,
    official defaults included; ``None`` for random weights.

    Raises the ``FileNotFoundError`` of :func:`resolve_checkpoint` (which says where to get
    the file): a job calls this before starting Ray, rather than failing in every actor.
    """
    if model.random_weights:
        return {"sam2": None, "dinov2": None}
    from refseg.core.models import sam2_config_name

    short, _ = sam2_config_name(model.sam2_config)
    dinov2 = model.dinov2_model.replace("_reg4", "_reg")
    return {
        "sam2": _checkpoint_sha("sam2", short, model.sam2_checkpoint),
        "dinov2": _checkpoint_sha("dinov2", dinov2, model.dinov2_checkpoint),
    }
