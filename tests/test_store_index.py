"""OUT's index (issue 19): a rerun plans from a few objects plus the parts written since.

* an OUT written before the index existed (parts made by the real writer, no index/)
  builds its index on the first rerun, and nothing is labelled again;
* once indexed, planning reads the index plus only the parts written since;
* the parts stay the truth: a part rewritten under the same name, a deleted part, a
  damaged pointer or a missing segment never give a stale, lost or doubled row;
* a kill at any change while the index is written loses nothing and doubles nothing;
* segments stay few, and the index rows a rerun writes follow its new images.
No Ray: the store functions the job calls, on parts written by the job's writer.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from refseg.pipeline.identity import Listing
from refseg.pipeline.store import index, redo

from tests.store_util import Killed, KillFS, local, make_parts, truth


def _concat(*listings: Listing) -> Listing:
    return Listing.of(
        [u for x in listings for u in x.uris],
        np.concatenate([x.ids for x in listings]),
        np.concatenate([x.sizes for x in listings]),
        np.concatenate([x.mtimes for x in listings]),
    )


def _reads(monkeypatch) -> list[str]:
    """Names of the parts ``index.load`` reads on top of the index, as it reads them."""
    seen: list[str] = []
    real = index.read_tables

    def spy(locs, *a, **kw):
        seen.extend(loc.path.rsplit("/", 1)[1] for loc in locs)
        return real(locs, *a, **kw)

    monkeypatch.setattr(index, "read_tables", spy)
    return seen


def test_an_out_written_before_the_index_builds_it_on_its_first_rerun(tmp_path, monkeypatch):
    out = local(tmp_path / "out")
    listing = make_parts(out, 12, per_part=3)  # today's writer, no index/
    assert not (tmp_path / "out" / "index").exists()
    read = _reads(monkeypatch)
    plan = redo.plan_rerun(out, listing, retry_errors=False)
    assert sorted(plan.done.tolist()) == sorted(listing.ids.tolist())  # nothing runs again
    assert len(read) == 4  # every part, once: there is no index yet
    redo.settle(out, compact=False)
    assert (tmp_path / "out" / "index" / "index.json").is_file()
    read.clear()
    again = redo.plan_rerun(out, listing, retry_errors=False)
    assert read == [] and sorted(again.done.tolist()) == sorted(listing.ids.tolist())


def test_a_rerun_reads_the_index_and_only_the_parts_written_since(tmp_path, monkeypatch):
    out = local(tmp_path / "out")
    old = make_parts(out, 40, per_part=4)
    redo.settle(out, compact=False)
    before = set(p.name for p in (tmp_path / "out" / "images").iterdir())
    new = make_parts(out, 6, per_part=3, start=40)
    written = set(p.name for p in (tmp_path / "out" / "images").iterdir()) - before
    read = _reads(monkeypatch)
    plan = redo.plan_rerun(out, _concat(old, new), retry_errors=False)
    assert sorted(read) == sorted(written) and len(written) == 2
    assert len(plan.done) == 46


def test_a_part_rewritten_under_its_name_is_read_again_not_taken_from_the_index(tmp_path):
    out = local(tmp_path / "out")
    listing = make_parts(out, 4, per_part=2)
    redo.settle(out, compact=False)
    # a late writer rewrites a part with the same images (same name), other content
    make_parts(out, 2, per_part=2, start=0)  # same ids 1000, 1001: same part key
    rows = index.load(out).rows
    assert rows.num_rows == 4
    stamp_rows = {r["image_id"]: r["file_size"] for r in rows.to_pylist()}
    assert stamp_rows[1000] == 100  # the rewritten part's rows (equal content here)
    # a part whose images all changed is removed, then written again under its name
    changed = Listing.of(
        listing.uris, listing.ids, np.asarray([100, 100, 999, 999]), listing.mtimes
    )
    plan = redo.plan_rerun(out, changed, retry_errors=False)
    assert plan.changed == 2 and sorted(plan.done.tolist()) == [1000, 1001]
    assert index.load(out).rows.num_rows == 2
    make_parts(out, 2, per_part=2, start=2)  # relabelled: ids 1002, 1003, same part key
    sizes = {r["image_id"]: r["file_size"] for r in index.load(out).rows.to_pylist()}
    assert sizes == {1000: 100, 1001: 100, 1002: 102, 1003: 102}


def test_a_deleted_part_leaves_the_index_and_a_damaged_pointer_is_rebuilt(tmp_path, caplog):
    out = local(tmp_path / "out")
    listing = make_parts(out, 6, per_part=2)
    redo.settle(out, compact=False)
    victim = sorted((tmp_path / "out" / "images").iterdir())[0]
    victim.unlink()  # a user deleted a finished part's marker by hand
    assert index.load(out).rows.num_rows == 4
    (tmp_path / "out" / "index" / "index.json").write_text('{"format": "refseg-index", "seg')
    assert index.load(out).rows.num_rows == 4 and "cannot be read" in caplog.text
    for seg in (tmp_path / "out" / "index").glob("seg-*"):
        seg.unlink()
    redo.settle(out, compact=False)  # rebuilt from the parts
    plan = redo.plan_rerun(out, listing, retry_errors=False)
    assert len(plan.done) == 4 and index.load(out).fresh == []


def test_one_image_one_row_when_the_same_image_is_in_two_parts(tmp_path):
    out = local(tmp_path / "out")
    make_parts(out, 4, per_part=2)
    redo.settle(out, compact=False)
    make_parts(out, 1, per_part=1, start=1)  # a killed run's worker: image 1001 again
    redo.settle(out, compact=False)
    ids = index.load(out).ids
    assert sorted(ids.tolist()) == [1000, 1001, 1002, 1003]
    assert truth(tmp_path / "out")["instances"] == {i: 2 for i in range(1000, 1004)}


def _rerun(root, listing: Listing) -> None:
    """The next run after a kill: repair, plan, settle; every image once, none again."""
    out = local(root)
    redo.tidy(out)
    plan = redo.plan_rerun(out, listing, retry_errors=False)
    assert sorted(plan.done.tolist()) == sorted(listing.ids.tolist()), "an image runs again"
    redo.settle(out, compact=False)
    t = truth(root)
    everyone = {int(i): 1 for i in listing.ids}
    assert t["images"] == everyone, "an image lost or doubled"
    assert t["instances"] == {i: 2 for i in everyone}
    snap = index.load(out)
    assert sorted(snap.ids.tolist()) == sorted(everyone) and snap.fresh == []


def test_a_kill_at_any_change_while_the_index_is_written_loses_and_doubles_nothing(tmp_path):
    template = tmp_path / "template"
    listing = make_parts(local(template), 16, per_part=2)
    redo.settle(local(template), compact=False)
    listing = _concat(listing, make_parts(local(template), 6, per_part=2, start=16))
    kills = 0
    for k in range(1, 200):
        root = tmp_path / f"k{k}"
        shutil.copytree(template, root)
        fs = KillFS(root, kill_at=k)
        try:
            index.update_index(fs.out)
        except Killed:
            kills += 1
            _rerun(root, listing)
            shutil.rmtree(root)
            continue
        _rerun(root, listing)
        break
    else:
        pytest.fail("update_index never finished")
    assert kills >= 3  # the segment, the pointer, the clean-up: each a kill point


def test_segments_stay_few_and_index_writes_follow_the_new_images(tmp_path):
    out = local(tmp_path / "out")
    make_parts(out, 64, per_part=4)
    first = index.update_index(out)
    assert first["rows_written"] == 64
    written, added = 0, 0
    for night in range(30):
        make_parts(out, 4, per_part=2, start=64 + 4 * night)
        stats = index.update_index(out)
        written += stats["rows_written"]
        added += 4
        pointer = index.read_pointer(out)
        assert len(pointer.segments) <= 1 + int(np.log2(stats["rows"])), pointer.segments
    assert added <= written <= 6 * added  # amortised: a few times the new rows, not N per run
    files = sorted(p.name for p in (tmp_path / "out" / "index").iterdir())
    assert len(files) == len(index.read_pointer(out).segments) + 1  # nothing left behind
    assert sorted(index.load(out).ids.tolist()) == list(range(1000, 1000 + 64 + added))
