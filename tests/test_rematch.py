"""``refseg label --cache-proposals`` and ``refseg rematch``: a new bank without SAM2.

Local Ray with 2 CPUs, the tiny preset with random weights. The cache is made with one bank
(A); a rematch with another bank (B) must give the instances of a full labelling run with
B on the same images: same categories and masks, scores within 1e-5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.core.memory_bank import MemoryBank, ShotRecord, encode_shot
from refseg.core.transport import decode_proposals
from refseg.jobs.cli import main
from refseg.pipeline.dataflow.proposal_cache import PROPOSALS_SCHEMA, pooled_from_bytes
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.dataflow.sources import ImageSource
from refseg.pipeline.job import LabelJob, run_label
from refseg.pipeline.rematch import RematchJob, configs_of, open_cache, run_rematch
from refseg.pipeline.schema import IMAGES_SCHEMA

from tests.conftest import write_images

pytestmark = pytest.mark.usefixtures("ray_local")
SETTINGS = PipelineSettings(write_batch_size=3, proposal_batch_size=2, match_batch_size=2)


def _table(folder: Path, kind: str) -> pa.Table:
    files = sorted((folder / kind).glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def _job(tiny, bank: str, images: Path, out: Path, **kw) -> LabelJob:
    return LabelJob(
        memory=bank,
        source=ImageSource(str(images)),
        out=str(out),
        model=tiny["model"],
        method=tiny["method"],
        settings=SETTINGS,
        preset="tiny",
        **kw,
    )


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


@pytest.fixture(scope="module")
def bank_b(tiny_setup, tmp_path_factory) -> str:
    """Three classes, other shots than bank A (same random-weight encoder)."""
    from refseg.core.factory import build_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = build_encoder(tiny_setup["model"], tiny_setup["method"])
    rng = np.random.default_rng(7)
    bank = MemoryBank(encoder=enc.name, image_size=enc.image_size)
    for k, (cid, name) in enumerate(((3, "car"), (5, "dog"), (17, "cat"))):
        img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        mask = np.zeros((96, 128), bool)
        mask[10 + 5 * k : 70, 20 : 100 - 9 * k] = True
        box = (20.0, 10.0 + 5 * k, 80.0 - 9 * k, 60.0 - 5 * k)
        bank.add(ShotRecord(cid, 10 + k, 100 + k), encode_shot(enc, img, mask, box), name)
    path = tmp_path_factory.mktemp("bank_b") / "b.safetensors"
    bank.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def runs(tiny_setup, bank_b, tmp_path_factory):
    root = tmp_path_factory.mktemp("rematch")
    images = root / "images"
    write_images(images, 6)
    (images / "broken.jpg").write_bytes(b"not an image")
    cached = root / "cached"  # bank A, with the cache
    run_label(_job(tiny_setup, tiny_setup["bank"], images, cached, cache_proposals=True))
    full = root / "full"  # bank B, the full pipeline
    run_label(_job(tiny_setup, bank_b, images, full))
    cache = open_cache(str(cached))
    preset, model, method = configs_of(cache)
    new = root / "new"
    summary = run_rematch(
        RematchJob(cache, bank_b, str(new), model, method, settings=SETTINGS, preset=preset)
    )
    return {"root": root, "images": images, "cached": cached, "full": full, "new": new,
            "summary": summary}  # fmt: skip


def _by_image(folder: Path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in _table(folder, "instances").to_pylist():
        out.setdefault(r["image_id"], []).append(r)
    return out


def test_cache_parts_hold_every_image_and_run_json_says_what_shaped_them(runs, tiny_setup):
    cache = _table(runs["cached"], "proposals")
    assert cache.schema.equals(PROPOSALS_SCHEMA)
    images = _table(runs["cached"], "images")
    assert sorted(cache.column("image_id").to_pylist()) == sorted(
        images.column("image_id").to_pylist()
    )
    for r in cache.to_pylist():
        if r["status"] != "ok":
            assert r["proposals"] == b"" and "broken.jpg" in r["error"]
            continue
        props = decode_proposals(r["proposals"])
        assert len(props) == r["n_proposals"] > 0 and props.orig_hw == (r["height"], r["width"])
        pooled = pooled_from_bytes(r["pooled"], r["n_pooled"], r["feature_dim"])
        assert pooled.shape == (r["n_pooled"], 384) and bool(pooled.isfinite().all())
    info = json.loads((runs["cached"] / "run.json").read_text())["proposal_cache"]
    assert info["encoder"] == {"dinov2_model": "vits14", "dinov2_image_size": 112,
                               "dinov2_sha256": None}  # fmt: skip
    assert info["sam2"]["sam2_config"] == "sam2.1_hiera_t" and info["random_weights"] is True
    assert info["method"]["points_per_side"] == 8 and info["method"]["resize"] == "square"
    assert "nms_iou" not in info["method"]  # acts after the proposals: a rematch may change it


def test_rematch_equals_a_full_labelling_run_with_the_new_bank(runs):
    full, new = _by_image(runs["full"]), _by_image(runs["new"])
    assert set(full) == set(new) and sum(len(v) for v in full.values()) > 0
    for image_id, rows in full.items():
        got = new[image_id]
        assert [r["category_id"] for r in got] == [r["category_id"] for r in rows]
        assert {r["category_id"] for r in rows} <= {3, 5, 17}
        assert [r["segmentation"] for r in got] == [r["segmentation"] for r in rows]
        assert [r["bbox"] for r in got] == [r["bbox"] for r in rows]
        np.testing.assert_allclose(
            [r["score"] for r in got], [r["score"] for r in rows], rtol=0, atol=1e-5
        )
    assert _table(runs["new"], "instances").schema.equals(INSTANCES_SCHEMA)


def test_rematch_writes_what_label_writes(runs):
    new, full = runs["new"], runs["full"]
    assert {p.name for p in new.iterdir()} >= {
        "instances", "images", "coco_results.json", "coco_dataset.json", "run.json"
    }  # fmt: skip
    assert not (new / "proposals").exists()
    keep = ["image_id", "image_uri", "width", "height", "status", "error", "n_instances"]
    a, b = (_table(f, "images") for f in (new, full))
    assert a.schema.equals(IMAGES_SCHEMA)
    assert sorted(a.select(keep).to_pylist(), key=lambda r: r["image_id"]) == sorted(
        b.select(keep).to_pylist(), key=lambda r: r["image_id"]
    )
    for name in ("coco_results.json", "coco_dataset.json"):
        got, want = (json.loads((f / name).read_text()) for f in (new, full))
        if name == "coco_dataset.json":
            assert got["categories"] == want["categories"]
            got, want = got["annotations"], want["annotations"]
        key = lambda r: (r["image_id"], -r["score"], r["category_id"])  # noqa: E731
        assert len(got) == len(want)
        for g, w in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
            assert g["segmentation"] == w["segmentation"] and g["category_id"] == w["category_id"]
    record = json.loads((new / "run.json").read_text())
    assert record["rematch"]["run"] == str(runs["cached"])
    assert record["proposal_cache"]["location"] == str(runs["cached"])
    assert record["counts"]["total"]["images"] == 7 and record["memory_bank"]["categories"] == {
        "car": 1, "dog": 1, "cat": 1
    }  # fmt: skip
    s = runs["summary"]
    assert (s.images, s.ok, s.errors) == (7, 6, 1)


def test_rematch_cli_changes_what_acts_after_the_proposals_and_resumes(runs, bank_b):
    out = runs["root"] / "top2"
    argv = ["rematch", str(runs["cached"]), "--memory", bank_b, "--out", str(out),
            "--max-instances", "2", "--write-batch-size", "4", "--num-cpus", "2"]  # fmt: skip
    rc, stdout, err = _run(argv)
    assert rc == 0, err
    assert "refseg rematch: 7 images (6 ok, 1 errors)" in stdout
    top, everything = _by_image(out), _by_image(runs["new"])
    for image_id, rows in everything.items():  # top-k is the last step: a prefix
        assert [r["segmentation"] for r in top.get(image_id, [])] == [
            r["segmentation"] for r in rows[:2]
        ]
    rc, stdout, err = _run(argv)  # the same command again: nothing left to do
    assert rc == 0 and "0 images" in stdout and "7 already done" in stdout
    # a rematch of the rematch follows it to the cache
    rc, stdout, err = _run(["rematch", str(out), "--memory", bank_b, "--out",
                            str(runs["root"] / "again"), "--num-cpus", "2"])  # fmt: skip
    assert rc == 0, err
    assert _by_image(runs["root"] / "again") == everything


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--points-per-side", "4"], "points_per_side (cache: 8, asked: 4)"),
        (["--resize", "longest-side"], "resize (cache: 'square', asked: 'longest-side')"),
        (["--iou-threshold", "0.6"], "iou_threshold"),
        (["--sam2-config", "sam2_hiera_t"], "sam2_config"),
        (["--preset", "ntt"], "was labelled with --preset tiny"),
    ],
)
def test_rematch_refuses_settings_that_shaped_the_cache(runs, bank_b, extra, expected):
    rc, _, err = _run(["rematch", str(runs["cached"]), "--memory", bank_b,
                       "--out", str(runs["root"] / "refused"), *extra])  # fmt: skip
    assert rc == 2 and expected in err and "refseg label --cache-proposals" in err
    assert "Traceback" not in err and not (runs["root"] / "refused").exists()


def test_rematch_refuses_a_bank_of_another_encoder_and_a_run_without_cache(runs, tmp_path):
    other = MemoryBank(encoder="vitb14", image_size=112)
    other.add(ShotRecord(3, 1, 1), torch.ones(768), "car")
    vitb = str(tmp_path / "vitb.safetensors")
    other.save(vitb)
    rc, _, err = _run(
        ["rematch", str(runs["cached"]), "--memory", vitb, "--out", str(tmp_path / "o")]
    )
    assert rc == 2 and "'vitb14'" in err and "rebuild the bank" in err
    rc, _, err = _run(
        ["rematch", str(runs["full"]), "--memory", vitb, "--out", str(tmp_path / "o")]
    )
    assert (
        rc == 2 and "without --cache-proposals" in err and "refseg label --cache-proposals" in err
    )
    rc, _, err = _run(["rematch", str(tmp_path), "--memory", vitb, "--out", str(tmp_path / "o")])
    assert rc == 2 and "no run.json" in err


def test_label_refuses_to_switch_the_cache_on_or_off_half_way(runs, tiny_setup, bank_b):
    with pytest.raises(ValueError, match="labelled without --cache-proposals"):
        run_label(_job(tiny_setup, bank_b, runs["images"], runs["full"], cache_proposals=True))
    with pytest.raises(ValueError, match="rerun with --cache-proposals"):
        run_label(_job(tiny_setup, tiny_setup["bank"], runs["images"], runs["cached"]))


def test_interrupted_cache_parts_are_removed_and_redone(runs, tiny_setup):
    """A proposals part without its images part is an interrupted batch, like instances."""
    import shutil

    run = runs["root"] / "resume"
    shutil.copytree(runs["cached"], run)
    victim = sorted((run / "images").glob("part-*.parquet"))[0]
    lost = pq.read_table(victim).num_rows
    victim.unlink()
    assert (run / "proposals" / victim.name).exists()
    job = dataclasses.replace(
        _job(tiny_setup, tiny_setup["bank"], runs["images"], run), cache_proposals=True
    )
    s = run_label(job)
    assert s.images == lost and s.skipped_done == 7 - lost
    ids = _table(run, "proposals").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(_table(run, "images")) == 7


def test_cache_write_and_read_tasks_do_not_import_torch():
    from tests.test_layers import _imported_after

    loaded = _imported_after(
        ["refseg.pipeline.store.layout", "refseg.pipeline.dataflow.proposal_cache"]
    )
    assert "refseg.pipeline.dataflow.proposal_cache" in loaded and not loaded & {
        "torch",
        "sam2",
        "timm",
    }


def test_the_review_loop_end_to_end(runs, tiny_setup, tmp_path):
    """label --cache-proposals, export, review, import-review, build-memory --add, rematch,
    report --compare: the README's loop through the CLI (random weights: plumbing only)."""
    import shutil

    cached = str(runs["cached"])
    rc, _, err = _run(
        ["export", cached, "--format", "label-studio", "--dest", str(tmp_path / "ls")]
    )
    assert rc == 0, err
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    reviewed = []  # Label Studio's export after a review: the first region of each task deleted
    for n, t in enumerate(tasks, 1):
        result = t["predictions"][0]["result"][1:]
        ann = {"id": n, "result": result, "was_cancelled": False, "ground_truth": False,
               "updated_at": "2026-11-26T10:00:00Z", "task": n}  # fmt: skip
        reviewed.append({"id": n, "data": t["data"], "annotations": [ann], "predictions": [n]})
    deleted = sum(1 for t in tasks if t["predictions"][0]["result"])
    assert deleted > 0
    (tmp_path / "export.json").write_text(json.dumps(reviewed))
    corrections = str(tmp_path / "corrections.json")
    rc, out, err = _run(["import-review", cached, "--from", str(tmp_path / "export.json"),
                         "--out", corrections])  # fmt: skip
    assert rc == 0, err
    assert f"0 new shots, {deleted} negatives" in out
    bank = str(tmp_path / "bank.safetensors")
    shutil.copy(tiny_setup["bank"], bank)
    add = ["build-memory", "--add", "--out", bank, "--negatives", corrections,
           "--references", corrections, "--preset", "tiny", "--random-weights"]  # fmt: skip
    rc, out, err = _run(add)
    assert rc == 0, err
    assert 0 < sum(t.shape[0] for t in MemoryBank.load(bank).negatives.values()) <= deleted
    rc, _, err = _run(["rematch", cached, "--memory", bank, "--out", str(tmp_path / "v2"),
                       "--num-cpus", "2"])  # fmt: skip
    assert rc == 0, err
    rc, out, err = _run(["report", str(tmp_path / "v2"), "--compare", cached])
    assert rc == 0, err
    assert "before" in out and "images labelled differently" in out
    assert '<section id="changes">' in (tmp_path / "v2" / "report.html").read_text()


def test_check_fits_compares_checkpoint_hashes(runs):
    """Checkpoints are compared by hash: the cache's against the bank's and the flags'."""
    import dataclasses as dc

    from refseg.pipeline.rematch import check_fits

    cache = open_cache(str(runs["cached"]))
    info = json.loads(json.dumps(cache.info))
    info["encoder"]["dinov2_sha256"] = "d" * 64
    info["sam2"]["sam2_sha256"] = "s" * 64
    real = dc.replace(cache, info=info)
    _, model, method = configs_of(cache)
    bank = MemoryBank(encoder="vits14", image_size=112, meta={"dinov2_sha256": "e" * 64})
    bank.add(ShotRecord(3, 1, 1), torch.ones(384), "car")
    with pytest.raises(ValueError, match=r"DINOv2 weights e+, but the proposal cache"):
        check_fits(real, bank, model=model, method=method)
    bank.meta["dinov2_sha256"] = "d" * 64
    check_fits(real, bank, model=model, method=method)  # same weights: fits
    with pytest.raises(ValueError, match="sam2_checkpoint"):
        check_fits(real, bank, model=model, method=method, checkpoints={"sam2": "t" * 64})


def test_rematch_accepts_what_the_label_fingerprint_ignores(runs, bank_b):
    """One list of runtime-only settings: what label's fingerprint ignores, a rematch
    accepts (and a setting in neither list is refused by both)."""
    import dataclasses as dc

    from refseg.core.config import RUNTIME_METHOD_FIELDS, RUNTIME_MODEL_FIELDS
    from refseg.pipeline.rematch import check_fits
    from refseg.pipeline.run_steps import config_fingerprint

    cache = open_cache(str(runs["cached"]))
    _, model, method = configs_of(cache)
    bank = MemoryBank.load(bank_b)
    other = {"decoder": "stock", "prompt_batch": 32, "device": "cuda:1", "compile": True}
    assert set(other) == set(RUNTIME_METHOD_FIELDS) | set(RUNTIME_MODEL_FIELDS)
    base = config_fingerprint(model, method, "bank")
    for name, value in other.items():
        m2 = dc.replace(method, **{name: value}) if name in RUNTIME_METHOD_FIELDS else method
        mo2 = dc.replace(model, **{name: value}) if name in RUNTIME_MODEL_FIELDS else model
        assert config_fingerprint(mo2, m2, "bank") == base, name
        check_fits(cache, bank, model=mo2, method=m2)  # accepted
    shaped = dc.replace(method, iou_threshold=0.9)
    assert config_fingerprint(model, shaped, "bank") != base
    with pytest.raises(ValueError, match="iou_threshold"):
        check_fits(cache, bank, model=model, method=shaped)
    rc, _, err = _run(["rematch", str(runs["cached"]), "--memory", bank_b, "--out",
                            str(runs["root"] / "stock"), "--decoder", "stock",
                            "--prompt-batch", "32", "--num-cpus", "2"])  # fmt: skip
    assert rc == 0, err
    assert _by_image(runs["root"] / "stock") == _by_image(runs["new"])
