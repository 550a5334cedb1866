"""Helpers of the fault-injection tests (``tests/test_faults_*.py``).

* bad input files, built here with PIL/numpy (``bad_image_cases``);
* a ``LabelJob`` for the tiny preset and readers of a run's output tables;
* processes the tests own and break on purpose: a moto S3 server (stop, pause with
  SIGSTOP, resume with SIGCONT), a driver subprocess, a process tree (``kill_tree``).

What happens mid-job is timed by the stage gate of tests/stage_gate.py (a stage call that
waits for the test), never by the clock.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import FETCH_BLOCK_ROWS, ImageSource
from refseg.pipeline.job import LabelJob
from refseg.pipeline.storage import resolve

from tests.stage_gate import running

REPO = Path(__file__).resolve().parents[1]
# The listing goes to Ray in blocks of FETCH_BLOCK_ROWS images (fewer images: one block),
# and each stage maps a block in one task whose results move on only when it ends. A stage
# gate (tests/stage_gate.py) holding proposal call ROWS_PER_TASK + 1, the first call of the
# second block, thus holds a job with exactly the first block's images written.
ROWS_PER_TASK = FETCH_BLOCK_ROWS
# Two whole blocks: the blocks' fetch tasks may finish in either order (a short trailing
# block often first on a loaded machine), so only with equal blocks is the held call
# always the first of the second proposal task, whichever block that is. (With 8 + 2
# images, the 2 went first under two busy loops; call 9 fell inside the 8's task and held
# its finished images back: 2 parts written, never 8.)
TWO_BLOCKS = 2 * ROWS_PER_TASK
# batches of one or two images: a kill lands mid-job and little work is in flight
SMALL_BATCHES = PipelineSettings(
    decode_batch_size=2, proposal_batch_size=1, match_batch_size=1, write_batch_size=1
)


# ------------------------------------------------------------------------- bad images


@dataclass(frozen=True)
class ImageCase:
    """One input file and what the labelling job must make of it.

    ``error``: a fragment of the error row's message, or None when the image must be
    labelled (status ok) with ``size`` = (width, height) after EXIF orientation.
    """

    name: str
    data: bytes
    error: str | None = None
    size: tuple[int, int] | None = None


def _enc(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A 100-byte PNG that declares a huge RGB image (30 GB of pixels) and holds garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"\x00" * 16)
        + _png_chunk(b"IEND", b"")
    )


def bad_image_cases(seed: int = 1) -> dict[str, ImageCase]:
    """The issue's table of odd inputs, keyed by row name (all small, made here)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    jpeg = _enc(Image.fromarray(rgb), "JPEG", quality=90)
    gray16 = (rng.integers(0, 65536, (30, 40))).astype(np.uint16)
    cmyk = Image.fromarray(rng.integers(0, 256, (36, 52, 4), dtype=np.uint8), mode="CMYK")
    palette = Image.fromarray(rng.integers(0, 4, (26, 34), dtype=np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0, 255, 255, 255])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 64 x 32, displayed rotated 90 degrees: 32 wide, 64 high
    rgba = rng.integers(0, 256, (44, 28, 4), dtype=np.uint8)
    png = lambda a: _enc(Image.fromarray(a), "PNG")  # noqa: E731
    exif6 = _enc(Image.fromarray(rgb[:32, :64]), "JPEG", exif=exif.tobytes())
    return {
        "zero-bytes": ImageCase("zero.jpg", b"", error="empty (0 bytes)"),
        "truncated-jpeg": ImageCase("truncated.jpg", jpeg[: len(jpeg) // 2], error="truncated"),
        "not-an-image": ImageCase("text.jpg", b"not an image\n" * 8, error="not a recognised"),
        "wrong-extension": ImageCase("png_named.jpg", png(rgb), size=(64, 48)),
        "16-bit-png": ImageCase("gray16.png", png(gray16), size=(40, 30)),
        "cmyk-jpeg": ImageCase("cmyk.jpg", _enc(cmyk, "JPEG"), size=(52, 36)),
        "grayscale": ImageCase("gray.png", png(rgb[..., 0]), size=(64, 48)),
        "rgba": ImageCase("rgba.png", png(rgba), size=(28, 44)),
        "palette-png": ImageCase("palette.png", _enc(palette, "PNG"), size=(34, 26)),
        "exif-rotated": ImageCase("exif6.jpg", exif6, size=(32, 64)),
        "1x1-pixel": ImageCase("one_pixel.png", png(rgb[:1, :1]), size=(1, 1)),
        "decompression-bomb": ImageCase("bomb.png", bomb_png(), error="decompression bomb"),
    }


def write_jpegs(folder: Path, n: int, *, start: int = 0, side: int = 48) -> list[Path]:
    """n small random JPEGs ``img_<i>.jpg`` (fixed seed per index)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        arr = np.random.default_rng(i).integers(0, 256, (side, side + 8, 3), dtype=np.uint8)
        p = folder / f"img_{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=85)
        paths.append(p)
    return paths


# ------------------------------------------------------------------------ jobs, outputs


def make_job(
    tiny: dict[str, Any],
    images: str | Path,
    out: str | Path,
    *,
    settings: PipelineSettings = SMALL_BATCHES,
    **source: Any,
) -> LabelJob:
    """A LabelJob of the tiny preset with random weights (``tiny`` = the conftest fixture)."""
    return LabelJob(
        memory=tiny["bank"],
        source=ImageSource(str(images), **source),
        out=str(out),
        model=tiny["model"],
        method=tiny["method"],
        settings=settings,
        preset="tiny",
        num_cpus=2,
    )


def read_parts(out: str, kind: str, *, s3_endpoint: str | None = None) -> pa.Table | None:
    """Every parquet part under ``out/kind`` (finished or not), concatenated; None if none."""
    loc = resolve(out, s3_endpoint=s3_endpoint).child(kind)
    sel = pafs.FileSelector(loc.path, allow_not_found=True)
    names = sorted(
        i.path
        for i in loc.fs.get_file_info(sel)
        if i.base_name.startswith("part-") and i.base_name.endswith(".parquet")
    )
    tables = []
    for name in names:
        with loc.fs.open_input_file(name) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else None


def image_ids(out: str, *, s3_endpoint: str | None = None) -> list[int]:
    """Image ids of every images row under ``out`` (one per finished image, repeats kept)."""
    t = read_parts(out, "images", s3_endpoint=s3_endpoint)
    return [] if t is None else t.column("image_id").to_pylist()


def part_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("part-*.parquet")} if folder.is_dir() else set()


# ------------------------------------------------------------------------------ moto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """A moto S3 server of this test alone, on its own loopback port.

    ``pause``/``resume`` freeze the process (SIGSTOP/SIGCONT): connections hang as in a
    network outage and the buckets (in moto's memory) survive. ``stop`` ends it.
    """

    def __init__(self) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        assert exe, "moto_server not found: install the dev extras (make setup)"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 120  # a safety net: moto starts in ~2 s
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -------------------------------------------------------------------- driver, processes

DRIVER = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("ignore")
    from refseg.core.config import get_preset, replace
    from refseg.pipeline.job import LabelJob, run_label
    from refseg.pipeline.dataflow.settings import PipelineSettings
    from refseg.pipeline.dataflow.sources import FETCH_BLOCK_ROWS, ImageSource
    p = get_preset("tiny")
    s = run_label(LabelJob(sys.argv[1], ImageSource(sys.argv[2]), sys.argv[3],
                  replace(p.model, random_weights=True), p.method,
                  PipelineSettings(decode_batch_size=2, proposal_batch_size=1,
                                   match_batch_size=1, write_batch_size=1),
                  num_cpus=int(sys.argv[4])))
    print(s.line())
    """
)


def start_driver(
    bank: str, images: Path, out: Path, env: dict[str, str], log: Path, *, num_cpus: int = 2
) -> subprocess.Popen:
    """``run_label`` in a subprocess of its own session (its own local Ray unless the
    environment sets RAY_ADDRESS), output to ``log``; kill it with
    ``os.killpg(proc.pid, SIGKILL)``."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-c", DRIVER, bank, str(images), str(out), str(num_cpus)],
            env=env,
            start_new_session=True,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def wait_until(pred: Any, *, timeout: float, what: str, proc: Any = None) -> None:
    """Poll ``pred()`` every 0.1 s; fail with ``what`` after ``timeout`` s (a safety net:
    wait only for what must come) or as soon as the job ``proc`` (a Popen, a Thread, an
    Event set at its end) has ended."""
    deadline = time.monotonic() + timeout
    while not pred():
        if not running(proc):
            raise AssertionError(f"the job ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Pids of every process below ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and every process below it (listed before the first kill, as the
    orphans of a killed process are handed to init)."""
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
