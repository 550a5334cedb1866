"""The README's "Python API" examples, run as they are written (tiny preset, random weights).

Each ```python block of that section runs in a fresh namespace, in order, in a folder
holding what the README says they expect (refs/, photos/, manifest.parquet); their outputs
are then checked.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from refseg.jobs.sample_data import make_sample_data

README = Path(__file__).resolve().parents[1] / "README.md"


def _examples() -> list[str]:
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_api")
    data = make_sample_data(root / "sample", n_images=3)
    refs = json.loads(data.references.read_text())
    (root / "refs").mkdir()
    from refseg.core import rle

    names = {c["id"]: c["name"] for c in refs["categories"]}
    images = {im["id"]: im for im in refs["images"]}
    for ann in refs["annotations"]:
        name = names[ann["category_id"]]
        if (root / "refs" / f"{name}.png").exists():
            continue
        im = images[ann["image_id"]]
        mask = rle.decode_rle(rle.annotation_to_rle(ann, im["height"], im["width"]))
        Image.open(data.references_dir / im["file_name"]).save(root / "refs" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "refs" / f"{name}_mask.png")
    (root / "photos").symlink_to(data.images)
    paths = sorted(str(p) for p in data.images.glob("*.png"))
    pq.write_table(pa.table({"path": [*paths, str(root / "notes.txt")]}), root / "manifest.parquet")
    return root


def test_the_readme_has_three_api_examples():
    examples = _examples()
    assert len(examples) == 3
    assert "Shot(" in examples[0] and "Labeller" in examples[1]
    assert "label_dataset" in examples[2]


def test_the_readme_api_examples_run(workdir, ray_local):
    here = os.getcwd()
    os.chdir(workdir)
    outputs = []
    try:
        for code in _examples():
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
            outputs.append(stdout.getvalue())
    finally:
        os.chdir(here)
    # 1: a bank of the two classes, one shot each
    assert "{1: 'disc', 4: 'square'} 2 shots" in outputs[0]
    from refseg.core.memory_bank import MemoryBank

    bank = MemoryBank.load(str(workdir / "bank.safetensors"))
    assert bank.category_ids == [1, 4]
    # 2: one line per image with its mask array's shape at the image's size (144 x 192)
    lines = outputs[1].strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["0", "1"]
    assert all(ln.endswith(", 144, 192)") for ln in lines), lines
    # 3: instance rows in OUT/instances' schema, for the three PNGs of the manifest only
    table = pq.read_table(workdir / "labels")
    from refseg.core.instances import INSTANCES_SCHEMA

    assert set(INSTANCES_SCHEMA.names) <= set(table.column_names)
    uris = set(table.column("image_uri").to_pylist())
    assert uris and uris <= {str(p) for p in (workdir / "sample" / "images").glob("*.png")}
    assert set(table.column("category_id").to_pylist()) <= {1, 4}
