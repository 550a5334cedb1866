"""Fault injection, bad inputs: one labelling job over a folder of odd files and crafted names.

Each odd file (issue 6, item 4) is one table row: it is labelled (with its true size) or it
is an error row whose message names the file and the problem, and the good images of the
same batches are labelled. Crafted file names (item 7) are plain images: they are labelled,
and neither the job nor ``refseg export`` writes anything outside OUT / the export folder.
Per-file decoding itself is unit-tested in test_imaging.py; this is the job-level view.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from refseg.core.instances import Instances
from refseg.jobs.export import export_run
from refseg.jobs.report import write_report
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.job import run_label
from refseg.pipeline.schema import image_id_from_uri

from tests.faults_util import bad_image_cases, make_job, read_parts, write_jpegs

pytestmark = pytest.mark.usefixtures("ray_local")

CASES = bad_image_cases()
# names that would escape a folder or run a command if a writer trusted them
CRAFTED = [
    "%2e%2e%2f%2e%2e%2fescape.jpg",
    "x..\\..\\escape.jpg",
    "a..b.jpg",
    "$(touch pwned);.jpg",
    "-rf --no-preserve-root.jpg",
    "ünï cödé 画像.jpg",
]
UNDERSCORE = "_DSC0001.jpg"
FIXED_NAME = re.compile(r"[a-z0-9_-]+\.[a-z]+")  # OUT's own file names
ENDPOINT_PASSWORD = "endpoint-PASSWORD-42"
# batches mixing good and bad files
SETTINGS = PipelineSettings(
    decode_batch_size=8, proposal_batch_size=4, match_batch_size=4, write_batch_size=8
)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def bad_run(tiny_setup, tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("bad_inputs")
    images = root / "images"
    good = write_jpegs(images, 3)
    for case in CASES.values():
        (images / case.name).write_bytes(case.data)
    (images / UNDERSCORE).write_bytes(good[0].read_bytes())
    for i, name in enumerate(CRAFTED):
        (images / name).write_bytes(write_jpegs(root / "src", 1, start=20 + i)[0].read_bytes())
    before = _tree(root)
    cwd_before = set(os.listdir())
    out = root / "out"
    # credentials in the environment and in a URI the user typed: none may be written out
    token, old_token = "session-token-SECRET-7f3a", os.environ.get("AWS_SESSION_TOKEN")
    os.environ["AWS_SESSION_TOKEN"] = token
    endpoint = f"http://refseg-user:{ENDPOINT_PASSWORD}@127.0.0.1:9"  # never contacted
    records, root_logger = _Records(), logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(records)
    root_logger.setLevel(logging.DEBUG)
    try:
        job = make_job(tiny_setup, images, out, settings=SETTINGS, s3_endpoint=endpoint)
        summary = run_label(job)
        write_report(str(out))
    finally:
        root_logger.removeHandler(records)
        root_logger.setLevel(old_level)
        if old_token is None:
            os.environ.pop("AWS_SESSION_TOKEN")
        else:
            os.environ["AWS_SESSION_TOKEN"] = old_token
    rows = {Path(r["image_uri"]).name: r for r in read_parts(str(out), "images").to_pylist()}
    return {
        "root": root,
        "images": images,
        "good": [p.name for p in good],
        "out": out,
        "summary": summary,
        "rows": rows,
        "before": before,
        "cwd_before": cwd_before,
        "secrets": [os.environ["AWS_SECRET_ACCESS_KEY"], token, ENDPOINT_PASSWORD],
        "logs": records.lines,
    }


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_image_row(bad_run, case):
    row = bad_run["rows"][case.name]
    assert row["image_id"] == image_id_from_uri(str(bad_run["images"] / case.name))
    if case.error is None:
        assert (row["status"], row["error"]) == ("ok", None)
        assert (row["width"], row["height"]) == case.size
        return
    assert row["status"] == "error" and row["n_instances"] == 0
    message = row["error"]
    assert case.name in message and case.error in message, message
    assert "Traceback" not in message and len(message) < 600  # one clear line


def test_a_file_named_with_a_leading_underscore_is_labelled(bad_run):
    """Camera files such as _DSC0001.jpg are listed (Ray's own folder reader skips them)."""
    assert bad_run["rows"][UNDERSCORE]["status"] == "ok"


def test_every_file_is_one_row_and_good_images_are_labelled(bad_run):
    rows, s = bad_run["rows"], bad_run["summary"]
    names = [*bad_run["good"], *(c.name for c in CASES.values()), *CRAFTED, UNDERSCORE]
    ids = read_parts(str(bad_run["out"]), "images").column("image_id").to_pylist()
    assert sorted(rows) == sorted(names) and len(ids) == len(set(ids)) == len(names)
    n_err = sum(c.error is not None for c in CASES.values())
    assert (s.images, s.ok, s.errors) == (len(names), len(names) - n_err, n_err)
    for name in [*bad_run["good"], *CRAFTED, UNDERSCORE]:
        assert (rows[name]["status"], rows[name]["error"]) == ("ok", None), name


def test_error_and_ok_rows_shared_batches(bad_run):
    """Write batches are the part files: at least one mixes error rows and labelled rows."""
    loc = bad_run["out"] / "images"
    mixed = [
        p.name
        for p in loc.glob("part-*.parquet")
        if {"ok", "error"} <= set(pq.read_table(p).column("status").to_pylist())
    ]
    assert mixed


def test_instances_fit_their_images(bad_run):
    by_id = {r["image_id"]: r for r in bad_run["rows"].values()}
    inst = read_parts(str(bad_run["out"]), "instances").to_pylist()
    assert len(inst) == sum(r["n_instances"] for r in by_id.values())
    for r in inst:
        img = by_id[r["image_id"]]
        assert img["status"] == "ok"
        assert list(r["segmentation"]["size"]) == [img["height"], img["width"]]


def test_an_image_without_instances_is_an_ok_row_not_an_error():
    """Regression: ``Instances.empty`` (nothing matched) failed to encode in MatchStage."""
    empty = Instances.empty((36, 52)).with_rles(drop_masks=True)
    assert empty.rles == () and empty.to_arrow(7, "x.jpg", {3: "car"}).num_rows == 0


def test_crafted_names_write_nothing_outside_out(bad_run, tmp_path):
    root, out = bad_run["root"], bad_run["out"]
    created = _tree(root) - bad_run["before"]
    allowed_top = {"out/images", "out/instances"}
    for rel in created:
        parent = str(Path(rel).parent)
        assert rel.startswith("out"), rel
        assert (
            rel in ("out", *allowed_top)
            or (parent in allowed_top and Path(rel).name.startswith("part-"))
            or rel in [f"out/{n}" for n in ("coco_results.json", "coco_dataset.json", "run.json")]
            or rel == "out/progress.json"
            or rel == "out/report.html"
            # OUT's index and COCO shards (pipeline/store/layout.py): fixed names, never
            # derived from an image's name
            or rel in ("out/index", "out/coco")
            or (parent in ("out/index", "out/coco") and FIXED_NAME.fullmatch(Path(rel).name))
        ), rel
    assert set(os.listdir()) == bad_run["cwd_before"]  # e.g. no "pwned" in the cwd
    dest = tmp_path / "export"
    before = _tree(root)
    export_run(str(out), "yolo-seg", dest=str(dest), link_images=True)
    assert _tree(root) == before
    assert all(w.startswith("export") for w in _tree(tmp_path))
    labels = {p.name for p in (dest / "labels").iterdir()}
    assert {f"{Path(n).stem}.txt" for n in CRAFTED} <= labels
    for link in (dest / "images").iterdir():
        assert link.is_symlink() and link.resolve().parent == bad_run["images"].resolve()


def test_credentials_never_reach_run_json_logs_or_report(bad_run):
    import ray

    secrets = bad_run["secrets"]
    assert all(len(x) > 8 for x in secrets)
    texts = {"log records": "\n".join(bad_run["logs"])}
    for name in ("run.json", "report.html", "coco_dataset.json", "coco_results.json"):
        texts[name] = (bad_run["out"] / name).read_text(errors="replace")
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())  # this Ray's logs
    for p in logs_dir.rglob("*"):
        if p.is_file():
            texts[f"ray logs/{p.name}"] = p.read_text(errors="replace")
    assert len(bad_run["logs"]) > 10 and len(texts) > 10  # there was something to search
    leaks = [(name, s) for name, text in texts.items() for s in secrets if s in text]
    assert not leaks, leaks
    run = json.loads(texts["run.json"])
    assert run["config"]["source"]["s3_endpoint"] == "http://<redacted>@127.0.0.1:9"
