"""Tests of ``refseg report`` (jobs/report.py) on a tiny fake run folder."""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from refseg.core import rle as rle_ops
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.jobs import report, report_data, report_render

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_INSTALL = (
    "`make test` installs it as root with apt-get; else Debian/Ubuntu: `sudo apt-get install "
    "chromium`, macOS: `brew install --cask chromium`, or set REFSEG_CHROMIUM to a Chromium or "
    "Chrome binary"
)
EVIL = '<script>alert("x")</script>'
IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("image_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("n_instances", pa.int32()),
        ("seconds", pa.float64()),
    ]
)
H, W = 96, 128
NAMES = {1: "cat", 2: "dog"}
# image id -> instances (category id, score, (y0, y1, x0, x1) of a rectangle mask)
INSTANCES = {
    1: [(1, 0.9, (10, 50, 10, 60)), (2, 0.3, (40, 90, 70, 120))],
    2: [(2, 0.75, (20, 70, 30, 100))],
    3: [],
}


def _mask(rect: tuple[int, int, int, int]) -> np.ndarray:
    y0, y1, x0, x1 = rect
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _write_image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, W, dtype=np.float32)[None, :, None] * np.ones((H, 1, 3))
    img = np.clip(base + rng.normal(0, 10, (H, W, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def _instance_rows(image_ids: list[int], run: Path) -> list[dict]:
    rows = []
    for iid in image_ids:
        for cid, score, rect in INSTANCES[iid]:
            rle = rle_ops.encode_masks(_mask(rect)[None])[0]
            rows.append(
                {
                    "image_id": iid,
                    "image_uri": str(run / "src" / f"{iid}.png"),
                    "category_id": cid,
                    "category_name": NAMES[cid],
                    "score": score,
                    "bbox": rle_ops.rle_to_bbox([rle])[0].tolist(),
                    "segmentation": rle,
                    "area": float(_mask(rect).sum()),
                    "proposal_iou": 0.8,
                }
            )
    return rows


def make_run(root: Path) -> Path:
    """A run folder: 5 images (3 ok with files, 1 ok whose file is gone, 1 error)."""
    run = root / "run"
    for sub in ("src", "instances", "images"):
        (run / sub).mkdir(parents=True)
    for iid in (1, 2, 3):
        _write_image(run / "src" / f"{iid}.png", iid)
    # two instance files (streamed as several batches) and files that must be ignored
    for name, ids in (("part-0.parquet", [1]), ("part-1.parquet", [2, 3])):
        table = pa.Table.from_pylist(_instance_rows(ids, run), schema=INSTANCES_SCHEMA)
        pq.write_table(table, run / "instances" / name)
    for junk in ("_SUCCESS", ".part-9.parquet", "_tmp.parquet", "notes.txt"):
        (run / "instances" / junk).write_text("not parquet")
    images = [
        (1, str(run / "src" / "1.png"), "ok", None, 2),
        (2, str(run / "src" / "2.png"), "ok", None, 1),
        (3, str(run / "src" / "3.png"), "ok", None, 0),
        (4, f"https://example.com/{EVIL}.jpg", "error", f"decode failed: {EVIL}", 0),
        (5, str(run / "src" / "gone.png"), "ok", None, 0),
    ]
    rows = [
        dict(zip(("image_id", "image_uri", "status", "error", "n_instances"), r, strict=True))
        | {"width": W, "height": H, "seconds": 0.1}
        for r in images
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), run / "images" / "i.parquet")
    refs = [
        {
            "category_id": 1,
            "category_name": "cat",
            "image_uri": str(run / "src" / "1.png"),
            "bbox": [10, 10, 50, 40],
            "segmentation": rle_ops.encode_masks(_mask((10, 50, 10, 60))[None])[0],
            "mask_generated": False,
        },
        {
            "category_id": 2,
            "category_name": "dog",
            "image_uri": str(run / "src" / "2.png"),
            "bbox": [30, 20, 70, 50],
            "segmentation": [[30, 20, 100, 20, 100, 70, 30, 70]],
            "mask_generated": True,
        },
    ]
    run_json = {"config": {"weights": "https://example.com/w.pt"}, "counts": {}, "references": refs}
    (run / "run.json").write_text(json.dumps(run_json))
    return run


def ground_truth() -> dict:
    """GT for images 1 and 2 only (image 3 is missing from it)."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [12, 12, 46, 36],
         "segmentation": [[12, 12, 58, 12, 58, 48, 12, 48]], "area": 1656, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 20, 70, 50],
         "segmentation": [[30, 20, 100, 20, 100, 70, 30, 70]], "area": 3500, "iscrowd": 0},
    ]  # fmt: skip
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in (1, 2)]
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def _figcaptions(page: str) -> list[str]:
    return re.findall(r'<figure class="tile">.*?<figcaption>(.*?)</figcaption>', page, re.S)


@pytest.mark.parametrize(
    ("gt", "threshold", "n_img", "shown"),
    [
        (None, 0.0, 3 + 2, ["2 shown", "1 shown", "0 shown"]),
        (None, 0.5, 3 + 2, ["1 shown", "1 shown", "0 shown"]),
        ("dict", 0.0, 3 + 2 + 2, ["2 shown", "1 shown", "0 shown"]),
        ("file", 0.8, 3 + 2 + 2, ["1 shown", "0 shown", "0 shown"]),
    ],
)
def test_report_page(run_dir: Path, gt, threshold, n_img, shown) -> None:
    truth = ground_truth()
    if gt == "file":
        (run_dir.parent / "gt.json").write_text(json.dumps(truth))
        truth = str(run_dir.parent / "gt.json")
    path = report.write_report(
        str(run_dir), ground_truth=truth if gt else None, score_threshold=threshold
    )
    assert path == str(run_dir / "report.html")
    page = Path(path).read_text(encoding="utf-8")
    for name in ("cat", "dog"):
        assert f"<td>{name}</td>" in page
    for label, n in (("images", 5), ("ok", 4), ("errors", 1), ("instances", 3), ("classes", 2)):
        assert f"<b>{n}</b>{label}</div>" in page
    assert page.count("<img") == n_img
    assert page.count("data:image/jpeg;base64,") == n_img
    assert "decode failed: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "image unreadable" in page and "gone.png" in page
    assert page.count('class="gen">generated') == 1
    captions = _figcaptions(page)
    assert [c.split("</b>")[0] for c in captions] == ["<b>#1", "<b>#2", "<b>#3", "<b>#5", "<b>#4"]
    assert [re.search(r"\d+ shown", c).group(0) for c in captions[:3]] == shown
    assert ("ground truth (1)" in page) == bool(gt)
    assert ("image id not in the ground-truth file" in page) == bool(gt)


@pytest.mark.parametrize(("max_images", "tiles"), [(0, 0), (2, 2), (48, 5)])
def test_max_images_and_determinism(run_dir: Path, tmp_path: Path, max_images, tiles) -> None:
    a = report.write_report(str(run_dir), max_images=max_images, dest=str(tmp_path / "a.html"))
    b = report.write_report(str(run_dir), max_images=max_images, dest=str(tmp_path / "b.html"))
    page = Path(a).read_text()
    assert page == Path(b).read_text()
    assert page.count('<figure class="tile">') == tiles


def test_histogram_matches_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "instances").mkdir()
    scores = {1: rng.random(300), 7: rng.random(50) * 0.5}
    for part in range(3):  # several files, several batches
        rows = [
            {"image_id": i, "category_id": cid, "category_name": f"c{cid}", "score": s,
             "bbox": [0.0, 0.0, 1.0, 1.0], "segmentation": None, "area": 1.0,
             "proposal_iou": 1.0}
            for cid, ss in scores.items() for i, s in enumerate(ss[part::3])
        ]  # fmt: skip
        table = pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA)
        pq.write_table(table, tmp_path / "instances" / f"{part}.parquet")
    dataset = report_data._parquet_dataset(str(tmp_path), "instances")
    stats = report_data.class_stats(dataset, 0.25)
    assert sorted(stats) == [1, 7]
    for cid, ss in scores.items():
        s32 = ss.astype(np.float32).astype(np.float64)
        expected, _ = np.histogram(s32, bins=report_data.N_BINS, range=(0, 1))
        assert stats[cid].name == f"c{cid}"
        assert stats[cid].count == len(ss)
        assert stats[cid].above == int((s32 >= 0.25).sum())
        np.testing.assert_array_equal(stats[cid].hist, expected)
    # no images table: the sample comes from the instances' image ids
    summary = report_data.summarise_images(None, dataset, 4)
    assert [r.image_id for r in summary.sample] == [0, 1, 2, 3]
    assert summary.n_images is None


@pytest.mark.parametrize("with_mask", [True, False])
def test_draw_overlay_colours(with_mask: bool) -> None:
    img = np.zeros((80, 80, 3), dtype=np.uint8)  # thumbnail of a 160 px original (scale 0.5)
    mask = np.zeros((160, 160), dtype=bool)
    mask[40:120, 40:120] = True  # thumbnail rows/cols 20..59
    rle = rle_ops.encode_masks(mask[None])[0] if with_mask else None
    shape = report_render.Shape(rle, (40.0, 40.0, 80.0, 80.0), 3, "x")
    out = report_render.draw_overlay(img, [shape], 0.5).astype(int)
    colour = np.array(report_data.class_colour(3))
    np.testing.assert_array_equal(out[70, 70], 0)  # outside
    np.testing.assert_array_equal(out[10, 22], colour)  # the label's background, above the box
    np.testing.assert_array_equal(out[59, 40], colour)  # outline / box edge
    if with_mask:
        np.testing.assert_allclose(out[40, 40], colour * report_data.FILL_ALPHA, atol=1)  # fill
    else:
        np.testing.assert_array_equal(out[40, 40], 0)  # box only: no fill


def test_fsspec_uri_and_cli(run_dir: Path, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    for p in run_dir.rglob("*"):
        if p.is_file() and p.parent.name in ("instances", "images"):
            fs.pipe(f"/r/{p.parent.name}/{p.name}", p.read_bytes())
    parser = report.add_report_args(argparse.ArgumentParser())
    args = parser.parse_args(["memory://r", "--max-images", "2", "--score-threshold", "0.5"])
    assert report.run_report(args) == 0
    page = fs.cat("/r/report.html").decode()
    assert page.count('<figure class="tile">') == 2 and "No reference information" in page
    args = parser.parse_args([str(run_dir), "--out", str(tmp_path / "x.html")])
    assert report.run_report(args) == 0 and (tmp_path / "x.html").exists()
    with pytest.raises(FileNotFoundError, match="refseg label"):
        report.write_report(str(tmp_path / "nothing"))


def chromium() -> str:
    """The browser binary, or skip (fail where REFSEG_REQUIRE_BROWSER=1, as on CI)."""
    found = os.environ.get("REFSEG_CHROMIUM") or next(
        filter(None, map(shutil.which, CHROMIUM_NAMES)), None
    )
    if found:
        return found
    message = f"no Chromium found for the report's rendering test: {CHROMIUM_INSTALL}"
    if os.environ.get("REFSEG_REQUIRE_BROWSER") == "1":
        pytest.fail(f"REFSEG_REQUIRE_BROWSER=1 and {message}")
    pytest.skip(message)


def test_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    browser = chromium()
    path = report.write_report(str(run_dir), ground_truth=ground_truth())
    shot = tmp_path / "shot.png"
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
        "--window-size=1200,2000", Path(path).as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert shot.exists(), f"no screenshot; chromium said:\n{proc.stderr[-2000:]}"
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 10, "the screenshot is blank"
    # the class colours of the overlays and histograms are on screen
    for cid in (1, 2):
        hits = (np.abs(pixels - np.array(report_data.class_colour(cid))).sum(axis=2) < 6).sum()
        assert hits > 50, f"class {cid}'s colour is not on the screenshot"
    if os.environ.get("REFSEG_KEEP_SHOT"):
        shutil.copy(shot, os.environ["REFSEG_KEEP_SHOT"])


def test_data_uri_round_trip() -> None:
    img = np.full((4, 6, 3), 200, dtype=np.uint8)
    uri = report_render.to_data_uri(img)
    assert uri.startswith("data:image/jpeg;base64,")
    back = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    assert back.shape == (4, 6, 3) and np.abs(back.astype(int) - 200).max() <= 3
