"""Reruns of a labelling job (issue 13): no mixed settings, nothing stale, one row per image.

Local Ray with 2 CPUs, the tiny preset with random weights, a few small images per case:
* a run interrupted before its end, rerun with another ``--nms-iou``: refused;
* a truncated run.json: a clear error, not a JSON parse error;
* an image replaced under the same name: redone, its old row and instances gone;
* earlier error rows: redone when their file appeared, or with ``retry_errors``;
* OUT inside --images, with ``refseg export --link-images`` links, a symlink loop and a
  symlinked duplicate: every real image labelled once, the links never.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from refseg.jobs.export import export_run
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.job import run_label

from tests.faults_util import make_job, read_parts, write_jpegs

pytestmark = pytest.mark.usefixtures("ray_local")
SETTINGS = PipelineSettings(
    decode_batch_size=4, proposal_batch_size=2, match_batch_size=2, write_batch_size=2
)


def _job(tiny, images, out, **kw):
    settings = kw.pop("settings", SETTINGS)
    job_kw = {k: kw.pop(k) for k in ("retry_errors",) if k in kw}
    job = make_job(tiny, images, out, settings=settings, **kw)
    return dataclasses.replace(job, **job_kw)


def _rows(out: Path) -> dict[str, dict]:
    rows = read_parts(str(out), "images").to_pylist()
    names = [Path(r["image_uri"]).name for r in rows]
    assert len(names) == len(set(names)), f"an image has two rows: {sorted(names)}"
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id has two rows"
    return dict(zip(names, rows, strict=True))


def test_an_interrupted_run_then_another_setting_is_refused(tiny_setup, tmp_path, monkeypatch):
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, 3)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # every part written, the final files not

    with monkeypatch.context() as m:
        m.setattr("refseg.pipeline.run_steps.write_coco", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_label(_job(tiny_setup, images, out))
    assert len(_rows(out)) == 3 and not (out / "coco_results.json").exists()
    record = json.loads((out / "run.json").read_text())  # written before the first part
    assert record["status"] == "running" and record["fingerprint"]
    job = _job(tiny_setup, images, out)
    other = dataclasses.replace(job, method=dataclasses.replace(job.method, nms_iou=0.7))
    with pytest.raises(ValueError, match="holds a run with another configuration"):
        run_label(other)

    # a run.json cut short (as in-place writers left it): a clear error, then a rerun
    text = (out / "run.json").read_text()
    (out / "run.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"run\.json is not valid JSON") as info:
        run_label(job)
    assert f"delete {out / 'run.json'} and rerun" in str(info.value)
    (out / "run.json").unlink()
    again = run_label(job)
    assert (again.images, again.skipped_done) == (0, 3)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def _replace_image(path: Path, size: tuple[int, int]) -> None:
    arr = np.random.default_rng(99).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    old = path.stat()
    Image.fromarray(arr).save(path, quality=85)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 5_000_000_000))


def test_an_image_replaced_under_its_name_is_redone_and_its_old_rows_are_gone(tiny_setup, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    paths = write_jpegs(images, 3)
    run_label(_job(tiny_setup, images, out))
    first = _rows(out)
    assert (first[paths[1].name]["width"], first[paths[1].name]["height"]) == (56, 48)
    _replace_image(paths[1], (90, 70))
    summary = run_label(_job(tiny_setup, images, out))
    assert (summary.images, summary.skipped_done) == (1, 2)
    rows = _rows(out)
    redone = rows[paths[1].name]
    assert (redone["width"], redone["height"]) == (90, 70)
    assert redone["image_id"] == first[paths[1].name]["image_id"]  # one image, one id
    assert redone["file_size"] == paths[1].stat().st_size
    assert redone["file_mtime_ns"] == paths[1].stat().st_mtime_ns
    inst = read_parts(str(out), "instances").to_pylist()
    mine = [r for r in inst if r["image_id"] == redone["image_id"]]
    assert len(mine) == redone["n_instances"]
    assert all(list(r["segmentation"]["size"]) == [70, 90] for r in mine)
    dataset = json.loads((out / "coco_dataset.json").read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in dataset["images"]}
    assert len(dataset["images"]) == 3 and sizes[redone["image_id"]] == (90, 70)
    anns = [a for a in dataset["annotations"] if a["image_id"] == redone["image_id"]]
    assert len(anns) == len(mine) and all(a["segmentation"]["size"] == [70, 90] for a in anns)
    results = json.loads((out / "coco_results.json").read_text())
    assert len(results) == sum(r["n_instances"] for r in rows.values())


def test_error_rows_are_redone_when_their_file_appears_or_with_retry_errors(tiny_setup, tmp_path):
    good = write_jpegs(tmp_path / "images", 2)
    missing = tmp_path / "images" / "later.jpg"
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p}\n" for p in [*good, missing]))
    out = tmp_path / "out"
    tight = dataclasses.replace(SETTINGS, max_pixels=100)  # every image an error row
    run_label(_job(tiny_setup, manifest, out, settings=tight))
    rows = _rows(out)
    assert {r["status"] for r in rows.values()} == {"error"}
    assert "exceeds max_pixels" in rows[good[0].name]["error"]
    assert "could not be read" in rows[missing.name]["error"]

    missing.write_bytes(good[0].read_bytes())  # the missing file appears
    summary = run_label(_job(tiny_setup, manifest, out))
    assert (summary.images, summary.ok, summary.skipped_done) == (1, 1, 2)
    rows = _rows(out)
    assert rows[missing.name]["status"] == "ok"
    assert rows[good[0].name]["status"] == "error"  # unchanged files keep their rows

    summary = run_label(_job(tiny_setup, manifest, out, retry_errors=True))
    assert (summary.images, summary.ok, summary.skipped_done) == (2, 2, 1)
    rows = _rows(out)
    assert len(rows) == 3 and {r["status"] for r in rows.values()} == {"ok"}


def test_out_inside_images_links_loops_and_duplicates_are_labelled_once(tiny_setup, tmp_path):
    images = tmp_path / "images"
    paths = write_jpegs(images, 2) + write_jpegs(images / "sub", 1, start=2)
    (images / "sub" / "loop").symlink_to("..")  # one image was listed 41 times
    (images / "same.jpg").symlink_to(paths[0])
    out = images / "labels"
    first = run_label(_job(tiny_setup, images, out))
    assert first.images == 3
    rows = _rows(out)
    assert {r["image_uri"] for r in rows.values()} == {str(p) for p in paths}
    export_run(str(out), "yolo-seg", link_images=True)  # links under OUT/export-yolo-seg
    assert len(list((out / "export-yolo-seg" / "images").iterdir())) == 3
    again = run_label(_job(tiny_setup, images, out, all_files=True))
    assert (again.images, again.skipped_done) == (0, 3)
    assert len(_rows(out)) == 3
