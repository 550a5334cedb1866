"""``refseg label``'s run-integrity flags and messages (issue 13), through ``main``."""

from __future__ import annotations

import contextlib
import io
import warnings

from refseg.jobs.cli import main
from refseg.pipeline.job import LabelSummary
from refseg.pipeline.storage import resolve
from refseg.pipeline.store.lock import hold_out

from tests.faults_util import write_jpegs

TINY = ["--preset", "tiny", "--random-weights"]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _label(tiny, tmp_path, *flags: str) -> list[str]:
    write_jpegs(tmp_path / "images", 1)
    return [
        "label",
        "--memory",
        tiny["bank"],
        "--images",
        str(tmp_path / "images"),
        "--out",
        str(tmp_path / "out"),
        *TINY,
        "--num-cpus",
        "2",
        *flags,
    ]


def test_the_flags_reach_the_job(tiny_setup, tmp_path, monkeypatch):
    jobs = []

    def fake(job):
        jobs.append(job)
        return LabelSummary(0, 0, 0, 0, 1.0, 0, job.out)

    monkeypatch.setattr("refseg.pipeline.job.run_label", fake)
    flags = ("--retry-errors", "--allow-outside-root", "--take-over-lock")
    rc, _, err = _run(_label(tiny_setup, tmp_path, *flags))
    assert rc == 0, err
    job = jobs[0]
    assert job.retry_errors and job.take_over_lock and job.source.allow_outside_root
    rc, _, err = _run(_label(tiny_setup, tmp_path))
    assert rc == 0, err
    job = jobs[1]
    assert not (job.retry_errors or job.take_over_lock or job.source.allow_outside_root)


def test_help_names_the_flags():
    rc, out, _ = _run(["label", "--help"])
    assert rc == 0
    for flag in ("--retry-errors", "--allow-outside-root", "--take-over-lock"):
        assert flag in out


def test_a_run_on_an_out_in_use_is_a_one_line_error(tiny_setup, tmp_path):
    argv = _label(tiny_setup, tmp_path)
    with hold_out(resolve(str(tmp_path / "out"))):
        rc, _, err = _run(argv)
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"refseg label: error: {tmp_path / 'out'} is in use by another")
    assert "Traceback" not in err
