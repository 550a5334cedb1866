"""A Parquet manifest that carries each file's size and time (issue 19): no request per file.

An S3 Inventory report, or any Parquet listing with a size column and a modification time
(timestamp, or integer ns), gives ``list_targets`` what a rerun compares, so it asks the
store nothing per entry; a manifest without them is asked as before.
"""

from __future__ import annotations

import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from refseg.pipeline.dataflow import sources
from refseg.pipeline.dataflow.sources import ImageSource, list_targets


def _no_stat(monkeypatch) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(sources, "_stat", lambda uri, endpoint: asked.append(uri) or (-1, -1))
    return asked


def test_sizes_and_times_come_from_the_manifest_without_a_request(tmp_path, monkeypatch):
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    table = pa.table(
        {
            "uri": ["s3://b/a.jpg", "s3://b/b.jpg", "s3://b/a.jpg"],
            "size": [10, 20, 10],
            "last_modified_date": pa.array([when] * 3, pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, tmp_path / "inventory.parquet")
    asked = _no_stat(monkeypatch)
    listing = list_targets(ImageSource(str(tmp_path / "inventory.parquet")))
    assert asked == []
    assert listing.uris == ["s3://b/a.jpg", "s3://b/b.jpg"]
    assert listing.sizes.tolist() == [10, 20]
    assert listing.mtimes.tolist() == [int(when.timestamp()) * 10**9] * 2


def test_rows_without_them_and_manifests_without_them_are_asked(tmp_path, monkeypatch):
    table = pa.table(
        {
            "image_uri": ["/x/a.jpg", "/x/b.jpg"],
            "file_size": pa.array([10, None], pa.int64()),
            "file_mtime_ns": pa.array([7, 8], pa.int64()),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    asked = _no_stat(monkeypatch)
    listing = list_targets(ImageSource(str(tmp_path / "m.parquet")))
    assert asked == ["/x/b.jpg"] and listing.sizes.tolist() == [10, -1]
    pq.write_table(pa.table({"uri": ["/x/a.jpg"]}), tmp_path / "plain.parquet")
    list_targets(ImageSource(str(tmp_path / "plain.parquet")))
    assert asked == ["/x/b.jpg", "/x/a.jpg"]


def test_a_time_column_of_another_type_is_a_clear_error(tmp_path):
    table = pa.table({"uri": ["/x/a.jpg"], "size": [1], "last_modified": ["yesterday"]})
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="'last_modified' must be a timestamp"):
        list_targets(ImageSource(str(tmp_path / "m.parquet")))
