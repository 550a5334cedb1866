"""The public Python API: one list of names, each documented and typed, and each doing
what the command line does (the commands are layers over it)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from refseg.jobs.sample_data import make_sample_data

import refseg

#: The public API. A name added to refseg.__all__ must be added here too, deliberately.
PUBLIC = {
    "BankUpdate",
    "ImageSource",
    "Instances",
    "JobSummary",
    "LabelJob",
    "Labeller",
    "MemoryBank",
    "MethodConfig",
    "ModelConfig",
    "PipelineSettings",
    "RematchJob",
    "Shot",
    "build_memory_bank",
    "evaluate",
    "label_dataset",
    "load_image",
    "open_cache",
    "preset_configs",
    "run_label",
    "run_rematch",
}


def _unannotated(fn) -> list[str]:
    hints = typing.get_type_hints(fn)
    sig = inspect.signature(fn)
    missing = [n for n in sig.parameters if n not in ("self", "cls") and n not in hints]
    if "return" not in hints and fn.__name__ != "__init__":
        missing.append("return")
    return missing


def test_the_public_names_are_one_list():
    assert set(refseg.__all__) == PUBLIC
    assert len(refseg.__all__) == len(PUBLIC)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_has_a_docstring_and_type_hints(name):
    obj = getattr(refseg, name)
    assert inspect.getdoc(obj) and len(inspect.getdoc(obj)) > 40, f"{name} needs a docstring"
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj):
            hints = typing.get_type_hints(obj)
            assert all(f.name in hints for f in dataclasses.fields(obj)), name
        elif "__init__" in vars(obj):
            assert not _unannotated(obj.__init__), (name, _unannotated(obj.__init__))
        for attr, member in vars(obj).items():
            if isinstance(member, classmethod | staticmethod):
                member = member.__func__
            if attr.startswith("_") or not inspect.isfunction(member):
                continue
            assert inspect.getdoc(member), f"{name}.{attr} needs a docstring"
            assert not _unannotated(member), (f"{name}.{attr}", _unannotated(member))
    else:
        assert callable(obj)
        assert not _unannotated(obj), (name, _unannotated(obj))


def test_importing_refseg_is_light():
    import subprocess
    import sys

    code = "import sys, refseg; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    data = make_sample_data(tmp_path_factory.mktemp("api") / "data", n_images=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bank = refseg.build_memory_bank(
            references=str(data.references),
            images=str(data.references_dir),
            preset="tiny",
            random_weights=True,
        ).bank
        labeller = refseg.Labeller.from_preset(bank, "tiny", random_weights=True)
    return data, bank, labeller


def test_labeller_takes_paths_pil_images_and_arrays_alike(sample):
    data, bank, labeller = sample
    path = sorted(data.images.glob("*.png"))[0]
    array = np.asarray(Image.open(path).convert("RGB"))
    by_path = labeller(str(path))
    by_pil, by_array = labeller([Image.open(path), array])
    gray = labeller(array[:, :, 0])
    for other in (by_pil, by_array):
        assert np.array_equal(other.scores, by_path.scores)
        assert np.array_equal(other.masks, by_path.masks)
        assert other.rles == by_path.rles
    assert by_path.masks.shape == (len(by_path), *array.shape[:2])
    assert gray.image_size == by_path.image_size
    # the in-process loop the pipeline's stages share
    from refseg.core.segmenter import Segmenter

    direct = Segmenter(labeller.segmenter.proposer, labeller.segmenter.matcher)([array])[0]
    assert np.array_equal(direct.scores, by_path.scores)
    assert set(by_path.category_ids.tolist()) <= set(bank.category_ids)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (np.zeros((4, 4, 4), np.uint8), "alpha"),
        (42, "path or URI, a PIL image or a uint8 numpy array"),
    ],
)
def test_labeller_refuses_other_inputs_clearly(sample, bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        sample[2]([bad])


def test_coco_results_and_supervision(sample):
    data, bank, labeller = sample
    inst = labeller(str(sorted(data.images.glob("*.png"))[1]))
    results = inst.to_coco_results(7)
    assert len(results) == len(inst)
    assert all(r["image_id"] == 7 and "counts" in r["segmentation"] for r in results)
    json.dumps(results)  # JSON-ready
    det = inst.to_supervision(labeller.category_names)
    assert len(det) == len(inst)
    assert np.array_equal(det.mask, inst.masks) and np.array_equal(det.class_id, inst.category_ids)
    assert list(det.data["class_name"]) == [bank.names[int(c)] for c in inst.category_ids]


def test_a_bank_from_arrays_equals_the_bank_from_the_same_coco(sample):
    """Shot arrays go through the same encoding as a COCO reference file."""
    from refseg.core import rle

    data, bank, _ = sample
    refs = json.loads(data.references.read_text())
    images = {im["id"]: im for im in refs["images"]}
    names = {c["id"]: c["name"] for c in refs["categories"]}
    shots = []
    for ann in refs["annotations"]:
        im = images[ann["image_id"]]
        mask = rle.decode_rle(rle.annotation_to_rle(ann, im["height"], im["width"])).astype(bool)
        image = data.references_dir / im["file_name"]
        shots.append(refseg.Shot(str(image), mask, ann["category_id"], names[ann["category_id"]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_arrays = refseg.build_memory_bank(shots, preset="tiny", random_weights=True).bank
    assert from_arrays.category_ids == bank.category_ids
    for cid in bank.category_ids:
        np.testing.assert_allclose(from_arrays.shots[cid], bank.shots[cid], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="mask must be"):
        refseg.build_memory_bank([dataclasses.replace(shots[0], mask=shots[0].mask[:5])])


def test_label_dataset_gives_the_rows_refseg_label_writes(sample, tmp_path, ray_local):
    """A user's Ray Data pipeline (Parquet manifest of paths) gets the same instance rows
    as `refseg label` writes to OUT/instances for the same images and bank."""
    import ray.data

    data, bank, _ = sample
    bank_path = tmp_path / "bank.safetensors"
    bank.save(str(bank_path))
    paths = sorted(str(p) for p in data.images.glob("*.png"))
    model, method = refseg.preset_configs("tiny", random_weights=True)
    summary = refseg.run_label(
        refseg.LabelJob(
            memory=str(bank_path),
            source=refseg.ImageSource(images=str(data.images)),
            out=str(tmp_path / "out"),
            model=model,
            method=method,
            num_cpus=2,
        )
    )
    assert summary.images == len(paths)
    ds = ray.data.from_items([{"path": p} for p in paths])
    rows = refseg.label_dataset(
        ds, str(bank_path), preset="tiny", random_weights=True, bytes_column=None, uri_column="path"
    ).to_pandas()
    written = pq.read_table(tmp_path / "out" / "instances").to_pandas()

    def key(df):
        cols = ["image_uri", "category_id", "score"]
        return sorted(
            (r.image_uri, r.category_id, round(float(r.score), 6), r.segmentation["counts"])
            for r in df[[*cols, "segmentation"]].itertuples()
        )

    assert len(rows) == len(written) and key(rows) == key(written)
    images = refseg.label_dataset(
        ray.data.from_items([{"bytes": b"not an image"}]),
        str(bank_path),
        preset="tiny",
        random_weights=True,
        output="images",
    ).take_all()
    assert images[0]["status"] == "error" and images[0]["error"]


def test_every_public_name_is_exported_from_its_module():
    from refseg import _EXPORTS

    assert set(_EXPORTS) == set(refseg.__all__)
