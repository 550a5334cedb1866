"""Image identity (issue 13): one file, one URI, one id, listed once; COCO names confined.

No Ray: these are the listings a run labels. Each case is the issue's: symlinked folders,
symlink loops, ``file://`` and ``/./`` spellings, a manifest or COCO list naming a file
twice, COCO ids that conflict, file names leaving the images root, OUT inside --images.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from refseg.pipeline.dataflow import sources
from refseg.pipeline.dataflow.sources import ImageSource, list_images
from refseg.pipeline.schema import image_id_from_uri
from refseg.pipeline.storage import resolve


def _files(root: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(f"image {name}".encode())
        paths.append(p)
    return paths


def _listing(images: str | Path, out: Path | None = None, **kw):
    src = ImageSource(str(images), **kw)
    return sources.list_targets(src, out=resolve(str(out)) if out else None)


def test_a_symlink_loop_is_not_followed_and_each_file_is_listed_once(tmp_path, caplog):
    a, b = _files(tmp_path, ["a.jpg", "sub/b.jpg"])
    (tmp_path / "sub" / "loop").symlink_to("..")  # sub/loop -> the root again
    with caplog.at_level(logging.WARNING):
        got = list_images(resolve(str(tmp_path)))
    assert got == [str(a), str(b)]
    assert "folders reached a second time" in caplog.text


def test_a_symlinked_folder_and_a_symlinked_file_are_listed_once_under_their_real_path(tmp_path):
    (x,) = _files(tmp_path, ["real/x.jpg"])
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "same.jpg").symlink_to(x)
    listing = _listing(tmp_path)
    assert listing.uris == [str(x)]
    assert listing.ids.tolist() == [image_id_from_uri(str(x))]  # the id earlier runs gave it


def test_a_folder_given_through_a_symlink_lists_the_real_files(tmp_path):
    (x,) = _files(tmp_path, ["real/x.jpg"])
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert _listing(tmp_path / "link").uris == [str(x)]


def test_file_uri_dot_and_dotdot_spellings_in_a_manifest_are_one_image(tmp_path, caplog):
    (a,) = _files(tmp_path, ["imgs/a.jpg"])
    (tmp_path / "link.jpg").symlink_to(a)
    spellings = [
        str(a),
        f"file://{a}",
        str(tmp_path / "imgs" / "." / "a.jpg"),
        str(tmp_path / "imgs" / ".." / "imgs" / "a.jpg"),
        str(tmp_path / "link.jpg"),
        str(a),
    ]
    (tmp_path / "list.txt").write_text("\n".join(spellings) + "\n")
    with caplog.at_level(logging.WARNING):
        listing = _listing(tmp_path / "list.txt")
    assert listing.uris == [str(a)] and listing.ids.tolist() == [image_id_from_uri(str(a))]
    warnings = [r.getMessage() for r in caplog.records if "already listed" in r.getMessage()]
    assert len(warnings) == 1 and "5 entries" in warnings[0], warnings  # once, with the count
    assert listing.sizes.tolist() == [a.stat().st_size]
    assert listing.mtimes.tolist() == [a.stat().st_mtime_ns]


def test_a_parquet_manifest_with_conflicting_ids_is_an_error_naming_both_rows(tmp_path):
    a, b = _files(tmp_path, ["a.jpg", "b.jpg"])
    same_file = pa.table({"uri": [str(a), f"file://{a}"], "image_id": [7, 9]})
    pq.write_table(same_file, tmp_path / "m1.parquet")
    with pytest.raises(ValueError, match=r"image id 7\).*image id 9\) are the same file") as e:
        _listing(tmp_path / "m1.parquet")
    assert str(a) in str(e.value) and f"file://{a}" in str(e.value)
    same_id = pa.table({"uri": [str(a), str(b)], "image_id": [7, 7]})
    pq.write_table(same_id, tmp_path / "m2.parquet")
    with pytest.raises(ValueError, match="image id 7 is given to") as e:
        _listing(tmp_path / "m2.parquet")
    assert str(a) in str(e.value) and str(b) in str(e.value)


def _coco(tmp_path: Path, images: list[dict]) -> str:
    path = tmp_path / "targets.json"
    cats = [{"id": 3, "name": "car"}]
    path.write_text(json.dumps({"images": images, "categories": cats, "annotations": []}))
    return str(path)


def test_coco_one_file_under_two_ids_is_an_error_naming_both_entries(tmp_path):
    _files(tmp_path / "imgs", ["a.jpg"])
    targets = _coco(tmp_path, [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "./a.jpg"}])
    with pytest.raises(ValueError) as e:
        _listing(tmp_path / "imgs", targets=targets)
    message = str(e.value)
    assert "'a.jpg' (image id 1)" in message and "'./a.jpg' (image id 2)" in message
    assert "same file" in message and targets in message


def test_coco_two_files_under_one_id_is_an_error_naming_both_entries(tmp_path):
    _files(tmp_path / "imgs", ["a.jpg", "b.jpg"])
    targets = _coco(tmp_path, [{"id": 5, "file_name": "a.jpg"}, {"id": 5, "file_name": "b.jpg"}])
    with pytest.raises(ValueError, match=r"image id 5 is given to 'a.jpg' and to 'b.jpg'"):
        _listing(tmp_path / "imgs", targets=targets)


def test_coco_entry_listed_twice_is_labelled_once_with_a_warning(tmp_path, caplog):
    (a,) = _files(tmp_path / "imgs", ["a.jpg"])
    entry = {"id": 5, "file_name": "a.jpg"}
    targets = _coco(tmp_path, [entry, entry, entry])
    with caplog.at_level(logging.WARNING):
        listing = _listing(tmp_path / "imgs", targets=targets)
    assert listing.uris == [str(a)] and listing.ids.tolist() == [5]
    assert "2 entries name a file already listed" in caplog.text


@pytest.mark.parametrize("name", ["../../x.jpg", "sub/../../x.jpg", "/etc/hostname"])
def test_coco_file_names_outside_the_images_root_are_refused(tmp_path, name):
    (tmp_path / "imgs").mkdir()
    targets = _coco(tmp_path, [{"id": 1, "file_name": name}])
    with pytest.raises(ValueError, match="--allow-outside-root") as e:
        _listing(tmp_path / "imgs", targets=targets)
    assert repr(name) in str(e.value) and "id 1" in str(e.value)


def test_coco_file_names_outside_the_root_are_read_with_allow_outside_root(tmp_path):
    (x,) = _files(tmp_path, ["x.jpg"])
    (tmp_path / "deep" / "imgs").mkdir(parents=True)
    targets = _coco(
        tmp_path, [{"id": 1, "file_name": "../../x.jpg"}, {"id": 2, "file_name": str(x)}]
    )
    with pytest.raises(ValueError, match="same file"):  # both name x.jpg: still one id each
        _listing(tmp_path / "deep" / "imgs", targets=targets, allow_outside_root=True)
    targets = _coco(tmp_path, [{"id": 1, "file_name": "../../x.jpg"}])
    listing = _listing(tmp_path / "deep" / "imgs", targets=targets, allow_outside_root=True)
    assert listing.uris == [str(x)] and listing.ids.tolist() == [1]


def test_out_inside_images_is_never_listed(tmp_path):
    a, b = _files(tmp_path, ["a.jpg", "sub/b.jpg"])
    out = tmp_path / "out"
    _files(out, ["coco_results.json", "images/part-1.parquet", "export-coco/x.jpg"])
    links = out / "export-yolo-seg" / "images"
    links.mkdir(parents=True)
    (links / "a.jpg").symlink_to(a)  # what `refseg export --link-images` makes
    (links / "b.jpg").symlink_to(b)
    assert _listing(tmp_path, out).uris == [str(a), str(b)]
    assert _listing(tmp_path, out, all_files=True).uris == [str(a), str(b)]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{a}\n{out / 'export-coco' / 'x.jpg'}\n")
    assert _listing(manifest, out).uris == [str(a)]


def test_out_inside_an_s3_prefix_is_never_listed(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="identity")
    for key in ["cam/a.jpg", "cam/out/export/images/a.jpg", "cam/out2/b.jpg"]:
        s3.put_object(Bucket="identity", Key=key, Body=b"x")
    src = ImageSource("s3://identity/cam", s3_endpoint=s3_endpoint)
    assert "s3://identity/cam/out/export/images/a.jpg" in sources.list_targets(src).uris
    got = sources.list_targets(src, out=resolve("s3://identity/cam/out"))
    assert got.uris == ["s3://identity/cam/a.jpg", "s3://identity/cam/out2/b.jpg"]
    assert all(s == 1 for s in got.sizes.tolist()) and all(t > 0 for t in got.mtimes.tolist())


def test_ids_of_plain_paths_are_unchanged(tmp_path):
    """Runs labelled before image identity keep their ids: the URI of a plain file is the
    same as before, so is its id (a 52-bit hash of the URI)."""
    paths = _files(tmp_path, ["a.jpg", "z/b.png"])
    listing = _listing(tmp_path)
    assert listing.ids.tolist() == [image_id_from_uri(str(p)) for p in paths]
    assert os.path.realpath(tmp_path) == str(tmp_path)  # the premise of the check
