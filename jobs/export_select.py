"""What ``refseg export`` keeps: score thresholds (default and per class), classes, images."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

__all__ = ["Thresholds", "parse_categories", "parse_class_thresholds", "read_image_list"]


def parse_class_thresholds(spec: str | None) -> dict[str, float]:
    """``"person=0.5,dog=0.3"`` or a YAML/JSON file mapping class name or id -> threshold."""
    if not spec:
        return {}
    if os.path.isfile(spec) or spec.lower().endswith((".yaml", ".yml", ".json")):
        try:
            with open(spec, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"class thresholds file not found: {spec}") from None
        if not isinstance(data, Mapping):
            raise ValueError(f"{spec} must map class names or ids to thresholds")
        items = list(data.items())
    else:
        items = []
        for part in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = part.rpartition("=")
            if not sep or not key.strip():
                raise ValueError(f"--class-thresholds entry {part!r} is not NAME=THRESHOLD")
            items.append((key.strip(), value))
    out: dict[str, float] = {}
    for key, value in items:
        try:
            t = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"threshold of class {key!r} is not a number: {value!r}") from None
        if not math.isfinite(t):
            raise ValueError(f"threshold of class {key!r} must be finite, got {value!r}")
        out[str(key)] = t
    return out


@dataclass(frozen=True)
class Thresholds:
    """Per-class score thresholds (category id -> T) over a default; keep score >= T."""

    default: float = 0.0
    per_class: dict[int, float] = field(default_factory=dict)
    only: frozenset[int] | None = None  # the classes kept (None: all)

    @classmethod
    def resolve(
        cls, default: float, raw: Mapping[str, float], categories: Mapping[int, str]
    ) -> Thresholds:
        """Map name or id keys to category ids; a key naming no class raises ValueError."""
        by_name = {name: cid for cid, name in categories.items()}
        per: dict[int, float] = {}
        for key, t in raw.items():
            if key in by_name:
                per[by_name[key]] = t
            elif key.lstrip("-").isdigit() and int(key) in categories:
                per[int(key)] = t
            else:
                known = ", ".join(f"{c}={n}" for c, n in sorted(categories.items()))
                raise ValueError(f"--class-thresholds: no class {key!r} in the run ({known})")
        return cls(float(default), per)

    def keep(self, category_id: int, score: float) -> bool:
        if self.only is not None and int(category_id) not in self.only:
            return False
        return score >= self.per_class.get(int(category_id), self.default)


def parse_categories(spec: str | None, categories: Mapping[int, str]) -> frozenset[int] | None:
    """``"person,3"``: class names or ids of the run -> category ids (None: every class)."""
    if not spec:
        return None
    by_name = {name: cid for cid, name in categories.items()}
    out = set()
    for key in filter(None, (k.strip() for k in spec.split(","))):
        if key in by_name:
            out.add(by_name[key])
        elif key.lstrip("-").isdigit() and int(key) in categories:
            out.add(int(key))
        else:
            known = ", ".join(f"{c}={n}" for c, n in sorted(categories.items()))
            raise ValueError(f"--categories: no class {key!r} in the run ({known})")
    return frozenset(out)


def read_image_list(path: str) -> tuple[set[int], set[str]]:
    """(image ids, image URIs) a text file lists, one per line (``#`` starts a comment).

    URIs are matched to the run's rows as written there (its canonical URIs)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.split("#", 1)[0].strip() for ln in f]
    except FileNotFoundError:
        raise FileNotFoundError(f"--images {path}: no such file") from None
    ids, uris = set(), set()
    for line in filter(None, lines):
        if line.lstrip("-").isdigit():
            ids.add(int(line))
        else:
            uris.add(line)
    if not ids and not uris:
        raise ValueError(f"--images {path} lists no image: write one image id or URI per line")
    return ids, uris
