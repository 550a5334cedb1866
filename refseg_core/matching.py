"""Match proposals to the memory bank with DINOv2 features (method.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from refseg.core import ops
from refseg.core.config import MethodConfig
from refseg.core.features import DinoEncoder
from refseg.core.imaging import ResizeInfo
from refseg.core.instances import Instances
from refseg.core.memory_bank import MemoryBank
from refseg.core.proposals import Proposals
from refseg.core.tensors import crop_valid, images_to_float, lowres_to_original

__all__ = ["Matcher", "PooledMatcher"]

#: Low-res logits upsampled to the image size per step (float32 peak: 16 masks' worth).
UPSAMPLE_CHUNK = 16


class PooledMatcher:
    """Labels proposals whose DINOv2 features are already pooled: scoring, NMS, merging, top-k.

    The part of matching that depends on the memory bank (method.md §4.3-§4.8). It needs no
    encoder, so a proposal cache (pooled features stored beside the proposals) can be
    matched against another bank without running DINOv2.

    Args:
        bank: the memory bank; its class prototypes (and negatives) are computed once here.
        method: NMS, merging, top-k and negative-margin settings.
        device: where matching runs.
    """

    def __init__(
        self, bank: MemoryBank, method: MethodConfig, *, device: torch.device | str = "cpu"
    ) -> None:
        self.bank = bank
        self.method = method
        self.device = torch.device(device)
        self.prototypes = bank.class_prototypes().to(self.device)  # (C, D), normalised
        self.category_ids = torch.tensor(bank.category_ids, dtype=torch.long)
        negatives = bank.class_negatives()  # None, or (K, D) raw and (K,) class index
        self.negatives = None if negatives is None else tuple(t.to(self.device) for t in negatives)

    def nonempty(self, proposals: Proposals) -> tuple[Proposals, torch.Tensor, torch.Tensor]:
        """Proposals on this device, their (N, h, w) bool low-res masks, (N,) nonempty flags."""
        props = proposals.to(self.device)
        lowres = props.logits > self.method.mask_threshold  # (N, h, w)
        return props, lowres, lowres.flatten(1).any(dim=1)

    def _labels(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N,) scores, (N,) class indices and (N,) rows to keep, negatives applied.

        Without negatives every row is kept (the paper). With them, a class whose negative
        is at least as close as its prototype (minus ``negative_margin``) is ruled out for
        that proposal: it takes its next best class, or is dropped when none scores > 0.
        """
        sims = ops.cosine_scores(pooled, self.prototypes)  # (N, C)
        keep = torch.ones(sims.shape[0], dtype=torch.bool, device=sims.device)
        if self.negatives is None:
            scores, labels = sims.max(dim=1)
            return scores, labels, keep
        negatives, negative_class = self.negatives
        blocked = ops.negative_blocked(
            pooled, self.prototypes, negatives, negative_class, self.method.negative_margin
        )
        scores, labels = sims.masked_fill(blocked, -1.0).max(dim=1)
        keep = ~(blocked.any(dim=1) & (scores <= 0))
        return scores.clamp(min=0.0), labels, keep

    @torch.inference_mode()
    def match_pooled(self, proposals: Proposals, pooled: torch.Tensor) -> Instances:
        """Final labelled instances of one image from its proposals and pooled features.

        Args:
            proposals: SAM2 proposals of the image.
            pooled: (K, D) float32 DINOv2 features pooled inside each nonempty proposal
                (``Matcher.pool``), in proposal order.

        Returns:
            Instances at the original image size with full-resolution masks, sorted by
            decreasing score, at most ``max_instances``.
        """
        m = self.method
        oh, ow = proposals.orig_hw
        props, lowres, nonempty = self.nonempty(proposals)
        k = int(nonempty.sum())
        if tuple(pooled.shape[:1]) != (k,):
            raise ValueError(
                f"pooled features have {tuple(pooled.shape)} rows for {k} nonempty proposals: "
                "the features do not belong to these proposals"
            )
        if k == 0:
            return Instances.empty((oh, ow))
        logits, iou, lowres = props.logits[nonempty], props.iou[nonempty], lowres[nonempty]
        pooled = pooled.to(self.device, torch.float32)
        scores, labels, rows = self._labels(pooled)
        if not bool(rows.all()):  # proposals that negatives left without a class
            logits, iou, lowres, pooled = logits[rows], iou[rows], lowres[rows], pooled[rows]
            scores, labels = scores[rows], labels[rows]

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


class Matcher(PooledMatcher):
    """Labels proposals by cosine similarity to class prototypes, then NMS and merging.

    ``PooledMatcher`` with the DINOv2 encoder that computes and pools the target features:
    ``match(proposals, features)`` is ``match_pooled(proposals, pool(proposals, features))``.

    Args:
        encoder: the DINOv2 feature extractor (the same encoder the bank was built with).
        bank: the memory bank; its class prototypes are computed once here.
        method: NMS, merging and top-k settings.
    """

    def __init__(self, encoder: DinoEncoder, bank: MemoryBank, method: MethodConfig) -> None:
        bank.check_encoder(encoder.name, encoder.image_size)
        super().__init__(bank, method, device=encoder.device)
        self.encoder = encoder

    @torch.inference_mode()
    def target_features(self, images: torch.Tensor) -> torch.Tensor:
        """DINOv2 patch features of the SAM2 input squares.

        Args:
            images: (B, 3, S, S) float in [0, 1] (the same squares SAM2 saw), or uint8
                (B, S, S, 3) / (B, 3, S, S), converted on the device to the same values.

        Returns:
            (B, h, w, D) patch features (h = w = dinov2 image size / 14).
        """
        size = self.encoder.image_size
        x = F.interpolate(
            images_to_float(images, self.device),
            size=(size, size),
            mode="bicubic",
            align_corners=False,
            antialias=False,
        )
        return self.encoder(x)

    @torch.inference_mode()
    def pool(self, proposals: Proposals, features: torch.Tensor) -> torch.Tensor:
        """(K, D) float32 features pooled inside the K nonempty proposals (method.md §4.2).

        Args:
            proposals: SAM2 proposals of the image.
            features: (h, w, D) DINOv2 features of the same image.
        """
        _, lowres, nonempty = self.nonempty(proposals)
        if not bool(nonempty.any()):
            return torch.zeros((0, features.shape[-1]), dtype=torch.float32, device=self.device)
        return ops.pool_features(features.float(), lowres[nonempty])

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
        return self.match_pooled(proposals, self.pool(proposals, features))
