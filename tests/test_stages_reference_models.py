"""§1 and §3 of the method against a plain, slow transcription of ``method.md``.

The transcriptions below are written from the specification only: loops and explicit index
arithmetic, on inputs small enough for that to be quick. The code under test is
``memory_bank.encode_shot`` (§1) with a random-weight DINOv2 and a colour double, and
``Sam2Proposer.propose`` with a real tiny SAM 2.1 (§3). §2 and §4 are in
``test_stages_reference.py``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from doubles import colour_dino_encoder
from refseg.core.config import MethodConfig
from refseg.core.features import DinoEncoder
from refseg.core.memory_bank import TinyMaskError, encode_shot
from refseg.core.models import build_dinov2, build_sam2
from refseg.core.proposals import Sam2Proposer

from tests.stages_reference_util import DINO_SIZE, PALETTE


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights" warnings
        return fn(*args, **kwargs)


# ------------------------------------------------------------------ §1 reference prototype


def reference_prototype(model, size, image, mask, bbox, scale=1.2):
    """§1 transcribed: context crop, bicubic to size, mask bilinear then nearest, soft mean."""
    x, y, w, h = bbox
    x0, y0, x1, y1 = int(x), int(y), int(x + w), int(y + h)  # corners truncated first
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(x1 - x0, y1 - y0) * scale
    img_h, img_w = image.shape[:2]
    left, top = max(0, int(cx - side / 2)), max(0, int(cy - side / 2))
    right, bottom = min(img_w, int(cx + side / 2)), min(img_h, int(cy + side / 2))
    crop = torch.tensor(image[top:bottom, left:right], dtype=torch.float32) / 255.0
    crop = F.interpolate(crop.permute(2, 0, 1)[None], size=(size, size), mode="bicubic")
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        tokens = model.forward_features((crop - mean) / std)[0, model.num_prefix_tokens :]
    m = torch.tensor(mask[top:bottom, left:right], dtype=torch.float32)[None, None]
    m = F.interpolate(m, size=(size, size), mode="bilinear")[0, 0]
    g = size // 14
    num, den = torch.zeros(tokens.shape[1], dtype=torch.float64), 0.0
    for i in range(g):
        for j in range(g):
            weight = float(m[14 * i, 14 * j])  # torch "nearest" to g x g: pixel floor(14 i)
            num += weight * tokens[i * g + j].double()
            den += weight
    return num, den


def _scene(seed, hw):
    """Random 4 x 4-pixel blocks of palette colours and grey, plus noise: (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    colours = np.array([*PALETTE, (128, 128, 128)])
    blocks = colours[rng.integers(len(colours), size=(hw[0] // 4 + 1, hw[1] // 4 + 1))]
    img = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)[: hw[0], : hw[1]]
    return np.clip(img + rng.integers(-20, 21, size=img.shape), 0, 255).astype(np.uint8)


def _ellipse(hw, box):
    x, y, w, h = box
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]] + 0.5
    return ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1


@pytest.fixture(scope="module")
def dino_models():
    real = _quiet(build_dinov2, "vits14", None, image_size=DINO_SIZE, random_weights=True)
    torch.manual_seed(0)
    with torch.no_grad():  # move LayerScale/biases off their trivial init
        for p in real.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return {"timm": DinoEncoder(real, DINO_SIZE), "colour": colour_dino_encoder(PALETTE, DINO_SIZE)}


@pytest.mark.parametrize("backbone", ["timm", "colour"])
@pytest.mark.parametrize(
    ("hw", "bbox"),
    [
        ((60, 80), (20.0, 15.0, 30.0, 24.0)),  # inside the image
        ((60, 80), (2.7, 3.2, 25.6, 30.9)),  # fractional, crop clipped at top-left
        ((60, 80), (55.5, 30.0, 24.0, 29.5)),  # clipped at bottom-right
        ((90, 40), (5.0, 10.0, 12.0, 60.0)),  # tall: side from the height
    ],
)
def test_reference_prototype_matches_transcription(dino_models, backbone, hw, bbox):
    encoder = dino_models[backbone]
    image = _scene(hash((hw, bbox)) % 1000, hw)
    mask = _ellipse(hw, bbox)
    num, den = reference_prototype(encoder.model, DINO_SIZE, image, mask, bbox)
    assert den > 1e-3
    expected = (num / den).float()
    got = encode_shot(encoder, image, mask, bbox)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_reference_prototype_tiny_mask_is_refused(dino_models):
    encoder, hw, bbox = dino_models["timm"], (60, 80), (30.0, 30.0, 16.0, 16.0)
    image = _scene(7, hw)
    mask = np.zeros(hw, dtype=bool)
    mask[30:32, 30:32] = True  # crop rows/cols 2-3 of 19: the patch samples read 0, 4-5, 9-10...
    _, den = reference_prototype(encoder.model, DINO_SIZE, image, mask, bbox)
    assert den < 1e-3
    with pytest.raises(TinyMaskError):
        encode_shot(encoder, image, mask, bbox)


# ------------------------------------------------------------------ §3 proposals (SAM2)

SAM_SIZE, GRID, BATCH = 256, 4, 5  # 16 prompts in batches 5, 5, 5, 1


def reference_encode(model, image):
    """§3.2 transcribed: image encoder once; returns the embedding and the high-res levels."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # SAM2's ImageNet constants
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        out = model.image_encoder((image[None] - mean) / std)
        fpn = list(out["backbone_fpn"])
        fpn[0] = model.sam_mask_decoder.conv_s0(fpn[0])
        fpn[1] = model.sam_mask_decoder.conv_s1(fpn[1])
    levels = fpn[-model.num_feature_levels :]
    return levels[-1], levels[:-1]


def reference_proposals(model, encoded, valid_hw, threshold):
    """§3.2-§3.3 transcribed with the model's modules: [(point, iou, logits)] in grid order."""
    embed, high_res = encoded
    vh, vw = valid_hw
    xs = [k * (vw - 1) / (GRID - 1) + 0.5 for k in range(GRID)]
    ys = [k * (vh - 1) / (GRID - 1) + 0.5 for k in range(GRID)]
    points = [(x, y) for x in xs for y in ys]  # x-major
    found = []
    for start in range(0, len(points), BATCH):
        chunk = points[start : start + BATCH]
        p = len(chunk)
        coords = torch.tensor(chunk, dtype=torch.float32)[:, None, :]
        with torch.inference_mode():
            sparse, dense = model.sam_prompt_encoder(
                points=(coords, torch.ones(p, 1, dtype=torch.int)), boxes=None, masks=None
            )
            low, pred, _, _ = model.sam_mask_decoder(
                image_embeddings=embed.expand(p, -1, -1, -1),
                image_pe=model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=True,
                repeat_image=False,
                high_res_features=[f.expand(p, -1, -1, -1) for f in high_res],
            )
        for k in range(p):
            best = max(range(3), key=lambda m: (float(pred[k, m]), -m))
            if float(pred[k, best]) > threshold:
                found.append((chunk[k], float(pred[k, best]), low[k, best]))
    return found


@pytest.fixture(scope="module")
def sam_model():
    loaded = _quiet(build_sam2, "sam2.1_hiera_t", None, image_size=SAM_SIZE, random_weights=True)
    return loaded.model


@pytest.fixture(scope="module")
def sam_image():
    return torch.rand(3, SAM_SIZE, SAM_SIZE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def sam_encoded(sam_model, sam_image):
    return reference_encode(sam_model, sam_image)


@pytest.mark.parametrize(
    ("add_no_mem_embed", "valid"),
    [(False, [(SAM_SIZE, SAM_SIZE), (192, SAM_SIZE)]), (True, [(SAM_SIZE, 160)])],
)
def test_proposals_match_transcription(sam_model, sam_image, sam_encoded, add_no_mem_embed, valid):
    embed, high_res = sam_encoded
    if add_no_mem_embed:  # SAM2's image predictor adds it; the paper's code does not
        embed = embed + sam_model.no_mem_embed.reshape(1, -1, 1, 1)
    encoded = (embed, high_res)
    every = {hw: reference_proposals(sam_model, encoded, hw, -math.inf) for hw in valid}
    for found in every.values():
        assert len(found) == GRID * GRID  # the last, partial batch is decoded too
    # a threshold that keeps the last prompt (alone in its batch) and drops some others
    ious = torch.tensor([e[1] for e in every[valid[0]]])
    lower = ious[ious < ious[-1]]
    assert lower.numel() > 0
    threshold = float(lower.max() + ious[-1]) / 2
    method = MethodConfig(
        points_per_side=GRID, prompt_batch=BATCH, iou_threshold=threshold,
        add_no_mem_embed=add_no_mem_embed,
    )  # fmt: skip
    batch = sam_image.expand(len(valid), -1, -1, -1)
    got = Sam2Proposer(sam_model, method).propose(batch, valid, [(100, 120)] * len(valid))
    for hw, props in zip(valid, got, strict=True):
        expected = [e for e in every[hw] if e[1] > threshold]
        if hw == valid[0]:
            assert 0 < len(expected) < GRID * GRID
            assert expected[-1][0] == every[hw][-1][0]  # from the partial batch
        assert len(props) == len(expected)
        assert props.valid_hw == hw and props.orig_hw == (100, 120)
        assert props.logits.shape[1:] == (SAM_SIZE // 4, SAM_SIZE // 4)
        for k, (point, pred, low) in enumerate(expected):
            assert props.points[k].tolist() == pytest.approx(point, abs=1e-4)
            assert float(props.iou[k]) == pytest.approx(pred, abs=1e-5)
            assert torch.allclose(props.logits[k], low, atol=1e-4, rtol=1e-4)
