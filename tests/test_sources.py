"""Listing targets: folders and S3 prefixes, file-name rules, manifests, fetch blocks."""

from __future__ import annotations

from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from refseg.pipeline.dataflow import sources
from refseg.pipeline.dataflow.sources import ImageSource, list_images
from refseg.pipeline.storage import resolve

KEPT = ["a.jpg", "B.JPEG", "_DSC0001.jpg", ".dotted.png", "sub/c.png", "sub/deep/_d.webp"]
LEFT_OUT = ["notes.txt", ".DS_Store", ".git/e.jpg", "sub/.ipynb_checkpoints/f.jpg"]


def _tree(root: Path) -> None:
    for name in KEPT + LEFT_OUT:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_folder_listing_keeps_underscore_and_dot_names_and_skips_hidden_folders(tmp_path):
    _tree(tmp_path)
    got = list_images(resolve(str(tmp_path)))
    assert got == sorted(str(tmp_path / n) for n in KEPT)
    every = list_images(resolve(str(tmp_path)), all_files=True)
    assert set(every) == {str(tmp_path / n) for n in [*KEPT, "notes.txt", ".DS_Store"]}


def test_single_file_and_missing_path(tmp_path):
    (tmp_path / "one.png").write_bytes(b"x")
    assert list_images(resolve(str(tmp_path / "one.png"))) == [str(tmp_path / "one.png")]
    with pytest.raises(FileNotFoundError, match=r"--images .*nope: no such file"):
        list_images(resolve(str(tmp_path / "nope")))


def test_s3_prefix_listing(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="listing")
    for name in KEPT + LEFT_OUT + ["other/z.jpg"]:
        s3.put_object(Bucket="listing", Key=f"cam/{name}", Body=b"x")
    s3.put_object(Bucket="listing", Key="camera2/y.jpg", Body=b"x")  # a prefix, not the folder
    got = list_images(resolve("s3://listing/cam"))
    assert got == sorted(f"s3://listing/cam/{n}" for n in [*KEPT, "other/z.jpg"])


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no image found.*--all-files"):
        sources.read_source(ImageSource(str(tmp_path)), done=sources.np.zeros(0), fetch_cpus=1)


def test_manifests_give_uris_and_ids(tmp_path):
    (tmp_path / "list.txt").write_text("s3://b/x.jpg\n\n  /data/y.png  \n")
    uris, ids = sources._listing(ImageSource(str(tmp_path / "list.txt")))
    assert uris == ["s3://b/x.jpg", "/data/y.png"] and len(set(ids.tolist())) == 2
    pq.write_table(
        pa.table({"uri": ["/a.jpg", "/b.jpg"], "image_id": [7, 9]}), tmp_path / "m.parquet"
    )
    uris, ids = sources._listing(ImageSource(str(tmp_path / "m.parquet")))
    assert (uris, ids.tolist()) == (["/a.jpg", "/b.jpg"], [7, 9])
    pq.write_table(pa.table({"path": ["/a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'uri' or 'image_uri' column"):
        sources._listing(ImageSource(str(tmp_path / "bad.parquet")))


@pytest.mark.parametrize(("n", "blocks"), [(1, 1), (8, 1), (9, 2), (100, 13)])
def test_listing_is_split_into_fetch_blocks(n, blocks):
    table = pa.table({"i": list(range(n))})
    parts = sources._blocks(table)
    assert len(parts) == blocks and sum(p.num_rows for p in parts) == n


def test_large_listings_use_a_bounded_number_of_blocks(monkeypatch):
    monkeypatch.setattr(sources, "MAX_FETCH_BLOCKS", 10)
    parts = sources._blocks(pa.table({"i": list(range(1000))}))
    assert len(parts) == 10 and {p.num_rows for p in parts} == {100}
