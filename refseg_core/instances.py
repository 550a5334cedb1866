"""One columnar result type for the instances found in one image, with COCO and Arrow adapters.

Modelled on roboflow supervision's ``Detections``: one array per field, filtered with a
boolean mask or an index array, ``empty()`` and ``merge()``. Coordinates are pixels of the
original image; boxes are ``XYXY`` float32 with ``x2 - x1`` equal to the COCO width.
Category ids are the dataset's own ids (never positions in a list).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from refseg.core import rle as rle_ops

__all__ = ["INSTANCES_SCHEMA", "Instances"]

# One row per instance; bbox is COCO xywh, segmentation a COCO RLE (null when the result
# has no mask), area the mask's pixel count (the box's area when there is no mask).
INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("category_id", pa.int64(), nullable=False),
        pa.field("category_name", pa.string()),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("bbox", pa.list_(pa.float64(), 4), nullable=False),
        pa.field(
            "segmentation",
            pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())]),
        ),
        pa.field("area", pa.float64(), nullable=False),
        pa.field("proposal_iou", pa.float32(), nullable=False),
    ]
)

Index = np.ndarray | slice | int | Sequence[int]


@dataclass(frozen=True, eq=False)
class Instances:
    """N instances of one image of size ``image_size = (H, W)``.

    Attributes:
        image_size: (H, W) of the original image.
        boxes: (N, 4) float32 XYXY pixels; COCO ``w = x2 - x1``, ``h = y2 - y1``.
        scores: (N,) float32 class scores.
        category_ids: (N,) int64 dataset category ids.
        proposal_iou: (N,) float32 SAM2 predicted IoU of each proposal.
        masks: (N, H, W) bool or None.
        rles: N COCO RLEs (``{"size": [H, W], "counts": str}``) or None.

    Arrays are converted to the stated dtypes on construction; wrong shapes raise
    ``ValueError``. When both ``masks`` and ``rles`` are set they describe the same masks.
    """

    image_size: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    category_ids: np.ndarray
    proposal_iou: np.ndarray
    masks: np.ndarray | None = None
    rles: tuple[dict[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be (H, W) with H, W >= 1, got {self.image_size}")
        set_ = object.__setattr__
        set_(self, "image_size", size)
        set_(self, "boxes", np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4))
        set_(self, "scores", np.asarray(self.scores, dtype=np.float32))
        set_(self, "category_ids", np.asarray(self.category_ids, dtype=np.int64))
        set_(self, "proposal_iou", np.asarray(self.proposal_iou, dtype=np.float32))
        n = self.boxes.shape[0]
        for name in ("scores", "category_ids", "proposal_iou"):
            shape = getattr(self, name).shape
            if shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) like boxes, got {shape}")
        if self.masks is not None:
            masks = np.asarray(self.masks)
            if masks.dtype != np.bool_:
                raise TypeError(f"masks must be bool, got {masks.dtype}")
            if masks.shape != (n, *size):
                raise ValueError(f"masks must have shape {(n, *size)}, got {masks.shape}")
            set_(self, "masks", masks)
        if self.rles is not None:
            rles = tuple(self.rles)
            if len(rles) != n:
                raise ValueError(f"rles must hold {n} RLEs like boxes, got {len(rles)}")
            for r in rles:
                if tuple(int(v) for v in r["size"]) != size:
                    raise ValueError(f"an RLE has size {r['size']}, image size is {list(size)}")
            set_(self, "rles", rles)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls, image_size: tuple[int, int], *, with_masks: bool = False) -> Instances:
        """No instances; ``with_masks`` gives a (0, H, W) mask array instead of None."""
        h, w = image_size
        return cls(
            image_size=(h, w),
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            category_ids=np.zeros((0,), np.int64),
            proposal_iou=np.zeros((0,), np.float32),
            masks=np.zeros((0, h, w), bool) if with_masks else None,
        )

    def __getitem__(self, index: Index) -> Instances:
        """Select instances by a bool mask (N,), an int index array, a slice or one int."""
        if isinstance(index, (int, np.integer)):
            index = np.asarray([index])
        if not isinstance(index, slice):
            index = np.asarray(index)
            if index.dtype == np.bool_ and index.shape != (len(self),):
                raise IndexError(f"bool index must have shape ({len(self)},), got {index.shape}")
            if index.dtype != np.bool_ and not np.issubdtype(index.dtype, np.integer):
                if index.size:
                    raise IndexError(f"index must be bool or int, got {index.dtype}")
                index = index.astype(np.int64)
        rles = None
        if self.rles is not None:
            positions = np.arange(len(self))[index].reshape(-1)
            rles = tuple(self.rles[int(i)] for i in positions)
        return Instances(
            image_size=self.image_size,
            boxes=self.boxes[index],
            scores=self.scores[index],
            category_ids=self.category_ids[index],
            proposal_iou=self.proposal_iou[index],
            masks=None if self.masks is None else self.masks[index],
            rles=rles,
        )

    @classmethod
    def merge(cls, parts: Sequence[Instances]) -> Instances:
        """Concatenate instances of the same image (same ``image_size``), in order.

        ``masks`` (``rles``) are kept when every non-empty part has them, dropped when none
        has them; a mix raises ``ValueError``. Empty parts never decide.
        """
        if not parts:
            raise ValueError("merge needs at least one Instances (the image size is unknown)")
        size = parts[0].image_size
        for p in parts:
            if p.image_size != size:
                raise ValueError(f"cannot merge image sizes {size} and {p.image_size}")
        deciding = [p for p in parts if len(p)] or list(parts)

        def keep(field: str) -> bool:
            has = [getattr(p, field) is not None for p in deciding]
            if any(has) and not all(has):
                raise ValueError(f"cannot merge instances with and without {field}")
            return all(has)

        masks = None
        if keep("masks"):
            masks = np.concatenate([p.masks for p in parts if p.masks is not None], axis=0)
        rles = None
        if keep("rles"):
            rles = tuple(r for p in parts if p.rles is not None for r in p.rles)
        return cls(
            image_size=size,
            boxes=np.concatenate([p.boxes for p in parts], axis=0),
            scores=np.concatenate([p.scores for p in parts]),
            category_ids=np.concatenate([p.category_ids for p in parts]),
            proposal_iou=np.concatenate([p.proposal_iou for p in parts]),
            masks=masks,
            rles=rles,
        )

    def with_rles(self, *, drop_masks: bool = False) -> Instances:
        """Return a copy whose ``rles`` are set (encoded from ``masks`` if missing).

        ``drop_masks=True`` leaves ``masks=None`` in the copy (compact for transport).
        No instances (e.g. ``Instances.empty``) give empty ``rles``.
        """
        rles = self.rles
        if rles is None and self.masks is None and len(self) == 0:
            rles = ()
        if rles is None:
            if self.masks is None:
                raise ValueError("with_rles needs masks or rles, this Instances has neither")
            rles = tuple(rle_ops.encode_masks(self.masks))
        return dataclasses.replace(self, rles=rles, masks=None if drop_masks else self.masks)

    def areas(self) -> np.ndarray:
        """Mask pixel counts, (N,) float64, from ``masks`` or else ``rles``."""
        if self.masks is not None:
            return self.masks.sum(axis=(1, 2), dtype=np.int64).astype(np.float64)
        if self.rles is not None:
            return rle_ops.rle_area(self.rles)
        raise ValueError("areas need masks or rles, this Instances has neither")

    def mask_array(self) -> np.ndarray:
        """(N, H, W) bool masks: ``masks``, or decoded from ``rles``."""
        if self.masks is not None:
            return self.masks
        if self.rles is not None:
            h, w = self.image_size
            if not self.rles:
                return np.zeros((0, h, w), bool)
            return np.stack([rle_ops.decode_rle(r) for r in self.rles]).astype(bool)
        raise ValueError("mask_array needs masks or rles, this Instances has neither")

    def to_supervision(self, category_names: Mapping[int, str] | None = None) -> Any:
        """These instances as a ``supervision.Detections`` (``pip install supervision``):
        ``xyxy``, ``mask`` (N, H, W) bool, ``confidence``, ``class_id`` (the category ids),
        and ``data["class_name"]`` when ``category_names`` is given."""
        try:
            import supervision as sv
        except ImportError:
            raise ImportError(
                "Instances.to_supervision needs the supervision package: "
                "pip install supervision (or pip install 'refseg[supervision]')"
            ) from None
        data = {}
        if category_names is not None:
            data["class_name"] = np.asarray([category_names[int(c)] for c in self.category_ids])
        masks = self.mask_array() if (self.masks is not None or self.rles is not None) else None
        return sv.Detections(
            xyxy=self.boxes.astype(np.float32),
            mask=masks,
            confidence=self.scores.astype(np.float32),
            class_id=self.category_ids.astype(int),
            data=data,
        )

    def xywh(self) -> np.ndarray:
        """Boxes as COCO ``xywh``, (N, 4) float64."""
        b = self.boxes.astype(np.float64)
        return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)

    def _rles_or_none(self) -> tuple[dict[str, Any], ...] | None:
        if self.rles is not None:
            return self.rles
        if self.masks is not None:
            return tuple(rle_ops.encode_masks(self.masks))
        return None

    def _areas_or_box(self, rles: tuple[dict[str, Any], ...] | None) -> np.ndarray:
        if self.masks is not None:
            return self.areas()
        if rles is not None:
            return rle_ops.rle_area(rles)
        wh = self.xywh()[:, 2:]
        return wh[:, 0] * wh[:, 1]

    def to_coco_results(self, image_id: int) -> list[dict[str, Any]]:
        """COCO results entries (plain Python types, JSON-ready), one per instance.

        Each: ``image_id``, ``category_id``, ``bbox`` (xywh floats), ``score``,
        ``segmentation`` (RLE with str counts; omitted when there is no mask) and ``area``
        (mask pixel count, or the box area without a mask).
        """
        rles = self._rles_or_none()
        areas = self._areas_or_box(rles)
        boxes = self.xywh().tolist()
        out = []
        for i in range(len(self)):
            item: dict[str, Any] = {
                "image_id": int(image_id),
                "category_id": int(self.category_ids[i]),
                "bbox": [float(v) for v in boxes[i]],
                "score": float(self.scores[i]),
            }
            if rles is not None:
                item["segmentation"] = {"size": list(rles[i]["size"]), "counts": rles[i]["counts"]}
            item["area"] = float(areas[i])
            out.append(item)
        return out

    def to_arrow(
        self, image_id: int, image_uri: str, category_names: Mapping[int, str]
    ) -> pa.Table:
        """A table in ``INSTANCES_SCHEMA``, one row per instance."""
        missing = sorted({int(c) for c in self.category_ids} - {int(k) for k in category_names})
        if missing:
            raise ValueError(f"category_names lacks category ids {missing}")
        rles = self._rles_or_none()
        n = len(self)
        seg: list[dict[str, Any] | None]
        if rles is None:
            seg = [None] * n
        else:
            seg = [{"size": [int(v) for v in r["size"]], "counts": r["counts"]} for r in rles]
        columns = {
            "image_id": pa.array(np.full(n, image_id, dtype=np.int64)),
            "image_uri": pa.array([image_uri] * n, pa.string()),
            "category_id": pa.array(self.category_ids),
            "category_name": pa.array(
                [category_names[int(c)] for c in self.category_ids], pa.string()
            ),
            "score": pa.array(self.scores),
            "bbox": pa.FixedSizeListArray.from_arrays(
                pa.array(self.xywh().reshape(-1), pa.float64()), 4
            ),
            "segmentation": pa.array(seg, INSTANCES_SCHEMA.field("segmentation").type),
            "area": pa.array(self._areas_or_box(rles)),
            "proposal_iou": pa.array(self.proposal_iou),
        }
        return pa.Table.from_pydict(columns, schema=INSTANCES_SCHEMA)

    @classmethod
    def from_arrow(cls, table: pa.Table, *, image_size: tuple[int, int] | None = None) -> Instances:
        """Rebuild the instances of one image from rows in ``INSTANCES_SCHEMA``.

        The image size comes from the RLEs; pass ``image_size`` for an empty table or rows
        without segmentation. Rows of several image ids raise ``ValueError``. The result has
        ``rles`` (no ``masks``) when the rows have segmentation.
        """
        missing = [f for f in INSTANCES_SCHEMA.names if f not in table.column_names]
        if missing:
            raise ValueError(f"table lacks instance columns {missing}")
        ids = set(table.column("image_id").to_pylist())
        if len(ids) > 1:
            raise ValueError(f"from_arrow takes the rows of one image, got image ids {sorted(ids)}")
        segs = table.column("segmentation").to_pylist()
        has_seg = [s is not None for s in segs]
        if any(has_seg) and not all(has_seg):
            raise ValueError("some rows have a segmentation and others do not")
        rles = None
        if segs and all(has_seg):
            rles = tuple({"size": list(s["size"]), "counts": s["counts"]} for s in segs)
            sizes = {tuple(r["size"]) for r in rles}
            if len(sizes) > 1 or (image_size is not None and sizes != {tuple(image_size)}):
                raise ValueError(f"RLE sizes {sorted(sizes)} disagree (image_size={image_size})")
            image_size = image_size or next(iter(sizes))
        if image_size is None:
            raise ValueError("image_size is needed: the rows carry no segmentation")
        n = table.num_rows
        xywh = np.asarray(table.column("bbox").to_pylist(), dtype=np.float64).reshape(n, 4)
        xywh[:, 2:] += xywh[:, :2]
        return cls(
            image_size=(int(image_size[0]), int(image_size[1])),
            boxes=xywh.astype(np.float32),
            scores=table.column("score").to_numpy(),
            category_ids=table.column("category_id").to_numpy(),
            proposal_iou=table.column("proposal_iou").to_numpy(),
            rles=rles,
        )
