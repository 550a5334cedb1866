"""Compaction (issue 19): small parts merged into large ones, atomic and resumable.

* a full compaction (``refseg compact OUT``) leaves parts of up to COMPACT_ROWS images, of
  the writer's schema, readable as one plain Parquet dataset (pyarrow, Ray Data);
* the automatic compaction merges only past its threshold (FANOUT parts of a size tier),
  within its per-run budget;
* a kill at any change of a compaction (or of the settle that runs it) loses nothing and
  doubles nothing on rerun, and no image is labelled again; readers that do not hold OUT
  see each image once even while a killed compaction waits for its repair.
"""

from __future__ import annotations

import shutil

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.jobs.cli import main
from refseg.pipeline.schema import IMAGES_SCHEMA
from refseg.pipeline.store import compaction, index, journal, layout, redo

from tests.store_util import Killed, KillFS, local, make_parts, truth


@pytest.fixture
def small_bounds(monkeypatch):
    """Compacted parts of at most 8 images, tiers of 4 parts: a few images show every case."""
    monkeypatch.setattr(compaction, "COMPACT_ROWS", 8)
    monkeypatch.setattr(compaction, "FANOUT", 4)


def _parts(root) -> list[str]:
    return sorted(p.name for p in (root / "images").glob("part-*.parquet"))


def test_a_full_compaction_leaves_few_parts_of_the_writers_schema(tmp_path, small_bounds):
    out = local(tmp_path / "out")
    listing = make_parts(out, 30, per_part=2, cache=True)
    before = truth(tmp_path / "out")
    stats = compaction.compact(out)
    assert stats["parts_merged"] == 15 and stats["rows"] == 30  # 4 + 4 + 4 + 3 parts
    names = _parts(tmp_path / "out")
    assert len(names) == 4
    for kind in ("instances", "proposals"):
        assert _parts(tmp_path / "out") == sorted(
            p.name for p in (tmp_path / "out" / kind).glob("part-*.parquet")
        )
    assert truth(tmp_path / "out") == before
    big = tmp_path / "out" / "images" / names[0]
    assert pq.read_schema(big).remove_metadata() == IMAGES_SCHEMA
    inst = tmp_path / "out" / "instances" / names[0]
    assert pq.read_schema(inst).remove_metadata() == INSTANCES_SCHEMA
    table = ds.dataset(str(tmp_path / "out" / "instances"), format="parquet").to_table()
    assert table.num_rows == 60  # the folder is one plain Parquet dataset
    for name in names:  # each part's key is the hash of its image ids, as the writer's
        ids = pq.read_table(tmp_path / "out" / "images" / name).column("image_id").to_numpy()
        assert name == f"part-{layout.part_key(ids)}.parquet"
    plan = redo.plan_rerun(out, listing, retry_errors=False)
    assert len(plan.done) == 30


def test_compacted_parts_read_with_ray_data(tmp_path, small_bounds, ray_local):
    out = local(tmp_path / "out")
    make_parts(out, 12, per_part=2)
    compaction.compact(out)
    ray = ray_local
    rows = ray.data.read_parquet(str(tmp_path / "out" / "instances")).count()
    assert rows == 24


def test_the_automatic_compaction_waits_for_its_threshold_and_keeps_its_budget(
    tmp_path, small_bounds, monkeypatch
):
    out = local(tmp_path / "out")
    make_parts(out, 6, per_part=2)  # 3 small parts: under the threshold
    redo.settle(out)
    assert len(_parts(tmp_path / "out")) == 3
    make_parts(out, 2, per_part=2, start=6)  # the 4th part of the tier: merged
    redo.settle(out)
    assert len(_parts(tmp_path / "out")) == 1
    monkeypatch.setattr(compaction, "AUTO_MAX_ROWS", 8)
    make_parts(out, 16, per_part=2, start=8)  # two groups' worth; the budget allows one
    redo.settle(out)
    assert len(_parts(tmp_path / "out")) == 1 + 1 + 4
    assert truth(tmp_path / "out")["images"] == {i: 1 for i in range(1000, 1024)}


def test_refseg_compact_merges_every_small_part(tmp_path, small_bounds, capsys):
    out = local(tmp_path / "out")
    make_parts(out, 16, per_part=2)
    assert main(["compact", str(tmp_path / "out")]) == 0
    assert len(_parts(tmp_path / "out")) == 2
    assert "8 parts merged into 2" in capsys.readouterr().out
    assert index.load(out).fresh == []  # the index is up to date after it


def _check_rerun(root, listing, *, cache: bool) -> None:
    out = local(root)
    redo.tidy(out)
    plan = redo.plan_rerun(out, listing, retry_errors=False)
    assert sorted(plan.done.tolist()) == sorted(listing.ids.tolist()), "an image runs again"
    redo.settle(out)
    t = truth(root)
    everyone = {int(i): 1 for i in listing.ids}
    assert t["images"] == everyone, "an image lost or doubled"
    assert t["instances"] == {i: 2 for i in everyone}
    assert t["proposals"] == (everyone if cache else {})
    snap = index.load(out)
    assert sorted(snap.ids.tolist()) == sorted(everyone) and snap.fresh == []
    assert not journal.read_journal(out)


@pytest.mark.parametrize("step", ["settle", "compact"])
def test_a_kill_at_any_change_of_a_compaction_loses_and_doubles_nothing(
    tmp_path, small_bounds, step
):
    template = tmp_path / "template"
    make_parts(local(template), 4, per_part=2, cache=True)
    redo.settle(local(template), compact=False)  # indexed, not compacted
    listing = make_parts(local(template), 16, per_part=2, cache=True)  # two groups of 4
    kills = 0
    for k in range(1, 400):
        root = tmp_path / f"k{k}"
        shutil.copytree(template, root)
        fs = KillFS(root, kill_at=k)
        try:
            redo.settle(fs.out) if step == "settle" else compaction.compact(fs.out)
        except Killed:
            kills += 1
            seen = index.load(local(root))  # a reader without the lock, before the repair
            assert sorted(seen.ids.tolist()) == sorted(listing.ids.tolist())
            _check_rerun(root, listing, cache=True)
            shutil.rmtree(root)
            continue
        _check_rerun(root, listing, cache=True)
        break
    else:
        pytest.fail("never finished")
    assert kills >= 20  # the journal, each target file, each deletion, the index


def test_export_and_report_see_each_image_once_while_a_killed_compaction_waits(
    tmp_path, small_bounds
):
    from refseg.jobs import report_data
    from refseg.jobs.export import export_run

    root = tmp_path / "out"
    make_parts(local(root), 8, per_part=2)
    redo.settle(local(root), compact=False)
    probe = KillFS(tmp_path / "probe")
    shutil.copytree(root, tmp_path / "probe")
    compaction.compact(probe.out)
    first_delete = next(k for k, (what, path) in enumerate(probe.log, 1) if what == "delete")
    with pytest.raises(Killed):  # the target is whole, no source deleted yet
        compaction.compact(KillFS(root, kill_at=first_delete).out)
    assert len(_parts(root)) == 5 and journal.read_journal(local(root))
    summary = export_run(str(root), "coco", dest=str(tmp_path / "coco"))
    assert (summary.images, summary.kept) == (8, 16)
    for sub, n in (("images", 8), ("instances", 16)):
        assert report_data._parquet_dataset(str(root), sub).count_rows() == n


def test_index_compaction_and_shards_on_s3(s3_endpoint, small_bounds):
    import boto3
    from refseg.pipeline.storage import resolve
    from refseg.pipeline.store.coco_files import write_coco

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="compaction")
    out = resolve("s3://compaction/out", s3_endpoint=s3_endpoint)
    listing = make_parts(out, 16, per_part=2, cache=True)
    redo.settle(out)  # index, then 8 parts of a tier merged (two groups of 4)
    stats = write_coco(out, [{"id": 3, "name": "car"}])
    assert stats["shards"] == 2 and stats["images"] == 16
    keys = {
        o["Key"]
        for o in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="compaction")[
            "Contents"
        ]
    }
    for kind in ("images", "instances", "proposals"):
        assert len([k for k in keys if k.startswith(f"out/{kind}/part-")]) == 2, keys
    assert not [k for k in keys if k.endswith("/")]  # no folder markers left by deletions
    plan = redo.plan_rerun(out, listing, retry_errors=False)
    assert len(plan.done) == 16 and index.load(out).fresh == []
