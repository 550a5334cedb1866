"""Fault injection, object storage: S3 down at start, and an outage in the middle of a run.

Each test owns a moto server on its own port (the session's one is left alone). The
mid-run outage freezes moto with SIGSTOP, so connections hang as in a network outage and
the finished parts (in moto's memory) survive; SIGCONT ends the outage.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from botocore.config import Config
from refseg.pipeline.dataflow.sources import fetch_bytes
from refseg.pipeline.job import run_label
from refseg.pipeline.schema import Col

from tests.faults_util import MotoServer, free_port, image_ids, make_job, write_jpegs

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture
def moto():
    server = MotoServer()
    yield server
    server.stop()


def _s3(url: str):  # a client that never hangs on a frozen server for long
    cfg = Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1})
    return boto3.client("s3", endpoint_url=url, config=cfg)


@pytest.mark.parametrize("where", ["out", "images"])
def test_endpoint_down_at_start_is_a_clear_error_before_any_work(tiny_setup, tmp_path, where):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    images = "s3://in-bucket/targets" if where == "images" else str(tmp_path / "images")
    out = "s3://out-bucket/run" if where == "out" else str(tmp_path / "out")
    write_jpegs(tmp_path / "images", 2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        run_label(make_job(tiny_setup, images, out, s3_endpoint=dead))
    message = str(info.value)
    expected = "output location s3://out-bucket/run" if where == "out" else f"images {images}"
    assert message.startswith(f"cannot reach the {expected}: "), message
    assert "AWS Error NETWORK_CONNECTION" in message  # the store's own words
    assert "no work was started" in message and "--s3-endpoint" in message
    assert time.monotonic() - t0 < 60  # pyarrow's own retries, not Ray's minutes-long ones
    assert not (tmp_path / "out").exists()


def _batch(uri: str) -> dict[str, np.ndarray]:
    return {Col.IMAGE_ID: np.array([1]), Col.IMAGE_URI: np.array([uri], dtype=object)}


def test_a_transient_read_error_is_raised_for_a_retry_not_written_as_an_error_row():
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OSError, match="AWS Error NETWORK_CONNECTION"):
        fetch_bytes(_batch("s3://in-bucket/a.jpg"), s3_endpoint=dead)


def test_a_missing_object_is_an_error_row(s3_endpoint):
    _s3(s3_endpoint).create_bucket(Bucket="faults-missing")
    out = fetch_bytes(_batch("s3://faults-missing/nope.jpg"), s3_endpoint=s3_endpoint)
    assert out[Col.BYTES][0] == b""
    assert "s3://faults-missing/nope.jpg: could not be read" in out[Col.ERROR][0]


class Outage:
    """Freezes ``moto`` once ``after`` images parts are in the bucket, for ``seconds``
    (None: until ``end()``), from a background thread."""

    def __init__(self, moto: MotoServer, s3, bucket: str, *, after: int, seconds: float | None):
        self.moto, self.s3, self.bucket = moto, s3, bucket
        self.after, self.seconds = after, seconds
        self.began: float | None = None
        self.ended: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def parts(self) -> int:
        listing = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="run/images/")
        return len(listing.get("Contents", []))

    def _run(self) -> None:
        while not self._stop.is_set() and self.parts() < self.after:
            time.sleep(0.2)
        if self._stop.is_set():
            return
        self.moto.pause()
        self.began = time.monotonic()
        if self.seconds is not None:
            self._stop.wait(self.seconds)
            self.end()

    def end(self) -> None:
        self._stop.set()
        if self.began is not None and self.ended is None:
            self.moto.resume()
            self.ended = time.monotonic()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)


BUCKET = "faults-out"
OUT = f"s3://{BUCKET}/run"


def _setup(tiny_setup, tmp_path, moto, n, bucket=BUCKET):
    write_jpegs(tmp_path / "images", n)
    s3 = _s3(moto.url)
    s3.create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/run"
    return s3, make_job(tiny_setup, tmp_path / "images", out, s3_endpoint=moto.url)


def _retry_log_lines(bucket: str) -> list[str]:
    """Ray Data's "Retrying attempt N to apply UDF transform" lines about ``bucket``."""
    import ray

    log = Path(ray._private.worker._global_node.get_logs_dir_path()) / "ray-data/ray-data.log"
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [ln for ln in lines if "Retrying attempt" in ln and f"bucket '{bucket}'" in ln]


def test_outage_longer_than_the_retries_fails_clearly_then_rerun_resumes(
    tiny_setup, tmp_path, moto, monkeypatch
):
    monkeypatch.setattr(
        "refseg.pipeline.dataflow.graph.IO_RETRIES", 1
    )  # fail sooner: 2 attempts of a part
    n = 24  # with 8 the fast decoder had written every part before the outage began
    s3, job = _setup(tiny_setup, tmp_path, moto, n)
    outage = Outage(moto, s3, BUCKET, after=2, seconds=None)
    try:
        with pytest.raises(OSError) as info:
            run_label(job)
    finally:
        outage.end()
    assert outage.began is not None, "the job ended before the outage began"
    message = str(info.value)
    print(f"\noutage: failed {outage.ended - outage.began:.0f} s after it began: {message}")
    assert message.startswith("the labelling job stopped: OSError: ")
    assert BUCKET in message and "AWS Error NETWORK_CONNECTION" in message
    assert "after 2/2 attempts" in message  # Ray Data's retry of the part write
    assert "rerun the same command" in message and "\n" not in message
    finished = image_ids(OUT, s3_endpoint=moto.url)
    assert 2 <= len(finished) < n and len(finished) == len(set(finished))
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert "run/coco_results.json" not in keys  # the failed run wrote no final files

    summary = run_label(job)
    ids = image_ids(OUT, s3_endpoint=moto.url)
    assert len(ids) == len(set(ids)) == n  # nothing lost, nothing doubled
    assert (summary.skipped_done, summary.images) == (len(finished), n - len(finished))


@pytest.mark.slow
def test_outage_shorter_than_the_retries_is_ridden_out(tiny_setup, tmp_path, moto):
    """40 s without S3 mid-run, longer than the S3 client's own three attempts (~11 s): Ray Data
    retries the part writes and the job completes as if nothing happened."""
    n, bucket = 10, "faults-short"
    s3, job = _setup(tiny_setup, tmp_path, moto, n, bucket)
    outage = Outage(moto, s3, bucket, after=2, seconds=40)
    try:
        summary = run_label(job)
    finally:
        outage.end()
    assert outage.began is not None and outage.ended is not None
    ids = image_ids(f"s3://{bucket}/run", s3_endpoint=moto.url)
    assert len(ids) == len(set(ids)) == n and (summary.images, summary.ok) == (n, n)
    retries = _retry_log_lines(bucket)
    print(f"\nshort outage: {len(retries)} part writes retried by Ray Data")
    assert retries, "no write was retried: the outage did not hit a write"
