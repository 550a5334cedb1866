"""The whole core on generated scenes: shapes of 3 colour classes labelled with AP >= 0.9.

The backbones are the deterministic doubles of ``tests/doubles.py``; everything else is the
real code: ``build_memory_bank`` from a references COCO, ``Segmenter`` (``Sam2Proposer`` and
``Matcher``), ``Instances.to_coco_results`` and pycocotools through
``refseg.core.coco.evaluate``. A failure here means the pieces do not fit together (ids,
coordinates, resizing, box conventions, NMS, merging), since the doubles segment and
recognise the shapes perfectly up to resampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from doubles import ShapeSam, colour_dino_encoder, connected_components
from refseg.core import ops
from refseg.core import rle as rle_ops
from refseg.core.coco import evaluate
from refseg.core.config import MethodConfig
from refseg.core.imaging import longest_side_hw, prepare_target
from refseg.core.matching import Matcher
from refseg.core.proposals import Sam2Proposer
from refseg.core.references import build_memory_bank
from refseg.core.segmenter import Segmenter
from refseg.core.tensors import stack_targets

# category id -> (name, colour); ids are deliberately not 0..C-1
CLASSES = {3: ("red", (220, 50, 50)), 17: ("green", (40, 180, 60)), 90: ("blue", (50, 80, 220))}
CLASS_COLOURS = [c for _, c in CLASSES.values()]
BACKGROUNDS = [(128, 128, 128), (90, 70, 50), (160, 120, 160), (60, 60, 60)]
TARGET_HW = [(120, 160), (160, 120), (100, 200), (150, 150), (96, 128), (140, 180), (128, 96)]
TARGET_HW += [(120, 160)]
SAM_SIZE, DINO_SIZE, GRID = 256, 224, 16
MARGIN = 6  # px between shapes and from the border


@dataclass(frozen=True)
class Scene:
    images: dict[str, np.ndarray]  # file name -> (H, W, 3) uint8
    targets: dict  # COCO ground truth of the targets
    references: dict  # COCO of the references (one shot per class)


def _shape_mask(kind: str, hw: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) bool: a rectangle or the ellipse inscribed in box = (x0, y0, x1, y1)."""
    h, w = hw
    x0, y0, x1, y1 = box
    if kind == "rect":
        m = np.zeros(hw, dtype=bool)
        m[y0:y1, x0:x1] = True
        return m
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            shifted = np.zeros_like(mask)
            h, w = mask.shape
            shifted[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = mask[
                max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)
            ]
            out &= shifted
    return out


def _grid_pixels(hw: tuple[int, int]) -> list[np.ndarray]:
    """Original-image pixels (row, col) under the prompt grid, for both resize modes."""
    h, w = hw
    out = []
    for vh, vw in [(SAM_SIZE, SAM_SIZE), longest_side_hw(hw, SAM_SIZE)]:
        pts = ops.point_grid(GRID, vh, vw).numpy()
        rows = np.minimum((pts[:, 1] * h / vh).astype(int), h - 1)
        cols = np.minimum((pts[:, 0] * w / vw).astype(int), w - 1)
        out.append(np.stack([rows, cols], axis=1))
    return out


def _place_shapes(rng, hw, n, classes=None):
    """Up to n non-overlapping shapes, each hit by the prompt grid well inside it."""
    h, w = hw
    grids = _grid_pixels(hw)
    shapes, taken = [], np.zeros(hw, dtype=bool)
    for _ in range(400):
        if len(shapes) == n:
            break
        sw, sh = (int(v) for v in rng.integers(28, 52, size=2))
        if sw > w - 2 * MARGIN or sh > h - 2 * MARGIN:
            continue
        x0 = int(rng.integers(MARGIN, w - MARGIN - sw + 1))
        y0 = int(rng.integers(MARGIN, h - MARGIN - sh + 1))
        box = (x0, y0, x0 + sw, y0 + sh)
        if taken[
            max(0, y0 - MARGIN) : y0 + sh + MARGIN, max(0, x0 - MARGIN) : x0 + sw + MARGIN
        ].any():
            continue
        kind = ("rect", "ellipse")[int(rng.integers(2))]
        mask = _shape_mask(kind, hw, box)
        core = _erode(mask, 2)
        if not all(core[g[:, 0], g[:, 1]].any() for g in grids):
            continue
        cid = (
            list(CLASSES)[int(rng.integers(len(CLASSES)))]
            if classes is None
            else classes[len(shapes)]
        )
        shapes.append((cid, mask))
        taken[y0 : y0 + sh, x0 : x0 + sw] = True
    return shapes


def _render(hw, background, shapes) -> np.ndarray:
    img = np.empty((*hw, 3), dtype=np.uint8)
    img[:] = background
    for cid, mask in shapes:
        img[mask] = CLASSES[cid][1]
    return img


def _coco(images, annotations):
    cats = [{"id": cid, "name": name} for cid, (name, _) in CLASSES.items()]
    return {"images": images, "annotations": annotations, "categories": cats}


def _annotation(ann_id, image_id, cid, mask):
    rle = rle_ops.encode_masks(mask[None])[0]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cid,
        "segmentation": rle,
        "area": float(mask.sum()),
        "bbox": rle_ops.rle_to_bbox([rle])[0].tolist(),
        "iscrowd": 0,
    }


def make_scene(seed: int = 0) -> Scene:
    rng = np.random.default_rng(seed)
    images: dict[str, np.ndarray] = {}
    t_images, t_anns, r_images, r_anns = [], [], [], []
    for i, hw in enumerate(TARGET_HW):
        image_id, name = 1000 + 7 * i, f"target_{i}.png"
        shapes = _place_shapes(rng, hw, int(rng.integers(2, 5)))
        assert len(shapes) >= 2, f"could not place shapes in {hw}"
        images[name] = _render(hw, BACKGROUNDS[i % len(BACKGROUNDS)], shapes)
        t_images.append({"id": image_id, "file_name": name, "height": hw[0], "width": hw[1]})
        for cid, mask in shapes:
            t_anns.append(_annotation(len(t_anns) + 1, image_id, cid, mask))
    for k, cid in enumerate(CLASSES):
        hw, image_id, name = (100, 120), 50 + k, f"reference_{cid}.png"
        shapes = _place_shapes(rng, hw, 1, classes=[cid])
        images[name] = _render(hw, BACKGROUNDS[(k + 1) % len(BACKGROUNDS)], shapes)
        r_images.append({"id": image_id, "file_name": name, "height": hw[0], "width": hw[1]})
        r_anns.append(_annotation(900 + k, image_id, cid, shapes[0][1]))
    return Scene(images, _coco(t_images, t_anns), _coco(r_images, r_anns))


@pytest.fixture(scope="module")
def scene() -> Scene:
    s = make_scene(0)
    classes = {a["category_id"] for a in s.targets["annotations"]}
    assert classes == set(CLASSES), "every class must appear among the targets"
    return s


@pytest.fixture(scope="module")
def encoder():
    return colour_dino_encoder(CLASS_COLOURS, image_size=DINO_SIZE)


@pytest.fixture(scope="module")
def bank(scene, encoder):
    return build_memory_bank(encoder, scene.references, "", load_image=scene.images.__getitem__)


def _segmenter(encoder, bank, resize, merge_resolution="full") -> Segmenter:
    method = MethodConfig(
        points_per_side=GRID,
        prompt_batch=64,
        box_convention="standard",
        resize=resize,
        merge_resolution=merge_resolution,
        decoder="stock",  # the double stands in for SAM2's own decoder call
    )
    sam = ShapeSam(CLASS_COLOURS + BACKGROUNDS, image_size=SAM_SIZE).eval()
    return Segmenter(Sam2Proposer(sam, method), Matcher(encoder, bank, method))


def test_bank_has_one_shot_per_class_with_its_own_axis(bank):
    assert bank.category_ids == sorted(CLASSES)
    assert [int(bank.shots[c].shape[0]) for c in bank.category_ids] == [1, 1, 1]
    protos = bank.class_prototypes()
    # each class prototype points along its own colour axis
    assert float(protos.diagonal().min()) > 0.9
    off_diagonal = protos[~torch.eye(len(CLASSES), dtype=torch.bool)]
    assert float(off_diagonal.max()) < 0  # other classes' colours point away


@pytest.mark.parametrize(
    ("resize", "merge_resolution"),
    [("square", "full"), ("longest-side", "full"), ("longest-side", "lowres")],
)
def test_synthetic_scene_ap(scene, encoder, bank, resize, merge_resolution):
    segmenter = _segmenter(encoder, bank, resize, merge_resolution)
    files = {im["id"]: im["file_name"] for im in scene.targets["images"]}
    ids = list(files)
    instances = segmenter([scene.images[files[i]] for i in ids])
    results = [
        r for iid, inst in zip(ids, instances, strict=True) for r in inst.to_coco_results(iid)
    ]
    assert {r["category_id"] for r in results} <= set(CLASSES)
    report = evaluate(scene.targets, results)
    segm, bbox = report["segm"]["stats"]["AP"], report["bbox"]["stats"]["AP"]
    print(f"\n{resize}: segm AP {segm:.4f}, bbox AP {bbox:.4f}, {len(results)} results")
    assert segm >= 0.9, report["segm"]["summary"]
    assert bbox >= 0.9, report["bbox"]["summary"]
    assert min(report["segm"]["per_class"].values()) >= 0.8


def test_background_only_image_gives_empty_result(encoder, bank):
    segmenter = _segmenter(encoder, bank, "square")
    image = _render((90, 130), BACKGROUNDS[0], [])
    # the proposer does propose the background: the matcher must reject it by score
    target = prepare_target(image, SAM_SIZE)
    proposals = segmenter.proposer.propose(stack_targets([target]), [target.valid_hw], [(90, 130)])
    assert len(proposals[0]) == GRID * GRID
    (instances,) = segmenter([image])
    assert len(instances) == 0
    assert instances.image_size == (90, 130)
    assert instances.to_coco_results(1) == []


def test_box_prompt_segments_the_shape(scene, encoder, bank):
    """``Sam2Proposer.segment_boxes`` (box-only references, §6) on the doubles."""
    proposer = _segmenter(encoder, bank, "square").proposer
    image_info = scene.targets["images"][0]
    hw = (image_info["height"], image_info["width"])
    target = prepare_target(scene.images[image_info["file_name"]], SAM_SIZE)
    anns = [a for a in scene.targets["annotations"] if a["image_id"] == image_info["id"]]
    scale = torch.tensor([SAM_SIZE / hw[1], SAM_SIZE / hw[0]] * 2)
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
    logits = proposer.segment_boxes(stack_targets([target])[0], boxes * scale)
    assert logits.shape == (len(anns), SAM_SIZE // 4, SAM_SIZE // 4)
    masks = ops.upsample_masks(logits, hw).numpy()
    for mask, ann in zip(masks, anns, strict=True):
        truth = rle_ops.decode_rle(ann["segmentation"])
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([[1, 1, 2], [2, 1, 2], [2, 2, 2]], [[0, 0, 1], [1, 0, 1], [1, 1, 1]]),
        ([[1, 2, 1], [2, 1, 2], [1, 2, 1]], [[0, 1, 2], [3, 4, 5], [6, 7, 8]]),  # 4-connected
        ([[3, 3], [3, 3]], [[0, 0], [0, 0]]),
        ([[1, 0, 1], [1, 0, 1], [1, 1, 1]], [[0, 1, 0], [0, 1, 0], [0, 0, 0]]),  # U shape
    ],
)
def test_double_connected_components(labels, expected):
    assert connected_components(np.array(labels)).tolist() == expected
