"""Two labelling runs on one OUT at once (issue 13): the second is refused, nothing is lost.

Before OUT had a lock, the second run's orphan clean-up deleted the first run's in-flight
instances parts: images were marked done without instances and ``coco_results.json`` was
left as ``[``. The first run here is a real driver subprocess; the second starts while the
first is held mid-job by the stage gate (tests/stage_gate.py), with its first block of
images written and the next one being proposed, and the first goes on once it is refused.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from refseg.pipeline.job import run_label

from tests.faults_util import (
    ROWS_PER_TASK,
    TWO_BLOCKS,
    image_ids,
    make_job,
    part_names,
    start_driver,
    wait_until,
    write_jpegs,
)
from tests.stage_gate import WAIT_S, StageGate

pytestmark = pytest.mark.usefixtures("ray_local")


def test_a_second_run_on_an_out_in_use_is_refused_and_deletes_nothing(tiny_setup, tmp_path):
    """The issue's case: the second run's clean-up deleted the first's in-flight parts."""
    images, out, log = tmp_path / "images", tmp_path / "out", tmp_path / "driver.log"
    n = TWO_BLOCKS
    write_jpegs(images, n)
    gate = StageGate(tmp_path / "gate", propose=ROWS_PER_TASK + 1)  # the second block's first
    proc = start_driver(tiny_setup["bank"], images, out, gate.env(), log)
    try:
        gate.wait_held("propose", proc=proc)
        wait_until(
            lambda: len(part_names(out / "images")) >= ROWS_PER_TASK,
            timeout=WAIT_S,
            what="the first run's first block",
            proc=proc,
        )
        before = part_names(out / "instances") | part_names(out / "images")
        with pytest.raises(OSError, match="is in use by another") as info:
            run_label(make_job(tiny_setup, images, out))
        assert f"{out} is in use by another `refseg label` run: pid {proc.pid}" in str(info.value)
        after = part_names(out / "instances") | part_names(out / "images")
        assert before <= after  # nothing of the first run deleted
        gate.release("propose")
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()[-3000:]
    finally:
        gate.release("propose")
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == n
    results = json.loads((out / "coco_results.json").read_text())
    assert {r["image_id"] for r in results} <= set(ids)
    assert not (out / "lock.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
