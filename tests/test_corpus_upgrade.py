"""An OUT written before the index existed keeps working (issue 19), end to end.

``refseg label`` on 4 images, then OUT made as the version before wrote it (its parts,
run.json and whole COCO files; no ``index/``, no ``coco/``): the rerun labels nothing
again, builds the index and the COCO shards, and the COCO files hold the same labels.
A rerun with 2 more images reads the index, labels those 2 only, and adds 2 rows.
"""

from __future__ import annotations

import json
import shutil

import pytest
from refseg.pipeline.job import run_label
from refseg.pipeline.storage import resolve
from refseg.pipeline.store import index

from tests.faults_util import make_job, read_parts, write_jpegs

pytestmark = pytest.mark.usefixtures("ray_local")


def _labels(out) -> list:
    rows = json.loads((out / "coco_results.json").read_text())
    return sorted((r["image_id"], r["category_id"], r["score"]) for r in rows)


def test_an_out_of_the_earlier_layout_is_indexed_on_its_first_rerun(tiny_setup, tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_jpegs(images, 4)
    first = run_label(make_job(tiny_setup, images, out))
    assert first.images == 4
    labels = _labels(out)
    shutil.rmtree(out / "index")  # what the earlier version left: parts and whole files
    shutil.rmtree(out / "coco")
    again = run_label(make_job(tiny_setup, images, out))
    assert (again.images, again.skipped_done) == (0, 4)  # nothing labelled again
    assert (out / "index" / "index.json").is_file()
    assert index.load(resolve(str(out))).fresh == []
    shards = json.loads((out / "coco" / "index.json").read_text())["shards"]
    assert sum(s["images"] for s in shards.values()) == 4
    assert _labels(out) == labels
    write_jpegs(images, 2, start=4)
    more = run_label(make_job(tiny_setup, images, out))
    assert (more.images, more.skipped_done) == (2, 4)
    ids = read_parts(str(out), "images").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 6
