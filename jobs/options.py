"""Options every model-running command shares: preset, models, method settings, config file.

Precedence: preset defaults < YAML config file (``--config``) < flags. Every field of
``ModelConfig`` and ``MethodConfig`` is a kebab-case flag and a config key.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from typing import Any

import yaml
from refseg.core.config import MethodConfig, ModelConfig, get_preset

__all__ = ["add_model_args", "add_config_arg", "resolve_configs", "load_config_file", "flag"]

log = logging.getLogger(__name__)

_MODEL_HELP = {
    "sam2_config": "SAM2 config shipped with the sam2 package, e.g. sam2_hiera_l, sam2.1_hiera_t",
    "sam2_checkpoint": "SAM2 checkpoint: path, s3://, gs://, https:// or official name",
    "dinov2_model": "DINOv2 model: vits14, vitb14, vitl14, vitg14, optionally with _reg",
    "dinov2_checkpoint": "DINOv2 checkpoint: path, URI or official name (dinov2_vitl14)",
    "device": "torch device: cpu, cuda, cuda:1 or auto",
    "random_weights": "build the models with random weights (offline smoke runs only)",
    "sam2_image_size": "SAM2 input side (1024 in the paper)",
    "dinov2_image_size": "DINOv2 input side, a multiple of 14 (518 in the paper)",
    "compile": "torch.compile what runs: SAM2's image encoder and mask decoder, DINOv2 (GPU speed)",
}
_METHOD_HELP = {
    "points_per_side": "point-grid prompts per side (32: 1024 prompts)",
    "prompt_batch": "prompts per mask-decoder call (0: automatic: 256 for the stock "
    "decoder, sized for the device for the fast one); speed and memory only",
    "decoder": "fast: SAM2's mask decoder with each image's shared work done once (same "
    "masks up to float rounding); stock: SAM2's own call, the paper's path",
    "iou_threshold": "keep proposals with SAM-predicted IoU above this",
    "nms_iou": "class-wise NMS box IoU threshold",
    "max_nms": "keep at most this many proposals after NMS",
    "max_instances": "keep the top-k instances per image (COCO maxDets)",
    "resize": "target resize: square (the paper) or longest-side (SAM2 predictor)",
    "add_no_mem_embed": "add SAM2's no_mem_embed to image features as its predictor does",
    "box_convention": "ntt: the paper's inclusive boxes; standard: pycocotools' boxes",
    "soft_merge": "semantic-aware soft merging of overlapping same-class instances",
    "merge_power": "exponent of (1 - IoS) in soft merging",
    "score_threshold": "drop instances scoring at or below this",
    "negative_margin": "rule a class out when a negative of it is at least as close as its "
    "prototype minus this margin (banks with negatives only; default 0)",
    "autocast_bf16": "run both backbones under bf16 autocast and the fast decoder in bf16 "
    "(speed option on GPUs and CPUs with bf16 support)",
    "tf32": "allow TF32 in float32 matrix products and convolutions on CUDA (speed option; "
    "off: strict float32, as the paper runs; no effect on CPU)",
    "merge_resolution": "full: soft-merge at image size (the paper); lowres: merge the "
    "256x256 masks, upsample only the kept top-k (speed and memory option)",
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(group: argparse._ArgumentGroup, cls: type, helps: dict[str, str]) -> None:
    for f in dataclasses.fields(cls):
        default = f.default
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        help_ = helps.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            group.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, help=help_, **kw
            )
            continue
        choices = _LITERALS.get(f.name)
        typ = type(default) if default is not None else str
        group.add_argument(flag(f.name), type=typ, choices=choices, help=help_, **kw)


_LITERALS = {
    "resize": ("square", "longest-side"),
    "box_convention": ("ntt", "standard"),
    "merge_resolution": ("full", "lowres"),
    "decoder": ("fast", "stock"),
}


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="YAML file of settings (keys as the flags, with - or _); flags override it",
    )


def add_model_args(parser: argparse.ArgumentParser, *, method: bool = True) -> None:
    """Add --preset, the model flags and (optionally) every method flag."""
    g = parser.add_argument_group("models")
    g.add_argument("--preset", default=None, help="ntt (the paper; default) or tiny")
    _add_fields(g, ModelConfig, _MODEL_HELP)
    if method:
        _add_fields(parser.add_argument_group("method"), MethodConfig, _METHOD_HELP)
    add_config_arg(parser)


def load_config_file(path: str | None) -> dict[str, Any]:
    """Flat dict of settings from a YAML file (sections ``model:``/``method:`` allowed)."""
    if not path:
        return {}
    import fsspec

    try:
        with fsspec.open(path, "r") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key in ("model", "method", "pipeline", "label"):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


def _check_keys(file_cfg: dict[str, Any], args: argparse.Namespace) -> None:
    from refseg.pipeline.dataflow.settings import PipelineSettings

    known = {"preset"} | set(vars(args))
    for cls in (ModelConfig, MethodConfig, PipelineSettings):
        known |= {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_cfg) - known)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} in config file {args.config}; "
            "keys are the command's flags (with - or _)"
        )


def resolve_configs(args: argparse.Namespace) -> tuple[str, ModelConfig, MethodConfig]:
    """Preset < config file < flags; warns loudly on random weights."""
    file_cfg = load_config_file(getattr(args, "config", None))
    _check_keys(file_cfg, args)
    preset_name = getattr(args, "preset", None) or file_cfg.pop("preset", None) or "ntt"
    file_cfg.pop("preset", None)
    preset = get_preset(preset_name)
    values: dict[str, dict[str, Any]] = {"model": {}, "method": {}}
    for section, cls in (("model", ModelConfig), ("method", MethodConfig)):
        for f in dataclasses.fields(cls):
            if f.name in file_cfg:
                values[section][f.name] = file_cfg[f.name]
            flag_value = getattr(args, f.name, None)
            if flag_value is not None:
                values[section][f.name] = flag_value
    model = dataclasses.replace(preset.model, **values["model"])
    method = dataclasses.replace(preset.method, **values["method"])
    if model.random_weights:
        msg = "RANDOM WEIGHTS: models are not loaded from checkpoints; outputs are meaningless"
        warnings.warn(msg, UserWarning, stacklevel=2)
        log.warning(msg)
    return preset_name, model, method


def config_file_extra(args: argparse.Namespace, key: str, default: Any = None) -> Any:
    """A non-model setting (e.g. pipeline batch sizes) from the config file."""
    return load_config_file(getattr(args, "config", None)).get(key, default)
