"""``refseg masks-from-boxes``: masks for box-only reference annotations, from SAM2 box prompts.

method.md §6: every annotation with a ``bbox`` and no segmentation is segmented by prompting
SAM2 with its box (single-mask output). The image is resized into the SAM2 input square as
for targets (``--resize``: ``square`` stretches, the paper's choice; ``longest-side`` keeps
the aspect ratio), the box is mapped into that square, and the low-resolution logits are
resampled bilinearly to the original size and thresholded at ``mask_threshold`` (0).

The output COCO file is the input with, for each such annotation, ``segmentation`` set to a
COCO RLE (``{"size": [H, W], "counts": str}``), ``area`` to its pixel count and
``"mask_generated": true``. Annotations that already have a mask are copied unchanged. A
picture of every reference (its mask filled, its box outlined) goes into the gallery folder.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw
from refseg.core import rle as rle_ops
from refseg.core.coco import category_names, images_by_id, load_coco
from refseg.core.config import ResizeMode
from refseg.core.factory import build_proposer
from refseg.core.imaging import resize_image
from refseg.core.proposals import Sam2Proposer
from refseg.core.references import image_uri, read_image
from refseg.core.tensors import lowres_to_original, to_float_tensor
from refseg.jobs.options import add_model_args, resolve_configs

__all__ = [
    "BoxMaskSummary",
    "add_box_masks_args",
    "box_masks",
    "masks_from_boxes",
    "needs_mask",
    "run_box_masks",
]

log = logging.getLogger(__name__)

GALLERY_SIDE = 512  # long side of a gallery picture, px
_GIVEN, _GENERATED = (40, 200, 80), (255, 140, 0)  # RGB of given and generated masks
_ALPHA = 0.45


def needs_mask(ann: Mapping[str, Any]) -> bool:
    """True for an annotation with a usable bbox and no (or an empty) segmentation."""
    seg = ann.get("segmentation")
    if seg is not None and len(seg) > 0:
        return False
    bbox = ann.get("bbox")
    return bool(bbox) and len(bbox) == 4 and float(bbox[2]) > 0 and float(bbox[3]) > 0


def box_masks(
    proposer: Sam2Proposer,
    image: np.ndarray,
    boxes_xywh: np.ndarray,
    *,
    resize: ResizeMode = "square",
    threshold: float = 0.0,
) -> np.ndarray:
    """SAM2 masks of box prompts on one image.

    Args:
        proposer: wraps a built SAM2 model (its input side S = ``proposer.input_size``).
        image: (H, W, 3) uint8 RGB.
        boxes_xywh: (K, 4) COCO boxes in original pixels.
        resize: how the image goes into the S x S input (see ``refseg.core.imaging``).

    Returns:
        (K, H, W) bool masks at the original size.
    """
    boxes = np.asarray(boxes_xywh, dtype=np.float64).reshape(-1, 4)
    h, w = image.shape[:2]
    if boxes.shape[0] == 0:
        return np.zeros((0, h, w), dtype=bool)
    square, info = resize_image(image, proposer.input_size, resize)
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    corners = info.to_input_xy(torch.from_numpy(xyxy).float().reshape(-1, 2)).reshape(-1, 4)
    logits = proposer.segment_boxes(to_float_tensor(square), corners)  # (K, S/4, S/4)
    full = lowres_to_original(logits.float().cpu(), info)  # (K, H, W)
    return (full > threshold).numpy()


@dataclass
class BoxMaskSummary:
    annotations: int = 0
    generated: int = 0
    kept: int = 0
    empty: list[int] = field(default_factory=list)  # ids of generated masks with no pixel
    unusable: list[int] = field(default_factory=list)  # ids with neither box nor mask
    pictures: list[str] = field(default_factory=list)

    def line(self, out: str, gallery: str | None) -> str:
        text = (
            f"refseg masks-from-boxes: {self.annotations} annotations, {self.generated} masks "
            f"generated, {self.kept} already had masks; wrote {out}"
        )
        if gallery is not None:
            text += f"; gallery of {len(self.pictures)} pictures in {gallery}"
        return text


def masks_from_boxes(
    proposer: Sam2Proposer,
    references: Mapping[str, Any],
    images_root: str,
    *,
    resize: ResizeMode = "square",
    threshold: float = 0.0,
    gallery: str | None = None,
    load_image: Callable[[str], np.ndarray] = read_image,
) -> tuple[dict[str, Any], BoxMaskSummary]:
    """Fill in the masks of box-only annotations; returns a new COCO dict and a summary.

    ``references`` is not modified. Images are decoded one at a time, in image id order.
    With ``gallery`` (a folder or URI), one PNG per annotation is written there.
    """
    out = copy.deepcopy(dict(references))
    anns = out.get("annotations", [])
    images = images_by_id(out)
    names = category_names(out)
    summary = BoxMaskSummary(annotations=len(anns))
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in anns:
        iid = int(a["image_id"])
        if iid not in images:
            raise ValueError(f"annotation {a.get('id')} refers to image {iid}, not in 'images'")
        by_image.setdefault(iid, []).append(a)
    for iid in sorted(by_image):
        img_info, group = images[iid], by_image[iid]
        todo = [a for a in group if needs_mask(a)]
        for a in group:
            if not needs_mask(a):
                summary.kept += 1
                if not a.get("segmentation"):
                    summary.unusable.append(int(a["id"]))
        if not todo and gallery is None:
            continue
        uri = image_uri(images_root, str(img_info["file_name"]))
        image = load_image(uri)
        expected = (int(img_info["height"]), int(img_info["width"]))
        if image.shape[:2] != expected:
            raise ValueError(
                f"image {uri} is {image.shape[1]}x{image.shape[0]} but the references say "
                f"{expected[1]}x{expected[0]}"
            )
        boxes = np.asarray([a["bbox"] for a in todo], dtype=np.float64).reshape(-1, 4)
        masks = box_masks(proposer, image, boxes, resize=resize, threshold=threshold)
        for a, rle in zip(todo, rle_ops.encode_masks(masks), strict=True):
            a["segmentation"] = rle
            a["area"] = float(rle_ops.rle_area([rle])[0])
            a["mask_generated"] = True
            summary.generated += 1
            if a["area"] == 0:
                summary.empty.append(int(a["id"]))
        if gallery is not None:
            for a in group:
                summary.pictures.append(_write_picture(gallery, image, a, names, img_info))
    if summary.empty:
        log.warning("SAM2 gave an empty mask for box-only annotations %s", summary.empty)
    if summary.unusable:
        log.warning("annotations without box or mask left as they are: %s", summary.unusable)
    return out, summary


def _write_picture(
    gallery: str,
    image: np.ndarray,
    ann: Mapping[str, Any],
    names: Mapping[int, str],
    img_info: Mapping[str, Any],
) -> str:
    """PNG of one reference: mask filled (orange: generated, green: given), box outlined."""
    h, w = image.shape[:2]
    scale = min(1.0, GALLERY_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    generated = bool(ann.get("mask_generated"))
    colour = _GENERATED if generated else _GIVEN
    pic = Image.fromarray(image).convert("RGB").resize(size, Image.Resampling.BILINEAR)
    if ann.get("segmentation"):
        mask = rle_ops.decode_rle(rle_ops.annotation_to_rle(ann, h, w))
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        alpha = (np.asarray(small, dtype=np.float32) / 255.0 * _ALPHA)[..., None]
        arr = np.asarray(pic, dtype=np.float32)
        arr = arr * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
        pic = Image.fromarray(arr.round().astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    if ann.get("bbox"):
        x, y, bw, bh = (float(v) * scale for v in ann["bbox"])
        draw.rectangle([x, y, x + bw, y + bh], outline=colour, width=2)
    label = f"{names.get(int(ann['category_id']), ann['category_id'])} #{ann.get('id')}"
    label += " (mask generated)" if generated else ""
    draw.rectangle([0, 0, 7 * len(label) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 2), label, fill=(255, 255, 255))
    stem = posixpath.splitext(posixpath.basename(str(img_info["file_name"])))[0]
    name = f"ann{ann.get('id')}_{stem}.png"
    fs, root = fsspec.core.url_to_fs(gallery)
    fs.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    with fs.open(posixpath.join(root, name), "wb") as f:
        f.write(buf.getvalue())
    return name


def default_gallery(out: str) -> str:
    """``<folder of OUT.json>/<stem>_gallery``."""
    folder, base = posixpath.split(out)
    return posixpath.join(folder, f"{posixpath.splitext(base)[0]}_gallery")


def add_box_masks_args(parser: argparse.ArgumentParser) -> None:
    """Add ``refseg masks-from-boxes``' arguments (and the model options) to ``parser``."""
    parser.add_argument(
        "--references", required=True, metavar="REFS.json",
        help="COCO annotation file whose box-only annotations need masks",
    )  # fmt: skip
    parser.add_argument(
        "--images", required=True, metavar="ROOT",
        help="folder or URI prefix that the references' file_name entries are under",
    )  # fmt: skip
    parser.add_argument(
        "--out", required=True, metavar="OUT.json", help="where to write the completed file"
    )
    parser.add_argument(
        "--gallery", metavar="DIR", default=None,
        help="folder for one PNG per reference with its mask (default OUT's folder/<stem>_gallery)",
    )  # fmt: skip
    parser.add_argument(
        "--resize", choices=("square", "longest-side"), default=None,
        help="how images go into the SAM2 input: square (the paper) or longest-side",
    )  # fmt: skip
    add_model_args(parser, method=False)


def run_box_masks(args: argparse.Namespace) -> int:
    """Run ``refseg masks-from-boxes`` from parsed arguments; print a summary; return 0."""
    preset, model, method = resolve_configs(args)
    references = load_coco(args.references)
    gallery = args.gallery or default_gallery(args.out)
    proposer = build_proposer(model, method)
    result, summary = masks_from_boxes(
        proposer,
        references,
        args.images,
        resize=method.resize,
        threshold=method.mask_threshold,
        gallery=gallery,
    )
    info = result.setdefault("info", {})
    if isinstance(info, dict):
        info["refseg_masks_from_boxes"] = {
            "preset": preset,
            "sam2_config": model.sam2_config,
            "sam2_checkpoint": model.sam2_checkpoint,
            "sam2_checkpoint_sha256": getattr(proposer, "checkpoint_sha256", None),
            "sam2_image_size": model.sam2_image_size,
            "resize": method.resize,
            "random_weights": model.random_weights,
            "generated": summary.generated,
        }
    fs, path = fsspec.core.url_to_fs(args.out)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    print(summary.line(args.out, gallery))
    return 0
