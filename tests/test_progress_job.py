"""OUT/progress.json and the progress output of real labelling runs (local and S3).

The job's reporter is driven by the test (``Driven``): no background thread; its clock
moves one second per batch the job finishes, and at the start, when the total is known
and after each batch, the file is rewritten and read back from the store as a scheduler
reads it. So what is checked is every state a scheduler can see during the run, then
after it, with exact counts, rates and ETAs, and nothing is raced. Tiny preset, random
weights, the session's 2-CPU Ray, moto's S3 server on loopback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import boto3
import pytest
from refseg.jobs.cli import main
from refseg.pipeline import job as job_module
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import ImageSource
from refseg.pipeline.job import LabelJob, LabelSummary, run_label
from refseg.pipeline.store import progress as progress_module
from refseg.pipeline.store.progress import PROGRESS_FILE, ProgressOptions, ProgressReporter

from tests.conftest import write_images

pytestmark = pytest.mark.usefixtures("ray_local")
REPO = Path(__file__).resolve().parents[1]
KEYS = [
    "images_done",
    "images_total",
    "errors",
    "images_per_second",
    "eta_seconds",
    "state",
    "updated",
]
FAST = ProgressOptions(file_interval_s=0.2, line_interval_s=1.0)
SETTINGS = PipelineSettings(write_batch_size=1, proposal_batch_size=1, match_batch_size=1)


def _job(tiny, images: str, out: str, **kw) -> LabelJob:
    return LabelJob(
        memory=tiny["bank"],
        source=ImageSource(images, s3_endpoint=kw.pop("s3_endpoint", None)),
        out=out,
        model=tiny["model"],
        method=tiny["method"],
        settings=SETTINGS,
        preset="tiny",
        progress=kw.pop("progress", FAST),
    )


class Driven(ProgressReporter):
    """The job's reporter, driven by the test (see the module's docstring): ``seen`` holds
    (what the job had reported, the file read back) at each step."""

    read: ClassVar[Callable[[], bytes | None]] = staticmethod(lambda: None)
    runs: ClassVar[list[Driven]] = []

    def __init__(self, options: ProgressOptions | None = None, **kw) -> None:
        self.time = 1000.0
        super().__init__(options, clock=lambda: self.time, **kw)
        self.seen: list[tuple[tuple[int, int], dict]] = []
        Driven.runs.append(self)

    def _look(self) -> None:
        data = type(self).read()
        assert data is not None, "progress.json is missing while the job runs"
        self.seen.append(((self._done, self._errors), json.loads(data)))  # never torn

    def start(self, out, *, already_done: int = 0, thread: bool = True) -> None:
        super().start(out, already_done=already_done, thread=False)
        self._look()

    def set_total(self, total: int | None) -> None:
        super().set_total(total)
        self._look()

    def add(self, images: int, errors: int = 0) -> None:
        self.time += 1.0  # one second per batch: longer than the file interval
        super().add(images, errors)
        self.tick()
        self._look()


@contextlib.contextmanager
def _driven(monkeypatch, read: Callable[[], bytes | None]) -> Iterator[list[Driven]]:
    """Jobs run in the block report through ``Driven`` reporters (one per run, yielded)."""
    monkeypatch.setattr(Driven, "read", staticmethod(read))
    monkeypatch.setattr(Driven, "runs", [])
    monkeypatch.setattr(progress_module, "ProgressReporter", Driven)
    yield Driven.runs


def _local_reader(out: Path) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        try:
            return (out / PROGRESS_FILE).read_bytes()
        except FileNotFoundError:
            return None

    return read


def _check_run(run: Driven, final: dict, total: int, errors: int) -> None:
    """Every snapshot of one run, as read from the store, and its final file."""
    steps = run.seen
    assert len(steps) >= 3, "the job reported no finished batch"  # start, total, a batch
    for _, snap in steps:
        assert list(snap) == KEYS and snap["state"] == "running"
        when = datetime.fromisoformat(snap["updated"].replace("Z", "+00:00"))
        assert when.tzinfo == timezone.utc and snap["updated"].endswith("Z")
    (_, at_start), (_, at_total) = steps[:2]
    assert (at_start["images_done"], at_start["images_total"]) == (0, None)  # not listed yet
    assert at_start["eta_seconds"] is None
    assert (at_total["images_done"], at_total["images_total"]) == (0, total)
    for k, ((done, errs), snap) in enumerate(steps[2:], start=1):  # k batches, k seconds
        assert (snap["images_done"], snap["errors"], snap["images_total"]) == (done, errs, total)
        assert snap["images_per_second"] == round(done / k, 4)
        assert snap["eta_seconds"] == round((total - done) / (done / k), 1)
    assert steps[-1][0] == (total, errors)  # every image reported before the end
    seconds = len(steps) - 2
    assert list(final) == KEYS and final["state"] == "done" and final["eta_seconds"] == 0.0
    assert (final["images_done"], final["images_total"], final["errors"]) == (total, total, errors)
    assert final["images_per_second"] == round(total / seconds, 4)


def test_local_run_progress_during_and_after_then_a_rerun(
    tiny_setup, tmp_path, capsys, monkeypatch
):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, 3)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    with _driven(monkeypatch, _local_reader(out)) as runs:
        summary = run_label(_job(tiny_setup, str(images), str(out)))
        assert (summary.images, summary.errors) == (4, 1)
        _check_run(runs[0], json.loads((out / PROGRESS_FILE).read_text()), total=4, errors=1)
        err = capsys.readouterr().err  # pytest's stderr is not a terminal: plain lines
        assert "refseg label: running: " in err  # a line each second of the driven clock
        assert "refseg label: done: 4/4 images (100%), 1 error, " in err

        # a rerun with 1 new image: the total counts this run's images, the COCO files all
        write_images(images, 1, start=10)
        again = run_label(_job(tiny_setup, str(images), str(out)))
        assert (again.images, again.skipped_done) == (1, 4)
        _check_run(runs[1], json.loads((out / PROGRESS_FILE).read_text()), total=1, errors=0)
    assert "refseg label: done: 1/1 images (100%), 0 errors, 4 done before, " in (
        capsys.readouterr().err
    )
    dataset = json.loads((out / "coco_dataset.json").read_text())
    assert len(dataset["images"]) == 4  # 3 + 1 ok images of both runs (not the broken one)
    results = json.loads((out / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} <= {im["id"] for im in dataset["images"]}

    # nothing new: total 0, done at once
    run_label(_job(tiny_setup, str(images), str(out)))
    final = json.loads((out / PROGRESS_FILE).read_text())
    assert final["state"] == "done" and (final["images_done"], final["images_total"]) == (0, 0)


def test_a_failed_run_leaves_state_failed(tiny_setup, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match="no image found"):  # raised after progress began
        run_label(_job(tiny_setup, str(tmp_path / "images"), str(tmp_path / "out")))
    final = json.loads((tmp_path / "out" / PROGRESS_FILE).read_text())
    assert final["state"] == "failed" and final["eta_seconds"] is None


def test_s3_output_progress_during_and_after(tiny_setup, s3_endpoint, tmp_path, monkeypatch):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="progress-in")
    s3.create_bucket(Bucket="progress-out")
    for p in write_images(tmp_path / "imgs", 2):
        s3.upload_file(str(p), "progress-in", f"targets/{p.name}")

    def read() -> bytes | None:
        try:
            return s3.get_object(Bucket="progress-out", Key=f"run/{PROGRESS_FILE}")["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None

    job = _job(
        tiny_setup, "s3://progress-in/targets", "s3://progress-out/run", s3_endpoint=s3_endpoint
    )
    with _driven(monkeypatch, read) as runs:
        run_label(job)
    _check_run(runs[0], json.loads(read() or b"{}"), total=2, errors=0)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="progress-out")["Contents"]}
    assert not [k for k in keys if "tmp" in k]  # one whole-object put, no temporaries


def test_cli_flags_reach_the_job(tiny_setup, tmp_path, monkeypatch):
    seen: list[LabelJob] = []

    def spy(job: LabelJob) -> LabelSummary:
        seen.append(job)
        return LabelSummary(0, 0, 0, 0, 1.0, 0, job.out)

    monkeypatch.setattr(job_module, "run_label", spy)
    write_images(tmp_path / "images", 1)
    argv = ["label", "--memory", tiny_setup["bank"], "--images", str(tmp_path / "images"),
            "--out", str(tmp_path / "out"), "--preset", "tiny", "--random-weights"]  # fmt: skip
    err = io.StringIO()
    with pytest.warns(UserWarning), contextlib.redirect_stderr(err):
        assert main(argv) == 0
        assert main([*argv, "--progress-interval", "2", "--ray-progress"]) == 0
        assert main([*argv, "--progress-interval", "-1"]) == 2
    assert seen[0].progress == ProgressOptions()  # a line every 30 s, the job bar
    assert seen[1].progress == ProgressOptions(line_interval_s=2.0, ray_bars=True)
    assert "--progress-interval must be >= 0" in err.getvalue()


def test_terminal_shows_one_job_bar_not_rays_operator_bars(tiny_setup, tmp_path):
    """`refseg label` with stderr on a pseudo-terminal, as a person runs it."""
    write_images(tmp_path / "images", 3)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "refseg", "label", "--memory", tiny_setup["bank"],
            "--images", str(tmp_path / "images"), "--out", str(out), "--preset", "tiny",
            "--random-weights", "--num-cpus", "2", "--write-batch-size", "1"]  # fmt: skip
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # Ray's default, as a user has it
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "refseg label: 100%|" in screen and "3/3 images [" in screen
    assert "images/s, 0 errors]" in screen and "\r" in screen  # redrawn in place
    assert "refseg label:   0%|" in screen  # the total is known while it runs
    assert "Running Dataset" not in screen and "- MapBatches(" not in screen  # no Ray bars
    assert "Progress bars disabled" not in screen
    assert "not writable" not in screen  # torch's warning from the actors is gone
    assert "refseg label: 3 images (3 ok, 0 errors)" in stdout
    assert json.loads((out / PROGRESS_FILE).read_text())["state"] == "done"
