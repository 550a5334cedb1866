"""Model builders: the only place in refseg that loads weights.

* :func:`build_sam2` builds Meta's SAM 2 / 2.1 from the configs the ``sam2`` package ships.
* :func:`build_dinov2` builds DINOv2 ViT-S/B/L/g 14 (optionally with 4 registers) as timm
  models and loads Meta's release files into them.

Checkpoints are resolved by :func:`refseg.core.checkpoints.resolve_checkpoint` (local path,
fsspec URI or official name), loaded with ``torch.load(..., weights_only=True)`` and applied
strictly: a missing or unexpected key is an error. Every :class:`LoadedModel` carries the
SHA-256 of the file it was loaded from, for the run's records.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from refseg.core.checkpoints import (
    ResolvedCheckpoint,
    cache_dir,
    default_checkpoint_for,
    resolve_checkpoint,
    verify_sha256,
)

SAM2_CONFIGS: tuple[str, ...] = tuple(
    f"{version}_hiera_{size}" for version in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l")
)
DINOV2_MODELS: tuple[str, ...] = tuple(
    f"vit{size}14{reg}" for size in "sblg" for reg in ("", "_reg")
)
_DINOV2_TIMM = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_DINOV2_PATCH = 14
_DINOV2_RELEASE_SIZE = 518  # Meta's release files hold a pos_embed for 518 x 518 (37 x 37)


@dataclass(frozen=True)
class LoadedModel:
    """A built model in eval mode and where its weights came from.

    ``checkpoint`` is the URI of the loaded file and ``sha256`` its hash; both are ``None``
    when ``random_weights`` is true.
    """

    model: torch.nn.Module
    name: str
    checkpoint: str | None
    sha256: str | None
    random_weights: bool


# --------------------------------------------------------------------------------- common


def _resolve_weights(
    family: str, arch: str, checkpoint: str | None, random_weights: bool, sha256: str | None
) -> ResolvedCheckpoint | None:
    """The file to load, or ``None`` for random weights (with a warning)."""
    if random_weights:
        if checkpoint is not None:
            raise ValueError(
                f"random_weights=True and checkpoint={checkpoint!r} were both given for {arch}"
            )
        warnings.warn(
            f"{arch}: building with random weights (no checkpoint loaded); outputs are "
            "meaningless, use this only for smoke runs",
            UserWarning,
            stacklevel=3,
        )
        return None
    if checkpoint is None:
        official = default_checkpoint_for(family, arch)  # type: ignore[arg-type]
        if official is None:
            raise FileNotFoundError(f"no official checkpoint for {arch}; pass a checkpoint")
        if not (cache_dir() / official.filename).is_file():
            raise FileNotFoundError(
                f"no checkpoint given for {arch} and the official one ({official.name}) is not "
                f"in {cache_dir()}: run `refseg checkpoints download {official.name}` (or fetch "
                f"{official.url}), pass a checkpoint path or URI, or use --random-weights "
                "for a smoke run"
            )
        checkpoint = official.name
    resolved = resolve_checkpoint(checkpoint)
    if sha256 is not None:
        verify_sha256(resolved.path, sha256, actual=resolved.sha256)
    return resolved


def _load_file(path: Path) -> dict[str, Any]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise RuntimeError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _load_strict(
    model: torch.nn.Module, state_dict: dict[str, Any], *, checkpoint: str, arch: str
) -> None:
    """``load_state_dict`` that names the checkpoint and the config on any mismatch."""
    where = f"checkpoint {checkpoint} does not fit {arch}"
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise RuntimeError(f"{where}: {exc}") from exc
    if missing or unexpected:
        raise RuntimeError(
            f"{where}: {len(missing)} missing keys {_head(missing)}, "
            f"{len(unexpected)} unexpected keys {_head(unexpected)}"
        )


def _head(keys: list[str], n: int = 5) -> str:
    return str(keys[:n])[:-1] + (", ...]" if len(keys) > n else "]")


# ----------------------------------------------------------------------------------- SAM2


def sam2_config_name(config: str) -> tuple[str, str]:
    """``(short name, sam2 package config path)`` of a SAM2 config.

    Accepts ``sam2_hiera_l``, ``sam2.1_hiera_b+``, with or without ``.yaml`` and the
    ``configs/sam2[.1]/`` prefix. E.g. ``"sam2.1_hiera_t"`` ->
    ``("sam2.1_hiera_t", "configs/sam2.1/sam2.1_hiera_t.yaml")``.
    """
    short = config.removesuffix(".yaml").rsplit("/", 1)[-1]
    match = re.fullmatch(r"(sam2|sam2\.1)_hiera_(t|s|b\+|l)", short)
    if match is None:
        raise ValueError(f"unknown SAM2 config {config!r}; choose one of {list(SAM2_CONFIGS)}")
    return short, f"configs/{match.group(1)}/{short}.yaml"


def build_sam2(
    config: str,
    checkpoint: str | None,
    *,
    device: str = "cpu",
    image_size: int | None = None,
    random_weights: bool = False,
    sha256: str | None = None,
) -> LoadedModel:
    """Build a SAM2Base (eval mode) with the sam2 package's config ``config``.

    ``checkpoint``: local path, fsspec URI or official name; ``None`` means the official
    checkpoint of this config, which must be in the cache. Official files hold
    ``{"model": state_dict}``; a bare state dict is accepted too. ``image_size`` overrides
    the config's input size (1024); weights do not depend on it. ``sha256``, when given,
    must match the file. Raises ``FileNotFoundError`` for a missing checkpoint,
    ``RuntimeError`` for missing/unexpected keys, ``ValueError`` for a hash mismatch.
    """
    short, config_path = sam2_config_name(config)
    resolved = _resolve_weights("sam2", short, checkpoint, random_weights, sha256)

    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from sam2.build_sam import build_sam2 as _sam2_build

    if not GlobalHydra.instance().is_initialized():  # sam2 does this on import; others may clear it
        initialize_config_module("sam2", version_base="1.2")
    overrides = [] if image_size is None else [f"++model.image_size={int(image_size)}"]
    model = _sam2_build(
        config_path, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides
    )
    if resolved is not None:
        obj = _load_file(resolved.path)
        state_dict = obj["model"] if isinstance(obj.get("model"), dict) else obj
        _load_strict(model, state_dict, checkpoint=resolved.uri, arch=f"config {config_path}")
    model = model.to(device).eval()
    return LoadedModel(
        model=model,
        name=short,
        checkpoint=None if resolved is None else resolved.uri,
        sha256=None if resolved is None else resolved.sha256,
        random_weights=resolved is None,
    )


# --------------------------------------------------------------------------------- DINOv2


def _dinov2_timm_name(name: str) -> tuple[str, str]:
    """``(canonical name, timm name)``, e.g. ``vitl14_reg`` -> ``vit_large_patch14_reg4_dinov2``."""
    match = re.fullmatch(r"vit([sblg])14(_reg4?)?", name)
    if match is None:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {list(DINOV2_MODELS)}")
    size, reg = match.group(1), bool(match.group(2))
    canonical = f"vit{size}14" + ("_reg" if reg else "")
    timm_size = _DINOV2_TIMM[size]
    return canonical, f"vit_{timm_size}_patch14{'_reg4' if reg else ''}_dinov2"


def _resample_release_pos_embed(
    state_dict: dict[str, torch.Tensor], grid: int, *, registers: bool
) -> None:
    """Resize the 37 x 37 ``pos_embed`` of a release file to ``grid`` x ``grid``, in place.

    Matches how Meta's models interpolate at run time: bicubic with a 0.1 offset on the
    scale factor and no antialiasing for the original models; bicubic to the exact size
    with antialiasing for the register models (``interpolate_offset=0``,
    ``interpolate_antialias=True``). The class token's entry is kept as is.
    """
    pos_embed = state_dict["pos_embed"]
    n_patch = pos_embed.shape[1] - 1
    old = math.isqrt(n_patch)
    if old * old != n_patch or old == grid:
        return
    dim = pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    if registers:
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        scale = (grid + 0.1) / old
        patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic")
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    state_dict["pos_embed"] = torch.cat([pos_embed[:, :1], patch], dim=1)


def build_dinov2(
    name: str,
    checkpoint: str | None,
    *,
    device: str = "cpu",
    image_size: int = _DINOV2_RELEASE_SIZE,
    random_weights: bool = False,
    sha256: str | None = None,
) -> LoadedModel:
    """Build DINOv2 ``name`` (``vits14``...``vitg14``, optional ``_reg``) as a timm ViT.

    The model takes square inputs of ``image_size`` (a multiple of 14) and has no head.
    ``checkpoint`` is a file in Meta's release layout (``cls_token``, ``pos_embed`` for
    518 x 518, ``mask_token``, ``blocks.N.*``, ``register_tokens`` for ``_reg``), converted
    by timm's ``checkpoint_filter_fn``; ``None`` means the official file, which must be in
    the cache. For another ``image_size`` the position embedding is resized once at load
    time the way Meta's code does it at run time.
    """
    canonical, timm_name = _dinov2_timm_name(name)
    if image_size % _DINOV2_PATCH:
        raise ValueError(f"DINOv2 image_size must be a multiple of 14, got {image_size}")
    resolved = _resolve_weights("dinov2", canonical, checkpoint, random_weights, sha256)

    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(timm_name, pretrained=False, img_size=image_size, num_classes=0)
    if resolved is not None:
        state_dict = _load_file(resolved.path)
        if "pos_embed" in state_dict and "mask_token" in state_dict:
            _resample_release_pos_embed(
                state_dict,
                image_size // _DINOV2_PATCH,
                registers="register_tokens" in state_dict,
            )
        state_dict = checkpoint_filter_fn(state_dict, model)
        _load_strict(model, state_dict, checkpoint=resolved.uri, arch=f"DINOv2 {canonical}")
    model = model.to(device).eval()
    return LoadedModel(
        model=model,
        name=canonical,
        checkpoint=None if resolved is None else resolved.uri,
        sha256=None if resolved is None else resolved.sha256,
        random_weights=resolved is None,
    )


def dinov2_patch_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens of the last block after the final LayerNorm.

    ``images``: (B, 3, H, W) float, already normalised with :func:`dinov2_mean_std`, H and W
    equal to the model's image size. Returns (B, H/14, W/14, D) in the model's dtype, row
    major (token [b, i, j] covers pixels [14i:14i+14, 14j:14j+14]); the class token and
    registers (``model.num_prefix_tokens``) are dropped.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    expected = tuple(model.patch_embed.img_size)  # type: ignore[union-attr]
    if tuple(images.shape[-2:]) != expected:
        raise ValueError(
            f"images are {tuple(images.shape[-2:])} but the model was built for {expected}"
        )
    tokens = model.forward_features(images)  # type: ignore[operator]
    tokens = tokens[:, model.num_prefix_tokens :]  # type: ignore[misc]
    h, w = (s // _DINOV2_PATCH for s in images.shape[-2:])
    return tokens.reshape(images.shape[0], h, w, tokens.shape[-1])


def dinov2_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel for inputs in [0, 1], from the timm model's config."""
    cfg = model.pretrained_cfg  # type: ignore[union-attr]
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
