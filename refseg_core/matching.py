"""Match proposals to the memory bank with DINOv2 features (method.md §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from refseg.core import ops
from refseg.core.config import MethodConfig
from refseg.core.features import DinoEncoder
from refseg.core.fullres import FullResolution, Window
from refseg.core.imaging import ResizeInfo
from refseg.core.instances import Instances
from refseg.core.memory_bank import MemoryBank
from refseg.core.proposals import Proposals
from refseg.core.tensors import crop_valid, images_to_float, lowres_to_original
from refseg.core.window_merge import MaskStore, encode_masks, window_overlaps

__all__ = ["Matcher", "PooledMatcher"]

#: Low-res logits upsampled to the image size per step of the dense reference path
#: (float32 peak: 16 masks' worth).
UPSAMPLE_CHUNK = 16
#: The dense path (every survivor upsampled whole) is taken where its masks fit in this
#: many pixels (K x H x W bool bytes) and the windows cover at least DENSE_WINDOW_SHARE of
#: them: frame-filling (speckled) masks on a small image, where windows save nothing and
#: cost their per-mask work (480 x 640, 800 speckled survivors: windowed 0.5x the dense).
DENSE_MAX_PIXELS = 2**28
DENSE_WINDOW_SHARE = 0.5


def dense_is_cheaper(windows: list[Window | None], orig_hw: tuple[int, int]) -> bool:
    """Whether ``PooledMatcher.match_pooled`` takes the dense path for these windows (the
    outputs are the same either way)."""
    whole = len(windows) * orig_hw[0] * orig_hw[1]
    if not whole or whole > DENSE_MAX_PIXELS:
        return False
    return sum(w.area for w in windows if w is not None) >= DENSE_WINDOW_SHARE * whole


@dataclass(frozen=True)
class _Survivors:
    """The K proposals that survive scoring and NMS, in NMS order (method.md §4.4).

    logits: (K, h, w) float32; lowres: (K, h, w) bool; iou, scores: (K,) float;
    labels: (K,) class index; feats: (K, D) normalised pooled features.
    """

    props: Proposals
    logits: torch.Tensor
    lowres: torch.Tensor
    iou: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    feats: torch.Tensor


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

        Full-resolution masks are computed inside each mask's window, one mask at a time
        (:mod:`refseg.core.fullres`), and leave as COCO RLE: memory follows the largest
        window, never K x H x W. Outputs equal ``_match_pooled_dense`` (the paper's order:
        every survivor upsampled whole): same instances and masks, same scores.

        Args:
            proposals: SAM2 proposals of the image.
            pooled: (K, D) float32 DINOv2 features pooled inside each nonempty proposal
                (``Matcher.pool``), in proposal order.

        Returns:
            Instances at the original image size with ``rles`` (no dense ``masks``),
            sorted by decreasing score, at most ``max_instances``.
        """
        m = self.method
        sv = self._survivors(proposals, pooled)
        if sv is None:
            return Instances.empty(proposals.orig_hw)
        fr = FullResolution(
            self._resize_info(sv.props),
            tuple(sv.logits.shape[-2:]),  # type: ignore[arg-type]
            threshold=m.mask_threshold,
            device=self.device,
        )
        if not fr.exact:  # this device's resize could not be reproduced window by window
            return self._finish_dense(sv).with_rles(drop_masks=True)
        windows = fr.windows(sv.logits)
        if dense_is_cheaper(windows, (fr.oh, fr.ow)):  # frame-filling masks, a small image
            return self._finish_dense(sv).with_rles(drop_masks=True)
        scores = sv.scores
        store = MaskStore()  # masks the merge computes whole, reused by the encoding
        if m.soft_merge:
            if m.merge_resolution == "lowres":
                merge = crop_valid(sv.lowres, self._resize_info(sv.props))
                scores = ops.soft_merge_scores(merge, sv.feats, sv.labels, scores, m.merge_power)
            else:

                def overlaps(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    ids = idx.tolist()
                    wins = [windows[i] for i in ids]
                    return window_overlaps(fr, sv.logits[idx], wins, keys=ids, store=store)

                scores = ops.merge_by_class(overlaps, sv.feats, sv.labels, scores, m.merge_power)
        order = self._order(scores)
        ids = order.tolist()
        boxes, rles = encode_masks(
            fr,
            sv.logits[order],
            [windows[i] for i in ids],
            inclusive=m.box_convention == "ntt",
            keys=ids,
            store=store,
        )
        return Instances(
            image_size=sv.props.orig_hw,
            boxes=boxes,
            scores=scores[order].float().cpu().numpy(),
            category_ids=self.category_ids[sv.labels[order].cpu()].numpy(),
            proposal_iou=sv.iou[order].float().cpu().numpy(),
            rles=rles,
        )

    def _survivors(self, proposals: Proposals, pooled: torch.Tensor) -> _Survivors | None:
        """Scores, labels and class-wise NMS on the low-res masks (method.md §4.3-§4.4)."""
        m = self.method
        props, lowres, nonempty = self.nonempty(proposals)
        k = int(nonempty.sum())
        if tuple(pooled.shape[:1]) != (k,):
            raise ValueError(
                f"pooled features have {tuple(pooled.shape)} rows for {k} nonempty proposals: "
                "the features do not belong to these proposals"
            )
        if k == 0:
            return None
        logits, iou, lowres = props.logits[nonempty], props.iou[nonempty], lowres[nonempty]
        pooled = pooled.to(self.device, torch.float32)
        scores, labels, rows = self._labels(pooled)
        if not bool(rows.all()):  # proposals that negatives left without a class
            logits, iou, lowres, pooled = logits[rows], iou[rows], lowres[rows], pooled[rows]
            scores, labels = scores[rows], labels[rows]

        boxes = ops.masks_to_boxes(lowres, inclusive=m.box_convention == "ntt")
        keep = ops.classwise_nms(boxes, iou, labels, m.nms_iou, m.max_nms)
        keep = keep[scores[keep] > 0]
        if keep.numel() == 0:
            return None
        return _Survivors(
            props,
            logits[keep],
            lowres[keep],
            iou[keep],
            scores[keep],
            labels[keep],
            ops.normalize(pooled[keep]),
        )

    def _order(self, scores: torch.Tensor) -> torch.Tensor:
        """Output order (method.md §4.7): by decreasing score, top ``max_instances``."""
        order = torch.argsort(scores, descending=True, stable=True)
        if self.method.score_threshold > 0:  # none by default: merged-away may score 0
            order = order[scores[order] > self.method.score_threshold]
        return order[: self.method.max_instances]

    @torch.inference_mode()
    def _match_pooled_dense(self, proposals: Proposals, pooled: torch.Tensor) -> Instances:
        """``match_pooled`` the paper's way: every survivor upsampled to the whole image.

        Holds K x H x W bool masks (and 16 float masks while upsampling); returns dense
        ``masks``. The reference the windowed path is tested and benchmarked against.
        """
        sv = self._survivors(proposals, pooled)
        if sv is None:
            return Instances.empty(proposals.orig_hw)
        return self._finish_dense(sv)

    def _finish_dense(self, sv: _Survivors) -> Instances:
        m = self.method
        props, logits, scores, labels = sv.props, sv.logits, sv.scores, sv.labels
        lowres_merge = m.merge_resolution == "lowres"
        masks = None if lowres_merge else self._full_resolution(logits, props)
        if m.soft_merge:
            # at 256²: the part of the low-res masks that covers the image
            merge_masks = crop_valid(sv.lowres, self._resize_info(props)) if lowres_merge else masks
            scores = ops.soft_merge_scores(merge_masks, sv.feats, labels, scores, m.merge_power)
        order = self._order(scores)
        masks = self._full_resolution(logits[order], props) if masks is None else masks[order]
        return Instances(
            image_size=props.orig_hw,
            boxes=ops.masks_to_boxes(masks, inclusive=m.box_convention == "ntt").cpu().numpy(),
            scores=scores[order].float().cpu().numpy(),
            category_ids=self.category_ids[labels[order].cpu()].numpy(),
            proposal_iou=sv.iou[order].float().cpu().numpy(),
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
