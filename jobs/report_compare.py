"""``refseg report NEW --compare OLD``: what changed between two runs of the same images.

Per class: instances before and after, those scoring at least the report's threshold, and
the mean score; then how many images (of those both runs labelled) changed: a different
number of instances of some class. Only the category, score and image id columns are read,
batch by batch; the per-image counts are one small integer table per run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from refseg.jobs.report_data import (
    ClassStats,
    _batches,
    _esc,
    _parquet_dataset,
    class_colour,
    class_stats,
)

__all__ = ["ClassChange", "RunComparison", "compare_runs", "compare_html", "compare_text"]


@dataclass(frozen=True)
class ClassChange:
    category_id: int
    name: str
    before: int
    after: int
    above_before: int
    above_after: int
    mean_before: float | None
    mean_after: float | None

    @property
    def delta(self) -> int:
        return self.after - self.before


@dataclass(frozen=True)
class RunComparison:
    old: str
    new: str
    classes: list[ClassChange]
    images_both: int  # images with an ok row in both runs
    images_changed: int  # of those, images whose per-class counts differ
    threshold: float


def _per_image(out: str) -> tuple[Counter, set[int]]:
    """(image id, category id) -> instances, and the ids of the run's ok images."""
    counts: Counter = Counter()
    for b in _batches(_parquet_dataset(out, "instances"), ["image_id", "category_id"]):
        ids = b.column("image_id").to_numpy(zero_copy_only=False)
        cats = b.column("category_id").to_numpy(zero_copy_only=False)
        pairs, n = np.unique(np.stack([ids, cats], axis=1), axis=0, return_counts=True)
        counts.update({(int(i), int(c)): int(k) for (i, c), k in zip(pairs, n, strict=True)})
    ok: set[int] = set()
    for b in _batches(_parquet_dataset(out, "images"), ["image_id", "status"]):
        ids = b.column("image_id").to_numpy(zero_copy_only=False)
        if "status" in b.schema.names:
            status = np.asarray(b.column("status").to_pylist(), dtype=object)
            ids = ids[status == "ok"]
        ok.update(int(i) for i in ids)
    return counts, ok


def _mean(s: ClassStats | None) -> float | None:
    return s.score_sum / s.count if s is not None and s.count else None


def compare_runs(new: str, old: str, threshold: float = 0.0) -> RunComparison:
    """Per-class and per-image differences of run ``new`` against run ``old``."""
    if _parquet_dataset(old, "images") is None and _parquet_dataset(old, "instances") is None:
        raise FileNotFoundError(
            f"--compare {old}: no instances/ or images/ parts: is it the --out of "
            "`refseg label` or `refseg rematch`?"
        )
    after = class_stats(_parquet_dataset(new, "instances"), threshold)
    before = class_stats(_parquet_dataset(old, "instances"), threshold)
    classes = []
    for cid in sorted(set(after) | set(before)):
        a, b = after.get(cid), before.get(cid)
        classes.append(
            ClassChange(
                cid,
                (a or b).name,  # type: ignore[union-attr]
                b.count if b else 0,
                a.count if a else 0,
                b.above if b else 0,
                a.above if a else 0,
                _mean(b),
                _mean(a),
            )
        )
    (new_counts, new_ok), (old_counts, old_ok) = _per_image(new), _per_image(old)
    both = new_ok & old_ok
    by_new: dict[int, dict[int, int]] = {}
    by_old: dict[int, dict[int, int]] = {}
    for counts, by in ((new_counts, by_new), (old_counts, by_old)):
        for (iid, cid), n in counts.items():
            if iid in both:
                by.setdefault(iid, {})[cid] = n
    changed = sum(by_new.get(i, {}) != by_old.get(i, {}) for i in both)
    return RunComparison(old, new, classes, len(both), changed, threshold)


def _fmt_mean(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _rows(c: RunComparison) -> list[list[str]]:
    rows = []
    for k in sorted(c.classes, key=lambda k: (-abs(k.delta), k.category_id)):
        rows.append([k.name, str(k.category_id), str(k.before), str(k.after), f"{k.delta:+d}",
                     f"{k.above_before} → {k.above_after}",
                     f"{_fmt_mean(k.mean_before)} → {_fmt_mean(k.mean_after)}"])  # fmt: skip
    tb, ta = sum(k.before for k in c.classes), sum(k.after for k in c.classes)
    ab, aa = sum(k.above_before for k in c.classes), sum(k.above_after for k in c.classes)
    rows.append(["all", "", str(tb), str(ta), f"{ta - tb:+d}", f"{ab} → {aa}", ""])
    return rows


def _head(threshold: float) -> list[str]:
    return ["class", "id", "before", "after", "change", f"score ≥ {threshold:g}", "mean score"]


def compare_text(c: RunComparison) -> str:
    """The comparison as a plain-text table (for the terminal)."""
    table = [_head(c.threshold), *_rows(c)]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return (
        f"changes from {c.old} (before) to {c.new} (after):\n"
        + "\n".join(lines)
        + f"\nimages labelled differently: {c.images_changed} of {c.images_both} in both runs"
    )


def compare_html(c: RunComparison) -> str:
    """The ``Changes`` section of the report page (every text escaped)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in ["", *_head(c.threshold)])
    body = []
    ids = [k.category_id for k in sorted(c.classes, key=lambda k: (-abs(k.delta), k.category_id))]
    for cid, row in zip([*ids, None], _rows(c), strict=True):
        sw = "" if cid is None else f'<span class="sw" style="background:rgb{class_colour(cid)}">'
        cells = "".join(f"<td>{_esc(v)}</td>" for v in row)
        body.append(f"<tr><td>{sw}{'</span>' if sw else ''}</td>{cells}</tr>")
    return (
        f'<section id="changes"><h2>Changes</h2><p class="muted">before: {_esc(c.old)}; '
        f"after: this run. Images labelled differently (another number of instances of some "
        f"class): {c.images_changed} of {c.images_both} labelled by both.</p>"
        f"<table>{head}{''.join(body)}</table></section>"
    )
