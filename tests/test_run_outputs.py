"""Outputs that are whole or absent, run.json errors, and error rows (issue 13).

* An interrupted COCO assembly (an error mid-way; locally and on S3) or a process killed
  while writing run.json leaves the previous file, never a partial one.
* A truncated run.json is a clear error naming the file and the fix (or, with no labels
  in OUT yet, is replaced).
* An error row never quotes the file's bytes.
No Ray: the writers are called directly on parts made here.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import zlib
from types import SimpleNamespace

import boto3
import numpy as np
import pyarrow as pa
import pytest
from refseg.core.imaging import ImageDecodeError, decode_image
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.pipeline.dataflow.decode import decode_batch
from refseg.pipeline.dataflow.writer import instances_blob, write_parts
from refseg.pipeline.run_steps import complete_record, new_counts
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import resolve
from refseg.pipeline.store.coco_files import write_coco
from refseg.pipeline.store.record import RunRecordError, check_fingerprint, read_run_record

from tests.faults_util import REPO

CATEGORIES = [{"id": 3, "name": "car"}]


def _instances(image_id: int, scores: list[float]) -> bytes:
    n = len(scores)
    table = pa.table(
        {
            "image_id": [image_id] * n,
            "image_uri": [f"/x/{image_id}.jpg"] * n,
            "category_id": [3] * n,
            "category_name": ["car"] * n,
            "score": scores,
            "bbox": [[1.0, 2.0, 3.0, 4.0]] * n,
            "segmentation": [{"size": [8, 8], "counts": "04"}] * n,
            "area": [12.0] * n,
            "proposal_iou": [0.9] * n,
        },
        schema=INSTANCES_SCHEMA,
    )
    return instances_blob(table)


def _part(out, image_id: int, scores: list[float]) -> None:
    """One finished part of one image with ``len(scores)`` instances."""
    batch = {
        Col.IMAGE_ID: np.array([image_id]),
        Col.IMAGE_URI: np.array([f"/x/{image_id}.jpg"], dtype=object),
        Col.WIDTH: np.array([8]),
        Col.HEIGHT: np.array([8]),
        Col.STATUS: np.array(["ok"], dtype=object),
        Col.ERROR: np.array([""], dtype=object),
        Col.N_INSTANCES: np.array([len(scores)], dtype=np.int32),
        Col.INSTANCES: np.array([_instances(image_id, scores)], dtype=object),
        **{c: np.zeros(1) for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE)},
    }
    write_parts(batch, out=out)


def test_an_interrupted_coco_assembly_leaves_the_previous_files(tmp_path):
    out = resolve(str(tmp_path / "out"))
    _part(out, 1, [0.5, 0.6])
    write_coco(out, CATEGORIES)
    before = {
        n: (tmp_path / "out" / n).read_text() for n in ("coco_results.json", "coco_dataset.json")
    }
    _part(out, 2, [0.7, float("nan"), 0.8])  # the assembly stops at the NaN, mid-file
    with pytest.raises(ValueError, match="NaN"):
        write_coco(out, CATEGORIES)
    for name, text in before.items():
        assert (tmp_path / "out" / name).read_text() == text
        json.loads(text)
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_store_failure_while_writing_the_coco_files_says_a_rerun_writes_them(
    tmp_path, monkeypatch
):
    out = resolve(str(tmp_path / "out"))
    _part(out, 1, [0.5])

    def unreachable(*_args, **_kwargs):
        raise OSError('Read timeout on endpoint URL:\n "http://127.0.0.1:1/b/coco_results.json"')

    monkeypatch.setattr("refseg.pipeline.run_steps.write_coco", unreachable)
    bank = SimpleNamespace(category_ids=[1], names={1: "cat"})
    with pytest.raises(OSError) as info:
        complete_record(
            out, fingerprint="f", preset=None, config={}, random_weights=False,
            checkpoints=None, bank=bank, bank_sha="s", counts=new_counts(), more_counts={},
            seconds=1.0,
        )  # fmt: skip
    message = str(info.value)
    assert message.startswith(f"every image is labelled, but writing the COCO files to {out.uri}")
    assert "OSError: Read timeout" in message and "\n" not in message
    assert message.endswith("rerun the same command to write them (no image is labelled again)")


def test_an_interrupted_coco_assembly_on_s3_leaves_no_object(s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="atomic-json")
    out = resolve("s3://atomic-json/run", s3_endpoint=s3_endpoint)
    _part(out, 1, [0.5])
    _part(out, 2, [0.7, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        write_coco(out, CATEGORIES)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="atomic-json")["Contents"]}
    assert not {"run/coco_results.json", "run/coco_dataset.json"} & keys, keys


_WRITE_RUN_JSON = textwrap.dedent(
    """
    import sys
    from refseg.pipeline.store.record import write_run_record
    from refseg.pipeline.storage import resolve
    write_run_record(resolve(sys.argv[1]), {"fingerprint": "new", "big": "x" * 200_000})
    """
)


def test_a_process_killed_while_writing_run_json_leaves_the_previous_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"fingerprint": "old"}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}

    def limit() -> None:  # a write past 64 KiB kills the process (SIGXFSZ), mid-file
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    proc = subprocess.run(
        [sys.executable, "-c", _WRITE_RUN_JSON, str(out)],
        env=env,
        preexec_fn=limit,
        capture_output=True,
        check=False,
    )
    assert proc.returncode != 0  # it was killed mid-write
    assert json.loads((out / "run.json").read_text()) == {"fingerprint": "old"}


def test_a_truncated_run_json_is_a_clear_error_naming_the_file_and_the_fix(tmp_path):
    out = resolve(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    text = json.dumps({"fingerprint": "abc", "config": {"x": 1}}, indent=2)
    (tmp_path / "out" / "run.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"run\.json is not valid JSON") as info:
        read_run_record(out)
    message = str(info.value)
    assert str(tmp_path / "out" / "run.json") in message
    assert "delete" in message and "finished images are kept" in message
    _part(out, 1, [0.5])
    with pytest.raises(RunRecordError):
        check_fingerprint(out, "abc", has_parts=True)


def test_a_truncated_run_json_without_labels_is_replaced(tmp_path):
    out = resolve(str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text('{"fingerprint": "ab')
    assert check_fingerprint(out, "abc", has_parts=False) is None


def _png_with_a_bad_chunk(secret: bytes) -> bytes:
    """A PNG whose second IDAT chunk has a non-ASCII type: PIL quotes chunk types."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "PNG"
    )
    png = buf.getvalue()
    i = png.index(b"IDAT") - 4
    (n,) = struct.unpack(">I", png[i : i + 4])
    half = png[i + 8 : i + 8 + n // 2]
    idat = (
        struct.pack(">I", len(half))
        + b"IDAT"
        + half
        + struct.pack(">I", zlib.crc32(b"IDAT" + half))
    )
    return png[:i] + idat + struct.pack(">I", len(secret)) + secret[:4] + secret + b"\0" * 4


@pytest.mark.parametrize(
    "data",
    [b"password=hunter2\n" * 4, b"\x89PNG\r\n\x1a\nhunter2", None],
    ids=["text", "png-signature", "png-bad-chunk"],
)
def test_error_texts_never_quote_the_file_bytes(data):
    data = data if data is not None else _png_with_a_bad_chunk(b"pw=!hunter2")
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, uri="notes.jpg")
    message = str(info.value)
    assert "notes.jpg" in message
    for fragment in ("hunter2", "password", "pw=!", "PNG\\r", "b'", 'b"'):
        assert fragment not in message, message
    batch = {
        Col.IMAGE_ID: np.array([1]),
        Col.IMAGE_URI: np.array(["notes.jpg"], dtype=object),
        Col.BYTES: np.array([data], dtype=object),
        Col.ERROR: np.array([""], dtype=object),
    }
    row = decode_batch(batch, size=32, resize="square", max_pixels=10**8)
    assert row[Col.STATUS][0] == "error" and "hunter2" not in row[Col.ERROR][0]


def test_the_error_row_still_says_what_the_file_is():
    with pytest.raises(ImageDecodeError, match=r"not a recognised image \(68 bytes\)"):
        decode_image(b"password=hunter2\n" * 4, uri="notes.jpg")
