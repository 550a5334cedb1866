"""Soft-merge overlaps and the kept instances' masks from windowed full-resolution masks.

The full-resolution side of matching (method.md §4.5-§4.7) without a K x H x W array: each
mask lives in its window (:class:`refseg.core.fullres.FullResolution`); overlaps for the
soft merge are counted in horizontal bands of the image holding only the masks whose windows
meet the band, and the kept masks are encoded to COCO RLE one at a time. Counts are exact
integers, so the merged scores equal those of ``ops.soft_merge_scores`` on dense masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from refseg.core import ops
from refseg.core import rle as rle_ops
from refseg.core.fullres import FullResolution, Window

__all__ = ["MERGE_BUDGET", "MaskStore", "encode_masks", "window_overlaps"]

#: Bytes of one band's bool mask buffer (256 MiB): with ``ops.overlap_counts``' float
#: chunk, the soft merge's memory bound.
MERGE_BUDGET = 2**28


#: Bytes of whole-window masks the merge keeps for the encoding that follows (256 MiB).
STORE_BUDGET = 2**28


class MaskStore:
    """Whole-window masks computed while merging, kept (up to a byte budget) so that the
    kept instances are not computed twice. Keys are the caller's mask ids."""

    def __init__(self, budget: int = STORE_BUDGET) -> None:
        self.left = budget
        self.masks: dict[int, torch.Tensor] = {}

    def offer(self, key: int, mask: torch.Tensor) -> None:
        if mask.numel() <= self.left:
            self.masks[key] = mask
            self.left -= mask.numel()


def window_overlaps(
    fr: FullResolution,
    logits: torch.Tensor,
    windows: Sequence[Window | None],
    *,
    budget: int = MERGE_BUDGET,
    keys: Sequence[int] | None = None,
    store: MaskStore | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise intersections and areas of full-resolution masks, band by band.

    Args:
        fr: the full-resolution geometry of the image.
        logits: (k, h, w) low-res logits, on ``fr.device``.
        windows: k windows from ``fr.window`` (None: the mask is empty).
        budget: bytes of one band's bool buffer (bands shrink to fit it, down to one row:
            a row of every mask at once is the floor).
        keys, store: a mask computed whole in one band goes to ``store`` under its key.

    Returns:
        (k, k) float64 intersection pixel counts and (k,) float64 areas, exact.
    """
    k = len(windows)
    dev = fr.device
    inter = torch.zeros((k, k), dtype=torch.float64, device=dev)
    area = torch.zeros((k,), dtype=torch.float64, device=dev)
    live = [i for i, w in enumerate(windows) if w is not None]
    if not live:
        return inter, area
    wins = [windows[i] for i in live]
    y0 = np.array([w.y0 for w in wins])
    y1 = np.array([w.y1 for w in wins])
    x0 = np.array([w.x0 for w in wins])
    x1 = np.array([w.x1 for w in wins])
    r, end = int(y0.min()), int(y1.max())
    while r < end:
        on = np.nonzero((y0 <= r) & (y1 > r))[0]
        if on.size == 0:  # no window covers row r: skip to the next one that starts
            r = int(y0[y0 > r].min())
            continue
        n, act = _band(r, end, on, y0, y1, x0, x1, budget)
        for group in _column_groups(act, x0, x1):  # masks in different groups never meet
            rows = max(r, int(y0[group].min())), min(r + n, int(y1[group].max()))
            c0, c1 = int(x0[group].min()), int(x1[group].max())
            buf = torch.zeros(
                (group.size, rows[1] - rows[0], c1 - c0), dtype=torch.bool, device=dev
            )
            for j, a in enumerate(group.tolist()):
                piece = wins[a].rows(*rows)
                if piece is None:
                    continue
                m = fr.mask(logits[live[a]], piece)
                buf[j, piece.y0 - rows[0] : piece.y1 - rows[0], piece.x0 - c0 : piece.x1 - c0] = m
                if store is not None and keys is not None and piece == wins[a]:
                    store.offer(keys[live[a]], m)
            ids = np.array([live[a] for a in group.tolist()])
            box = (rows[0], c0, y0[group], y1[group], x0[group], x1[group])
            tiles = list(_tiles(*box, buf.shape[1], buf.shape[2]))
            work = sum(sel.size**2 * (t[1] - t[0]) * (t[3] - t[2]) for sel, t in tiles)
            if work > 0.7 * group.size**2 * buf.shape[1] * buf.shape[2]:  # frame-filling
                tiles = [(np.arange(group.size), (0, buf.shape[1], 0, buf.shape[2]))]
            for sel, (r0, r1, q0, q1) in tiles:
                if sel.size == 0:
                    continue
                whole = sel.size == group.size
                part = (buf if whole else buf[torch.as_tensor(sel, device=dev)])[:, r0:r1, q0:q1]
                tile_inter, tile_area = ops.overlap_counts(part.reshape(sel.size, -1))
                idx = torch.as_tensor(ids[sel], device=dev)
                inter[idx[:, None], idx[None, :]] += tile_inter
                area[idx] += tile_area
        r += n
    return inter, area


def _band(
    r: int,
    end: int,
    on: np.ndarray,
    y0: np.ndarray,
    y1: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    budget: int,
) -> tuple[int, np.ndarray]:
    """Rows ``n`` of the band starting at row ``r`` and the windows it holds."""
    width = int(x1[on].max() - x0[on].min())
    n = max(1, min(end - r, budget // max(on.size * width, 1)))
    while True:
        act = np.nonzero((y0 < r + n) & (y1 > r))[0]
        width = int(x1[act].max() - x0[act].min())
        if n == 1 or act.size * n * width <= budget:
            return n, act
        n = max(1, n // 2)


#: A band's buffer is cut into at most TILES x TILES tiles of at least TILE_MIN px a side;
#: each tile's product involves only the masks whose windows meet it.
TILES, TILE_MIN = 4, 64


def _tiles(
    top: int,
    left: int,
    y0: np.ndarray,
    y1: np.ndarray,
    x0: np.ndarray,
    x1: np.ndarray,
    rows: int,
    cols: int,
):
    """Tiles of a (rows, cols) buffer at image pixel (top, left): yields (positions of the
    masks whose windows meet the tile, (r0, r1, c0, c1) in buffer coordinates)."""
    ny = max(1, min(TILES, rows // TILE_MIN))
    nx = max(1, min(TILES, cols // TILE_MIN))
    for i in range(ny):
        r0, r1 = rows * i // ny, rows * (i + 1) // ny
        hit_y = (y0 < top + r1) & (y1 > top + r0)
        for j in range(nx):
            c0, c1 = cols * j // nx, cols * (j + 1) // nx
            sel = np.nonzero(hit_y & (x0 < left + c1) & (x1 > left + c0))[0]
            yield sel, (r0, r1, c0, c1)


def _column_groups(act: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> list[np.ndarray]:
    """``act`` split into groups whose column ranges ``[x0, x1)`` chain-overlap."""
    order = act[np.argsort(x0[act], kind="stable")]
    groups, start, reach = [], 0, -1
    for i, a in enumerate(order.tolist()):
        if i and x0[a] >= reach:
            groups.append(order[start:i])
            start = i
        reach = max(reach, int(x1[a])) if i > start else int(x1[a])
    groups.append(order[start:])
    return groups


def encode_masks(
    fr: FullResolution,
    logits: torch.Tensor,
    windows: Sequence[Window | None],
    *,
    inclusive: bool,
    keys: Sequence[int] | None = None,
    store: MaskStore | None = None,
) -> tuple[np.ndarray, tuple[dict, ...]]:
    """Tight boxes and COCO RLEs of full-resolution masks, computed one at a time.

    Args:
        logits: (n, h, w) low-res logits of the kept masks, in output order.
        windows: their windows (None: empty mask).
        inclusive: box convention (``ops.masks_to_boxes``).
        keys, store: masks found in ``store`` under their key are not computed again.

    Returns:
        (n, 4) float32 XYXY boxes and n RLEs (``str`` counts) of the image size.
    """
    boxes = np.zeros((len(windows), 4), dtype=np.float32)
    rles = []
    size = (fr.oh, fr.ow)
    for i, win in enumerate(windows):
        if win is None:
            rles.append(rle_ops.encode_window(np.zeros((0, 0), bool), 0, 0, size))
            continue
        kept = store.masks.get(keys[i]) if store is not None and keys is not None else None
        mask = kept if kept is not None else fr.mask(logits[i], win)
        columns = mask.T.contiguous().cpu().numpy()  # torch transposes bool ~3x faster
        boxes[i] = ops.box_of_window(columns.T, win.y0, win.x0, inclusive=inclusive)
        rles.append(rle_ops.encode_window(columns, win.y0, win.x0, size, columns=True))
    return boxes, tuple(rles)
