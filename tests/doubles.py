"""Deterministic stand-ins for the two backbones, for tests only (no weights, no upstream code).

They implement exactly the interfaces refseg calls, so the real ``Sam2Proposer``, ``Matcher``,
``encode_shot`` and ``build_memory_bank`` run unchanged on synthetic scenes of flat-coloured
shapes:

* :class:`ShapeSam` for a SAM2 model (``Sam2Proposer``): ``image_size``, ``parameters()``,
  ``forward_image``, ``_prepare_backbone_features``, ``no_mem_embed``,
  ``sam_prompt_encoder(points=..., boxes=None, masks=None)`` with ``get_dense_pe()``, and
  ``sam_mask_decoder(...)``. A point prompt gives the connected region of the colour under the
  point; a box prompt (labels 2, 3) the region that fills most of the box. Background regions
  are proposals too: rejecting them is the matcher's job.
* :class:`ColourDino` for a timm DINOv2 (``dinov2_mean_std``, ``dinov2_patch_tokens``):
  ``pretrained_cfg`` mean/std, ``num_prefix_tokens``, ``patch_embed.img_size`` and
  ``forward_features``. A patch's feature is a soft one-hot of its mean colour over the class
  palette minus a "background-ness" on every dimension, so each class colour points along its
  own axis and any other colour points away from all of them (cosine < 0, score 0).

Colours are RGB uint8 triples; images reach the doubles normalised with ImageNet mean/std,
which they undo first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from refseg.core.features import DinoEncoder
from refseg.core.models import LoadedModel
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ColourDino",
    "ShapeSam",
    "colour_dino_encoder",
    "connected_components",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Colour = tuple[int, int, int]

# ShapeSam's predicted IoUs: multimask outputs are (shrunken, region, whole image), so the
# proposer must pick the middle one by IoU.
REGION_IOU, SHRUNK_IOU, WHOLE_IOU = 0.95, 0.7, 0.3
LOGIT_SCALE = 16.0  # low-res logit = (coverage of the 4x4 block - 0.5) * scale
PRESENT_TOL, PRESENT_MIN_PIXELS = 0.03, 8  # a palette colour is in an image if this flat


def _denormalise(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) ImageNet-normalised -> [0, 1]."""
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def _palette_tensor(colours: Sequence[Colour]) -> torch.Tensor:
    return torch.tensor([list(c) for c in colours], dtype=torch.float32) / 255.0


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal values.

    Args:
        labels: (H, W) integer array.

    Returns:
        (H, W) int64 component ids 0..n-1 (row-run union-find, deterministic).
    """
    h, w = labels.shape
    parent: list[int] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    run_ids = np.empty((h, w), dtype=np.int64)
    prev: list[tuple[int, int, int, int]] = []
    for y in range(h):
        row = labels[y]
        cuts = np.flatnonzero(row[1:] != row[:-1]) + 1
        starts, ends = [0, *cuts.tolist()], [*cuts.tolist(), w]
        runs = []
        for s, e in zip(starts, ends, strict=True):
            rid = len(parent)
            parent.append(rid)
            run_ids[y, s:e] = rid
            runs.append((s, e, int(row[s]), rid))
        i = j = 0
        while i < len(prev) and j < len(runs):
            ps, pe, pl, pid = prev[i]
            s, e, lab, rid = runs[j]
            if ps < e and s < pe and pl == lab:
                ra, rb = find(pid), find(rid)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if pe <= e:
                i += 1
            else:
                j += 1
        prev = runs
    roots = np.array([find(i) for i in range(len(parent))], dtype=np.int64)
    _, comp = np.unique(roots, return_inverse=True)
    return comp.reshape(-1)[run_ids]


class _PromptEncoder(nn.Module):
    """Passes the prompts through: sparse = (P, K, 3) of (x, y, label)."""

    def forward(self, points, boxes=None, masks=None):
        if boxes is not None or masks is not None:
            raise NotImplementedError("ShapeSam takes point prompts only (boxes as labels 2, 3)")
        coords, labels = points
        sparse = torch.cat([coords.float(), labels.float()[..., None]], dim=-1)
        dense = torch.zeros(coords.shape[0], 1, 1, 1, device=coords.device)
        return sparse, dense

    def get_dense_pe(self) -> torch.Tensor:
        return torch.zeros(1, 1, 1, 1)


class _MaskDecoder(nn.Module):
    """Regions under the prompts, read from the component-id level of ``forward_image``."""

    def _region_id(self, comp: torch.Tensor, prompt: torch.Tensor) -> int:
        s = comp.shape[-1]
        xy, labels = prompt[:, :2], prompt[:, 2].round().long()
        if bool((labels == 2).any()):
            (x0, y0), (x1, y1) = xy[labels == 2][0], xy[labels == 3][0]
            xs = slice(max(0, int(x0)), min(s, max(int(x0) + 1, int(x1))))
            ys = slice(max(0, int(y0)), min(s, max(int(y0) + 1, int(y1))))
            return int(torch.bincount(comp[ys, xs].reshape(-1)).argmax())
        x, y = xy[labels == 1][0].tolist()
        return int(comp[min(max(int(y), 0), s - 1), min(max(int(x), 0), s - 1)])

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        repeat_image: bool,
        high_res_features: list[torch.Tensor] | None = None,
    ):
        """Returns low-res logits (P, 3 or 1, S/4, S/4), IoUs (P, 3 or 1), None, None."""
        if not repeat_image or high_res_features is None or high_res_features[0].shape[0] != 1:
            raise NotImplementedError("ShapeSam decodes prompts of one image (repeat_image)")
        comp = high_res_features[0][0, 0].round().long()  # (S, S) component ids
        ids = torch.tensor(
            [self._region_id(comp, p) for p in sparse_prompt_embeddings], device=comp.device
        )
        unique, inverse = torch.unique(ids, return_inverse=True)
        region = (comp[None] == unique[:, None, None]).float()[:, None]  # (U, 1, S, S)
        logits = (F.avg_pool2d(region, 4)[inverse] - 0.5) * LOGIT_SCALE  # (P, 1, S/4, S/4)
        p = logits.shape[0]
        if not multimask_output:
            return logits, torch.full((p, 1), REGION_IOU), None, None
        shrunk = logits - 0.375 * LOGIT_SCALE  # foreground where coverage > 0.875
        outputs = torch.cat([shrunk, logits, torch.full_like(logits, LOGIT_SCALE / 2)], dim=1)
        iou = torch.tensor([SHRUNK_IOU, REGION_IOU, WHOLE_IOU]).repeat(p, 1)
        return outputs, iou, None, None


class ShapeSam(nn.Module):
    """A SAM2 stand-in that segments flat-coloured regions.

    Args:
        colours: every colour the scenes use (classes and backgrounds); pixels are assigned
            to the nearest one (black, SAM2's padding, is always added).
        image_size: the square input side S (a multiple of 4); masks are S/4 x S/4.
    """

    def __init__(self, colours: Sequence[Colour], image_size: int = 256) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.image_size = image_size
        self.register_buffer("palette", _palette_tensor([*colours, (0, 0, 0)]))
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, 3))
        self.sam_prompt_encoder = _PromptEncoder()
        self.sam_mask_decoder = _MaskDecoder()

    def components(self, image: torch.Tensor) -> torch.Tensor:
        """(3, S, S) in [0, 1] -> (S, S) int64 component ids of the nearest-colour map.

        Only palette colours present in the image (flat areas of at least a few pixels)
        compete, so that an edge between two colours splits at its midpoint.
        """
        pixels = image.permute(1, 2, 0).reshape(-1, 3)
        d2 = torch.cdist(pixels, self.palette) ** 2  # (S*S, K)
        present = (d2 < PRESENT_TOL**2).sum(0) >= PRESENT_MIN_PIXELS
        if not bool(present.any()):
            present[:] = True
        quantised = d2.masked_fill(~present, float("inf")).argmin(dim=1)
        labels = quantised.reshape(image.shape[1:]).cpu().numpy()
        return torch.from_numpy(connected_components(labels)).to(image.device)

    def forward_image(self, img_batch: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """(B, 3, S, S) normalised -> levels [component ids (B, 1, S, S), image at S/4]."""
        image = _denormalise(img_batch.float())
        comp = torch.stack([self.components(im) for im in image])[:, None].float()
        levels = [comp, F.avg_pool2d(image, 4)]
        return {"backbone_fpn": levels, "vision_pos_enc": [torch.zeros_like(x) for x in levels]}

    def _prepare_backbone_features(self, backbone_out):
        levels = backbone_out["backbone_fpn"]
        sizes = [(x.shape[-2], x.shape[-1]) for x in levels]
        flat = [x.flatten(2).permute(2, 0, 1) for x in levels]  # (HW, B, C)
        return backbone_out, flat, [torch.zeros_like(x) for x in flat], sizes


class _PatchEmbed(nn.Module):
    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.img_size = (image_size, image_size)


class ColourDino(nn.Module):
    """A timm DINOv2 stand-in: features of patch mean colours (D = number of class colours).

    For a patch of mean colour c, ``w_k = max(0, 1 - |c - p_k| / radius) ** 2`` over the
    class palette p_k, ``b = max(0, 1 - sum_k w_k)`` and the feature is ``w - b`` on every
    dimension: a class colour is its own axis, any colour far from the palette is
    (-1, ..., -1), whose cosine with every class prototype is negative.
    """

    def __init__(
        self, class_colours: Sequence[Colour], image_size: int, radius: float = 0.25
    ) -> None:
        super().__init__()
        if image_size % 14:
            raise ValueError(f"image_size must be a multiple of 14, got {image_size}")
        self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        self.num_prefix_tokens = 1
        self.patch_embed = _PatchEmbed(image_size)
        self.register_buffer("palette", _palette_tensor(class_colours))
        self.radius = nn.Parameter(torch.tensor(float(radius)))
        self.embed_dim = len(class_colours)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, 1 + (S/14)^2, D) tokens (a zero class token first)."""
        colour = F.avg_pool2d(_denormalise(x.float()), 14).flatten(2).transpose(1, 2)
        dist = torch.cdist(colour, self.palette[None].expand(x.shape[0], -1, -1))
        w = (1 - dist / self.radius).clamp(min=0) ** 2  # (B, N, K)
        b = (1 - w.sum(-1, keepdim=True)).clamp(min=0)
        tokens = w - b
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)


def colour_dino_encoder(
    class_colours: Sequence[Colour], image_size: int = 224, name: str = "vits14"
) -> DinoEncoder:
    """A ``DinoEncoder`` around a :class:`ColourDino`, as ``build_dinov2`` would wrap it."""
    model = ColourDino(class_colours, image_size).eval()
    loaded = LoadedModel(model=model, name=name, checkpoint=None, sha256=None, random_weights=False)
    return DinoEncoder(loaded, image_size=image_size)
