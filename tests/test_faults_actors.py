"""Fault injection: SIGKILL pipeline actors mid-job; Ray restarts them, retries their batch.

The stage gate (tests/stage_gate.py) holds one stage call until the test has killed the
actor running it, so the kill always lands mid-job, on a known call, with known work done;
the job must end normally with every image exactly once, all ok.

* In ``make test``: the SAM2 proposal actor of an in-process job on the session's Ray.
* In ``make test-slow``: the proposal actor, then the DINOv2 matching actor, of a job in a
  driver subprocess, counting the images whose stage call began twice (the work a kill
  wastes).
"""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
from refseg.pipeline.job import run_label

from tests.faults_util import image_ids, make_job, read_parts, start_driver, write_jpegs
from tests.stage_gate import WAIT_S, StageGate

N_IMAGES = 8


def _check_kill(gate: StageGate, stage: str, killed: int) -> list[int]:
    """The killed actor was cut short in the held call, a new actor did that call again,
    and only what the killed actor had begun was done twice; the images done twice."""
    began = {i for pid, i in gate.events(f"{stage}-start") if pid == killed}
    ended = {i for pid, i in gate.events(stage) if pid == killed}
    held = began - ended
    assert len(held) == 1, (stage, began, ended)  # one call at a time: the held one
    assert held <= {i for pid, i in gate.events(stage) if pid != killed}  # by a new actor
    redone = {i for i, n in gate.counts(f"{stage}-start").items() if n > 1}
    # Ray retries the killed actor's task: the held call, and the calls of that task
    # that had ended before it (Ray Data maps a task's block batch by batch)
    assert held <= redone <= began, (stage, held, redone, began)
    return sorted(redone)


def test_killed_proposal_actor_restarts_and_its_batch_is_retried(tiny_setup, tmp_path, ray_local):
    # The third proposal call waits until its actor has been killed: two images are
    # proposed, the rest cannot be without a restarted actor retrying the held batch.
    n = 6
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, n)
    gate = StageGate(tmp_path / "gate", propose=3)
    done, killed = threading.Event(), []

    def kill() -> None:
        try:
            killed.append(gate.kill_held("propose", proc=done))
        finally:
            gate.release("propose")  # whatever happened, never leave the job held

    watcher = threading.Thread(target=kill, daemon=True)
    with gate.in_process():
        watcher.start()
        try:
            summary = run_label(make_job(tiny_setup, images, out))
        finally:
            done.set()
            watcher.join(timeout=120)
    assert killed, "the held proposal actor was not killed"
    assert (summary.images, summary.ok, summary.errors) == (n, n, 0)
    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == n  # nothing lost, nothing doubled
    _check_kill(gate, "propose", killed[0])


@pytest.mark.slow
def test_killed_proposal_and_match_actors_redo_only_what_they_had_begun(
    tiny_setup, tmp_path, capsys
):
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, N_IMAGES)
    # proposal call 3 waits for its kill; matching call 4 can only begin after the
    # restarted proposal actor has proposed, and waits for its own kill
    gate = StageGate(tmp_path / "gate", propose=3, match=4)
    proc = start_driver(tiny_setup["bank"], images, out, gate.env(), tmp_path / "d.log")
    try:
        killed = {s: gate.kill_held(s, proc=proc) for s in ("propose", "match")}
        rc = proc.wait(timeout=WAIT_S)
    finally:
        gate.release("propose")
        gate.release("match")
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    driver_log = (tmp_path / "d.log").read_text()
    assert rc == 0, driver_log[-3000:]
    assert f"refseg label: {N_IMAGES} images ({N_IMAGES} ok, 0 errors)" in driver_log

    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == N_IMAGES  # nothing lost, nothing doubled
    rows = read_parts(str(out), "images").to_pylist()
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    inst = read_parts(str(out), "instances")
    assert inst is None or set(inst.column("image_id").to_pylist()) <= set(ids)

    redone = {s: _check_kill(gate, s, killed[s]) for s in ("propose", "match")}
    for s in ("propose", "match"):
        assert set(gate.counts(s)) == set(ids), s  # every image went through every stage
    with capsys.disabled():
        print(
            "\nactor kills:",
            json.dumps(
                {
                    "killed_pids": killed,
                    "images_lost": N_IMAGES - len(set(ids)),
                    "output_rows_doubled": len(ids) - len(set(ids)),
                    "proposal_calls_redone": len(redone["propose"]),
                    "match_calls_redone": len(redone["match"]),
                }
            ),
        )
    assert not list((out / "instances").glob(".*"))  # no temporary file left behind
