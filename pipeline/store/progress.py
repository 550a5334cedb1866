"""Progress of a labelling job: one bar on a terminal, plain lines off one, OUT/progress.json.

``OUT/progress.json`` is what a scheduler or a dashboard reads while a job runs. It is
rewritten whole (a local rename, or one S3 PUT) every ``file_interval_s`` seconds (at most
10) from the moment the job starts working, and once at the end::

    {
      "images_done": 18,            # images finished by this run (ok and error rows)
      "images_total": 40,           # images this run processes: the listing less the images
                                    # OUT already holds; null until the listing is made
      "errors": 1,                  # error rows (unreadable files...) among images_done
      "images_per_second": 1.52,    # over the last minute while running; the run's average
                                    # (start to end) once it is done or failed
      "eta_seconds": 14.5,          # (total - done) / rate; null while either is unknown,
                                    # 0 when done, null when failed
      "state": "running",           # running | done | failed
      "updated": "2026-12-04T18:02:30Z"  # UTC, ISO 8601
    }

``state`` becomes ``done`` only after the COCO files and run.json are written, so a
scheduler that sees ``done`` can read every output.

On a terminal (stderr is a TTY) one bar shows images done / total, images/s, the ETA and the
errors so far; off a terminal (a log file, cron, ``ray job submit``) a plain line is printed
every ``line_interval_s`` seconds. Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from refseg.pipeline.storage import Location, put_atomic
from tqdm import tqdm

__all__ = ["PROGRESS_FILE", "ProgressOptions", "ProgressReporter", "reporting", "utc_now"]

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
MAX_FILE_INTERVAL_S = 10.0
RATE_WINDOW_S = 60.0
_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images [{elapsed}<{remaining}, "
_BAR += "{rate_noinv_fmt}{postfix}]"
_BAR_NO_TOTAL = "{desc}: {n_fmt} images [{elapsed}, {rate_noinv_fmt}{postfix}]"


@dataclass(frozen=True)
class ProgressOptions:
    """How a job reports progress (none of it changes the labels).

    line_interval_s: seconds between plain progress lines when stderr is not a terminal
        (0: no lines; the file is still written).
    file_interval_s: seconds between rewrites of OUT/progress.json (0 < x <= 10).
    ray_bars: show Ray Data's own per-operator bars; the job bar is then left out on a
        terminal so that the two do not overwrite each other.
    """

    line_interval_s: float = 30.0
    file_interval_s: float = 5.0
    ray_bars: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.file_interval_s <= MAX_FILE_INTERVAL_S:
            raise ValueError(
                f"progress file interval must be in (0, {MAX_FILE_INTERVAL_S:g}] seconds, "
                f"got {self.file_interval_s}"
            )
        if self.line_interval_s < 0:
            raise ValueError(f"--progress-interval must be >= 0, got {self.line_interval_s}")


def utc_now() -> str:
    """The current time as ISO 8601 UTC with a ``Z`` (``2026-12-04T18:02:30Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _clock_text(seconds: float | None) -> str:
    return "?" if seconds is None else tqdm.format_interval(seconds)


class ProgressReporter:
    """Counts the images a job finishes and reports them (terminal, log lines, progress.json).

    Thread-safe: the driver loop calls :meth:`add`; a daemon thread started by
    :meth:`start` calls :meth:`tick` (tests call it directly with a fake ``clock``).
    Nothing is written before :meth:`start`; :meth:`finish` writes the final state once.
    """

    def __init__(
        self,
        options: ProgressOptions | None = None,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], str] = utc_now,
        refresh_s: float = 0.5,
    ) -> None:
        self.options = options or ProgressOptions()
        self._stream = stream
        self._clock, self._now, self._refresh_s = clock, now, refresh_s
        self._lock = threading.Lock()
        self._ticking = threading.Lock()  # the driver (set_total) and the thread both tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._out: Location | None = None
        self._done = self._errors = self._skipped = 0
        self._total: int | None = None
        self._t0 = 0.0
        self._samples: deque[tuple[float, int]] = deque()
        self._next_file = self._next_line = 0.0
        self._state: str | None = None  # None: not started
        self._write_failed = False

    # ----------------------------------------------------------------- driver side
    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @property
    def on_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def start(self, out: Location | None, *, already_done: int = 0, thread: bool = True) -> None:
        """Begin reporting (state ``running``); ``out`` None keeps it off storage."""
        with self._lock:
            self._out, self._skipped = out, already_done
            self._t0 = self._clock()
            self._samples.append((self._t0, 0))
            self._state = "running"
            self._next_line = self._t0 + self.options.line_interval_s
        self.tick()
        if thread:
            self._thread = threading.Thread(target=self._loop, name="refseg-progress", daemon=True)
            self._thread.start()

    def set_already_done(self, images: int) -> None:
        """Images that earlier runs finished (shown in the plain lines)."""
        with self._lock:
            self._skipped = int(images)

    def set_total(self, total: int | None) -> None:
        """The number of images this run processes (None: unknown); shown at once once
        reporting has started (the bar redrawn, progress.json rewritten)."""
        with self._lock:
            self._total = None if total is None else int(total)
            self._next_file = 0.0
        self.tick()

    def add(self, images: int, errors: int = 0) -> None:
        """``images`` more finished, ``errors`` of them error rows."""
        with self._lock:
            self._done += int(images)
            self._errors += int(errors)
            self._samples.append((self._clock(), self._done))

    def finish(self, state: str) -> None:
        """Stop the thread and report the final ``state`` (``done`` or ``failed``) once."""
        if state not in ("done", "failed"):
            raise ValueError(f"final state must be done or failed, got {state!r}")
        if self._state != "running":
            return  # never started, or already finished
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._ticking:  # no tick after this one: the final state is the last written
            with self._lock:
                self._state = state
                if state == "done" and self._total is None:
                    self._total = self._done
            snap = self.snapshot()
            if self.on_terminal and not self.options.ray_bars:
                self._draw(snap, final=True)
            elif self.options.line_interval_s > 0:
                self._print_line(snap)
            self._write(snap)

    # ------------------------------------------------------------------- reporting
    def _rate(self, now: float) -> float:
        """Images/s over the last RATE_WINDOW_S (since the start during the first window)."""
        while len(self._samples) > 1 and self._samples[1][0] <= now - RATE_WINDOW_S:
            self._samples.popleft()
        t_base, done_base = self._samples[0]
        span = now - t_base
        return (self._done - done_base) / span if span > 0 else 0.0

    def snapshot(self) -> dict[str, Any]:
        """The progress.json content now (keys in the documented order)."""
        with self._lock:
            now = self._clock()
            state = self._state or "running"
            elapsed = now - self._t0
            if state == "running":
                rate = self._rate(now)
            else:
                rate = self._done / elapsed if elapsed > 0 else 0.0
            eta: float | None = None
            if state == "done":
                eta = 0.0
            elif state == "running" and self._total is not None and rate > 0:
                eta = max(self._total - self._done, 0) / rate
            return {
                "images_done": self._done,
                "images_total": self._total,
                "errors": self._errors,
                "images_per_second": round(rate, 4),
                "eta_seconds": None if eta is None else round(eta, 1),
                "state": state,
                "updated": self._now(),
            }

    def tick(self) -> None:
        """One reporting step: redraw the bar, print a line and rewrite the file when due."""
        with self._ticking:
            if self._state != "running":
                return
            now = self._clock()
            snap = self.snapshot()
            if self.on_terminal:
                if not self.options.ray_bars:
                    self._draw(snap)
            elif self.options.line_interval_s > 0 and now >= self._next_line:
                self._next_line = now + self.options.line_interval_s
                self._print_line(snap)
            if now >= self._next_file:
                self._next_file = now + self.options.file_interval_s
                self._write(snap)

    def _loop(self) -> None:
        while not self._stop.wait(self._refresh_s):
            try:
                self.tick()
            except Exception:  # reporting must never stop the job
                log.exception("progress reporting failed")

    def _elapsed(self) -> float:
        return max(self._clock() - self._t0, 0.0)

    def _postfix(self, snap: dict[str, Any]) -> str:
        text = f"{snap['errors']} error" + ("" if snap["errors"] == 1 else "s")
        if self._skipped:
            text += f", {self._skipped} done before"
        return text

    def line(self, snap: dict[str, Any]) -> str:
        """The plain progress line of a snapshot (for logs)."""
        done, total = snap["images_done"], snap["images_total"]
        count = f"{done}/{total} images" if total is not None else f"{done} images"
        if total:
            count += f" ({100 * done / total:.0f}%)"
        eta = _clock_text(snap["eta_seconds"])
        return (
            f"refseg label: {snap['state']}: {count}, {self._postfix(snap)}, "
            f"{snap['images_per_second']:.2f} images/s, ETA {eta}, "
            f"elapsed {_clock_text(self._elapsed())}"
        )

    def _print_line(self, snap: dict[str, Any]) -> None:
        print(self.line(snap), file=self.stream, flush=True)

    def bar(self, snap: dict[str, Any], width: int | None = None) -> str:
        """The one-line bar of a snapshot, ``width`` columns wide (default: the terminal)."""
        total = snap["images_total"]
        rate = snap["images_per_second"] or None
        return tqdm.format_meter(
            min(snap["images_done"], total) if total is not None else snap["images_done"],
            total,
            self._elapsed(),
            ncols=width or shutil.get_terminal_size((100, 20)).columns,
            prefix="refseg label",
            unit=" images",
            rate=rate,
            bar_format=_BAR if total is not None else _BAR_NO_TOTAL,
            postfix=self._postfix(snap),
        )

    def _draw(self, snap: dict[str, Any], *, final: bool = False) -> None:
        end = "\n" if final else ""
        self.stream.write("\r" + self.bar(snap) + "\x1b[K" + end)
        self.stream.flush()

    def _write(self, snap: dict[str, Any]) -> None:
        if self._out is None:
            return
        data = (json.dumps(snap, indent=1) + "\n").encode()
        try:
            put_atomic(self._out.child(PROGRESS_FILE), data)
            self._write_failed = False
        except Exception as exc:  # a store hiccup must not stop the job
            if not self._write_failed:
                log.warning("could not write %s: %s", self._out.child(PROGRESS_FILE).uri, exc)
            self._write_failed = True


@contextlib.contextmanager
def reporting(options: ProgressOptions) -> Iterator[ProgressReporter]:
    """A job's reporter: the run ends ``failed`` on any exception (a no-op when the job
    stopped before it started reporting); the job itself reports ``done``."""
    progress = ProgressReporter(options)
    try:
        yield progress
    except BaseException:
        progress.finish("failed")
        raise
