"""Outer polygon of a binary mask, traced on pixel edges (pure numpy, no OpenCV)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["mask_polygon"]

_STEP = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.int64)


# --------------------------------------------------------------------------- polygons


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of the largest 8-connected component of a mask, as a polygon.

    Pure numpy "crack following": the boundary runs along pixel edges, so vertices are
    pixel corners (pixel ``(row, col)`` spans ``x in [col, col + 1]``, ``y in [row, row +
    1]``) and the polygon encloses the component exactly (holes filled). Collinear
    vertices are dropped: a solid rectangle ``mask[y0:y1, x0:x1]`` gives its 4 corners.
    Components are compared by enclosed area.

    Args:
        mask: (H, W) bool (any non-zero counts as foreground).

    Returns:
        (K, 2) float64 ``(x, y)`` vertices, clockwise on screen (y down), K >= 4; (0, 2)
        for an empty mask.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    y0, x0 = int(ys.min()), int(xs.min())
    m = m[y0 : ys.max() + 1, x0 : xs.max() + 1]
    w = m.shape[1]
    p = np.pad(m, 1)
    starts, dirs = [], []
    # an edge per foreground pixel side facing background, walked with the pixel on its right
    sides = (
        (m & ~p[:-2, 1:-1], 0, 0, 0),  # top: from the top-left corner, rightwards
        (m & ~p[1:-1, 2:], 1, 1, 0),  # right side: from the top-right corner, down
        (m & ~p[2:, 1:-1], 2, 1, 1),  # bottom: from the bottom-right corner, leftwards
        (m & ~p[1:-1, :-2], 3, 0, 1),  # left side: from the bottom-left corner, up
    )
    for side, d, dx, dy in sides:
        r, c = np.nonzero(side)
        starts.append(np.stack([c + dx, r + dy], axis=1))
        dirs.append(np.full(r.size, d, dtype=np.int64))
    start = np.concatenate(starts).astype(np.int64)
    direction = np.concatenate(dirs)
    end = start + _STEP[direction]
    nxt = _next_edges(start, end, direction, w + 1)
    rep = _cycle_representatives(nxt)
    cross = start[:, 0] * end[:, 1] - end[:, 0] * start[:, 1]
    area = np.bincount(rep, weights=cross, minlength=rep.size)
    edge = int(np.argmax(area))  # a representative of the largest outer boundary
    order = [edge]
    while (edge := int(nxt[edge])) != order[0]:
        order.append(edge)
    idx = np.asarray(order)
    turn = direction[idx] != direction[np.roll(idx, 1)]
    return (start[idx[turn]] + [x0, y0]).astype(np.float64)


def _next_edges(start: np.ndarray, end: np.ndarray, d: np.ndarray, row: int) -> np.ndarray:
    """Index of the edge that follows each edge; at a vertex shared by two diagonal pixels
    the left turn is taken, which joins them (8-connectivity, like OpenCV's contours)."""
    keys = (start[:, 1] * row + start[:, 0]) * 4 + d
    order = np.argsort(keys)
    sorted_keys = keys[order]
    vertex = (end[:, 1] * row + end[:, 0]) * 4
    nxt = np.full(d.size, -1, dtype=np.int64)
    for turn in (3, 0, 1):  # left, straight, right
        want = vertex + (d + turn) % 4
        pos = np.minimum(np.searchsorted(sorted_keys, want), d.size - 1)
        hit = (sorted_keys[pos] == want) & (nxt < 0)
        nxt[hit] = order[pos[hit]]
    if (nxt < 0).any():  # pragma: no cover - every boundary vertex has an outgoing edge
        raise RuntimeError("broken boundary: an edge has no successor")
    return nxt


def _cycle_representatives(nxt: np.ndarray) -> np.ndarray:
    """Smallest edge index of each edge's cycle (pointer doubling, O(n log n))."""
    rep = np.arange(nxt.size)
    jump = nxt.copy()
    for _ in range(max(1, math.ceil(math.log2(max(nxt.size, 2))))):
        rep = np.minimum(rep, rep[jump])
        jump = jump[jump]
    return rep


# --------------------------------------------------------------------------- thresholds
