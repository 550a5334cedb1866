"""Pure tensor functions of the method: grids, boxes, NMS, pooling, merging.

No I/O, no device choice, no config reading: every function takes tensors and numbers and
returns tensors on the device of its inputs. Shapes are stated in each docstring.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "point_grid",
    "masks_to_boxes",
    "classwise_nms",
    "bilinear_operator",
    "pool_features",
    "pool_features_naive",
    "cosine_scores",
    "negative_blocked",
    "upsample_masks",
    "soft_merge_scores",
    "merge_by_class",
    "overlap_counts",
    "box_of_window",
    "normalize",
]


def point_grid(points_per_side: int, height: float, width: float | None = None) -> torch.Tensor:
    """Grid of single-point prompts in input pixel coordinates, ordered x-major.

    Coordinates are ``linspace(0, side - 1, n) + 0.5`` on each axis, as the paper's code
    builds them; ``(x, y)`` pairs with x varying slowest: (0.5, 0.5), (0.5, 33.5), ...

    Returns:
        (n * n, 2) float32 tensor of (x, y).
    """
    width = height if width is None else width
    xs = torch.linspace(0, width - 1, points_per_side) + 0.5
    ys = torch.linspace(0, height - 1, points_per_side) + 0.5
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1).float()


def masks_to_boxes(masks: torch.Tensor, *, inclusive: bool = False) -> torch.Tensor:
    """Tight boxes of binary masks.

    Args:
        masks: (N, H, W) bool.
        inclusive: if True, (x2, y2) is the last foreground pixel (the paper's convention,
            so a COCO width ``x2 - x1`` is one less than the mask's extent); otherwise
            (x2, y2) is one past it, as pycocotools' box of the same mask.

    Returns:
        (N, 4) float32 XYXY; an empty mask gives (0, 0, 0, 0).
    """
    n = masks.shape[0]
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    flags = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    rows = flags.amax(dim=2) > 0  # (N, H); uint8 amax: many times faster than bool any
    cols = flags.amax(dim=1) > 0  # (N, W)
    h, w = masks.shape[1:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y1 = torch.where(rows, ar_h, big).amin(dim=1)
    y2 = torch.where(rows, ar_h, -1).amax(dim=1)
    x1 = torch.where(cols, ar_w, big).amin(dim=1)
    x2 = torch.where(cols, ar_w, -1).amax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    if not inclusive:
        boxes[:, 2:] += 1
    empty = ~rows.any(dim=1)
    boxes[empty] = 0
    return boxes


def box_of_window(mask: np.ndarray, top: int, left: int, *, inclusive: bool = False) -> np.ndarray:
    """``masks_to_boxes`` of a whole-image mask that is false outside one window.

    Args:
        mask: (h, w) bool NumPy array, the window's pixels; its top-left pixel is
            ``(top, left)`` (NumPy: a row/column ``any`` is many times faster than torch's
            on bool, and the mask goes to the host for its RLE anyway).

    Returns:
        (4,) float32 XYXY in image pixels (conventions of ``masks_to_boxes``); an empty mask
        gives (0, 0, 0, 0).
    """
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return np.zeros((4,), dtype=np.float32)
    xs = np.flatnonzero(mask.any(axis=0))
    end = 0 if inclusive else 1
    box = [left + xs[0], top + ys[0], left + xs[-1] + end, top + ys[-1] + end]
    return np.asarray(box, dtype=np.float32)


def classwise_nms(
    boxes: torch.Tensor,
    ranking: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
    max_keep: int,
) -> torch.Tensor:
    """Class-wise NMS; returns kept indices sorted by decreasing ``ranking``.

    Args:
        boxes: (N, 4) XYXY. ranking: (N,) the key to rank by (the paper ranks by SAM's
        predicted IoU, not by score). labels: (N,) int class index.
    """
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    from torchvision.ops import batched_nms  # imported here: torchvision costs ~2 s to import

    keep = batched_nms(boxes.float(), ranking.float(), labels, iou_threshold)
    return keep[:max_keep]


@functools.lru_cache(maxsize=64)
def _operator_cpu(in_size: int, out_size: int) -> torch.Tensor:
    eye = torch.eye(in_size, dtype=torch.float64).unsqueeze(1)  # (in, 1, in)
    up = F.interpolate(eye, size=out_size, mode="linear", align_corners=False)  # (in, 1, out)
    return up[:, 0, :].T.contiguous()  # (out, in)


def bilinear_operator(in_size: int, out_size: int, *, device=None, dtype=torch.float32):
    """Matrix ``U`` (out, in) with ``U @ x`` = 1-D linear upsampling of x as torch does it.

    ``F.interpolate(mode="bilinear", align_corners=False)`` is separable, so a 2-D
    upsampling of a map ``X`` (h, w) is ``Uy @ X @ Ux.T``.
    """
    return _operator_cpu(in_size, out_size).to(device=device, dtype=dtype)


#: Masks converted to float per step of ``pool_features``: keeps the float copy small
#: (4 MiB at 256x256) and in cache instead of one (N, H, W) float32 array.
POOL_CHUNK = 16


def pool_features(
    features: torch.Tensor, masks: torch.Tensor, *, chunk: int = POOL_CHUNK
) -> torch.Tensor:
    """Mean of bilinearly upsampled features inside each mask, at patch resolution.

    Equal (up to float rounding) to upsampling ``features`` to the masks' size and
    averaging inside each mask (``pool_features_naive``), without materialising the
    (H, W, D) map: the mean is a weighted sum of patch features with weights
    ``Uy.T @ M @ Ux`` (the transpose of the upsampling applied to the mask). Masks are
    converted to float ``chunk`` at a time into one reused buffer; the mask areas come out
    of the same product (a row of ones appended to ``Uy.T``), so they are exact counts.

    Args:
        features: (h, w, D) patch features.
        masks: (N, H, W) bool or float masks.

    Returns:
        (N, D) pooled features; an empty mask gives zeros.
    """
    h, w, d = features.shape
    n, mh, mw = masks.shape
    dtype, dev = features.dtype, features.device
    uy = bilinear_operator(h, mh, device=dev, dtype=dtype)  # (H, h)
    ux = bilinear_operator(w, mw, device=dev, dtype=dtype)  # (W, w)
    uy1 = torch.cat([uy, torch.ones((mh, 1), device=dev, dtype=dtype)], dim=1).T  # (h+1, H)
    weights = torch.empty((n, h, w), device=dev, dtype=dtype)
    area = torch.empty((n,), device=dev, dtype=dtype)
    convert = masks.dtype != dtype
    buf = torch.empty((min(chunk, n), mh, mw), device=dev, dtype=dtype) if convert else None
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        m = masks[s : s + k]
        if buf is not None:
            m = buf[:k].copy_(m)
        rows = uy1 @ m  # (k, h+1, W): contracted over H; the last row sums each column
        area[s : s + k] = rows[:, h].sum(dim=1)
        weights[s : s + k] = rows[:, :h] @ ux  # (k, h, w)
    pooled = weights.reshape(n, h * w) @ features.reshape(h * w, d)
    return pooled / area.clamp(min=1)[:, None]


def pool_features_naive(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The paper's form: upsample (h, w, D) to (H, W, D) bilinearly, average inside masks."""
    _, mh, mw = masks.shape
    up = F.interpolate(
        features.permute(2, 0, 1)[None], size=(mh, mw), mode="bilinear", align_corners=False
    )[0]  # (D, H, W)
    m = masks.to(features.dtype)
    area = m.sum(dim=(1, 2)).clamp(min=1)
    return torch.einsum("nhw,dhw->nd", m, up) / area[:, None]


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the last dimension."""
    return F.normalize(x, dim=-1, eps=eps)


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``max(0, cos)`` between (N, D) features and (C, D) prototypes: (N, C)."""
    return (normalize(features) @ normalize(prototypes).T).clamp(min=0.0)


def negative_blocked(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    negatives: torch.Tensor,
    negative_class: torch.Tensor,
    margin: float = 0.0,
) -> torch.Tensor:
    """Which classes negative references rule out for each proposal.

    Class c is ruled out for proposal i when ``max_k cos(f_i, n_k) >= cos(f_i, P_c) - margin``
    over the negatives n_k of class c (raw cosines, not clamped). A class without negatives
    is never ruled out.

    Args:
        features: (N, D) proposal features. prototypes: (C, D) class prototypes.
        negatives: (K, D) negative prototypes. negative_class: (K,) int64 class index
            (0..C-1) each negative belongs to.

    Returns:
        (N, C) bool.
    """
    f = normalize(features)
    pos = f @ normalize(prototypes).T  # (N, C)
    neg = f @ normalize(negatives).T  # (N, K)
    closest = torch.full_like(pos, float("-inf"))
    index = negative_class.to(pos.device).long()[None].expand(neg.shape[0], -1)
    closest = closest.scatter_reduce(1, index, neg, reduce="amax", include_self=True)
    return closest >= pos - margin


def upsample_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0):
    """Bilinear upsampling of (N, h, w) mask logits to ``size``; returns (N, H, W) bool."""
    if logits.shape[0] == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=logits.device)
    up = F.interpolate(logits[:, None].float(), size=size, mode="bilinear", align_corners=False)
    return up[:, 0] > threshold


#: Pixels per step when counting mask overlaps: bounds the float copy of k masks to
#: k x 2**18 values, and each step's counts are exact in float32 (<= 2**24).
OVERLAP_CHUNK = 2**18
#: Float32 values of that copy at most (64 MiB): many masks take fewer pixels per step.
OVERLAP_FLOATS = 2**24


def _overlaps(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, P) bool masks -> (k, k) intersection counts and (k,) areas, float64, exact."""
    k, p = flat.shape
    inter = torch.zeros((k, k), dtype=torch.float64, device=flat.device)
    area = torch.zeros((k,), dtype=torch.float64, device=flat.device)
    for s in range(0, p, OVERLAP_CHUNK):
        m = flat[:, s : s + OVERLAP_CHUNK].to(torch.float32)
        inter += (m @ m.T).double()
        area += m.sum(dim=1).double()
    return inter, area


def overlap_counts(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, P) bool masks -> (k, k) intersection counts and (k,) areas, float64, exact.

    As ``_overlaps`` (the dense reference's), with the float copy bounded to
    ``OVERLAP_FLOATS`` values whatever k: ``OVERLAP_FLOATS / k`` pixels per step.
    """
    k, p = flat.shape
    step = max(1, min(OVERLAP_CHUNK, OVERLAP_FLOATS // max(k, 1)))
    inter = torch.zeros((k, k), dtype=torch.float64, device=flat.device)
    area = torch.zeros((k,), dtype=torch.float64, device=flat.device)
    for s in range(0, p, step):
        m = flat[:, s : s + step].to(torch.float32)
        inter += (m @ m.T).double()
        area += m.sum(dim=1).double()
    return inter, area


def soft_merge_scores(
    masks: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    power: float = 0.5,
) -> torch.Tensor:
    """Semantic-aware soft merging (method.md §4.6), masks given in NMS order.

    ``IoS_i = max_{j < i, same label} |M_i ∩ M_j| / |M_i| * clamp(cos(f_i, f_j), 0, 1)``
    and ``score_i * (1 - IoS_i) ** power``. The cosine is clamped to [0, 1] so two identical
    masks never give NaN.

    Args:
        masks: (N, H, W) bool, in the order the rule walks (NMS order).
        features: (N, D) proposal features. labels: (N,) class index. scores: (N,).

    Returns:
        (N,) new scores.
    """
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    return merge_by_class(lambda idx: _overlaps(flat[idx]), features, labels, scores, power)


def merge_by_class(
    overlaps: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    features: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    power: float = 0.5,
) -> torch.Tensor:
    """The rule of ``soft_merge_scores`` given each class's mask overlaps.

    Args:
        overlaps: ``idx`` (k,) positions of one class's masks, in NMS order -> (k, k)
            float64 intersection pixel counts and (k,) float64 mask areas, exact.
        features: (N, D). labels: (N,) class index. scores: (N,).

    Returns:
        (N,) new scores; a class with one mask keeps its score.
    """
    out = scores.clone()
    if scores.shape[0] < 2:
        return out
    fnorm = normalize(features.float())
    for label in labels.unique():
        idx = torch.nonzero(labels == label).flatten()
        if idx.numel() < 2:
            continue
        inter, area = overlaps(idx)
        ios = (inter / area.clamp(min=1)[:, None]).float()
        sim = (fnorm[idx] @ fnorm[idx].T).clamp(0.0, 1.0)
        earlier = torch.ones_like(ios, dtype=torch.bool).tril(diagonal=-1)  # j < i
        val = torch.where(earlier, ios * sim, torch.zeros_like(ios)).amax(dim=1).clamp(0.0, 1.0)
        out[idx] = scores[idx] * (1.0 - val) ** power
    return out
