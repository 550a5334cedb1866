"""The Ray Data labelling job end to end: local folder and S3 in/out, resume, bad files.

Local Ray with 2 CPUs, the tiny preset with random weights, moto's S3 server on loopback.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import ImageSource
from refseg.pipeline.job import LabelJob, run_label
from refseg.pipeline.schema import IMAGES_SCHEMA, image_id_from_uri
from refseg.pipeline.storage import resolve

from tests.conftest import write_images
from tests.faults_util import ROWS_PER_TASK, TWO_BLOCKS, kill_tree, start_driver, wait_until
from tests.stage_gate import WAIT_S, StageGate

pytestmark = pytest.mark.usefixtures("ray_local")
SETTINGS = PipelineSettings(write_batch_size=2, proposal_batch_size=2, match_batch_size=2)


def _job(tiny, images, out, **kw) -> LabelJob:
    return LabelJob(
        memory=tiny["bank"],
        source=ImageSource(images, **{k: kw.pop(k) for k in ("targets", "s3_endpoint") if k in kw}),
        out=str(out),
        model=tiny["model"],
        method=tiny["method"],
        settings=kw.pop("settings", SETTINGS),
        preset="tiny",
    )


def _table(out: str, kind: str):
    loc = resolve(out)
    sel = pafs.FileSelector(loc.child(kind).path)
    names = sorted(i.path for i in loc.fs.get_file_info(sel) if i.base_name.endswith(".parquet"))
    tables = []
    for n in names:
        with loc.fs.open_input_file(n) as f:
            tables.append(pq.read_table(f))
    import pyarrow as pa

    return pa.concat_tables(tables)


def _corrupt_files(folder: Path) -> dict[str, bytes]:
    bad = {
        "zero.jpg": b"",
        "text.png": b"this is not an image at all",
        "truncated.jpg": (folder / "img_000.jpg").read_bytes()[:200],
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    return bad


@pytest.fixture(scope="module")
def local_run(tiny_setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    images = root / "images"
    good = write_images(images, 5)
    bad = _corrupt_files(images)
    (images / "notes.txt").write_text("not listed: wrong extension")
    out = root / "out"
    summary = run_label(_job(tiny_setup, str(images), out))
    return {"images": images, "good": good, "bad": bad, "out": out, "summary": summary}


def test_every_input_is_one_images_row_and_corrupt_files_are_error_rows(local_run):
    t = _table(str(local_run["out"]), "images")
    assert t.schema.equals(IMAGES_SCHEMA)
    rows = {Path(r["image_uri"]).name: r for r in t.to_pylist()}
    assert set(rows) == {p.name for p in local_run["good"]} | set(local_run["bad"])
    assert t.num_rows == len(rows)  # exactly once
    for p in local_run["good"]:
        r = rows[p.name]
        assert r["status"] == "ok" and r["error"] is None
        assert (r["width"], r["height"]) == (80 + 5 * int(p.stem[-3:]), 60 + 7 * int(p.stem[-3:]))
        assert r["image_id"] == image_id_from_uri(str(p))
        assert r["seconds"] > 0
    for name in local_run["bad"]:
        assert rows[name]["status"] == "error"
        assert name in rows[name]["error"]  # the message names the file
    s = local_run["summary"]
    assert (s.images, s.ok, s.errors) == (8, 5, 3)


def test_instances_table_columns_and_values(local_run):
    t = _table(str(local_run["out"]), "instances")
    assert t.schema.equals(INSTANCES_SCHEMA)
    images = {r["image_id"]: r for r in _table(str(local_run["out"]), "images").to_pylist()}
    assert t.num_rows == sum(r["n_instances"] for r in images.values()) > 0
    for r in t.to_pylist():
        img = images[r["image_id"]]
        assert img["status"] == "ok"
        assert (
            r["category_id"] in (3, 17)
            and r["category_name"] == {3: "car", 17: "cat"}[r["category_id"]]
        )
        assert list(r["segmentation"]["size"]) == [img["height"], img["width"]]
        x, y, w, h = r["bbox"]
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert 0 < r["score"] <= 1 and 0 <= r["proposal_iou"] <= 1.5 and r["area"] > 0


def test_coco_files_load_with_pycocotools(local_run):
    out = local_run["out"]
    gt = COCO(str(out / "coco_dataset.json"))
    assert len(gt.getImgIds()) == 5 and sorted(gt.getCatIds()) == [3, 17]
    n = _table(str(out), "instances").num_rows
    assert len(gt.getAnnIds()) == n
    res = gt.loadRes(str(out / "coco_results.json"))
    assert len(res.getAnnIds()) == n


def test_run_record(local_run):
    run = json.loads((local_run["out"] / "run.json").read_text())
    assert run["random_weights"] is True and run["warnings"]
    assert run["counts"]["total"] == {
        "images": 8,
        "ok": 5,
        "errors": 3,
        "instances": run["counts"]["total"]["instances"],
    }
    assert run["config"]["model"]["sam2_config"] == "sam2.1_hiera_t"
    assert run["versions"]["ray"] and run["versions"]["torch"]
    assert set(run["timings"]["stage_seconds"]) == {"decode", "propose", "match", "encode"}
    assert "testing-secret-value" not in (local_run["out"] / "run.json").read_text()


def test_rerun_processes_only_new_images(local_run, tiny_setup):
    images, out = local_run["images"], local_run["out"]
    again = run_label(_job(tiny_setup, str(images), out))
    assert again.images == 0 and again.skipped_done == 8
    write_images(images, 2, start=10)
    more = run_label(_job(tiny_setup, str(images), out))
    assert more.images == 2
    t = _table(str(out), "images")
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10  # every input exactly once


def test_rerun_with_another_configuration_is_refused(local_run, tiny_setup):
    images, out = local_run["images"], local_run["out"]
    job = _job(tiny_setup, str(images), out)
    other = dataclasses.replace(job, method=dataclasses.replace(job.method, nms_iou=0.7))
    with pytest.raises(ValueError, match="holds a run with another configuration"):
        run_label(other)


def test_fingerprint_keeps_what_decides_the_labels(tiny_setup, tmp_path):
    from refseg.pipeline.run_steps import config_fingerprint

    job = _job(tiny_setup, str(tmp_path), tmp_path / "o")
    base = config_fingerprint(job.model, job.method, "bank-a")
    same = [
        dataclasses.replace(job, model=dataclasses.replace(job.model, device="cuda:3")),
        dataclasses.replace(job, model=dataclasses.replace(job.model, compile=True)),
        # a field at its default value, set explicitly: old runs keep their fingerprint
        dataclasses.replace(job, method=dataclasses.replace(job.method, merge_resolution="full")),
        # how the mask decoder runs: the same masks up to float rounding
        dataclasses.replace(job, method=dataclasses.replace(job.method, decoder="stock")),
        dataclasses.replace(job, method=dataclasses.replace(job.method, prompt_batch=32)),
    ]
    assert all(config_fingerprint(j.model, j.method, "bank-a") == base for j in same)
    changed = [
        dataclasses.replace(job, method=dataclasses.replace(job.method, merge_resolution="lowres")),
        dataclasses.replace(job, model=dataclasses.replace(job.model, dinov2_image_size=126)),
    ]
    assert all(config_fingerprint(j.model, j.method, "bank-a") != base for j in changed)
    assert config_fingerprint(job.model, job.method, "bank-b") != base


def test_s3_input_and_output(tiny_setup, s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="refseg-in")
    s3.create_bucket(Bucket="refseg-out")
    for p in write_images(tmp_path / "imgs", 3):
        s3.upload_file(str(p), "refseg-in", f"targets/{p.name}")
    s3.put_object(Bucket="refseg-in", Key="targets/broken.jpg", Body=b"\xff\xd8\xff garbage")
    summary = run_label(
        _job(tiny_setup, "s3://refseg-in/targets", "s3://refseg-out/run1", s3_endpoint=s3_endpoint)
    )
    assert (summary.images, summary.ok, summary.errors) == (4, 3, 1)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="refseg-out")["Contents"]}
    assert {"run1/run.json", "run1/coco_results.json", "run1/coco_dataset.json"} <= keys
    t = _table("s3://refseg-out/run1", "images")
    assert sorted(t.column("image_uri").to_pylist()) == [
        f"s3://refseg-in/targets/{n}"
        for n in ["broken.jpg", "img_000.jpg", "img_001.jpg", "img_002.jpg"]
    ]
    body = s3.get_object(Bucket="refseg-out", Key="run1/run.json")["Body"].read().decode()
    assert "testing-secret-value" not in body


def test_coco_targets_keep_their_ids_and_manifest_input(tiny_setup, tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    coco = {
        "images": [
            {"id": 1000 + i, "file_name": p.name, "width": 1, "height": 1}
            for i, p in enumerate(paths)
        ],
        "categories": [{"id": 3, "name": "car"}],
        "annotations": [],
    }
    (tmp_path / "targets.json").write_text(json.dumps(coco))
    targets = str(tmp_path / "targets.json")
    run_label(_job(tiny_setup, str(tmp_path / "imgs"), tmp_path / "o1", targets=targets))
    ids = sorted(_table(str(tmp_path / "o1"), "images").column("image_id").to_pylist())
    assert ids == [1000, 1001, 1002]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(p) for p in paths[:2]) + "\n" + str(tmp_path / "gone.jpg"))
    s = run_label(_job(tiny_setup, str(manifest), tmp_path / "o2"))
    assert (s.images, s.ok, s.errors) == (3, 2, 1)
    err = [r for r in _table(str(tmp_path / "o2"), "images").to_pylist() if r["status"] == "error"]
    assert "gone.jpg" in err[0]["error"]


def test_driver_killed_mid_job_then_rerun_completes_exactly_once(tiny_setup, tmp_path):
    images = tmp_path / "imgs"
    n = TWO_BLOCKS
    write_images(images, n)
    out = tmp_path / "out"
    # the first proposal call of the second block waits: the driver dies mid-job, always,
    # with exactly the first block's images written
    gate = StageGate(tmp_path / "gate", propose=ROWS_PER_TASK + 1)
    proc = start_driver(tiny_setup["bank"], images, out, gate.env(), tmp_path / "driver.log")
    try:
        gate.wait_held("propose", proc=proc)
        parts = lambda: len(list((out / "images").glob("part-*.parquet")))  # noqa: E731
        wait_until(lambda: parts() >= ROWS_PER_TASK, timeout=WAIT_S, what="the first block")
    finally:
        kill_tree(proc.pid)  # the driver, its Ray and the held actor
        proc.wait()
    finished = len(list((out / "images").glob("part-*.parquet")))
    assert finished == ROWS_PER_TASK  # the first block; the rest was still to do
    assert not (out / "coco_results.json").exists()
    summary = run_label(_job(tiny_setup, str(images), out))
    t = _table(str(out), "images")
    ids = t.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == n
    assert (summary.skipped_done, summary.images) == (ROWS_PER_TASK, n - ROWS_PER_TASK)
    inst = _table(str(out), "instances")
    assert set(inst.column("image_id").to_pylist()) <= set(ids)
    assert not [p for p in (out / "instances").iterdir() if p.name.startswith(".")]
