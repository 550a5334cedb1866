"""The memory bank: instance prototypes per shot and class prototypes (method.md §1-§2).

Stored as one safetensors file: a (K_c, D) tensor of instance prototypes per category
(``shots/<category_id>``) and JSON metadata in the file's header (category ids and names,
encoder, image size, checkpoint hash, the image and annotation id of every shot).

Negative references (refseg's addition, not the paper's): prototypes of things that must
not get a category, kept per category as ``negatives/<category_id>`` (K'_c, D) beside the
shots, with their provenance in the header. A bank without negatives is written exactly as
before (format version 1); one with negatives is version 2. Both load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from refseg.core import ops
from refseg.core.features import DinoEncoder
from refseg.core.imaging import context_crop_box
from refseg.core.tensors import to_float_tensor
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["MemoryBank", "ShotRecord", "TinyMaskError", "encode_shot"]

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
NEGATIVES_VERSION = 2  # written only when the bank holds negatives


class TinyMaskError(ValueError):
    """A reference mask too small to give a prototype at the encoder's patch resolution."""


@dataclass(frozen=True)
class ShotRecord:
    """Where one shot came from."""

    category_id: int
    image_id: int
    annotation_id: int
    file_name: str = ""
    mask_generated: bool = False
    bbox: tuple[float, ...] = ()  # COCO xywh of the shot
    segmentation: dict[str, Any] | None = None  # COCO RLE of the shot's mask


@torch.inference_mode()
def encode_shot(
    encoder: DinoEncoder,
    image: np.ndarray,
    mask: np.ndarray,
    bbox_xywh: tuple[float, float, float, float],
    *,
    context_scale: float = 1.2,
    min_weight: float = 1e-3,
) -> torch.Tensor:
    """Instance prototype of one reference (method.md §1).

    Args:
        image: (H, W, 3) uint8 RGB. mask: (H, W) bool instance mask. bbox_xywh: its box.

    Returns:
        (D,) float32: the soft-mask-weighted mean of the crop's patch features.

    Raises:
        TinyMaskError: the mask weights sum to less than ``min_weight``.
    """
    x0, y0, x1, y1 = context_crop_box(bbox_xywh, image.shape[:2], context_scale)
    s, g = encoder.image_size, encoder.grid
    crop = to_float_tensor(image[y0:y1, x0:x1])[None]
    crop = F.interpolate(crop, size=(s, s), mode="bicubic", align_corners=False)
    m = torch.from_numpy(np.ascontiguousarray(mask[y0:y1, x0:x1])).float()[None, None]
    m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False)
    weights = F.interpolate(m, size=(g, g), mode="nearest")[0, 0].to(encoder.device)
    total = float(weights.sum())
    if total < min_weight:
        raise TinyMaskError(
            f"reference mask too small: weights sum to {total:.2g} at {g}x{g} patches "
            f"(box {bbox_xywh}); use a larger instance or a larger encoder image size"
        )
    feats = encoder(crop)[0]  # (g, g, D)
    return (weights[..., None] * feats).sum(dim=(0, 1)) / total


@dataclass
class MemoryBank:
    """Instance prototypes grouped by category, plus provenance.

    Attributes:
        shots: category id -> (K_c, D) float32 instance prototypes (raw, not normalised).
        names: category id -> name.
        records: category id -> one ShotRecord per row of ``shots``.
        encoder: DINOv2 name the prototypes come from (e.g. ``vitl14``).
        image_size: the DINOv2 input side used for the references.
        meta: anything else worth keeping (preset, checkpoint hashes).
        negatives: category id -> (K'_c, D) float32 prototypes of things that are not that
            category (raw, not normalised); only categories that have shots.
        negative_records: category id -> one ShotRecord per row of ``negatives``.
    """

    encoder: str
    image_size: int
    shots: dict[int, torch.Tensor] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    records: dict[int, list[ShotRecord]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    negatives: dict[int, torch.Tensor] = field(default_factory=dict)
    negative_records: dict[int, list[ShotRecord]] = field(default_factory=dict)

    @property
    def category_ids(self) -> list[int]:
        """Category ids in ascending order: the class index order used for matching."""
        return sorted(self.shots)

    @property
    def dim(self) -> int:
        return next(iter(self.shots.values())).shape[1] if self.shots else 0

    def __len__(self) -> int:
        return sum(int(v.shape[0]) for v in self.shots.values())

    def add(self, record: ShotRecord, prototype: torch.Tensor, name: str) -> None:
        """Append one shot; new categories are created, others keep their shots."""
        cid = int(record.category_id)
        proto = prototype.detach().float().cpu().reshape(1, -1)
        if self.shots and proto.shape[1] != self.dim:
            raise ValueError(f"prototype dim {proto.shape[1]} != bank dim {self.dim}")
        if cid in self.names and self.names[cid] != name:
            raise ValueError(
                f"category {cid} is {self.names[cid]!r} in the bank but {name!r} in the "
                "new references: fix the references' categories"
            )
        self.names[cid] = name
        self.shots[cid] = torch.cat([self.shots.get(cid, proto[:0]), proto])
        self.records.setdefault(cid, []).append(record)

    def add_negative(self, record: ShotRecord, prototype: torch.Tensor, name: str) -> None:
        """Append one negative of ``record.category_id``, a category the bank has shots of."""
        cid = int(record.category_id)
        if cid not in self.shots:
            known = ", ".join(f"{c} ({self.names[c]})" for c in self.category_ids) or "none"
            raise ValueError(
                f"negative reference {record.annotation_id} names category {cid} ({name!r}), "
                f"which the bank has no shots of (it has {known}): add positive references "
                "of that class first, or fix the negative's category_id"
            )
        if self.names[cid] != name:
            raise ValueError(
                f"category {cid} is {self.names[cid]!r} in the bank but {name!r} in the "
                "negative references: fix the negatives' categories"
            )
        proto = prototype.detach().float().cpu().reshape(1, -1)
        if proto.shape[1] != self.dim:
            raise ValueError(f"negative prototype dim {proto.shape[1]} != bank dim {self.dim}")
        self.negatives[cid] = torch.cat([self.negatives.get(cid, proto[:0]), proto])
        self.negative_records.setdefault(cid, []).append(record)

    def merge(self, other: MemoryBank) -> None:
        """Add every shot and negative of ``other`` (same encoder), recomputing nothing."""
        self.check_encoder(other.encoder, other.image_size)
        for cid in other.category_ids:
            for rec, proto in zip(other.records[cid], other.shots[cid], strict=True):
                self.add(rec, proto, other.names[cid])
        for cid in sorted(other.negatives):
            for rec, proto in zip(other.negative_records[cid], other.negatives[cid], strict=True):
                self.add_negative(rec, proto, other.names[cid])

    def class_negatives(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """All negatives as (K, D) raw prototypes and (K,) int64 class indices (positions in
        ``category_ids``); None when the bank has none."""
        if not any(t.shape[0] for t in self.negatives.values()):
            return None
        index = {c: k for k, c in enumerate(self.category_ids)}
        cids = sorted(self.negatives)
        protos = torch.cat([self.negatives[c] for c in cids])
        owner = [index[c] for c in cids for _ in range(int(self.negatives[c].shape[0]))]
        return protos, torch.tensor(owner, dtype=torch.long)

    def class_prototypes(self) -> torch.Tensor:
        """(C, D) ``normalize(mean_k r_{c,k})`` in ``category_ids`` order (method.md §2)."""
        if not self.shots:
            raise ValueError("the memory bank is empty: build it from at least one reference")
        return ops.normalize(torch.stack([self.shots[c].mean(dim=0) for c in self.category_ids]))

    def check_encoder(self, encoder: str, image_size: int) -> None:
        """Refuse a bank made with another encoder or image size."""
        if (encoder, int(image_size)) != (self.encoder, int(self.image_size)):
            raise ValueError(
                f"memory bank was built with DINOv2 {self.encoder!r} at {self.image_size}px, "
                f"but the matcher uses {encoder!r} at {image_size}px: rebuild the bank with "
                "`refseg build-memory` and the same --dinov2-model/--preset as `refseg label`"
            )

    # ---- persistence -------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The bank as safetensors bytes: the (K_c, D) float32 prototypes per class (and
        negatives), with the encoder, names, shot records and meta as JSON metadata."""
        header: dict[str, Any] = {
            "format": "refseg-memory-bank",
            "version": FORMAT_VERSION,
            "encoder": self.encoder,
            "image_size": self.image_size,
            "categories": [{"id": c, "name": self.names[c]} for c in self.category_ids],
            "shots": [dataclasses.asdict(r) for c in self.category_ids for r in self.records[c]],
            "meta": self.meta,
        }
        tensors = {f"shots/{c}": self.shots[c].contiguous() for c in self.category_ids}
        negs = sorted(c for c, t in self.negatives.items() if t.shape[0])
        if negs:
            header["version"] = NEGATIVES_VERSION
            header["negatives"] = [
                dataclasses.asdict(r) for c in negs for r in self.negative_records[c]
            ]
            tensors.update({f"negatives/{c}": self.negatives[c].contiguous() for c in negs})
        return st_save(tensors, metadata={"refseg": json.dumps(header)})

    def save(self, uri: str) -> None:
        """Write the bank to a local path or fsspec URI."""
        with fsspec.open(uri, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> MemoryBank:
        """A bank from ``to_bytes`` output (no pickle); ``source`` names it in errors."""
        try:
            tensors = st_load(data)
            n = int.from_bytes(data[:8], "little")
            header = json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["refseg"])
        except Exception as exc:
            raise ValueError(
                f"{source} is not a refseg memory bank (safetensors with refseg metadata): "
                f"{exc}; build one with `refseg build-memory`"
            ) from exc
        version = int(header.get("version", FORMAT_VERSION))
        if version > NEGATIVES_VERSION:
            raise ValueError(
                f"{source} is a memory bank of format version {version}, newer than this "
                f"refseg reads (up to {NEGATIVES_VERSION}): upgrade refseg"
            )
        bank = cls(encoder=header["encoder"], image_size=int(header["image_size"]))
        bank.meta = header.get("meta", {})
        names = {int(c["id"]): c["name"] for c in header["categories"]}
        recs = _records(header["shots"])
        for cid, name in names.items():
            bank.shots[cid] = tensors[f"shots/{cid}"].float()
            bank.names[cid] = name
            bank.records[cid] = recs.get(cid, [])
        for cid, neg_recs in _records(header.get("negatives", [])).items():
            bank.negatives[cid] = tensors[f"negatives/{cid}"].float()
            bank.negative_records[cid] = neg_recs
        return bank

    @classmethod
    def load(cls, uri: str) -> MemoryBank:
        """Read a bank written by ``save`` from a local path or fsspec URI (s3://, gs://)."""
        try:
            with fsspec.open(uri, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"memory bank not found: {uri}; build one with `refseg build-memory`"
            ) from None
        return cls.from_bytes(data, source=uri)

    def describe(self) -> Mapping[str, Any]:
        """A JSON-ready summary: encoder, image size, classes and shots per class."""
        out: dict[str, Any] = {
            "encoder": self.encoder,
            "image_size": self.image_size,
            "categories": {self.names[c]: int(self.shots[c].shape[0]) for c in self.category_ids},
        }
        if self.negatives:
            out["negatives"] = {
                self.names[c]: int(t.shape[0]) for c, t in sorted(self.negatives.items())
            }
        return out


def _records(rows: list[dict[str, Any]]) -> dict[int, list[ShotRecord]]:
    """Header rows -> ShotRecords grouped by category id, in file order."""
    out: dict[int, list[ShotRecord]] = {}
    for r in rows:
        r = {**r, "bbox": tuple(r.get("bbox", ()))}
        out.setdefault(int(r["category_id"]), []).append(ShotRecord(**r))
    return out
