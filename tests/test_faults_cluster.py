"""Slow fault injection (``make test-slow``): a worker node lost mid-job; the driver killed.

Both run the job in driver subprocesses with the stage gate of tests/stage_gate.py, which
logs the images each run sent through SAM2 (``propose``) and DINOv2 (``match``), so the
test can count the images processed twice, and holds one proposal call until the test has
struck: the node or the driver dies mid-job, after a known number of images, always. Each
prints one JSON line for the issue's table.

* Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, so
  all work lands on two 2-CPU worker nodes); the node running the SAM2 actor is killed
  (raylet and workers, SIGKILL) while it holds the first proposal call of the second
  block, with the first block's images written. The job must finish on the other node
  with every image exactly once.
* The driver (and with it its local Ray) is SIGKILLed at the same point; a rerun resumes.
  Images processed twice are those the killed run had begun and the rerun did again:
  the held one, never the job's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile

import pytest

from tests.faults_util import (
    ROWS_PER_TASK,
    TWO_BLOCKS,
    descendants,
    image_ids,
    kill_tree,
    part_names,
    read_parts,
    start_driver,
    wait_until,
    write_jpegs,
)
from tests.stage_gate import WAIT_S, StageGate

pytestmark = pytest.mark.slow


def _report(name: str, **values) -> None:
    print(f"\n{name}: {json.dumps(values)}")


HOLD = ROWS_PER_TASK + 1  # the proposal call held at the kill: the first block is written
N = ROWS_PER_TASK + 4


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Head (0 CPUs) + two 2-CPU worker nodes; their Ray workers carry the stage gate.

    Its files go under a folder of its own (RAY_TMPDIR): ``Cluster`` writes its address to
    ``<ray tmp>/ray_current_cluster``, and while that is in /tmp/ray every ``ray.init()``
    on the machine would join this cluster instead of starting its own.
    """
    from ray.cluster_utils import Cluster

    gate = StageGate(tmp_path / "gate", propose=HOLD)
    for key, value in gate.env().items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    ray_tmp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        workers = [c.add_node(num_cpus=2) for _ in range(2)]
        c.wait_for_nodes()
        yield c, workers, gate
    finally:
        gate.release("propose")
        c.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_worker_node_killed_mid_job_finishes_with_every_image_once(
    cluster, tiny_setup, tmp_path, capsys
):
    c, workers, gate = cluster
    n = N
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, n)
    env = {**os.environ, "RAY_ADDRESS": c.address}
    proc = start_driver(tiny_setup["bank"], images, out, env, tmp_path / "driver.log")
    parts = lambda: len(part_names(out / "images"))  # noqa: E731
    raylet = {w: w.all_processes["raylet"][0].process.pid for w in workers}
    try:
        held = gate.wait_held("propose", proc=proc)
        wait_until(lambda: parts() >= HOLD - 1, timeout=WAIT_S, what="the first block", proc=proc)
        (victim,) = [w for w in workers if held in descendants(raylet[w])]
        victim_workers = descendants(raylet[victim])
        done_at_kill = parts()
        c.remove_node(victim, allow_graceful=False)
        for pid in victim_workers:  # its worker processes, should any outlive the raylet
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        gate.release("propose")  # the retried call (on the other node) goes on
        rc = proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.wait()
    driver_log = (tmp_path / "driver.log").read_text()
    assert rc == 0, driver_log[-4000:]
    assert done_at_kill == HOLD - 1  # the held call and everything after it were to do
    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == n
    assert all(r["status"] == "ok" for r in read_parts(str(out), "images").to_pylist())
    started, finished = gate.counts("propose-start"), gate.counts("match")
    assert set(finished) == set(ids)
    twice = sorted(i for i, k in started.items() if k > 1)
    began_on_victim = {i for pid, i in gate.events("propose-start") if pid == held}
    with capsys.disabled():
        _report(
            "worker node killed",
            images=n,
            parts_before_kill=done_at_kill,
            images_lost=n - len(set(ids)),
            output_rows_doubled=len(ids) - len(set(ids)),
            images_proposed_twice=len(twice),
            proposal_calls=sum(started.values()),
        )
    assert twice  # at least the held call was done again, on the other node
    # redone: what the lost node had begun, or had finished but whose results died with it
    assert set(twice) <= began_on_victim and len(twice) <= n - done_at_kill


def test_driver_killed_mid_job_rerun_resumes_and_redoes_only_work_in_flight(
    tiny_setup, tmp_path, capsys
):
    n = TWO_BLOCKS  # a local Ray, one proposal actor: the held call begins a task
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, n)
    gates = [StageGate(tmp_path / "gate1", propose=HOLD), StageGate(tmp_path / "gate2")]
    proc = start_driver(tiny_setup["bank"], images, out, gates[0].env(), tmp_path / "d1.log")
    try:
        gates[0].wait_held("propose", proc=proc)
        parts = lambda: len(part_names(out / "images"))  # noqa: E731
        wait_until(lambda: parts() >= HOLD - 1, timeout=WAIT_S, what="the first block", proc=proc)
    finally:
        kill_tree(proc.pid)  # the driver, its raylet and every Ray worker: nothing survives
        proc.wait()
    done_before = set(image_ids(str(out)))
    orphans = part_names(out / "instances") - part_names(out / "images")
    assert len(done_before) == HOLD - 1 and not (out / "coco_results.json").exists()

    rerun = start_driver(tiny_setup["bank"], images, out, gates[1].env(), tmp_path / "d2.log")
    rc = rerun.wait(timeout=600)
    assert rc == 0, (tmp_path / "d2.log").read_text()[-4000:]
    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == n  # nothing lost, nothing doubled in the output
    assert not part_names(out / "instances") - part_names(out / "images")  # orphans removed
    run1 = {stage: gates[0].counts(f"{stage}-start") for stage in ("propose", "match")}
    run2 = {stage: gates[1].counts(f"{stage}-start") for stage in ("propose", "match")}
    assert set(run2["propose"]) == set(ids) - done_before  # the rerun did exactly the rest
    assert not set(run2["propose"]) & done_before
    twice = {s: sorted(set(run1[s]) & set(run2[s])) for s in run1}
    in_flight = set(run1["propose"]) - done_before  # begun by the killed run, not finished
    assert set(twice["propose"]) == in_flight
    with capsys.disabled():
        _report(
            "driver killed",
            images=n,
            finished_before_kill=len(done_before),
            orphan_instance_parts=len(orphans),
            images_lost=n - len(set(ids)),
            output_rows_doubled=len(ids) - len(set(ids)),
            images_proposed_twice=len(twice["propose"]),
            images_matched_twice=len(twice["match"]),
            rerun_images=len(run2["propose"]),
        )
    # in flight at the kill: the held call's image (the actor proposes one at a time and
    # the calls before it were written); never the job's size
    assert len(twice["propose"]) == 1
    assert (out / "run.json").exists()
