"""Settings of the method and of the models, as small frozen dataclasses.

Every number of ``../shared/method.md`` lives here with the paper's default. A preset is a
named pair of (ModelConfig, MethodConfig); flags and config files override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

ResizeMode = Literal["square", "longest-side"]
BoxConvention = Literal["ntt", "standard"]
MergeResolution = Literal["full", "lowres"]
Decoder = Literal["fast", "stock"]


@dataclass(frozen=True)
class ModelConfig:
    """Which backbones to build and from where.

    ``sam2_config`` is any config name the sam2 package ships (``sam2_hiera_l``,
    ``sam2.1_hiera_t``...). ``dinov2_model`` is ``vits14``, ``vitb14``, ``vitl14``,
    ``vitg14`` with an optional ``_reg`` suffix. Checkpoints are local paths, fsspec URIs
    or names of official checkpoints (``refseg checkpoints list``).
    """

    sam2_config: str = "sam2_hiera_l"
    sam2_checkpoint: str | None = None
    dinov2_model: str = "vitl14"
    dinov2_checkpoint: str | None = None
    device: str = "cpu"
    random_weights: bool = False
    sam2_image_size: int = 1024
    dinov2_image_size: int = 518
    # torch.compile of the heavy modules (GPU speed option; results equal within float
    # tolerance, bench/gpu.py's fp32-compile checks that)
    compile: bool = False


@dataclass(frozen=True)
class MethodConfig:
    """The method's settings (method.md §1-§4); defaults reproduce the paper's code."""

    # §1 references
    context_scale: float = 1.2
    min_mask_weight: float = 1e-3  # Σ m_p below this: the shot is skipped with a warning
    # §3 proposals
    points_per_side: int = 32
    # prompts per mask-decoder call; 0: automatic (the paper's 256 for the stock decoder,
    # sized for the device for the fast one). It changes speed and memory, not results.
    prompt_batch: int = 0
    iou_threshold: float = 0.4
    mask_threshold: float = 0.0
    add_no_mem_embed: bool = False
    resize: ResizeMode = "square"
    # §4 matching
    nms_iou: float = 0.5
    max_nms: int = 800
    merge_power: float = 0.5
    soft_merge: bool = True
    max_instances: int = 100
    score_threshold: float = 0.0
    box_convention: BoxConvention = "ntt"
    # negative references (refseg's addition; no effect on a bank without negatives): a class
    # is ruled out for a proposal whose cosine to one of its negatives is at least its
    # cosine to the class prototype minus this margin
    negative_margin: float = 0.0
    # speed options (off by default: the paper runs float32 and merges at full resolution)
    # "fast": SAM2's mask decoder with each image's shared work done once
    # (refseg.core.decoder; equal outputs up to float rounding); "stock": SAM2's own call
    decoder: Decoder = "fast"
    autocast_bf16: bool = False
    # TF32 for float32 matrix products and convolutions on CUDA (faster on Ampere and later,
    # ~10 mantissa bits: it changes the numerics, so it is part of the run's fingerprint);
    # off: strict float32 (cuDNN convolutions too), as the paper runs. No effect on CPU.
    tf32: bool = False
    # "lowres": soft merging on the 256x256 proposal masks, then only the kept top-k are
    # upsampled to the image size (the paper upsamples every NMS survivor first)
    merge_resolution: MergeResolution = "full"

    def __post_init__(self) -> None:
        if self.points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {self.points_per_side}")
        if self.prompt_batch < 0:
            raise ValueError(
                f"prompt_batch must be >= 1, or 0 for automatic; got {self.prompt_batch}"
            )
        if self.decoder not in ("fast", "stock"):
            raise ValueError(f"decoder must be 'fast' or 'stock', got {self.decoder!r}")
        if self.resize not in ("square", "longest-side"):
            raise ValueError(f"resize must be 'square' or 'longest-side', got {self.resize!r}")
        if self.merge_resolution not in ("full", "lowres"):
            raise ValueError(
                f"merge_resolution must be 'full' or 'lowres', got {self.merge_resolution!r}"
            )
        if self.box_convention not in ("ntt", "standard"):
            raise ValueError(
                f"box_convention must be 'ntt' or 'standard', got {self.box_convention!r}"
            )


#: Settings that say where and how fast the models run, not what they compute (the same
#: masks up to float rounding): run fingerprints leave them out, and a rematch accepts any
#: value of them (refseg.pipeline.run_steps, refseg.pipeline.dataflow.proposal_cache).
RUNTIME_MODEL_FIELDS: tuple[str, ...] = ("device", "compile")
RUNTIME_METHOD_FIELDS: tuple[str, ...] = ("decoder", "prompt_batch")


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    method: MethodConfig = field(default_factory=MethodConfig)


PRESETS: dict[str, Preset] = {
    # The paper's setting: SAM 2.0 Hiera-L, DINOv2 ViT-L/14 at 518, 32x32 grid.
    "ntt": Preset("ntt", ModelConfig()),
    # Small models and sizes so that a CPU test runs in seconds.
    "tiny": Preset(
        "tiny",
        ModelConfig(
            sam2_config="sam2.1_hiera_t",
            dinov2_model="vits14",
            sam2_image_size=256,
            dinov2_image_size=112,
        ),
        MethodConfig(points_per_side=8, max_nms=200, box_convention="standard"),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that ignores ``None`` values (unset flags)."""
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if v is not None})


def preset_configs(
    preset: str = "ntt",
    *,
    model: ModelConfig | None = None,
    method: MethodConfig | None = None,
    **overrides: Any,
) -> tuple[ModelConfig, MethodConfig]:
    """The (model, method) settings of ``preset``, or the given ones, with single fields set
    by keyword (each to whichever of the two has it; ``None`` values are ignored).

    >>> model, method = preset_configs("tiny", random_weights=True, nms_iou=0.7)
    """
    p = get_preset(preset)
    model, method = model or p.model, method or p.method
    fields = {
        "model": {f.name for f in dataclasses.fields(ModelConfig)},
        "method": {f.name for f in dataclasses.fields(MethodConfig)},
    }
    unknown = sorted(set(overrides) - fields["model"] - fields["method"])
    if unknown:
        raise TypeError(
            f"unknown settings {unknown}: ModelConfig has {sorted(fields['model'])}, "
            f"MethodConfig has {sorted(fields['method'])}"
        )
    model = replace(model, **{k: v for k, v in overrides.items() if k in fields["model"]})
    method = replace(method, **{k: v for k, v in overrides.items() if k in fields["method"]})
    return model, method
