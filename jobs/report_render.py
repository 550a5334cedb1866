"""Drawing and HTML of the report page: overlays, tiles, histograms, tables."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from refseg.core import rle as rle_ops
from refseg.jobs.report_data import (
    _THREADS,
    MAX_REFS_PER_CLASS,
    N_BINS,
    REF_SIDE,
    THUMB_SIDE,
    ClassStats,
    ImageRow,
    ImageSummary,
    _esc,
    class_colour,
)
from refseg.jobs.report_draw import (
    Shape,
    _thumb,
    draw_overlay,
    read_image,
    read_thumbnail,
    to_data_uri,
)

__all__ = ["Shape", "TileInput", "build_page", "draw_overlay", "render_tile", "to_data_uri"]


# ---------------------------------------------------------------- page parts


def _placeholder(title: str, message: str) -> str:
    return f'<div class="ph"><b>{_esc(title)}</b><pre>{_esc(message)}</pre></div>'


def _panel(title: str, img: np.ndarray) -> str:
    return (
        f'<div class="panel"><div class="pt">{_esc(title)}</div>'
        f'<img src="{to_data_uri(img)}" alt="{_esc(title)}"></div>'
    )


def _gt_shapes(
    anns: Sequence[Mapping[str, Any]], img: Mapping[str, Any], names: Mapping[int, str]
) -> list[Shape]:
    shapes = []
    for a in anns:
        cid = int(a["category_id"])
        try:
            rle = rle_ops.annotation_to_rle(a, int(img["height"]), int(img["width"]))
        except (ValueError, TypeError, KeyError):
            rle = None  # box-only or malformed: its box is drawn instead
        bbox = a.get("bbox") or (rle_ops.rle_to_bbox([rle])[0].tolist() if rle else None)
        if bbox is not None:
            shapes.append(Shape(rle, bbox, cid, names.get(cid, f"class {cid}")))
    return shapes


@dataclass(frozen=True)
class TileInput:
    row: ImageRow
    instances: list[dict[str, Any]]
    n_shown_max: int
    gt: tuple[list[dict[str, Any]], dict[str, Any] | None, dict[int, str]] | None = None


def _tile_panels(t: TileInput, thumb: np.ndarray, scale: float) -> list[str]:
    shapes = [
        Shape(r["segmentation"], r["bbox"], int(r["category_id"]),
              f"{r['category_name'] or r['category_id']} {r['score']:.2f}")
        for r in t.instances[: t.n_shown_max][::-1]  # best drawn last, on top
    ]  # fmt: skip
    panels = [_panel("prediction", draw_overlay(thumb, shapes, scale))]
    if t.gt is not None:
        anns, gt_img, names = t.gt
        if gt_img is None:
            panels.append(_placeholder("ground truth", "image id not in the ground-truth file"))
        else:
            gt_scale = thumb.shape[0] / int(gt_img["height"])
            gt_draw = draw_overlay(thumb, _gt_shapes(anns, gt_img, names), gt_scale)
            panels.append(_panel(f"ground truth ({len(anns)})", gt_draw))
    return panels


def render_tile(t: TileInput) -> str:
    """HTML of one image tile: prediction (and ground-truth) overlays, or a placeholder."""
    row, n = t.row, len(t.instances)
    more = f" (top {t.n_shown_max})" if n > t.n_shown_max else ""
    caption = (
        f'<figcaption><b>#{row.image_id}</b> <span class="uri">{_esc(row.image_uri)}</span>'
        f" · {n} shown{more}</figcaption>"
    )
    if row.status != "ok":
        body = _placeholder("error", row.error or row.status)
    else:
        stage = "image unreadable"
        try:
            thumb, scale = read_thumbnail(row.image_uri, THUMB_SIDE)  # never full size
            stage = "cannot draw the overlay"
            body = f'<div class="pair">{"".join(_tile_panels(t, thumb, scale))}</div>'
        except Exception as exc:  # any I/O, decoding or malformed-mask failure
            body = _placeholder(stage, f"{type(exc).__name__}: {exc}")
    return f'<figure class="tile">{body}{caption}</figure>'


def render_reference(ref: Mapping[str, Any]) -> str:
    """HTML of one reference crop with its mask (or box) drawn, or a placeholder."""
    cid = int(ref.get("category_id", -1))
    name = ref.get("category_name") or f"class {cid}"
    badge = ' <span class="gen">generated</span>' if ref.get("mask_generated") else ""
    uri = str(ref.get("image_uri", ""))
    caption = (
        f'<figcaption>{_esc(name)}{badge}<br><span class="uri">{_esc(uri)}</span></figcaption>'
    )
    try:
        full = read_image(uri)
        h, w = full.shape[:2]
        seg = ref.get("segmentation")
        mask = rle_ops.decode_rle(rle_ops.annotation_to_rle(ref, h, w)) if seg else None
        bx, by, bw, bh = (float(v) for v in ref["bbox"])
        pad = 0.15 * max(bw, bh) + 4
        x0, y0 = max(0, int(bx - pad)), max(0, int(by - pad))
        x1, y1 = min(w, int(bx + bw + pad) + 1), min(h, int(by + bh + pad) + 1)
        crop = np.ascontiguousarray(full[y0:y1, x0:x1])
        rle = rle_ops.encode_masks(mask[None, y0:y1, x0:x1])[0] if mask is not None else None
        thumb, scale = _thumb(crop, REF_SIDE, upscale=4.0)
        shape = Shape(rle, (bx - x0, by - y0, bw, bh), cid, str(name))
        img = draw_overlay(thumb, [shape], scale)
    except Exception as exc:  # unreadable image or malformed reference
        body = _placeholder("reference unreadable", f"{type(exc).__name__}: {exc}")
        return f'<figure class="ref">{body}{caption}</figure>'
    alt = _esc(f"reference {name}")
    return f'<figure class="ref"><img src="{to_data_uri(img)}" alt="{alt}">{caption}</figure>'


def histogram_svg(hist: np.ndarray, colour: tuple[int, int, int], threshold: float) -> str:
    """An inline SVG bar chart of ``hist`` (N_BINS counts over scores [0, 1])."""
    w, h, bw = 200, 48, 200 / N_BINS
    top = max(1, int(hist.max()))
    rgb = "rgb({},{},{})".format(*colour)
    bars = []
    for i, c in enumerate(hist.tolist()):
        bh = 0 if c == 0 else max(1.0, h * c / top)
        lo, hi = i / N_BINS, (i + 1) / N_BINS
        bars.append(
            f'<rect x="{i * bw:.1f}" y="{h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
            f'fill="{rgb}"><title>{lo:.2f}–{hi:.2f}: {c}</title></rect>'
        )
    tx = min(max(threshold, 0.0), 1.0) * w
    return (
        f'<svg class="hist" width="{w}" height="{h + 12}" viewBox="0 0 {w} {h + 12}" '
        f'role="img"><rect width="{w}" height="{h}" fill="#f4f4f4"/>{"".join(bars)}'
        f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{h}" stroke="#333" stroke-dasharray="2"/>'
        f'<text x="0" y="{h + 10}" font-size="9">0</text>'
        f'<text x="{w}" y="{h + 10}" font-size="9" text-anchor="end">1 (max {top})</text></svg>'
    )


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd}
.muted,.uri{color:#666}.uri{font-size:12px;word-break:break-all}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.card b{display:block;font-size:22px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:middle}.sw{display:inline-block;width:12px;height:12px;border-radius:2px}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;max-width:1040px}
.pair{display:flex;gap:6px;flex-wrap:wrap}.panel img{display:block;max-width:100%}
.pt{font-size:12px;color:#555}.ref img{display:block}
figcaption{width:0;min-width:100%}.panel img{min-width:240px}
.ph{width:300px;min-height:120px;background:#f6eeee;border:1px dashed #c99;padding:8px;
box-sizing:border-box}.ph pre,td pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;
font-size:12px}.gen{background:#fd5;border-radius:3px;padding:0 4px;font-size:11px}
details pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:480px}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _cards(items: Sequence[tuple[str, Any]]) -> str:
    cells = "".join(
        f'<div class="card"><b>{_esc("n/a" if v is None else v)}</b>{_esc(k)}</div>'
        for k, v in items
    )
    return f'<div class="cards">{cells}</div>'


def _class_table(stats: Mapping[int, ClassStats], threshold: float) -> str:
    if not stats:
        return "<p>No instances.</p>"
    head = (
        "<tr><th></th><th>class</th><th>id</th><th>instances</th>"
        f"<th>score ≥ {threshold:g}</th><th>mean score</th><th>score histogram</th></tr>"
    )
    rows = []
    for cid, s in sorted(stats.items(), key=lambda kv: (-kv[1].count, kv[0])):
        colour = class_colour(cid)
        rows.append(
            f'<tr><td><span class="sw" style="background:rgb{colour}"></span></td>'
            f"<td>{_esc(s.name)}</td><td>{cid}</td><td>{s.count}</td><td>{s.above}</td>"
            f"<td>{s.score_sum / max(s.count, 1):.3f}</td>"
            f"<td>{histogram_svg(s.hist, colour, threshold)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _errors_table(summary: ImageSummary) -> str:
    if not summary.errors:
        return "<p>No errors.</p>"
    more = (summary.n_errors or 0) - len(summary.errors)
    rows = "".join(
        f"<tr><td>{r.image_id}</td><td class=uri>{_esc(r.image_uri)}</td>"
        f"<td><pre>{_esc(r.error or r.status)}</pre></td></tr>"
        for r in summary.errors
    )
    note = f"<p class=muted>{more} more error rows not listed.</p>" if more > 0 else ""
    return f"<table><tr><th>image id</th><th>image_uri</th><th>error</th></tr>{rows}</table>{note}"


def _references(refs: Sequence[Mapping[str, Any]]) -> str:
    if not refs:
        return "<p>No reference information in run.json.</p>"
    by_class: dict[int, list[Mapping[str, Any]]] = {}
    for r in refs:
        by_class.setdefault(int(r.get("category_id", -1)), []).append(r)
    chosen = [r for cid in sorted(by_class) for r in by_class[cid][:MAX_REFS_PER_CLASS]]
    with ThreadPoolExecutor(_THREADS) as pool:
        parts = list(pool.map(render_reference, chosen))
    note = f"<p class=muted>{len(chosen)} of {len(refs)} references shown.</p>"
    return note + f'<div class="grid">{"".join(parts)}</div>'


def _run_json_text(run: Mapping[str, Any]) -> str:
    shown = {k: v for k, v in run.items() if k != "references"}
    text = json.dumps(shown, indent=2, sort_keys=True, default=str)
    return text if len(text) < 200_000 else text[:200_000] + "\n... (truncated)"


def build_page(
    out: str,
    *,
    stats: Mapping[int, ClassStats],
    summary: ImageSummary,
    tiles: Sequence[str],
    refs_html: str,
    run: Mapping[str, Any],
    threshold: float,
    has_gt: bool,
    changes_html: str = "",
) -> str:
    """The whole HTML page (every text escaped; ``changes_html`` is escaped HTML)."""
    n_inst = sum(s.count for s in stats.values())
    cards = _cards(
        [
            ("images", summary.n_images),
            ("ok", summary.n_ok),
            ("errors", summary.n_errors),
            ("instances", n_inst),
            (f"instances ≥ {threshold:g}", sum(s.above for s in stats.values())),
            ("classes", len(stats)),
        ]
    )
    gt_note = " Ground truth shown beside each prediction." if has_gt else ""
    grid = "".join(tiles) or "<p>No images to show.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>refseg report: {_esc(out)}</title><style>{_CSS}</style></head><body>
<h1>refseg report</h1><p class="muted">run: {_esc(out)}</p>
<section id="summary"><h2>Summary</h2>{cards}
<h3>Instances per class</h3>{_class_table(stats, threshold)}</section>{changes_html}
<section id="overlays"><h2>Overlays</h2><p class="muted">{len(tiles)} images (lowest ids,
images with instances first); instances with score &lt; {threshold:g} hidden.{gt_note}</p>
<div class="grid">{grid}</div></section>
<section id="references"><h2>References</h2>{refs_html}</section>
<section id="errors"><h2>Errors ({summary.n_errors or 0})</h2>{_errors_table(summary)}</section>
<section id="run"><h2>Run</h2><details><summary>run.json</summary>
<pre>{_esc(_run_json_text(run))}</pre></details></section>
</body></html>
"""


# ---------------------------------------------------------------- entry points
