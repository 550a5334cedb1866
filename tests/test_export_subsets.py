"""``refseg export --format coco`` of any subset (issue 19): score, classes, images.

The subset is chosen while streaming; ``--images`` reads only the parts that hold the
listed images (from OUT's index). No Ray: parts written by the job's writer.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pycocotools.coco import COCO
from refseg.core.instances import INSTANCES_SCHEMA
from refseg.jobs import run_read
from refseg.jobs.cli import main
from refseg.pipeline.dataflow.writer import instances_blob, write_parts
from refseg.pipeline.schema import Col
from refseg.pipeline.storage import resolve
from refseg.pipeline.store.record import write_run_record


def _instances(image_id: int) -> bytes:
    """Four instances: car 0.2, car 0.8, cat 0.3, cat 0.9."""
    cats, scores = [3, 3, 17, 17], [0.2, 0.8, 0.3, 0.9]
    table = pa.table(
        {
            "image_id": [image_id] * 4,
            "image_uri": [f"/x/{image_id}.jpg"] * 4,
            "category_id": cats,
            "category_name": ["car" if c == 3 else "cat" for c in cats],
            "score": scores,
            "bbox": [[1.0, 2.0, 3.0, 4.0]] * 4,
            "segmentation": [{"size": [8, 8], "counts": "04"}] * 4,
            "area": [12.0] * 4,
            "proposal_iou": [0.9] * 4,
        },
        schema=INSTANCES_SCHEMA,
    )
    return instances_blob(table)


@pytest.fixture
def run(tmp_path):
    out = resolve(str(tmp_path / "run"))
    for first in range(0, 12, 3):  # 4 parts of 3 images
        ids = np.arange(first, first + 3)
        batch = {
            Col.IMAGE_ID: ids,
            Col.IMAGE_URI: np.asarray([f"/x/{i}.jpg" for i in ids], dtype=object),
            Col.WIDTH: np.full(3, 8),
            Col.HEIGHT: np.full(3, 8),
            Col.STATUS: np.asarray(["ok"] * 3, dtype=object),
            Col.ERROR: np.asarray([""] * 3, dtype=object),
            Col.N_INSTANCES: np.full(3, 4, dtype=np.int32),
            Col.INSTANCES: np.asarray([_instances(int(i)) for i in ids], dtype=object),
            **{c: np.zeros(3) for c in (Col.T_DECODE, Col.T_PROPOSE, Col.T_MATCH, Col.T_ENCODE)},
        }
        write_parts(batch, out=out)
    refs = [{"category_id": 3, "category_name": "car"}, {"category_id": 17, "category_name": "cat"}]
    write_run_record(out, {"fingerprint": "f", "status": "complete", "references": refs})
    return tmp_path / "run"


def test_export_coco_keeps_the_score_class_and_image_subset(run, tmp_path, monkeypatch):
    wanted = tmp_path / "images.txt"
    wanted.write_text("1\n/x/4.jpg  # by URI\n\n")
    parts_read: list[str] = []
    real = run_read.read_tables

    def spy(locs, *a, **kw):
        parts_read.extend(loc.path for loc in locs)
        return real(locs, *a, **kw)

    monkeypatch.setattr(run_read, "read_tables", spy)
    dest = tmp_path / "export"
    argv = ["export", str(run), "--format", "coco", "--dest", str(dest)]
    argv += ["--score-threshold", "0.5", "--categories", "cat", "--images", str(wanted)]
    assert main(argv) == 0
    gt = COCO(str(dest / "annotations.json"))
    assert sorted(gt.getImgIds()) == [1, 4]
    anns = gt.loadAnns(gt.getAnnIds())
    assert sorted((a["image_id"], a["category_id"], round(a["score"], 2)) for a in anns) == [
        (1, 17, 0.9),
        (4, 17, 0.9),
    ]
    assert [c["name"] for c in gt.dataset["categories"]] == ["cat"]
    assert len(parts_read) == 2  # images 1 and 4 are in two of the four parts


def test_export_coco_of_everything_streams_every_part(run, tmp_path):
    dest = tmp_path / "all"
    assert main(["export", str(run), "--format", "coco", "--dest", str(dest)]) == 0
    gt = COCO(str(dest / "annotations.json"))
    assert len(gt.getImgIds()) == 12 and len(gt.getAnnIds()) == 48
    assert len({a["id"] for a in gt.dataset["annotations"]}) == 48


def test_an_unknown_class_or_an_empty_image_list_is_a_clear_error(run, tmp_path, capsys):
    argv = ["export", str(run), "--format", "coco", "--dest", str(tmp_path / "e")]
    assert main([*argv, "--categories", "dog"]) == 2
    assert "--categories: no class 'dog' in the run" in capsys.readouterr().err
    empty = tmp_path / "none.txt"
    empty.write_text("# nothing\n")
    assert main([*argv, "--images", str(empty)]) == 2
    assert "lists no image" in capsys.readouterr().err
