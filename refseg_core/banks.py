"""Build a memory bank, or add to one, from COCO references or from arrays (method.md §1-§2).

:func:`build_memory_bank` is what ``refseg build-memory`` runs: it builds DINOv2 once,
encodes every shot (and negative), and adds them to a new bank or to an existing one,
leaving out shots the bank already holds and refusing prototypes of other DINOv2 weights.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from refseg.core import rle as rle_ops
from refseg.core.checkpoints import default_checkpoint_for, resolve_checkpoint
from refseg.core.coco import load_coco
from refseg.core.config import MethodConfig, ModelConfig, preset_configs
from refseg.core.factory import build_encoder
from refseg.core.labeller import ImageLike, load_image
from refseg.core.memory_bank import MemoryBank
from refseg.core.references import build_memory_bank as encode_references
from refseg.core.references import read_image

__all__ = [
    "KIND_KEY",
    "BankUpdate",
    "Shot",
    "build_memory_bank",
    "check_bank",
    "dinov2_checkpoint_uri",
]

#: Key that marks an annotation of a corrections file (``refseg import-review``) as a new
#: shot or a negative, so that one file serves both ``references`` and ``negatives``.
KIND_KEY = "refseg_kind"


@dataclass(frozen=True)
class Shot:
    """One reference instance given as arrays.

    Attributes:
        image: the reference image: a path/URI, a PIL image or an (H, W, 3) uint8 array.
        mask: (H, W) bool instance mask on that image.
        category_id: the dataset's category id (labels come out with it).
        category_name: the category's name.
        negative: a look-alike that is NOT of this category (refseg's negative references).
    """

    image: ImageLike
    mask: np.ndarray
    category_id: int
    category_name: str
    negative: bool = False


@dataclass
class BankUpdate:
    """What :func:`build_memory_bank` did.

    Attributes:
        bank: the new or updated bank.
        changed: whether anything was encoded and added.
        duplicates: annotation ids left out because the bank already held them, by kind
            (``"shots"``, ``"negatives"``).
    """

    bank: MemoryBank | None
    changed: bool
    duplicates: dict[str, list[int]] = field(default_factory=dict)


def dinov2_checkpoint_uri(model: ModelConfig) -> str | None:
    """URI of the DINOv2 file that ``model`` loads; None for random weights.

    Raises ``FileNotFoundError`` (saying where to get it) when that file is not available.
    """
    if model.random_weights:
        return None
    spec = model.dinov2_checkpoint
    if spec is None:
        official = default_checkpoint_for("dinov2", model.dinov2_model.replace("_reg4", "_reg"))
        if official is None:
            return None  # the models layer raises its own message when it builds
        spec = official.name
    return resolve_checkpoint(spec).uri


def check_bank(bank: MemoryBank, model: ModelConfig, dinov2_sha: str | None, where: str) -> None:
    """Refuse a bank whose prototypes come from another DINOv2 than ``model`` runs (name,
    input size, or weights by SHA-256); warn when one side has random weights."""
    bank.check_encoder(model.dinov2_model, model.dinov2_image_size)
    bank_sha = bank.meta.get("dinov2_sha256")
    if bank_sha and dinov2_sha and bank_sha != dinov2_sha:
        raise ValueError(
            f"memory bank {where} was built with DINOv2 weights {bank_sha} but this run "
            f"loads {dinov2_sha}: rebuild the bank with the same --dinov2-checkpoint"
        )
    bank_rw = bank.meta.get("random_weights")
    if bank_rw is not None and bool(bank_rw) != model.random_weights:
        warnings.warn(
            f"memory bank {where} has random_weights={bank_rw} but this run has "
            f"random_weights={model.random_weights}: the matches are meaningless",
            UserWarning,
            stacklevel=3,
        )


def _of_kind(coco: dict[str, Any], kind: str) -> dict[str, Any]:
    """``coco`` without the annotations marked as the other kind (shot / negative)."""
    other = "negative" if kind == "shot" else "shot"
    return {**coco, "annotations": [a for a in coco["annotations"] if a.get(KIND_KEY) != other]}


def _new_only(refs: dict[str, Any], bank: MemoryBank, negatives: bool) -> tuple[dict, list[int]]:
    """``refs`` without the shots (same annotation and image id) already in ``bank``."""
    records = bank.negative_records if negatives else bank.records
    present = {(r.annotation_id, r.image_id) for recs in records.values() for r in recs}
    anns = refs["annotations"]
    dup = [(int(a["id"]), int(a["image_id"])) in present for a in anns]
    keep = [a for a, d in zip(anns, dup, strict=True) if not d]
    ids = sorted(int(a["id"]) for a, d in zip(anns, dup, strict=True) if d)
    return {**refs, "annotations": keep}, ids


def _check_same_weights(bank: MemoryBank, meta: dict[str, Any], where: str) -> None:
    old_rw, new_rw = bank.meta.get("random_weights"), meta["random_weights"]
    old_sha, new_sha = bank.meta.get("dinov2_sha256"), meta["dinov2_sha256"]
    if (old_rw is not None and bool(old_rw) != bool(new_rw)) or (
        old_sha and new_sha and old_sha != new_sha
    ):
        raise ValueError(
            f"{where} was built with other DINOv2 weights (random_weights={old_rw}, sha256 "
            f"{old_sha}) than this run (random_weights={new_rw}, sha256 {new_sha}): "
            "prototypes of different weights cannot share a bank"
        )


def _shots_coco(shots: Sequence[Shot]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Array shots as a COCO dict (RLE masks) plus the images by their stand-in names."""
    images, anns, arrays, cats = [], [], {}, {}
    for k, shot in enumerate(shots):
        image = load_image(shot.image, what=f"shot {k}'s image")
        mask = np.asarray(shot.mask)
        if mask.shape != image.shape[:2] or mask.dtype != np.bool_:
            raise ValueError(
                f"shot {k}: the mask must be (H, W) bool like its image {image.shape[:2]}, "
                f"got {mask.dtype} {mask.shape}"
            )
        if not mask.any():
            raise ValueError(f"shot {k} (category {shot.category_id}): the mask is empty")
        name = f"array:{k}"
        arrays[name] = image
        h, w = mask.shape
        images.append({"id": k + 1, "file_name": name, "height": h, "width": w})
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1)]
        box.append(float(ys.max() - ys.min() + 1))
        anns.append(
            {
                "id": k + 1,
                "image_id": k + 1,
                "category_id": int(shot.category_id),
                "bbox": box,
                "segmentation": rle_ops.encode_masks(mask[None])[0],
                "iscrowd": 0,
                KIND_KEY: "negative" if shot.negative else "shot",
            }
        )
        if cats.setdefault(int(shot.category_id), shot.category_name) != shot.category_name:
            raise ValueError(
                f"category {shot.category_id} is named {cats[int(shot.category_id)]!r} and "
                f"{shot.category_name!r}: one name per category id"
            )
    coco = {"images": images, "annotations": anns}
    coco["categories"] = [{"id": c, "name": n} for c, n in sorted(cats.items())]
    return coco, arrays


def build_memory_bank(
    shots: Sequence[Shot] = (),
    *,
    references: str | Mapping[str, Any] | None = None,
    negatives: str | Mapping[str, Any] | None = None,
    images: str = "",
    add_to: MemoryBank | None = None,
    preset: str = "ntt",
    model: ModelConfig | None = None,
    method: MethodConfig | None = None,
    **settings: Any,
) -> BankUpdate:
    """Encode reference shots (and negatives) into a memory bank.

    Args:
        shots: references as arrays (:class:`Shot`), positive or negative.
        references: a COCO file/URI or dict of reference shots (polygon or RLE masks),
            their ``file_name`` under ``images``; annotations a corrections file marks as
            negatives (``refseg_kind``) are left out.
        negatives: a COCO file/URI or dict of negative references.
        images: the folder or URI prefix the COCO ``file_name`` entries are under.
        add_to: an existing bank to add to (shots it holds, by annotation and image id,
            are left out; prototypes of other DINOv2 weights are refused); None: a new bank.
        preset, model, method, settings: the DINOv2 to build (``preset_configs``), e.g.
            ``preset="tiny", random_weights=True`` or ``dinov2_checkpoint=...``.

    Returns:
        :class:`BankUpdate` (``bank`` is ``add_to`` updated in place, or a new bank).
    """
    model, method = preset_configs(preset, model=model, method=method, **settings)
    parts: list[tuple[dict[str, Any], bool, Any, str]] = []
    if references is not None:
        refs = load_coco(references) if isinstance(references, str) else dict(references)
        parts.append((_of_kind(refs, "shot"), False, read_image, images))
    if negatives is not None:
        negs = load_coco(negatives) if isinstance(negatives, str) else dict(negatives)
        parts.append((_of_kind(negs, "negative"), True, read_image, images))
    if shots:
        coco, arrays = _shots_coco(shots)
        for negative, kind in ((False, "shot"), (True, "negative")):
            parts.append((_of_kind(coco, kind), negative, arrays.__getitem__, ""))
    if not parts:
        raise ValueError("give shots, references (a COCO file of shots), negatives, or both")
    if add_to is None and not any(not neg and p["annotations"] for p, neg, _, _ in parts):
        raise ValueError(
            "negatives are added to a bank with positive shots: pass add_to (--add), or "
            "references/shots to build the bank in the same call"
        )
    duplicates: dict[str, list[int]] = {}
    if add_to is not None:
        kept = []
        for coco, negative, load, root in parts:
            coco, dup = _new_only(coco, add_to, negative)
            if dup:
                duplicates.setdefault("negatives" if negative else "shots", []).extend(dup)
            kept.append((coco, negative, load, root))
        parts = kept
    parts = [p for p in parts if p[0]["annotations"]]
    if not parts:
        return BankUpdate(add_to, False, duplicates)
    encoder = build_encoder(model, method)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta: dict[str, Any] = {
        "preset": preset,
        "dinov2_model": model.dinov2_model,
        "dinov2_checkpoint": dinov2_checkpoint_uri(model),
        "dinov2_sha256": encoder.checkpoint_sha256,
        "random_weights": model.random_weights,
    }
    if add_to is None:
        meta["created"] = now
    else:
        _check_same_weights(add_to, meta, "the bank to add to")
        meta["updated"] = now
    bank = add_to
    for negative in (False, True):  # shots first: negatives need their classes
        for coco, neg, load, root in parts:
            if neg == negative:
                bank = encode_references(
                    encoder,
                    coco,
                    root,
                    bank=bank,
                    context_scale=method.context_scale,
                    min_weight=method.min_mask_weight,
                    meta=meta,
                    load_image=load,
                    negatives=negative,
                )
    return BankUpdate(bank, True, duplicates)
