"""A file in Meta's DINOv2 release layout gives, through build_dinov2, Meta's features.

Meta's reference code is PyPI ``dinov2==0.0.1.dev2`` (install with ``pip install --no-deps``;
a re-upload of Meta's April 2023 code). Without xformers it logs "xFormers not available"
and falls back to plain attention, which is all these tests need. That code predates the
register models (October 2023), so for ``_reg`` the reference forward below composes the
package's own modules and inserts the 4 register tokens after the class token, as Meta's
later code does; at 518 no position-embedding interpolation is involved.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from refseg.core.models import build_dinov2, dinov2_patch_tokens

try:  # Meta's reference code is a test-only dependency: missing, the suite fails loudly
    import dinov2.models.vision_transformer as vit_ref
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "Meta's DINOv2 reference code is missing: `make setup` installs it "
        "(pip install --no-deps dinov2==0.0.1.dev2)"
    ) from exc
logging.getLogger("dinov2").setLevel(logging.ERROR)

N_REG = 4


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _reference_vits14(seed: int) -> torch.nn.Module:
    """Meta's ViT-S/14 as in the release (init_values=1.0 so that LayerScale is present),
    with every tensor perturbed so that no value sits at its trivial init (zeros, ones)."""
    torch.manual_seed(seed)
    model = vit_ref.vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _reference_tokens(
    ref: torch.nn.Module, x: torch.Tensor, reg: torch.Tensor | None
) -> torch.Tensor:
    """(B, N, D) normed patch tokens of the reference; ``reg`` (1, 4, D) inserts registers."""
    if reg is None:
        return ref.forward_features(x)["x_norm_patchtokens"]
    t = ref.prepare_tokens_with_masks(x)  # class token + patches, plus pos_embed
    t = torch.cat([t[:, :1], reg.expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
    for blk in ref.blocks:
        t = blk(t)
    return ref.norm(t)[:, 1 + N_REG :]


def _release_file(path: Path, ref: torch.nn.Module, reg: torch.Tensor | None) -> Path:
    state_dict = {k: v.clone() for k, v in ref.state_dict().items()}
    if reg is not None:
        state_dict["register_tokens"] = reg.clone()
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, object]:
    """One reference ViT-S/14 and its release files, with and without 4 registers."""
    ref = _reference_vits14(1)
    reg = 0.5 * torch.randn(1, N_REG, 384)
    folder = tmp_path_factory.mktemp("dinov2_release")
    return {
        "ref": ref,
        "reg": reg,
        "vits14": _release_file(folder / "vits14.pth", ref, None),
        "vits14_reg": _release_file(folder / "vits14_reg4.pth", ref, reg),
    }


def test_release_layout_matches_the_expected_tensors(release):
    sd = torch.load(release["vits14"], weights_only=True)
    assert len(sd) == 175
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert {"cls_token", "mask_token", "blocks.11.ls2.gamma"} <= set(sd)


@pytest.mark.parametrize(
    ("name", "image_size"),
    [("vits14", 518), ("vits14_reg", 518), ("vits14", 224)],
)
def test_patch_tokens_equal_the_reference(release, name, image_size):
    ref, path = release["ref"], release[name]
    reg = release["reg"] if name.endswith("_reg") else None

    loaded = build_dinov2(name, str(path), image_size=image_size)
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        ours = dinov2_patch_tokens(loaded.model, x)
        theirs = _reference_tokens(ref, x, reg)
        # registers must matter, or the _reg comparison would prove nothing
        without = None if reg is None else _reference_tokens(ref, x, torch.zeros_like(reg))

    g = image_size // 14
    assert ours.shape == (1, g, g, 384)
    assert theirs.std() > 0.1  # the comparison is between non-trivial features
    assert _rel_diff(ours.reshape(1, g * g, 384), theirs) < 1e-5
    if without is not None:
        assert _rel_diff(ours.reshape(1, g * g, 384), without) > 1e-3
    assert loaded.sha256 is not None and loaded.checkpoint == path.resolve().as_uri()


def test_pos_embed_resampling_for_registers_matches_timm(release):
    """At sizes other than 518 the _reg models resize pos_embed with antialiased bicubic to
    the exact size (Meta: interpolate_offset=0, interpolate_antialias=True), which is also
    what timm's own checkpoint filter does."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = release["vits14_reg"]
    loaded = build_dinov2("vits14_reg", str(path), image_size=224)
    timm_sd = checkpoint_filter_fn(torch.load(path, weights_only=True), loaded.model)
    ours = loaded.model.pos_embed.detach()
    assert ours.shape == (1, 16 * 16, 384)
    assert _rel_diff(ours, timm_sd["pos_embed"]) < 1e-6


@pytest.mark.parametrize(
    ("name", "factory", "kwargs"),
    [
        ("vitb14", "vit_base", {}),
        ("vitl14", "vit_large", {}),
        ("vitg14", "vit_giant2", {"ffn_layer": "swiglufused"}),
        ("vitl14_reg", "vit_large", {}),
    ],
)
def test_release_keys_and_shapes_fit_the_larger_models(name, factory, kwargs):
    """Key by key, shape by shape, on the meta device (no memory, no weights)."""
    import timm
    from refseg.core.models import _dinov2_timm_name
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        ref = getattr(vit_ref, factory)(
            patch_size=14,
            img_size=518,
            init_values=1.0,
            block_chunks=0,
            drop_path_uniform=True,  # avoids .item() on meta tensors
            **kwargs,
        )
        sd = dict(ref.state_dict())
        if name.endswith("_reg"):
            sd["register_tokens"] = torch.empty(1, N_REG, sd["cls_token"].shape[-1])
        model = timm.create_model(
            _dinov2_timm_name(name)[1], pretrained=False, img_size=518, num_classes=0
        )
        converted = checkpoint_filter_fn(sd, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
