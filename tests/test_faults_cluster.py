"""Slow fault injection (``make test-slow``): a worker node lost mid-job; the driver killed.

Both run the job in driver subprocesses with the stage probe of faults_util, so the test
knows exactly which images each run sent through SAM2 (``propose``) and DINOv2 (``match``)
and can count the images processed twice. Each prints one JSON line for the issue's table.

* Several Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head without CPUs, so
  all work lands on two 2-CPU worker nodes); the node running the SAM2 actor is killed
  (raylet and workers, SIGKILL) after a few parts. The job must finish on the other node
  with every image exactly once.
* The driver (and with it its local Ray) is SIGKILLed mid-job; a rerun resumes. Images
  processed twice are those the killed run had begun and the rerun did again; they must be
  bounded by the work in flight at the kill, never by the job's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest

from tests.faults_util import (
    descendants,
    image_ids,
    part_names,
    probe_counts,
    probe_env,
    read_parts,
    stage_pids,
    start_driver,
    wait_until,
    write_jpegs,
)

pytestmark = pytest.mark.slow


def _report(name: str, **values) -> None:
    print(f"\n{name}: {json.dumps(values)}")


def _kill_tree(root: int) -> None:
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Head (0 CPUs) + two 2-CPU worker nodes; their Ray workers carry the stage probe."""
    from ray.cluster_utils import Cluster

    log = tmp_path / "probe.log"
    for key, value in probe_env(tmp_path / "probe", log).items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers, log
    c.shutdown()


def test_worker_node_killed_mid_job_finishes_with_every_image_once(
    cluster, tiny_setup, tmp_path, capsys
):
    c, workers, log = cluster
    n = 16
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, n)
    env = {**os.environ, "RAY_ADDRESS": c.address}
    proc = start_driver(tiny_setup["bank"], images, out, env, tmp_path / "driver.log")
    parts = lambda: len(part_names(out / "images"))  # noqa: E731
    raylet = {w: w.all_processes["raylet"][0].process.pid for w in workers}
    try:
        wait_until(
            lambda: parts() >= 3 and any(stage_pids("ProposalStage", r) for r in raylet.values()),
            timeout=400,
            what="three parts",
            proc=proc,
        )
        victim = next(w for w in workers if stage_pids("ProposalStage", raylet[w]))
        victim_workers = descendants(raylet[victim])
        done_at_kill = parts()
        c.remove_node(victim, allow_graceful=False)
        for pid in victim_workers:  # its worker processes, should any outlive the raylet
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert done_at_kill < n, "the job had finished before the node was killed"
        rc = proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
            proc.wait()
    driver_log = (tmp_path / "driver.log").read_text()
    assert rc == 0, driver_log[-4000:]
    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == n
    assert all(r["status"] == "ok" for r in read_parts(str(out), "images").to_pylist())
    started, finished = probe_counts(log, "propose-start"), probe_counts(log, "match")
    assert set(finished) == set(ids)
    twice = sorted(i for i, k in started.items() if k > 1)
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
    assert len(twice) <= n - done_at_kill  # only unfinished work is redone


def test_driver_killed_mid_job_rerun_resumes_and_redoes_only_work_in_flight(
    tiny_setup, tmp_path, capsys
):
    n = 16
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, n)
    logs = [tmp_path / "probe1.log", tmp_path / "probe2.log"]
    proc = start_driver(
        tiny_setup["bank"], images, out, probe_env(tmp_path / "p", logs[0]), tmp_path / "d1.log"
    )
    try:
        wait_until(
            lambda: len(part_names(out / "images")) >= 4, timeout=400, what="4 parts", proc=proc
        )
    finally:
        _kill_tree(proc.pid)  # the driver, its raylet and every Ray worker: nothing survives
        proc.wait()
    done_before = set(image_ids(str(out)))
    orphans = part_names(out / "instances") - part_names(out / "images")
    assert 4 <= len(done_before) < n and not (out / "coco_results.json").exists()

    rerun = start_driver(
        tiny_setup["bank"], images, out, probe_env(tmp_path / "p", logs[1]), tmp_path / "d2.log"
    )
    rc = rerun.wait(timeout=600)
    assert rc == 0, (tmp_path / "d2.log").read_text()[-4000:]
    ids = image_ids(str(out))
    assert len(ids) == len(set(ids)) == n  # nothing lost, nothing doubled in the output
    assert not part_names(out / "instances") - part_names(out / "images")  # orphans removed
    run1 = {stage: probe_counts(logs[0], f"{stage}-start") for stage in ("propose", "match")}
    run2 = {stage: probe_counts(logs[1], f"{stage}-start") for stage in ("propose", "match")}
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
    # in flight at the kill: the decoded batches queued for the two actors (<= 2 tasks of
    # 1 image each per actor) plus results on their way to the writer; never the job's size
    assert len(twice["propose"]) <= 8
    assert Path(out / "run.json").exists()
