"""Match proposals to the memory bank with DINOv2 features (method.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from refseg_core import ops
from refseg_core.config import MethodConfig
from refseg_core.features import DinoEncoder
from refseg_core.imaging import ResizeInfo
from refseg_core.instances import Instances
from refseg_core.memory_bank import MemoryBank
from refseg_core.proposals import Proposals
from refseg_core.tensors import crop_valid, lowres_to_original

__all__ = ["Matcher"]

#: Low-res logits upsampled to the image size per step (float32 peak: 16 masks' worth).
UPSAMPLE_CHUNK = 16


class Matcher:
    """Labels proposals by cosine similarity to class prototypes, then NMS and merging.

    Args:
        encoder: the DINOv2 feature extractor (the same encoder the bank was built with).
        bank: the memory bank; its class prototypes are computed once here.
        method: NMS, merging and top-k settings.
    """

    def __init__(self, encoder: DinoEncoder, bank: MemoryBank, method: MethodConfig) -> None:
        bank.check_encoder(encoder.name, encoder.image_size)
        self.encoder = encoder
        self.bank = bank
        self.method = method
        self.device = encoder.device
        self.prototypes = bank.class_prototypes().to(self.device)  # (C, D), normalised
        self.category_ids = torch.tensor(bank.category_ids, dtype=torch.long)

    @torch.inference_mode()
    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2 patch features of the SAM2 input squares.

        Args:
            images: (B, 3, S, S) float in [0, 1] (the same squares SAM2 saw).

        Returns:
            (B, h, w, D) patch features (h = w = dinov2 image size / 14).
        """
        size = self.encoder.image_size
        x = F.interpolate(
            images.to(self.device, torch.float32),
            size=(size, size),
            mode="bicubic",
            align_corners=False,
            antialias=False,
        )
        return self.encoder(x)

    @torch.inference_mode()
    def match(self, proposals: Proposals, features: torch.Tensor) -> Instances:
        """Final labelled instances of one image.

        Args:
            proposals: SAM2 proposals of the image.
            features: (h, w, D) DINOv2 features of the same image.

        Returns:
            Instances at the original image size with full-resolution masks, sorted by
            decreasing score, at most ``max_instances``.
        """
        m = self.method
        oh, ow = proposals.orig_hw
        props = proposals.to(self.device)
        lowres = props.logits > m.mask_threshold  # (N, h, w)
        nonempty = lowres.flatten(1).any(dim=1)
        if not bool(nonempty.any()):
            return Instances.empty((oh, ow))
        logits, iou, lowres = props.logits[nonempty], props.iou[nonempty], lowres[nonempty]

        pooled = ops.pool_features(features.float(), lowres)  # (N, D)
        sims = ops.cosine_scores(pooled, self.prototypes)  # (N, C)
        scores, labels = sims.max(dim=1)

        inclusive = m.box_convention == "ntt"
        boxes = ops.masks_to_boxes(lowres, inclusive=inclusive)
        keep = ops.classwise_nms(boxes, iou, labels, m.nms_iou, m.max_nms)
        keep = keep[scores[keep] > 0]
        if keep.numel() == 0:
            return Instances.empty((oh, ow))
        logits, iou, scores, labels = logits[keep], iou[keep], scores[keep], labels[keep]
        feats = ops.normalize(pooled[keep])

        lowres_merge = m.merge_resolution == "lowres"
        masks = None if lowres_merge else self._full_resolution(logits, props)
        if m.soft_merge:
            # at 256²: the part of the low-res masks that covers the image
            merge_masks = (
                crop_valid(lowres[keep], self._resize_info(props)) if lowres_merge else masks
            )
            scores = ops.soft_merge_scores(merge_masks, feats, labels, scores, m.merge_power)
        order = torch.argsort(scores, descending=True, stable=True)
        if m.score_threshold > 0:  # none by default: merged-away instances may score 0
            order = order[scores[order] > m.score_threshold]
        order = order[: m.max_instances]
        masks = self._full_resolution(logits[order], props) if masks is None else masks[order]
        return Instances(
            image_size=(oh, ow),
            boxes=ops.masks_to_boxes(masks, inclusive=inclusive).cpu().numpy(),
            scores=scores[order].float().cpu().numpy(),
            category_ids=self.category_ids[labels[order].cpu()].numpy(),
            proposal_iou=iou[order].float().cpu().numpy(),
            masks=masks.cpu().numpy(),
        )

    @staticmethod
    def _resize_info(props: Proposals) -> ResizeInfo:
        """How the proposals' image was put into the SAM2 input square."""
        mode = "square" if props.valid_hw == (props.input_size,) * 2 else "longest-side"
        return ResizeInfo(props.orig_hw, props.input_size, mode, props.valid_hw)

    def _full_resolution(self, logits: torch.Tensor, props: Proposals) -> torch.Tensor:
        """(K, h, w) low-res logits to (K, H, W) bool masks at the original size.

        Square inputs go straight from the low-res logits to the original size (the
        paper); longest-side inputs map each original pixel into the valid region exactly.
        The float upsampling runs ``UPSAMPLE_CHUNK`` masks at a time, so only the bool
        result is held whole.
        """
        info = self._resize_info(props)
        out = torch.empty((logits.shape[0], *props.orig_hw), dtype=torch.bool, device=self.device)
        for s in range(0, logits.shape[0], UPSAMPLE_CHUNK):
            part = lowres_to_original(logits[s : s + UPSAMPLE_CHUNK], info)
            out[s : s + UPSAMPLE_CHUNK] = part > self.method.mask_threshold
        return out
