"""The progress reporter (pipeline/progress.py) with a fake clock: no Ray, no waiting.

The pipeline-level checks (progress.json read during and after real runs, local and S3)
are in tests/test_progress_job.py.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from refseg.pipeline.storage import resolve
from refseg.pipeline.store.progress import PROGRESS_FILE, ProgressOptions, ProgressReporter

KEYS = [
    "images_done",
    "images_total",
    "errors",
    "images_per_second",
    "eta_seconds",
    "state",
    "updated",
]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _reporter(tmp_path: Path | None, stream: io.StringIO, **options) -> tuple:
    clock = Clock()
    rep = ProgressReporter(
        ProgressOptions(**options), stream=stream, clock=clock, now=lambda: "2026-12-04T18:00:00Z"
    )
    out = resolve(str(tmp_path)) if tmp_path is not None else None
    rep.start(out, thread=False)
    return rep, clock


def _file(tmp_path: Path) -> dict:
    return json.loads((tmp_path / PROGRESS_FILE).read_text())


def test_file_has_exactly_the_keys_and_is_rewritten_on_its_interval(tmp_path):
    rep, clock = _reporter(tmp_path, io.StringIO(), file_interval_s=5, line_interval_s=0)
    first = _file(tmp_path)  # written as soon as the job starts
    assert list(first) == KEYS
    assert first == {
        "images_done": 0,
        "images_total": None,
        "errors": 0,
        "images_per_second": 0.0,
        "eta_seconds": None,
        "state": "running",
        "updated": "2026-12-04T18:00:00Z",
    }
    rep.set_total(40)  # shown at once
    assert _file(tmp_path) == {**first, "images_total": 40}
    clock.t += 4
    rep.add(8, errors=1)
    rep.tick()
    assert _file(tmp_path)["images_done"] == 0  # not due yet
    clock.t += 1
    rep.tick()
    now = _file(tmp_path)
    assert (now["images_done"], now["images_total"], now["errors"]) == (8, 40, 1)
    assert now["images_per_second"] == pytest.approx(8 / 5)
    assert now["eta_seconds"] == pytest.approx(32 / (8 / 5), abs=0.1)
    assert [p.name for p in tmp_path.iterdir()] == [PROGRESS_FILE]  # no temporary left


def test_rate_is_over_the_last_minute_and_the_final_state_is_the_average(tmp_path):
    rep, clock = _reporter(tmp_path, io.StringIO(), line_interval_s=0)
    rep.set_total(200)
    clock.t += 100  # a slow start (model loading): nothing done
    rep.add(10)
    clock.t += 60
    rep.add(60)  # 60 images in the last 60 s
    clock.t += 0.001
    snap = rep.snapshot()
    assert snap["images_per_second"] == pytest.approx(60 / 60, rel=1e-3)
    assert snap["eta_seconds"] == pytest.approx(130 / 1.0, rel=1e-3)
    clock.t += 40
    rep.finish("done")
    final = _file(tmp_path)
    assert final["state"] == "done" and final["eta_seconds"] == 0.0
    assert final["images_per_second"] == pytest.approx(70 / 200.001, rel=1e-3)
    clock.t += 10
    rep.tick()
    rep.finish("failed")  # a second finish changes nothing
    assert _file(tmp_path) == final


def test_failed_run_and_unknown_total(tmp_path):
    rep, clock = _reporter(tmp_path, io.StringIO(), line_interval_s=0)
    clock.t += 10
    rep.add(3)
    assert rep.snapshot()["eta_seconds"] is None  # total unknown: no ETA
    rep.finish("failed")
    final = _file(tmp_path)
    assert final["state"] == "failed" and final["images_total"] is None
    assert final["eta_seconds"] is None and final["images_done"] == 3


def test_a_reporter_never_started_writes_nothing(tmp_path):
    rep = ProgressReporter(stream=io.StringIO())
    rep.finish("failed")
    assert not list(tmp_path.iterdir())


def test_off_a_terminal_a_plain_line_every_interval(tmp_path):
    stream = io.StringIO()
    rep, clock = _reporter(tmp_path, stream, line_interval_s=30)
    rep.set_total(40)
    for _ in range(12):  # 60 s of ticks every 5 s
        clock.t += 5
        rep.tick()
        if clock.t < 1030:
            rep.add(2, errors=1 if clock.t == 1020 else 0)
    rep.finish("done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines  # at 30 s, at 60 s, and the final one
    assert lines[0].startswith("refseg label: running: 10/40 images (25%), 1 error, ")
    assert "images/s, ETA " in lines[0] and "elapsed 00:30" in lines[0]
    assert lines[2].startswith("refseg label: done: 10/40 images") and "ETA 00:00" in lines[2]
    assert "\r" not in stream.getvalue()


def test_no_lines_with_interval_zero_but_the_file_is_written(tmp_path):
    stream = io.StringIO()
    rep, clock = _reporter(tmp_path, stream, line_interval_s=0)
    clock.t += 100
    rep.tick()
    rep.finish("done")
    assert stream.getvalue() == "" and _file(tmp_path)["state"] == "done"


def test_on_a_terminal_one_bar_redrawn_in_place():
    stream = Tty()
    rep, clock = _reporter(None, stream)
    rep.set_total(40)
    clock.t += 10
    rep.add(12, errors=2)
    rep.tick()
    frame = stream.getvalue().split("\r")[-1]
    assert frame.startswith("refseg label:  30%|") and "\n" not in frame
    assert "12/40 images [00:10<00:23,  1.20 images/s, 2 errors]" in frame
    rep.finish("done")
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


def test_bar_without_a_total_and_with_images_done_before():
    rep = ProgressReporter(stream=Tty(), clock=Clock())
    rep.start(None, already_done=6, thread=False)
    text = rep.bar(rep.snapshot(), width=100)
    assert text.startswith("refseg label: 0 images [00:00, ? images/s, 0 errors, 6 done before]")


def test_ray_bars_leave_the_terminal_to_ray():
    stream = Tty()
    rep, clock = _reporter(None, stream, ray_bars=True, line_interval_s=0)
    clock.t += 10
    rep.tick()
    rep.finish("done")
    assert stream.getvalue() == ""


@pytest.mark.parametrize("bad", [0, 10.5, -1])
def test_file_interval_is_at_most_ten_seconds(bad):
    with pytest.raises(ValueError, match="progress file interval"):
        ProgressOptions(file_interval_s=bad)
    with pytest.raises(ValueError, match="--progress-interval"):
        ProgressOptions(line_interval_s=-1)


def test_a_store_that_fails_does_not_stop_the_job(tmp_path, caplog):
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should be")
    rep = ProgressReporter(stream=io.StringIO(), clock=Clock())
    rep.start(resolve(str(blocker)), thread=False)  # the write fails: a warning, no raise
    rep.tick()
    rep.finish("done")
    warnings = [r for r in caplog.records if PROGRESS_FILE in r.getMessage()]
    assert len(warnings) == 1  # once, not on every tick


def test_the_total_shows_at_once_on_the_bar_and_in_the_file(tmp_path):
    """Not at the next tick: a short job could end before it (the bar would never show
    the total, a scheduler never see it while the job runs)."""
    stream = Tty()
    rep, clock = _reporter(tmp_path, stream, file_interval_s=5)
    assert "images [" in stream.getvalue() and "%|" not in stream.getvalue()  # no total yet
    clock.t += 1
    rep.set_total(7)
    assert stream.getvalue().split("\r")[-1].startswith("refseg label:   0%|")
    assert "0/7 images" in stream.getvalue().split("\r")[-1]
    assert _file(tmp_path)["images_total"] == 7


class _Ticks(ProgressReporter):
    """Counts the background thread's file writes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[dict] = []
        self.wrote_done_count = threading.Event()

    def _write(self, snap: dict) -> None:
        super()._write(snap)
        self.writes.append(snap)
        if snap["images_done"] == 2 and threading.current_thread() is self._thread:
            self.wrote_done_count.set()


def test_background_thread_writes_and_stops(tmp_path):
    rep = _Ticks(
        ProgressOptions(file_interval_s=0.05, line_interval_s=0),
        stream=io.StringIO(),
        refresh_s=0.01,
    )
    rep.start(resolve(str(tmp_path)))
    rep.set_total(5)
    rep.add(2)  # only the thread writes this count (add itself writes nothing)
    assert rep.wrote_done_count.wait(120), "the thread never rewrote the file"  # safety net
    rep.finish("done")
    assert rep._thread is not None and not rep._thread.is_alive()
    assert _file(tmp_path)["state"] == "done" and rep.writes[-1]["state"] == "done"
    assert all(w["state"] == "running" for w in rep.writes[:-1])  # nothing after the final
