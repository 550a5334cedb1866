"""The fast mask decoder against SAM2's own ``sam_mask_decoder(..., repeat_image=True)``.

Every SAM2 size of both versions, built by the sam2 package with random weights at a small
input size (the decoder's weights and shapes do not depend on it beyond the embedding
size), plus variants without high-res features and without object-score tokens. Point
prompts with multimask output (the proposals' path), box prompts with single-mask output
and SAM2's stability fallback (the box-only references' path).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from refseg.core.config import MethodConfig
from refseg.core.decoder import SharedImageDecoder
from refseg.core.models import SAM2_CONFIGS, sam2_config_name
from refseg.core.proposals import Sam2Proposer

SIZE = 256  # 16 x 16 embedding, 64 x 64 masks
TIE = 1e-5  # predicted IoUs closer than this may order either way


def _build(config: str, *overrides: str) -> torch.nn.Module:
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2

    if not GlobalHydra.instance().is_initialized():
        initialize_config_module("sam2", version_base="1.2")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_sam2(
            sam2_config_name(config)[1],
            ckpt_path=None,
            device="cpu",
            mode="eval",
            hydra_overrides_extra=[f"++model.image_size={SIZE}", *overrides],
        )


VARIANTS = {
    "no-high-res": ("sam2.1_hiera_t", "++model.use_high_res_features_in_sam=false"),
    "no-obj-scores": (
        "sam2_hiera_s",
        "++model.pred_obj_scores=false",
        "++model.pred_obj_scores_mlp=false",
        "++model.fixed_no_obj_ptr=false",
    ),
}
CASES = [*SAM2_CONFIGS, *VARIANTS]


@pytest.fixture(scope="module", params=CASES)
def model(request):
    spec = VARIANTS.get(request.param, (request.param,))
    return _build(*spec)


def _image(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A seeded random image embedding and high-res levels of the model's shapes."""
    g = torch.Generator().manual_seed(1)
    e = SIZE // 16
    c = model.sam_prompt_embed_dim
    embed = torch.randn(1, c, e, e, generator=g)
    high_res = [torch.randn(1, c // 8, 4 * e, 4 * e, generator=g)]
    high_res.append(torch.randn(1, c // 4, 2 * e, 2 * e, generator=g))
    return embed, high_res


def _stock(model, embed, high_res, coords, labels, multimask):
    with torch.inference_mode():
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            repeat_image=True,
            high_res_features=high_res,
        )
    return sparse, low, iou


def _prompts(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    if kind == "points":  # one positive point per prompt
        return torch.rand(n, 1, 2, generator=g) * SIZE, torch.ones(n, 1, dtype=torch.int)
    if kind == "two-points":  # a positive and a negative point
        labels = torch.tensor([[1, 0]], dtype=torch.int).repeat(n, 1)
        return torch.rand(n, 2, 2, generator=g) * SIZE, labels
    xy = torch.rand(n, 2, generator=g) * SIZE / 2
    wh = 8 + torch.rand(n, 2, generator=g) * SIZE / 2
    corners = torch.stack([xy, xy + wh], dim=1)  # box corners, labels 2 and 3
    return corners, torch.tensor([[2, 3]], dtype=torch.int).repeat(n, 1)


@pytest.mark.parametrize(
    ("kind", "multimask"), [("points", True), ("two-points", True), ("boxes", False)]
)
def test_fast_decoder_equals_sam2s_call(model, kind, multimask):
    embed, high_res = _image(model)
    coords, labels = _prompts(kind, 24)
    sparse, low, iou = _stock(model, embed, high_res, coords, labels, multimask)
    fast = SharedImageDecoder(model)
    got_low, got_iou = fast(fast.prepare(embed, high_res), sparse, multimask=multimask)
    assert got_low.shape == low.shape == (24, 3 if multimask else 1, SIZE // 4, SIZE // 4)
    assert got_iou.shape == iou.shape
    assert float((got_low - low).abs().max()) <= 1e-3
    assert float((got_iou - iou).abs().max()) <= 1e-5
    assert float(low.std()) > 0.01 and float(iou.std()) > 1e-4  # a test that can fail
    if multimask:  # the same best-of-three, except where two IoUs tie within TIE
        top2 = iou.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > TIE
        assert clear.sum() >= 20
        assert torch.equal(got_iou.argmax(1)[clear], iou.argmax(1)[clear])


def test_single_mask_stability_fallback_both_branches():
    """SAM2's ``dynamic_multimask_via_stability`` (on in build_sam2): with its threshold at the
    median stability, half the box prompts keep the single mask and half fall back to the
    best multimask output; the fast decoder follows on both branches."""
    model = _build("sam2.1_hiera_t")
    dec = model.sam_mask_decoder
    assert dec.dynamic_multimask_via_stability
    embed, high_res = _image(model)
    coords, labels = _prompts("boxes", 24)
    sparse, _, _ = _stock(model, embed, high_res, coords, labels, multimask=True)
    with torch.inference_mode():
        dense = model.sam_prompt_encoder(points=None, boxes=None, masks=None)[1]
        every, every_iou, _, _ = dec.predict_masks(
            embed, model.sam_prompt_encoder.get_dense_pe(), sparse, dense, True, high_res
        )
    stability = dec._get_stability_scores(every[:, 0:1]).flatten()
    dec.dynamic_multimask_stability_thresh = float(stability.median())
    stable = stability >= dec.dynamic_multimask_stability_thresh
    assert 0 < int(stable.sum()) < len(stable)
    _, low, iou = _stock(model, embed, high_res, coords, labels, multimask=False)
    assert torch.equal(iou[stable, 0], every_iou[stable, 0])  # single-mask branch
    assert not torch.equal(iou[~stable, 0], every_iou[~stable, 0])  # fallback branch
    fast = SharedImageDecoder(model)
    got_low, got_iou = fast(fast.prepare(embed, high_res), sparse, multimask=False)
    assert float((got_low - low).abs().max()) <= 1e-3
    assert float((got_iou - iou).abs().max()) <= 1e-5


@pytest.mark.parametrize("config", ["sam2_hiera_t", "sam2.1_hiera_t"])
@pytest.mark.parametrize("threshold", [0.0, "median"])
def test_proposals_equal_the_stock_decoder(config, threshold):
    """The proposer keeps the same proposals after the IoU filter with either decoder."""
    model = _build(config)
    image = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    valid, orig = [(SIZE, SIZE), (SIZE, 160)], [(90, 120), (40, 25)]
    base = MethodConfig(points_per_side=6, prompt_batch=7, decoder="stock", iou_threshold=-1.0)
    every = Sam2Proposer(model, base).propose(image, valid, orig)
    cut = threshold
    if threshold == "median":  # halfway between two IoUs near the median, clear of both
        ious = torch.cat([p.iou for p in every]).sort().values
        gaps = [(k, float(ious[k + 1] - ious[k])) for k in range(len(ious) // 2, len(ious) - 1)]
        k = next(k for k, gap in gaps if gap > 4 * TIE)
        cut = float(ious[k] + ious[k + 1]) / 2
    stock_m = dataclasses.replace(base, iou_threshold=cut)
    stock = Sam2Proposer(model, stock_m).propose(image, valid, orig)
    for batch in (0, 5, 36):
        fast_m = dataclasses.replace(stock_m, decoder="fast", prompt_batch=batch)
        fast = Sam2Proposer(model, fast_m).propose(image, valid, orig)
        for a, b, all_ in zip(stock, fast, every, strict=True):
            near = (all_.iou - cut).abs() <= TIE
            assert not bool(near.any())  # no IoU sits on the threshold in these cases
            assert len(a) == len(b) and torch.equal(a.points, b.points)
            if len(a):
                assert float((a.logits - b.logits).abs().max()) <= 1e-3
                assert float((a.iou - b.iou).abs().max()) <= 1e-5
    if threshold == "median":
        assert 0 < len(stock[0]) < 36


def _assert_same_masks(got: torch.Tensor, ref: torch.Tensor) -> None:
    """bf16 mask logits ``got`` give float32's masks ``ref`` (both (N, M, H, W)): per mask,
    foreground IoU >= 0.97 and positive fraction within 0.01 (measured: IoU >= 0.988,
    fraction within 0.004, Hiera-T and -L). An all-background, all-foreground, inverted
    or shifted output fails; so does a reference without both foreground and background."""
    a, b = (got.float() > 0).flatten(2), (ref.float() > 0).flatten(2)
    frac_got, frac_ref = a.float().mean(-1), b.float().mean(-1)
    assert bool(((frac_ref > 0.05) & (frac_ref < 0.95)).all()), "a degenerate reference"
    iou = (a & b).sum(-1) / (a | b).sum(-1).clamp(min=1)
    assert float(iou.min()) >= 0.97, f"foreground IoU {float(iou.min()):.3f}"
    assert float((frac_got - frac_ref).abs().max()) <= 0.01


def test_bf16_decoder_is_a_bf16_copy_close_to_float32():
    model = _build("sam2.1_hiera_t")
    embed, high_res = _image(model)
    coords, labels = _prompts("points", 16)
    sparse, low, _ = _stock(model, embed, high_res, coords, labels, True)
    fast = SharedImageDecoder(model, dtype=torch.bfloat16)
    assert next(fast.decoder.parameters()).dtype == torch.bfloat16
    assert next(model.sam_mask_decoder.parameters()).dtype == torch.float32  # untouched
    got, _ = fast(fast.prepare(embed, high_res), sparse)
    assert got.dtype == torch.bfloat16 and got.shape == low.shape == (16, 3, SIZE // 4, SIZE // 4)
    _assert_same_masks(got, low)


@pytest.fixture(scope="module")
def float32_masks() -> torch.Tensor:
    model = _build("sam2.1_hiera_t")
    embed, high_res = _image(model)
    coords, labels = _prompts("points", 16)
    return _stock(model, embed, high_res, coords, labels, True)[1]


@pytest.mark.parametrize(
    "broken",
    [
        torch.zeros_like,  # all background
        torch.ones_like,  # all foreground
        torch.neg,  # inverted
        lambda x: torch.roll(x, 2, dims=-1),  # shifted by two pixels
        lambda x: x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))],
    ],
    ids=["zeros", "ones", "inverted", "shifted", "prompts-swapped"],
)
def test_the_bf16_mask_check_fails_on_broken_masks(float32_masks, broken):
    low = float32_masks
    _assert_same_masks(low.to(torch.bfloat16), low)  # the check passes on the real thing
    with pytest.raises(AssertionError):
        _assert_same_masks(broken(low).to(torch.bfloat16), low)


def test_automatic_prompt_batch():
    from refseg.core.sizing import CPU_PROMPT_BATCH, STOCK_PROMPT_BATCH, auto_prompt_batch

    cpu = torch.device("cpu")
    assert auto_prompt_batch("stock", cpu, (64, 64)) == STOCK_PROMPT_BATCH == 256
    assert auto_prompt_batch("fast", cpu, (64, 64)) == CPU_PROMPT_BATCH
    model = _build("sam2.1_hiera_t")
    assert Sam2Proposer(model, MethodConfig(prompt_batch=0)).prompt_batch((16, 16)) == 16
    assert Sam2Proposer(model, MethodConfig(prompt_batch=7)).prompt_batch((16, 16)) == 7
    stock = MethodConfig(prompt_batch=0, decoder="stock")
    assert Sam2Proposer(model, stock).prompt_batch((16, 16)) == 256
    with pytest.raises(ValueError, match="prompt_batch"):
        MethodConfig(prompt_batch=-1)
    with pytest.raises(ValueError, match="decoder"):
        MethodConfig(decoder="fastest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", ["sam2_hiera_l", "sam2.1_hiera_t"])
def test_fast_decoder_on_cuda(config):
    """The same equality on a GPU (TF32 off), and the bf16 copy close to float32 there."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _build(config).cuda()
    embed, high_res = _image(model)
    embed, high_res = embed.cuda(), [f.cuda() for f in high_res]
    coords, labels = _prompts("points", 64)
    sparse, low, iou = _stock(model, embed, high_res, coords.cuda(), labels.cuda(), True)
    fast = SharedImageDecoder(model)
    got_low, got_iou = fast(fast.prepare(embed, high_res), sparse)
    assert float((got_low - low).abs().max()) <= 1e-3
    assert float((got_iou - iou).abs().max()) <= 1e-5
    half = SharedImageDecoder(model, dtype=torch.bfloat16)
    got_bf16, _ = half(half.prepare(embed, high_res), sparse)
    _assert_same_masks(got_bf16, low)


def test_fast_decoder_refuses_a_stand_in_with_the_fix():
    from doubles import ShapeSam

    proposer = Sam2Proposer(ShapeSam([(200, 30, 30)], image_size=64), MethodConfig())
    with pytest.raises(TypeError, match="--decoder stock"):
        proposer.propose(torch.rand(1, 3, 64, 64), [(64, 64)], [(20, 20)])
