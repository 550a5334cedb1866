"""Build a memory bank from COCO references (masks as polygons or RLE) and their images."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import fsspec
import numpy as np
from refseg.core import rle as rle_ops
from refseg.core.coco import ReferenceShot, category_names, load_references
from refseg.core.features import DinoEncoder
from refseg.core.imaging import decode_image
from refseg.core.memory_bank import MemoryBank, ShotRecord, TinyMaskError, encode_shot

__all__ = ["image_uri", "read_image", "reference_mask", "build_memory_bank"]

log = logging.getLogger(__name__)


def image_uri(root: str, file_name: str) -> str:
    """``file_name`` under ``root`` (a folder or URI prefix); absolute names are kept."""
    if "://" in file_name or file_name.startswith("/"):
        return file_name
    return posixpath.join(root.rstrip("/"), file_name) if root else file_name


def read_image(uri: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a local path or fsspec URI."""
    try:
        with fsspec.open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"reference image not found: {uri} (check --images and the file_name entries)"
        ) from None
    return decode_image(data, uri=uri)


def reference_mask(shot: ReferenceShot) -> np.ndarray:
    """(H, W) bool instance mask of a shot; box-only shots raise a clear error."""
    if shot.segmentation is None:
        raise ValueError(
            f"reference annotation {shot.annotation_id} (image {shot.file_name}) has a box but "
            "no mask: run `refseg masks-from-boxes` on the references first"
        )
    ann = {"id": shot.annotation_id, "segmentation": shot.segmentation}
    return rle_ops.decode_rle(rle_ops.annotation_to_rle(ann, shot.height, shot.width))


def build_memory_bank(
    encoder: DinoEncoder,
    references: Mapping[str, Any],
    images_root: str,
    *,
    bank: MemoryBank | None = None,
    context_scale: float = 1.2,
    min_weight: float = 1e-3,
    meta: Mapping[str, Any] | None = None,
    load_image: Callable[[str], np.ndarray] = read_image,
    negatives: bool = False,
) -> MemoryBank:
    """Encode every shot of a COCO dict and add it to ``bank`` (a new one when None).

    Shots whose mask is empty, outside its image or too small for the encoder's patches are
    skipped with a warning; a category left with no usable shot is an error naming it.
    With ``negatives``, the annotations are negative references: each is encoded the same
    way and stored as a negative of its ``category_id``, a class the bank must have shots of.
    """
    what, kind = ("negative reference", "negative") if negatives else ("reference", "shot")
    names = category_names(references)
    dup = {n for n in names.values() if list(names.values()).count(n) > 1}
    if dup:
        raise ValueError(f"duplicate category names in the references: {sorted(dup)}")
    shots = load_references(references)
    if not shots:
        raise ValueError(f"the {what}s hold no annotations: nothing to build a bank from")
    if bank is None:
        if negatives:
            raise ValueError("negative references need a bank with positive shots to add to")
        bank = MemoryBank(encoder=encoder.name, image_size=encoder.image_size)
    bank.check_encoder(encoder.name, encoder.image_size)
    bank.meta.update(meta or {})
    cache: dict[str, np.ndarray] = {}
    added: dict[int, int] = {s.category_id: 0 for s in shots}
    skipped: list[str] = []
    for shot in sorted(shots, key=lambda s: (s.image_id, s.annotation_id)):
        uri = image_uri(images_root, shot.file_name)
        if uri not in cache:
            cache.clear()  # shots are sorted by image: keep one decoded image at a time
            cache[uri] = load_image(uri)
        image = cache[uri]
        if image.shape[:2] != (shot.height, shot.width):
            raise ValueError(
                f"reference image {uri} is {image.shape[1]}x{image.shape[0]} but the "
                f"annotations say {shot.width}x{shot.height}"
            )
        mask = reference_mask(shot)
        if not mask.any():
            skipped.append(f"annotation {shot.annotation_id}: empty mask")
            continue
        try:
            proto = encode_shot(
                encoder, image, mask, shot.bbox, context_scale=context_scale, min_weight=min_weight
            )
        except (TinyMaskError, ValueError) as exc:
            skipped.append(f"annotation {shot.annotation_id}: {exc}")
            continue
        record = ShotRecord(
            category_id=shot.category_id,
            image_id=shot.image_id,
            annotation_id=shot.annotation_id,
            file_name=uri,
            mask_generated=shot.mask_generated,
            bbox=tuple(float(v) for v in shot.bbox),
            segmentation=rle_ops.encode_masks(mask[None])[0],
        )
        (bank.add_negative if negatives else bank.add)(record, proto, names[shot.category_id])
        added[shot.category_id] += 1
    for msg in skipped:
        log.warning("skipped %s %s", what, msg)
    present = bank.negatives if negatives else bank.shots
    empty = [f"{cid} ({names[cid]})" for cid, n in added.items() if n == 0 and cid not in present]
    if empty:
        raise ValueError(
            f"no usable {kind} for categories {', '.join(empty)}: their {what} masks are "
            f"empty, outside the image or too small; add larger {what}s"
        )
    return bank
