"""``refseg import-review``: a Label Studio export (or a verdicts CSV) to shots and negatives.

The run is a fake run folder written with pyarrow (the layout ``refseg label`` writes);
``tests/data/label_studio_review.json`` is a Label Studio "JSON" export of the tasks
``refseg export --format label-studio`` wrote for it, reviewed: the full task and annotation
fields of Label Studio's export, regions with ``origin`` (prediction, prediction-changed,
manual), predictions as ids (newer Label Studio) and in full (task 3), a skipped
annotation, a brush region whose ``rle`` was encoded by Label Studio's own reference
encoder (label-studio-converter 0.0.59, ``brush.encode_rle``), a rectangle (no mask), a
class the run does not know, and a task of an image not in the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from refseg.core import rle as rle_ops
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.core.memory_bank import MemoryBank
from refseg.jobs.cli import main
from refseg.jobs.label_studio import chosen_annotation, decode_brush_rle
from refseg.jobs.review import import_review
from refseg.pipeline.schema import IMAGES_SCHEMA

H, W = 50, 100
NAMES = {3: "cat", 7: "dog", 9: "bird"}
FIXTURE = Path(__file__).parent / "data" / "label_studio_review.json"
# image id -> instances in run order: (category id, score, (y0, y1, x0, x1) rectangle)
RUN = {
    11: [(3, 0.9, (10, 30, 20, 60)), (7, 0.4, (0, 50, 0, 10))],
    12: [],
    13: [(7, 0.8, (5, 45, 50, 95)), (3, 0.2, (40, 50, 0, 100))],
}
TINY = ["--preset", "tiny", "--random-weights"]


def _rect(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "instances").mkdir(parents=True)
    (out / "images").mkdir()
    rng = np.random.default_rng(0)
    inst, imgs = [], []
    for iid, items in RUN.items():
        uri = tmp_path / f"img_{iid}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(uri)
        imgs.append({"image_id": iid, "image_uri": str(uri), "width": W, "height": H,
                     "status": "ok", "error": None, "n_instances": len(items)})  # fmt: skip
        for cid, score, rect in items:
            rle = rle_ops.encode_masks(_rect(*rect)[None])[0]
            y0, y1, x0, x1 = rect
            inst.append({"image_id": iid, "image_uri": str(uri), "category_id": cid,
                         "category_name": NAMES[cid], "score": score,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle,
                         "area": float((y1 - y0) * (x1 - x0)), "proposal_iou": 0.9})  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist(inst, schema=INSTANCES_SCHEMA), out / "instances/part-a.parquet"
    )
    pq.write_table(pa.Table.from_pylist(imgs, schema=IMAGES_SCHEMA), out / "images/part-a.parquet")
    refs = [{"category_id": c, "category_name": n} for c, n in NAMES.items()]
    (out / "run.json").write_text(json.dumps({"references": refs}))
    return out


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _anns(coco: dict, kind: str) -> list[dict]:
    return [a for a in coco["annotations"] if a["refseg_kind"] == kind]


def test_export_tasks_carry_what_the_import_needs(run_dir, tmp_path):
    rc, _, err = _run(
        ["export", str(run_dir), "--format", "label-studio", "--dest", str(tmp_path / "ls")]
    )
    assert rc == 0, err
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert [t["data"]["refseg_instances"] for t in tasks] == [[0, 1], [], [0, 1]]
    ids = [[r["id"] for r in t["predictions"][0]["result"]] for t in tasks]
    assert ids == [["11_0", "11_1"], [], ["13_0", "13_1"]]
    # the fixture's predictions are these tasks' (task 3 keeps them in full)
    fixture = json.loads(FIXTURE.read_text())
    assert [r["id"] for r in fixture[2]["predictions"][0]["result"]] == ids[2]
    assert (
        fixture[0]["annotations"][0]["result"][0]["value"]["points"]
        == (tasks[0]["predictions"][0]["result"][0]["value"]["points"])
    )


def test_label_studio_review_becomes_shots_and_negatives(run_dir):
    coco = import_review(str(run_dir), str(FIXTURE))
    c = coco["info"]["counts"]
    assert c == {"accepted": 2, "rejected": 1, "relabelled": 1, "negatives": 2, "shots": 4,
                 "new_classes": 1, "regions_without_mask_skipped": 1, "tasks_reviewed": 3,
                 "tasks_not_in_run": 1}  # fmt: skip
    cats = {x["id"]: x["name"] for x in coco["categories"]}
    assert cats == {3: "cat", 7: "dog", 9: "bird", 10: "horse"}
    # negatives: the deleted dog of image 11 and the dog of 13 relabelled as cat, with the
    # run's own masks, as negatives of their class
    neg = {(a["image_id"], a["category_id"]): a for a in _anns(coco, "negative")}
    assert set(neg) == {(11, 7), (13, 7)}
    assert np.array_equal(rle_ops.decode_rle(neg[11, 7]["segmentation"]), _rect(0, 50, 0, 10))
    assert np.array_equal(rle_ops.decode_rle(neg[13, 7]["segmentation"]), _rect(5, 45, 50, 95))
    # shots: what a person drew or relabelled, with its shape
    shots = {(a["image_id"], cats[a["category_id"]]): a for a in _anns(coco, "shot")}
    assert set(shots) == {(11, "bird"), (12, "dog"), (13, "cat"), (13, "horse")}
    brush = rle_ops.decode_rle(shots[12, "dog"]["segmentation"])
    assert np.array_equal(brush, _rect(10, 40, 30, 70))  # decoded from Label Studio's RLE
    bird = rle_ops.decode_rle(shots[11, "bird"]["segmentation"])
    assert (bird & _rect(10, 40, 70, 90)).sum() / (bird | _rect(10, 40, 70, 90)).sum() > 0.9
    edited = shots[13, "cat"]["bbox"]  # the reviewer's edited polygon, not the run's mask
    assert edited[0] == pytest.approx(52, abs=1) and edited[3] == pytest.approx(39, abs=1.5)
    assert all(im["file_name"].endswith(f"img_{im['id']}.png") for im in coco["images"])
    assert len({a["id"] for a in coco["annotations"]}) == 6
    assert coco == import_review(str(run_dir), str(FIXTURE))  # deterministic ids


def test_an_unreviewed_task_changes_nothing(run_dir, tmp_path):
    tasks = json.loads(FIXTURE.read_text())
    tasks[1]["annotations"] = []  # exported with download_all_tasks: never annotated
    tasks[0]["annotations"][0]["was_cancelled"] = True  # skipped
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    c = import_review(str(run_dir), str(path))["info"]["counts"]
    assert c["tasks_not_reviewed"] == 2 and c["tasks_reviewed"] == 1 and c["shots"] == 2


def test_csv_verdicts(run_dir, tmp_path):
    path = tmp_path / "verdicts.csv"
    path.write_text("image_id,instance,verdict\n11,1,wrong\n13,0,ok\n13,1,WRONG\n")
    coco = import_review(str(run_dir), str(path))
    assert coco["info"]["counts"] == {"negatives": 2, "ok": 1, "wrong": 2}
    neg = sorted((a["image_id"], a["category_id"]) for a in _anns(coco, "negative"))
    assert neg == [(11, 7), (13, 3)] and not _anns(coco, "shot")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("image_id,instance,verdict\n11,0,maybe\n", "line 2: verdict 'maybe' is not ok or wrong"),
        ("image_id,instance,verdict\n11,5,ok\n", "line 2: image 11 has 2 instances"),
        ("image_id,instance,verdict\n11,0,ok\n404,0,ok\n", "line 3: image 404 has no ok output"),
        ("image,verdict\n11,ok\n", "needs the header image_id,instance,verdict"),
    ],
)
def test_bad_csv_is_one_clear_line(run_dir, tmp_path, text, expected):
    path = tmp_path / "v.csv"
    path.write_text(text)
    rc, _, err = _run(
        ["import-review", str(run_dir), "--from", str(path), "--out", str(tmp_path / "c.json")]
    )
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "c.json").exists()


def test_import_then_build_memory_add_takes_both_kinds(run_dir, tmp_path):
    image = str(run_dir.parent / "img_11.png")
    refs = {
        "images": [{"id": 11, "file_name": image, "width": W, "height": H}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 3, "bbox": [20, 10, 40, 20], "iscrowd": 0,
             "segmentation": rle_ops.encode_masks(_rect(10, 30, 20, 60)[None])[0]},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [0, 0, 10, 50], "iscrowd": 0,
             "segmentation": rle_ops.encode_masks(_rect(0, 50, 0, 10)[None])[0]},
        ],
    }  # fmt: skip
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    bank = str(tmp_path / "bank.safetensors")
    rc, _, err = _run(
        ["build-memory", "--references", str(tmp_path / "refs.json"), "--out", bank, *TINY]
    )
    assert rc == 0, err
    corrections = str(tmp_path / "corrections.json")
    rc, out, err = _run(
        ["import-review", str(run_dir), "--from", str(FIXTURE), "--out", corrections]
    )
    assert rc == 0, err
    assert "4 new shots, 2 negatives" in out and "build-memory --add" in out
    add = ["build-memory", "--add", "--out", bank, "--references", corrections,
           "--negatives", corrections, *TINY]  # fmt: skip
    rc, out, err = _run(add)
    assert rc == 0, err
    assert "4 classes, 6 shots, 2 negatives (+2 classes, +4 shots, +2 negatives)" in out
    b = MemoryBank.load(bank)
    assert b.names == {3: "cat", 7: "dog", 9: "bird", 10: "horse"}
    assert b.negatives[7].shape[0] == 2 and set(b.negatives) == {7}
    rc, out, err = _run(add)  # the same corrections again: nothing new
    assert rc == 0 and "nothing new to add" in out


def test_negatives_alone_need_add(run_dir, tmp_path):
    corrections = tmp_path / "c.json"
    assert (
        _run(["import-review", str(run_dir), "--from", str(FIXTURE), "--out", str(corrections)])[0]
        == 0
    )
    rc, _, err = _run(
        ["build-memory", "--negatives", str(corrections), "--out", str(tmp_path / "b"), *TINY]
    )
    assert rc == 2 and "pass --add" in err


def test_chosen_annotation_and_brush_rle():
    tasks = json.loads(FIXTURE.read_text())
    assert chosen_annotation(tasks[2])["id"] == 4  # the skipped one does not count
    region = tasks[1]["annotations"][0]["result"][0]
    mask = decode_brush_rle(region["value"]["rle"], H, W)
    assert mask.shape == (H, W) and mask.sum() == 30 * 40
    with pytest.raises(ValueError, match="do not fit the region"):
        decode_brush_rle(region["value"]["rle"], W, W)


# ------------------------------------------------------------------ report --compare


def _rewrite(run: Path, items: dict[int, list[tuple[int, float, tuple]]]) -> None:
    t = pq.read_table(run / "instances" / "part-a.parquet").to_pylist()
    uri = {r["image_id"]: r["image_uri"] for r in pq.read_table(run / "images").to_pylist()}
    rows = []
    for iid, insts in items.items():
        for cid, score, rect in insts:
            y0, y1, x0, x1 = rect
            rows.append({**t[0], "image_id": iid, "image_uri": uri[iid], "category_id": cid,
                         "category_name": NAMES[cid], "score": score,
                         "segmentation": rle_ops.encode_masks(_rect(*rect)[None])[0],
                         "bbox": [x0, y0, x1 - x0, y1 - y0]})  # fmt: skip
    pq.write_table(
        pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA), run / "instances" / "part-a.parquet"
    )


def test_report_compare_shows_instances_per_class_before_and_after(run_dir, tmp_path):
    import shutil

    from refseg.jobs.report_compare import compare_runs

    new = tmp_path / "new"
    shutil.copytree(run_dir, new)
    # after the review: the wrong dog of image 11 is gone, the dog of 13 is a cat now
    _rewrite(new, {11: RUN[11][:1], 13: [(3, 0.7, (5, 45, 50, 95)), RUN[13][1]]})
    c = compare_runs(str(new), str(run_dir), 0.5)
    by = {k.name: k for k in c.classes}
    assert (by["cat"].before, by["cat"].after, by["cat"].delta) == (2, 3, 1)
    assert (by["dog"].before, by["dog"].after) == (2, 0) and by["dog"].mean_after is None
    assert (by["cat"].above_before, by["cat"].above_after) == (1, 2)
    assert (c.images_both, c.images_changed) == (3, 2)
    rc, stdout, err = _run(
        ["report", str(new), "--compare", str(run_dir), "--score-threshold", "0.5"]
    )
    assert rc == 0, err
    lines = {ln.split()[0]: ln.split() for ln in stdout.splitlines() if ln.strip()}
    assert lines["dog"][1:5] == ["7", "2", "0", "-2"] and lines["all"][1:4] == ["4", "3", "-1"]
    assert "images labelled differently: 2 of 3" in stdout
    page = (new / "report.html").read_text()
    assert '<section id="changes">' in page and "2 of 3 labelled by both" in page
    rc, _, err = _run(["report", str(new), "--compare", str(tmp_path / "nothing")])
    assert rc == 2 and "--compare" in err and "nothing" in err


def test_a_task_without_refseg_ids_is_found_by_its_image_uri(run_dir, tmp_path):
    tasks = json.loads(FIXTURE.read_text())
    first = tasks[0]
    del first["data"]["refseg_image_id"], first["data"]["refseg_instances"]
    first["data"]["image"] = str(run_dir.parent / "img_11.png")
    first["predictions"] = [{"result": [{"id": "11_0"}, {"id": "11_1"}]}]  # in full
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))
    coco = import_review(str(run_dir), str(path))
    assert coco == import_review(str(run_dir), str(FIXTURE)) | {"info": coco["info"]}
