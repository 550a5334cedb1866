"""OUT/progress.json and the progress output of real labelling runs (local and S3).

A poller thread reads progress.json while ``run_label`` runs in the test's thread, so
what is checked is what a scheduler sees during the run, then after it. Tiny preset,
random weights, the session's 2-CPU Ray, moto's S3 server on loopback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import boto3
import pytest
from refseg.jobs.cli import main
from refseg.pipeline import job as job_module
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import ImageSource
from refseg.pipeline.job import LabelJob, LabelSummary, run_label
from refseg.pipeline.store.progress import PROGRESS_FILE, ProgressOptions

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


@contextlib.contextmanager
def _polling(read: Callable[[], bytes | None]) -> Iterator[list[dict]]:
    """Read progress.json every 50 ms in a thread; yields the list of distinct snapshots."""
    seen: list[dict] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            data = read()
            if data is not None:
                snap = json.loads(data)  # a torn file would fail here
                if not seen or snap != seen[-1]:
                    seen.append(snap)
            stop.wait(0.05)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(timeout=10)


def _local_reader(out: Path) -> Callable[[], bytes | None]:
    def read() -> bytes | None:
        try:
            return (out / PROGRESS_FILE).read_bytes()
        except FileNotFoundError:
            return None

    return read


def _check_snapshots(seen: list[dict], total: int, errors: int) -> None:
    """What the poller read: this run's snapshots (a rerun first shows the last run's end)."""
    assert seen, "progress.json never appeared during the run"
    first = [i for i, s in enumerate(seen) if s["state"] == "running"]
    assert first, "no snapshot was read while the job ran"
    assert first[0] <= 1 and all(s["state"] == "done" for s in seen[: first[0]])
    seen = seen[first[0] :]
    for snap in seen:
        assert list(snap) == KEYS
        assert snap["state"] in ("running", "done")
        when = datetime.fromisoformat(snap["updated"].replace("Z", "+00:00"))
        assert when.tzinfo == timezone.utc and snap["updated"].endswith("Z")
    running = [s for s in seen if s["state"] == "running"]
    assert any(s["images_total"] == total for s in running), "the total never showed"
    done = [s["images_done"] for s in seen]
    assert done == sorted(done) and all(d <= total for d in done)
    final = seen[-1]
    assert final["state"] == "done" and final["eta_seconds"] == 0.0
    assert (final["images_done"], final["images_total"], final["errors"]) == (total, total, errors)
    assert final["images_per_second"] > 0


def test_local_run_progress_during_and_after_then_a_rerun(tiny_setup, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "out"
    write_images(images, 3)
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    with _polling(_local_reader(out)) as seen:
        summary = run_label(_job(tiny_setup, str(images), str(out)))
        time.sleep(0.2)  # let the poller read the final file
    assert (summary.images, summary.errors) == (4, 1)
    _check_snapshots(seen, total=4, errors=1)
    assert json.loads((out / PROGRESS_FILE).read_text()) == seen[-1]
    err = capsys.readouterr().err  # pytest's stderr is not a terminal: plain lines
    assert "refseg label: running: " in err
    assert "refseg label: done: 4/4 images (100%), 1 error, " in err

    # a rerun with 1 new image: the total counts this run's images, the COCO files all
    write_images(images, 1, start=10)
    with _polling(_local_reader(out)) as seen:
        again = run_label(_job(tiny_setup, str(images), str(out)))
        time.sleep(0.2)
    assert (again.images, again.skipped_done) == (1, 4)
    _check_snapshots(seen, total=1, errors=0)
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


def test_s3_output_progress_during_and_after(tiny_setup, s3_endpoint, tmp_path):
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
    with _polling(read) as seen:
        run_label(job)
        time.sleep(0.5)
    _check_snapshots(seen, total=2, errors=0)
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
