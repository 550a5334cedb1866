"""Few-shot reference sampling from a COCO annotation dict (method.md §0), and class splits.

Per class, the candidate annotations (ascending annotation id) are shuffled with Python's
``random.Random`` seeded by the string ``f"{seed}:{category_id}"``; the first ``shots``
candidates that pass the rules are taken. Python's string seeding (SHA-512 of the string)
and ``shuffle`` are the same on every platform and have been stable across Python 3
releases, unlike NumPy's ``Generator`` whose streams may change between NumPy versions.
Seeding per class makes each class's shots independent of which other classes are sampled.

Rules: not ``iscrowd``; bbox width and height >= ``min_side`` (32) px; bbox at least
``border`` (10) px from every image border; at most one instance per image per class.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from refseg.core.coco import categories_by_id, images_by_id

__all__ = [
    "COCO_CATEGORY_IDS",
    "COCO_FSOD_NOVEL",
    "SPLITS",
    "passes_rules",
    "resolve_split",
    "sample_references",
]

# The 80 category ids of COCO 2014/2017 (91 ids with 11 unused).
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
# The 20 PASCAL VOC classes as COCO ids: person 1, bicycle 2, car 3, motorcycle 4,
# airplane 5, bus 6, train 7, boat 9, bird 16, cat 17, dog 18, horse 19, sheep 20, cow 21,
# bottle 44, chair 62, couch 63, potted plant 64, dining table 67, tv 72.
COCO_FSOD_NOVEL: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72,
)  # fmt: skip

# Named class splits. None: every category of the annotation file.
SPLITS: dict[str, tuple[int, ...] | None] = {
    "coco-fsod-novel": COCO_FSOD_NOVEL,
    "coco-fsod-base": tuple(i for i in COCO_CATEGORY_IDS if i not in COCO_FSOD_NOVEL),
    "coco-all": None,
}


def resolve_split(spec: str, ann: Mapping[str, Any]) -> list[int]:
    """Category ids (sorted, unique) named by ``spec``.

    ``spec`` is a split name of ``SPLITS`` or a comma list of category ids and/or names of
    ``ann["categories"]`` (``"17,dog"``). Unknown names or ids raise ``ValueError`` that
    lists the valid ones.
    """
    cats = categories_by_id(ann)
    by_name = {str(c["name"]): cid for cid, c in cats.items()}
    valid = f"valid splits: {sorted(SPLITS)}; valid categories: " + ", ".join(
        f"{cid} {cats[cid]['name']}" for cid in sorted(cats)
    )
    spec = spec.strip()
    if spec in SPLITS:
        ids = SPLITS[spec]
        if ids is None:
            return sorted(cats)
        missing = [i for i in ids if i not in cats]
        if missing:
            raise ValueError(f"split {spec!r} needs category ids {missing} absent here; {valid}")
        return sorted(ids)
    out: set[int] = set()
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token.lstrip("-").isdigit() and int(token) in cats:
            out.add(int(token))
        elif token in by_name:
            out.add(by_name[token])
        else:
            raise ValueError(f"unknown split or category {token!r}; {valid}")
    if not out:
        raise ValueError(f"empty class split {spec!r}; {valid}")
    return sorted(out)


def passes_rules(
    ann: Mapping[str, Any], image: Mapping[str, Any], *, min_side: float = 32, border: float = 10
) -> bool:
    """True if a candidate annotation obeys the per-instance rules (not the per-image one)."""
    if ann.get("iscrowd", 0):
        return False
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w < min_side or h < min_side:
        return False
    width, height = float(image["width"]), float(image["height"])
    return x >= border and y >= border and x + w <= width - border and y + h <= height - border


def sample_references(
    ann: Mapping[str, Any],
    *,
    shots: int,
    seed: int,
    category_ids: Iterable[int],
    min_side: float = 32,
    border: float = 10,
) -> dict[str, Any]:
    """Sample up to ``shots`` reference instances per class; returns a COCO dict.

    The dict has ``info`` (the sampling settings), ``images``, ``annotations`` and
    ``categories`` of the sampled shots only: deep copies with their original ids and fields.
    Annotations are ordered by category id, then by draw order. A class with fewer passing
    candidates than ``shots`` keeps what exists, with a ``UserWarning`` naming it. The same
    inputs and seed give identical output.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    cats = categories_by_id(ann)
    ids = sorted({int(c) for c in category_ids})
    unknown = [c for c in ids if c not in cats]
    if unknown:
        raise ValueError(f"unknown category ids {unknown}; valid: {sorted(cats)}")
    images = images_by_id(ann)
    candidates: dict[int, list[Mapping[str, Any]]] = {c: [] for c in ids}
    for a in ann.get("annotations", []):
        cid = int(a["category_id"])
        if cid in candidates:
            candidates[cid].append(a)

    chosen: list[Mapping[str, Any]] = []
    for cid in ids:
        pool = sorted(candidates[cid], key=lambda a: int(a["id"]))
        random.Random(f"{seed}:{cid}").shuffle(pool)
        used_images: set[int] = set()
        taken = 0
        for a in pool:
            if taken == shots:
                break
            image_id = int(a["image_id"])
            image = images.get(image_id)
            if image is None:
                raise ValueError(
                    f"annotation {a['id']} refers to image {image_id}, not in 'images'"
                )
            if image_id in used_images or not passes_rules(
                a, image, min_side=min_side, border=border
            ):
                continue
            used_images.add(image_id)
            chosen.append(a)
            taken += 1
        if taken < shots:
            warnings.warn(
                f"category {cid} ({cats[cid]['name']}): only {taken} of {shots} shots pass the "
                f"sampling rules ({len(pool)} annotations)",
                UserWarning,
                stacklevel=2,
            )

    image_ids = sorted({int(a["image_id"]) for a in chosen})
    cat_ids = sorted({int(a["category_id"]) for a in chosen})
    return {
        "info": {
            "description": "refseg few-shot references",
            "shots": int(shots),
            "seed": int(seed),
            "category_ids": ids,
            "rng": "random.Random(f'{seed}:{category_id}').shuffle over annotations by id",
            "rules": {"min_side": min_side, "border": border, "one_per_image": True},
        },
        "images": [copy.deepcopy(images[i]) for i in image_ids],
        "annotations": [copy.deepcopy(a) for a in chosen],
        "categories": [copy.deepcopy(cats[c]) for c in cat_ids],
    }
