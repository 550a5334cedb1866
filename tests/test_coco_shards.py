"""COCO outputs that scale (issue 19): shards per part, whole files only while small.

* one shard per part, each a COCO dataset pycocotools loads (as a dataset and as results);
* a rerun writes the shards of its new or rewritten parts only;
* the whole-corpus files are written up to WHOLE_MAX_IMAGES ok images, removed past it;
* a kill at any change while the shards are written leaves an index whose every shard is
  whole, and the next write brings it up to date.
No Ray: the store functions the job calls, on parts written by the job's writer.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from pycocotools.coco import COCO
from refseg.pipeline.identity import Listing
from refseg.pipeline.store import coco_files, redo
from refseg.pipeline.store.coco_shards import read_shard_index

from tests.store_util import Killed, KillFS, local, make_parts

CATEGORIES = [{"id": 3, "name": "car"}]


def _shards(root) -> dict[str, dict]:
    return read_shard_index(local(root)).get("shards", {})


def test_one_shard_per_part_each_loaded_by_pycocotools(tmp_path):
    out = local(tmp_path / "out")
    make_parts(out, 6, per_part=2)
    redo.settle(out, compact=False)
    stats = coco_files.write_coco(out, CATEGORIES)
    assert stats["shards"] == 3 and stats["whole"] and stats["annotations"] == 12
    parts = sorted(p.name for p in (tmp_path / "out" / "images").iterdir())
    assert sorted(_shards(tmp_path / "out")) == parts
    ids = set()
    for entry in _shards(tmp_path / "out").values():
        gt = COCO(str(tmp_path / "out" / "coco" / entry["file"]))
        assert len(gt.getImgIds()) == entry["images"] == 2
        res = gt.loadRes(gt.dataset["annotations"])  # the shard as results, too
        assert len(res.getAnnIds()) == entry["annotations"] == 4
        ids |= set(gt.getImgIds())
    assert ids == set(range(1000, 1006))
    whole = json.loads((tmp_path / "out" / "coco_dataset.json").read_text())
    assert len(whole["images"]) == 6 and len(whole["annotations"]) == 12


def test_a_rerun_writes_only_the_shards_of_new_and_rewritten_parts(tmp_path):
    out = local(tmp_path / "out")
    listing = make_parts(out, 8, per_part=2)
    redo.settle(out, compact=False)
    coco_files.write_coco(out, CATEGORIES)
    coco = tmp_path / "out" / "coco"
    before = {p.name: p.stat().st_mtime_ns for p in coco.glob("shard-*")}
    make_parts(out, 2, per_part=2, start=8)  # a new part
    changed = Listing.of(listing.uris, listing.ids, np.r_[999, listing.sizes[1:]], listing.mtimes)
    redo.plan_rerun(out, changed, retry_errors=False)  # image 1000 changed: its part rewritten
    redo.settle(out, compact=False)
    stats = coco_files.write_coco(out, CATEGORIES)
    assert stats["shards_written"] == 2 and stats["shards"] == 5
    after = {p.name: p.stat().st_mtime_ns for p in coco.glob("shard-*")}
    kept = set(before) & set(after)
    assert len(kept) == 3 and all(before[n] == after[n] for n in kept)  # untouched
    assert len(after) == 5  # the rewritten part's old shard is gone
    assert stats["images"] == 9


def test_the_whole_corpus_files_go_past_the_threshold(tmp_path, caplog):
    out = local(tmp_path / "out")
    make_parts(out, 6, per_part=3)
    redo.settle(out, compact=False)
    coco_files.write_coco(out, CATEGORIES, whole_max_images=6)
    assert (tmp_path / "out" / "coco_results.json").is_file()
    make_parts(out, 1, per_part=1, start=6)
    redo.settle(out, compact=False)
    stats = coco_files.write_coco(out, CATEGORIES, whole_max_images=6)
    assert not stats["whole"]
    assert not list((tmp_path / "out").glob("coco_*.json"))
    assert "no longer written" in caplog.text and "coco" in caplog.text
    assert stats["images"] == 7 and stats["annotations"] == 14  # the shards hold every label


def test_a_kill_at_any_change_while_shards_are_written_leaves_whole_shards(tmp_path):
    template = tmp_path / "template"
    make_parts(local(template), 4, per_part=2)
    redo.settle(local(template), compact=False)
    coco_files.write_coco(local(template), CATEGORIES)
    make_parts(local(template), 6, per_part=2, start=4)
    redo.settle(local(template), compact=False)
    kills = 0
    for k in range(1, 100):
        root = tmp_path / f"k{k}"
        shutil.copytree(template, root)
        finished = False
        try:
            coco_files.write_coco(KillFS(root, kill_at=k).out, CATEGORIES)
            finished = True
        except Killed:
            kills += 1
            for entry in _shards(root).values():  # what the index names is whole
                json.loads((root / "coco" / entry["file"]).read_text())
            coco_files.write_coco(local(root), CATEGORIES)
        shards = _shards(root)
        assert sorted(shards) == sorted(p.name for p in (root / "images").iterdir())
        assert sorted(e["file"] for e in shards.values()) == sorted(
            p.name for p in (root / "coco").glob("shard-*")
        )
        assert json.loads((root / "coco_results.json").read_text())[0]["image_id"] >= 1000
        shutil.rmtree(root)
        if finished:
            break
    else:
        pytest.fail("never finished")
    assert kills >= 5  # three shards, the index, the whole files
