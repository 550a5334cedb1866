"""What a rerun keeps, redoes and removes (issue 13), on parts made here (no Ray).

* rows of one file under several ids (earlier versions listed a file once per spelling,
  e.g. through a symlink): one row kept, under its recorded id, the others removed;
* removing one image's rows from a part keeps the other images' rows and instances;
* late writes of a killed run's workers (a second row of an image, a completion marker
  whose instances part was cleaned up): settled before the COCO files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from refseg.pipeline.dataflow.writer import write_parts
from refseg.pipeline.identity import Listing
from refseg.pipeline.schema import Col, image_id_from_uri
from refseg.pipeline.storage import resolve
from refseg.pipeline.store import layout, redo
from refseg.pipeline.store.coco_files import write_coco

from tests.test_run_outputs import CATEGORIES, _instances


def _part(out, uris: list[str], ids: list[int], *, status: str = "ok") -> str:
    n = len(uris)
    batch = {
        Col.IMAGE_ID: np.asarray(ids),
        Col.IMAGE_URI: np.asarray(uris, dtype=object),
        Col.WIDTH: np.full(n, 8),
        Col.HEIGHT: np.full(n, 8),
        Col.STATUS: np.asarray([status] * n, dtype=object),
        Col.ERROR: np.asarray(["" if status == "ok" else "bad"] * n, dtype=object),
        Col.N_INSTANCES: np.full(n, 2, dtype=np.int32),
        Col.INSTANCES: np.asarray([_instances(i, [0.5, 0.6]) for i in ids], dtype=object),
        **{c: np.zeros(n) for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE)},
    }
    write_parts(batch, out=out)
    return f"part-{layout.part_key(np.asarray(ids))}.parquet"


def _rows(out_dir: Path, kind: str = "images") -> list[dict]:
    rows = []
    for p in sorted((out_dir / kind).glob("part-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def _listing(paths: list[Path]) -> Listing:
    uris = [str(p) for p in paths]
    st = [p.stat() for p in paths]
    return Listing.of(
        uris,
        np.asarray([image_id_from_uri(u) for u in uris]),
        [s.st_size for s in st],
        [s.st_mtime_ns for s in st],
    )


def test_rows_of_one_file_under_several_spellings_become_one(tmp_path):
    real = tmp_path / "real" / "a.jpg"
    real.parent.mkdir()
    real.write_bytes(b"a")
    (tmp_path / "link").symlink_to(real.parent, target_is_directory=True)
    via_link = str(tmp_path / "link" / "a.jpg")
    out = resolve(str(tmp_path / "out"))
    old_id = image_id_from_uri(via_link)
    _part(out, [via_link], [old_id])  # an earlier version's row, through the link
    _part(out, [str(real)], [image_id_from_uri(str(real))])  # and its row by the real path
    plan = redo.plan_rerun(out, _listing([real]), retry_errors=False)
    assert plan.duplicates == 1 and plan.changed == 0
    rows = _rows(tmp_path / "out")
    assert [r["image_id"] for r in rows] == plan.done.tolist() == plan.listing.ids.tolist()
    inst = _rows(tmp_path / "out", "instances")
    assert {r["image_id"] for r in inst} == {rows[0]["image_id"]} and len(inst) == 2


def test_an_image_recorded_under_an_older_spelling_keeps_its_id(tmp_path):
    real = tmp_path / "real" / "a.jpg"
    real.parent.mkdir()
    real.write_bytes(b"a")
    (tmp_path / "link").symlink_to(real.parent, target_is_directory=True)
    via_link = str(tmp_path / "link" / "a.jpg")
    out = resolve(str(tmp_path / "out"))
    _part(out, [via_link], [image_id_from_uri(via_link)])
    plan = redo.plan_rerun(out, _listing([real]), retry_errors=False)
    assert plan.listing.ids.tolist() == plan.done.tolist() == [image_id_from_uri(via_link)]


def test_error_rows_run_again_when_their_file_appears_or_with_retry_errors(tmp_path):
    out = resolve(str(tmp_path / "out"))
    paths = [tmp_path / f"{c}.jpg" for c in "ab"]
    paths[0].write_bytes(b"a")
    listing = _listing(paths[:1])
    _part_with_stats(out, listing, status="error")  # a: a bad file, recorded with its stats
    missing = Listing.of([str(paths[1])], np.asarray([image_id_from_uri(str(paths[1]))]))
    _part_with_stats(out, missing, status="error")  # b: missing then (no stats)
    paths[1].write_bytes(b"b")
    plan = redo.plan_rerun(out, _listing(paths), retry_errors=False)
    assert (plan.changed, plan.retried) == (1, 0) and plan.done.tolist() == listing.ids.tolist()
    plan = redo.plan_rerun(out, _listing(paths), retry_errors=True)
    assert (plan.changed, plan.retried) == (0, 1) and len(plan.done) == 0
    assert _rows(tmp_path / "out") == []


def test_changed_and_retried_rows_are_removed_with_their_instances(tmp_path):
    out = resolve(str(tmp_path / "out"))
    paths = [tmp_path / f"{c}.jpg" for c in "abc"]
    for p in paths:
        p.write_bytes(p.name.encode())
    listing = _listing(paths)
    ids = listing.ids.tolist()
    _part_with_stats(out, listing)
    paths[1].write_bytes(b"a longer content")  # b replaced under its name
    plan = redo.plan_rerun(out, _listing(paths), retry_errors=False)
    assert plan.changed == 1 and sorted(plan.done.tolist()) == sorted([ids[0], ids[2]])
    assert sorted(r["image_id"] for r in _rows(tmp_path / "out")) == sorted([ids[0], ids[2]])
    inst = _rows(tmp_path / "out", "instances")
    assert sorted({r["image_id"] for r in inst}) == sorted([ids[0], ids[2]]) and len(inst) == 4


def _part_with_stats(out, listing: Listing, *, status: str = "ok") -> None:
    n = len(listing)
    batch = {
        Col.IMAGE_ID: listing.ids,
        Col.IMAGE_URI: np.asarray(listing.uris, dtype=object),
        Col.WIDTH: np.full(n, 8),
        Col.HEIGHT: np.full(n, 8),
        Col.STATUS: np.asarray([status] * n, dtype=object),
        Col.ERROR: np.asarray(["" if status == "ok" else "bad"] * n, dtype=object),
        Col.N_INSTANCES: np.full(n, 2 if status == "ok" else 0, dtype=np.int32),
        Col.INSTANCES: np.asarray(
            [_instances(int(i), [0.5, 0.6]) if status == "ok" else b"" for i in listing.ids],
            dtype=object,
        ),
        Col.FILE_SIZE: listing.sizes,
        Col.FILE_MTIME: listing.mtimes,
        **{c: np.zeros(n) for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE)},
    }
    write_parts(batch, out=out)


def test_late_writes_of_a_killed_run_are_settled_before_the_coco_files(tmp_path):
    out = resolve(str(tmp_path / "out"))
    _part(out, ["/x/1.jpg", "/x/2.jpg"], [1, 2])  # this run
    _part(out, ["/x/2.jpg"], [2])  # a killed run's worker: image 2 a second time
    marker = _part(out, ["/x/3.jpg"], [3])
    (tmp_path / "out" / "instances" / marker).unlink()  # its instances were cleaned up
    redo.settle(out)
    rows = _rows(tmp_path / "out")
    assert sorted(r["image_id"] for r in rows) == [1, 2]
    write_coco(out, CATEGORIES)  # every finished part is whole again
    inst = _rows(tmp_path / "out", "instances")
    assert sorted(r["image_id"] for r in inst) == [1, 1, 2, 2]
