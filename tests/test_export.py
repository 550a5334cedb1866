"""Tests of ``refseg export`` (jobs/export.py) on a fake run folder written with pyarrow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from refseg.core import rle as rle_ops
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.jobs import export
from refseg.jobs.cli import main
from refseg.pipeline.schema import IMAGES_SCHEMA

H, W = 50, 100
NAMES = {3: "cat", 7: "dog", 9: "bird"}  # bird: in the bank (run.json), never found
# part -> image id -> [(category id, score, (y0, y1, x0, x1) rectangle mask)]
PARTS = {
    "part-a": {11: [(3, 0.9, (10, 30, 20, 60)), (7, 0.4, (0, 50, 0, 10))], 12: []},
    "part-b": {13: [(7, 0.8, (5, 45, 50, 95)), (3, 0.2, (40, 50, 0, 100))]},
}
ORPHAN = {99: [(3, 0.99, (0, 10, 0, 10))]}  # instances part without its images part


def _mask(rect):
    y0, y1, x0, x1 = rect
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _instances(by_image) -> pa.Table:
    rows = []
    for iid, items in by_image.items():
        for cid, score, rect in items:
            rle = rle_ops.encode_masks(_mask(rect)[None])[0]
            y0, y1, x0, x1 = rect
            rows.append(
                {
                    "image_id": iid,
                    "image_uri": f"/data/img_{iid}.jpg",
                    "category_id": cid,
                    "category_name": NAMES[cid],
                    "score": score,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "segmentation": rle,
                    "area": float((y1 - y0) * (x1 - x0)),
                    "proposal_iou": 0.9,
                }
            )
    return pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA)


def _images(ids, status="ok") -> pa.Table:
    rows = [
        {
            "image_id": i,
            "image_uri": f"/data/img_{i}.jpg",
            "width": W,
            "height": H,
            "status": status,
            "error": None if status == "ok" else "broken",
            "n_instances": 0,
            "seconds": 0.1,
        }
        for i in ids
    ]
    return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    (out / "instances").mkdir(parents=True)
    (out / "images").mkdir()
    for name, by_image in PARTS.items():
        pq.write_table(_instances(by_image), out / "instances" / f"{name}.parquet")
        pq.write_table(_images(list(by_image)), out / "images" / f"{name}.parquet")
    pq.write_table(_instances(ORPHAN), out / "instances" / "part-orphan.parquet")
    pq.write_table(_images([14], "error"), out / "images" / "part-err.parquet")
    pq.write_table(_images([15]), out / "images" / ".part-tmp.parquet")  # not a part
    refs = [{"category_id": c, "category_name": n} for c, n in NAMES.items()]
    (out / "run.json").write_text(json.dumps({"references": refs}))
    return out


def _run(argv: list[str]) -> int:
    return main(["export", *argv])


# ------------------------------------------------------------------ polygons


def _rect(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (_rect(10, 12, 2, 5, 3, 9), [[3, 2], [9, 2], [9, 5], [3, 5]]),
        (_rect(4, 4, 0, 4, 0, 4), [[0, 0], [4, 0], [4, 4], [0, 4]]),
        (_rect(5, 5, 2, 3, 2, 3), [[2, 2], [3, 2], [3, 3], [2, 3]]),  # one pixel
        # a ring: the hole is filled, the outer boundary is kept
        (_rect(10, 10, 1, 9, 1, 9) & ~_rect(10, 10, 3, 6, 3, 6), [[1, 1], [9, 1], [9, 9], [1, 9]]),
        # two components: the larger wins
        (_rect(9, 9, 0, 2, 0, 2) | _rect(9, 9, 4, 9, 5, 8), [[5, 4], [8, 4], [8, 9], [5, 9]]),
        # diagonal neighbours are one component (8-connectivity)
        (
            _rect(6, 6, 1, 3, 1, 3) | _rect(6, 6, 3, 5, 3, 5),
            [[1, 1], [3, 1], [3, 3], [5, 3], [5, 5], [3, 5], [3, 3], [1, 3]],
        ),
        # an L shape: 6 corners, clockwise on screen
        (
            _rect(8, 8, 1, 7, 1, 3) | _rect(8, 8, 5, 7, 1, 7),
            [[1, 1], [3, 1], [3, 5], [7, 5], [7, 7], [1, 7]],
        ),
    ],
)
def test_mask_polygon(mask, expected):
    np.testing.assert_array_equal(export.mask_polygon(mask), np.asarray(expected, float))


def test_mask_polygon_empty_and_bad_shape():
    assert export.mask_polygon(np.zeros((4, 4), bool)).shape == (0, 2)
    with pytest.raises(ValueError, match="must be"):
        export.mask_polygon(np.zeros((2, 4, 4), bool))


@pytest.mark.parametrize("radius", [6, 20])
def test_mask_polygon_of_a_disc_rasterises_back(radius):
    yy, xx = np.mgrid[:64, :80]
    disc = (yy - 30.5) ** 2 + (xx - 41.5) ** 2 < radius**2
    poly = export.mask_polygon(disc)
    back = rle_ops.decode_rle(rle_ops.polygons_to_rle([poly.reshape(-1).tolist()], 64, 80))
    iou = (back & disc).sum() / (back | disc).sum()
    assert iou > (0.75 if radius < 10 else 0.9)
    # every vertex lies on a pixel corner of the disc's bounding box
    ys, xs = np.nonzero(disc)
    assert poly[:, 0].min() == xs.min() and poly[:, 0].max() == xs.max() + 1
    assert poly[:, 1].min() == ys.min() and poly[:, 1].max() == ys.max() + 1


# ------------------------------------------------------------------ thresholds


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, {}),
        ("", {}),
        ("cat=0.5", {"cat": 0.5}),
        (" cat = 0.5 , 7=0.3,", {"cat": 0.5, "7": 0.3}),
        ("a=b=0.1", {"a=b": 0.1}),
    ],
)
def test_parse_class_thresholds(spec, expected):
    assert export.parse_class_thresholds(spec) == expected


@pytest.mark.parametrize(
    ("spec", "error"),
    [("cat", "NAME=THRESHOLD"), ("cat=high", "not a number"), ("cat=nan", "finite")],
)
def test_parse_class_thresholds_errors(spec, error):
    with pytest.raises(ValueError, match=error):
        export.parse_class_thresholds(spec)


def test_thresholds_file_and_resolution(tmp_path):
    path = tmp_path / "th.yaml"
    path.write_text("cat: 0.95\n7: 0.5\n")
    raw = export.parse_class_thresholds(str(path))
    th = export.Thresholds.resolve(0.3, raw, NAMES)
    assert th.per_class == {3: 0.95, 7: 0.5}
    assert [th.keep(3, 0.9), th.keep(7, 0.5), th.keep(9, 0.3), th.keep(9, 0.29)] == [
        False,
        True,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="no class 'horse'"):
        export.Thresholds.resolve(0.0, {"horse": 0.1}, NAMES)
    with pytest.raises(FileNotFoundError):
        export.parse_class_thresholds(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------ formats


def _labels(dest: Path) -> dict[str, list[list[float]]]:
    out = {}
    for p in sorted((dest / "labels").glob("*.txt")):
        out[p.stem] = [[float(v) for v in ln.split()] for ln in p.read_text().splitlines()]
    return out


def test_yolo_seg(run_dir, tmp_path, capsys):
    dest = tmp_path / "yolo"
    assert _run([str(run_dir), "--format", "yolo-seg", "--dest", str(dest)]) == 0
    assert "3 images, 4 instances kept, 0 below threshold" in capsys.readouterr().out
    labels = _labels(dest)
    assert sorted(labels) == ["img_11", "img_12", "img_13"]  # not the error/orphan images
    assert labels["img_12"] == []
    # class index = position in sorted ids (3 cat, 7 dog, 9 bird); rectangle -> its corners
    cat = [0, 20 / W, 10 / H, 60 / W, 10 / H, 60 / W, 30 / H, 20 / W, 30 / H]
    dog = [1, 0, 0, 10 / W, 0, 10 / W, 1, 0, 1]
    np.testing.assert_allclose(labels["img_11"], [cat, dog], atol=1e-6)
    assert [row[0] for row in labels["img_13"]] == [1, 0]
    data = yaml.safe_load((dest / "data.yaml").read_text())
    assert data["names"] == {0: "cat", 1: "dog", 2: "bird"}
    assert data["category_ids"] == {0: 3, 1: 7, 2: 9} and data["nc"] == 3
    assert (dest / "images.txt").read_text().split() == [
        "/data/img_11.jpg",
        "/data/img_12.jpg",
        "/data/img_13.jpg",
    ]


@pytest.mark.parametrize(
    ("flags", "kept"),
    [
        ([], {11: [3, 7], 12: [], 13: [7, 3]}),
        (["--score-threshold", "0.5"], {11: [3], 12: [], 13: [7]}),
        (["--class-thresholds", "dog=0.5"], {11: [3], 12: [], 13: [7, 3]}),
        (["--score-threshold", "0.85", "--class-thresholds", "7=0.1"], {11: [3, 7], 13: [7]}),
        (["--class-thresholds", "cat=0.95,dog=0.95"], {}),
    ],
)
def test_thresholds_drop_the_right_instances(run_dir, tmp_path, flags, kept):
    dest = tmp_path / "coco"
    assert _run([str(run_dir), "--format", "coco", "--dest", str(dest), *flags]) == 0
    coco = json.loads((dest / "annotations.json").read_text())
    got: dict[int, list[int]] = {}
    for a in coco["annotations"]:
        got.setdefault(a["image_id"], []).append(a["category_id"])
    assert got == {k: v for k, v in kept.items() if v}
    assert [im["id"] for im in coco["images"]] == [11, 12, 13]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))


def test_coco_values(run_dir, tmp_path):
    dest = tmp_path / "c"
    export.export_run(str(run_dir), "coco", dest=str(dest), class_thresholds={"cat": 0.5})
    coco = json.loads((dest / "annotations.json").read_text())
    assert coco["categories"] == [{"id": c, "name": n} for c, n in sorted(NAMES.items())]
    assert coco["info"]["thresholds"] == {"default": 0.0, "per_class": {"3": 0.5}}
    first = coco["annotations"][0]
    assert first["bbox"] == [20, 10, 40, 20] and first["score"] == pytest.approx(0.9)
    mask = rle_ops.decode_rle(first["segmentation"])
    np.testing.assert_array_equal(mask, _mask((10, 30, 20, 60)))
    assert coco["images"][0] == {"id": 11, "file_name": "/data/img_11.jpg", "width": W, "height": H}


def test_label_studio(run_dir, tmp_path):
    dest = tmp_path / "ls"
    assert _run([str(run_dir), "--format", "label-studio", "--dest", str(dest)]) == 0
    tasks = json.loads((dest / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/img_{i}.jpg" for i in (11, 12, 13)]
    pred = tasks[0]["predictions"][0]
    assert pred["model_version"] == "refseg"
    assert pred["score"] == pytest.approx((0.9 + 0.4) / 2)
    first = pred["result"][0]
    assert first["type"] == "polygonlabels" and first["value"]["polygonlabels"] == ["cat"]
    assert (first["original_width"], first["original_height"]) == (W, H)
    assert first["value"]["points"] == [[20.0, 20.0], [60.0, 20.0], [60.0, 60.0], [20.0, 60.0]]
    assert tasks[1]["predictions"][0]["result"] == []
    config = (dest / "label_config.xml").read_text()
    assert all(f'<Label value="{n}"/>' in config for n in NAMES.values())


def test_default_dest_and_link_images(tmp_path):
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    (run / "instances").mkdir()
    image = tmp_path / "pics" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"png")
    table = _images([1]).set_column(1, "image_uri", pa.array([str(image)]))
    pq.write_table(table, run / "images" / "part-x.parquet")
    pq.write_table(_instances({}), run / "instances" / "part-x.parquet")
    assert _run([str(run), "--format", "yolo-seg", "--link-images"]) == 0
    dest = run / "export-yolo-seg"
    link = dest / "images" / "a.png"
    assert link.is_symlink() and link.resolve() == image.resolve()
    assert (dest / "images.txt").read_text().split() == [str(link)]
    assert (dest / "labels" / "a.txt").read_text() == ""
    assert yaml.safe_load((dest / "data.yaml").read_text())["names"] == {}


def test_clashing_stems_get_the_image_id(tmp_path):
    """The first image keeps its stem; a later one of the same name gets ``_<image id>``."""
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    table = _images([1, 2]).set_column(
        1, "image_uri", pa.array(["/x/a/frame.jpg", "/x/b/frame.jpg"])
    )
    pq.write_table(table, run / "images" / "part-x.parquet")
    export.export_run(str(run), "yolo-seg")
    assert sorted(p.name for p in (run / "export-yolo-seg" / "labels").iterdir()) == [
        "frame.txt",
        "frame_2.txt",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--format", "coco", "--class-thresholds", "horse=0.5"], "no class 'horse'"),
        (["--format", "coco", "--class-thresholds", "cat"], "is not NAME=THRESHOLD"),
        (["--format", "coco", "--score-threshold", "nan"], "must be finite"),
        (["--format", "voc"], "invalid choice: 'voc'"),
        (["--format", "coco", "--class-thresholds", "missing.yaml"], "file not found"),
    ],
)
def test_cli_errors_exit_2(run_dir, capsys, argv, message):
    assert _run([str(run_dir), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (run_dir / "export-coco").exists()


def test_not_a_run_folder(tmp_path, capsys):
    assert _run([str(tmp_path), "--format", "coco"]) == 2
    assert "no images/ parts" in capsys.readouterr().err
