"""Label images in this process: the method as a small object for notebooks and scripts.

``Labeller`` builds SAM2 and DINOv2 once (from a preset or explicit configs) around a
memory bank and labels file paths or URIs, PIL images or ``(H, W, 3)`` uint8 arrays,
returning one :class:`~refseg.core.instances.Instances` per image. No Ray: for a corpus,
``refseg label`` or ``refseg.label_dataset`` run the same pieces as a Ray Data pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
from PIL import Image
from refseg.core import imaging
from refseg.core.config import MethodConfig, ModelConfig, preset_configs
from refseg.core.factory import build_encoder, build_proposer
from refseg.core.instances import Instances
from refseg.core.matching import Matcher
from refseg.core.memory_bank import MemoryBank
from refseg.core.references import read_image
from refseg.core.segmenter import Segmenter

__all__ = ["ImageLike", "Labeller", "load_image"]

#: A path or URI (local, s3://, gs://, http(s)://), a PIL image, or an (H, W, 3) uint8 RGB /
#: (H, W) uint8 grayscale array.
ImageLike: TypeAlias = str | os.PathLike[str] | np.ndarray | Image.Image


def load_image(image: ImageLike, *, what: str = "image") -> np.ndarray:
    """One image as an ``(H, W, 3)`` uint8 RGB array (the method's input).

    Paths and URIs are read and decoded as ``refseg label`` decodes files (EXIF rotation,
    16-bit, CMYK, palette; alpha dropped). PIL images are converted the same way. Arrays
    must be uint8 ``(H, W, 3)`` RGB or ``(H, W)`` grayscale (replicated).

    Raises:
        TypeError / ValueError: naming ``what`` and the accepted forms.
    """
    if isinstance(image, str | os.PathLike):
        return read_image(os.fspath(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"{what}: arrays must be uint8 RGB (H, W, 3), got dtype {image.dtype}; scale "
                "floats in [0, 1] with (a * 255).round().astype(np.uint8)"
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ValueError(
                f"{what}: arrays must be (H, W, 3) RGB or (H, W) grayscale, got shape "
                f"{image.shape}; drop an alpha channel with a[..., :3]"
            )
        return np.ascontiguousarray(image)
    if isinstance(image, Image.Image):
        return imaging._to_rgb_array(image, what)
    raise TypeError(
        f"{what}: expected a path or URI, a PIL image or a uint8 numpy array, got "
        f"{type(image).__name__}"
    )


class Labeller:
    """Training-free instance segmentation of images against a memory bank, in process.

    Args:
        bank: a :class:`MemoryBank` or the path/URI of a ``.safetensors`` bank.
        model: which SAM2 and DINOv2 to build and from which checkpoints; the bank must come
            from the same DINOv2 (name and input size).
        method: the method's settings (grid, thresholds, NMS, merging, top-k).

    Example::

        labeller = Labeller.from_preset("bank.safetensors", "ntt", device="cuda")
        instances = labeller("photo.jpg")            # one image  -> Instances
        results = labeller([array, pil_image])       # a sequence -> list[Instances]
        instances.to_coco_results(image_id=1)        # COCO results (RLE masks)
        instances.masks                               # (N, H, W) bool at the image's size
    """

    def __init__(self, bank: MemoryBank | str, *, model: ModelConfig, method: MethodConfig) -> None:
        self.bank = bank if isinstance(bank, MemoryBank) else MemoryBank.load(bank)
        self.model, self.method = model, method
        matcher = Matcher(build_encoder(model, method), self.bank, method)
        self.segmenter = Segmenter(build_proposer(model, method), matcher)

    @classmethod
    def from_preset(cls, bank: MemoryBank | str, preset: str = "ntt", **settings: Any) -> Labeller:
        """A labeller of a preset (``ntt``: the paper's setting; ``tiny``: CPU smoke runs)
        with any ModelConfig/MethodConfig field set by keyword, e.g. ``device="cuda"``,
        ``sam2_checkpoint="sam2_hiera_large.pt"``, ``random_weights=True``, ``nms_iou=0.6``."""
        model, method = preset_configs(preset, **settings)
        return cls(bank, model=model, method=method)

    @property
    def category_names(self) -> dict[int, str]:
        """Category id -> name, as the bank has them."""
        return dict(self.bank.names)

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike],
        *,
        batch_size: int = 1,
        masks: bool = True,
    ) -> Instances | list[Instances]:
        """Label one image (-> ``Instances``) or a sequence of them (-> a list, in order).

        Each result holds the image's instances at its original size: ``boxes`` (N, 4) XYXY
        float32, ``scores`` (N,), ``category_ids`` (N,) (the bank's category ids),
        ``rles`` (COCO RLE) and, with ``masks=True``, ``masks`` (N, H, W) bool; sorted by
        decreasing score, at most ``max_instances``. ``batch_size`` images go through the
        models together (more memory, fewer calls); ``masks=False`` keeps only the compact
        RLEs (large images: a dense mask is H x W bytes per instance).
        """
        one = not isinstance(images, Sequence) or isinstance(images, str)
        items = [images] if one else list(images)  # type: ignore[list-item]
        arrays = (load_image(im, what=f"image {k}") for k, im in enumerate(items))
        out: list[Instances] = []
        chunk: list[np.ndarray] = []
        for array in arrays:
            chunk.append(array)
            if len(chunk) == max(1, batch_size):
                out += self.segmenter(chunk)
                chunk = []
        if chunk:
            out += self.segmenter(chunk)
        out = [_with_masks(r) if masks else r.with_rles(drop_masks=True) for r in out]
        return out[0] if one else out


def _with_masks(instances: Instances) -> Instances:
    if instances.masks is not None:
        return instances.with_rles()
    return dataclasses.replace(instances, masks=instances.mask_array())
