"""Class-agnostic mask proposals from SAM2 with a point-grid prompt (method.md §3).

``Sam2Proposer`` receives a built SAM2 model (``refseg.core.models.build_sam2``) and calls
the model's own image encoder, prompt encoder and mask decoder, as the paper's code does,
so that it works at any image size the model was built for. The mask decoder runs either
as SAM2's own call (``decoder="stock"``, the paper's path) or, by default, through
:class:`refseg.core.decoder.SharedImageDecoder`, which does each image's prompt-independent
work once and gives the same masks and IoUs up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from refseg.core import ops
from refseg.core.config import MethodConfig
from refseg.core.decoder import ImageState, SharedImageDecoder
from refseg.core.sizing import auto_prompt_batch, probe_bytes_per_prompt
from refseg.core.tensors import images_to_float

#: SAM2's input normalisation (ImageNet mean and std, as ``sam2.utils.transforms``'s
#: ``SAM2Transforms`` sets them). Copied as numbers because importing that module pulls in
#: torchvision (about 2 s per worker process); tests/test_proposals.py checks they agree.
SAM2_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
SAM2_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

__all__ = ["EncodedImage", "Proposals", "Sam2Proposer"]


@dataclass(frozen=True)
class EncodedImage:
    """One image's mask-decoder inputs.

    Attributes:
        embed: (1, C, h, w) image embedding; high_res: [(1, C/8, 4h, 4w), (1, C/4, 2h, 2w)].
        shared: the fast decoder's prompt-independent state, ``None`` for the stock call.
    """

    embed: torch.Tensor
    high_res: list[torch.Tensor]
    shared: ImageState | None = None


@dataclass(frozen=True)
class Proposals:
    """The surviving proposals of one image.

    Attributes:
        logits: (N, h, w) float32 low-resolution mask logits (h = w = input_size / 4),
            in the padded/resized input frame; foreground where > 0.
        iou: (N,) float32 SAM's predicted IoU of each mask.
        points: (N, 2) float32 prompt (x, y) in input pixels.
        input_size: side of the square SAM2 input (1024 in the paper).
        valid_hw: (h, w) of the image inside the input square (== input size for 'square').
        orig_hw: (H, W) of the original image.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    points: torch.Tensor
    input_size: int
    valid_hw: tuple[int, int]
    orig_hw: tuple[int, int]

    def __len__(self) -> int:
        return int(self.iou.shape[0])

    def to(self, device: torch.device | str) -> Proposals:
        return Proposals(
            self.logits.to(device),
            self.iou.to(device),
            self.points.to(device),
            self.input_size,
            self.valid_hw,
            self.orig_hw,
        )


class Sam2Proposer:
    """Point-grid proposals with SAM2 (method.md §3).

    Args:
        model: a built ``SAM2Base`` (eval mode) on its device.
        method: grid size, prompt batch, IoU filter, ``add_no_mem_embed``.
        compile_backend: a ``torch.compile`` backend (``"inductor"``, or a callable) for
            the code that runs per image and per prompt: the image encoder
            (``model.forward_image``), the fast decoder's per-prompt work
            (``SharedImageDecoder``) and, with ``decoder="stock"``, SAM2's mask decoder.
            The model itself is left as it is. ``None``: eager.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        method: MethodConfig,
        *,
        compile_backend: str | Callable[..., Any] | None = None,
    ) -> None:
        self.model = model
        self.method = method
        self.input_size = int(model.image_size)
        self.device = next(model.parameters()).device
        self._mean = torch.tensor(SAM2_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(SAM2_STD, device=self.device).view(1, 3, 1, 1)
        self._fast: SharedImageDecoder | None = None
        self.compile_backend = compile_backend
        self._forward_image = model.forward_image
        self._stock_decoder = model.sam_mask_decoder
        if compile_backend is not None:
            self._forward_image = torch.compile(model.forward_image, backend=compile_backend)
            self._stock_decoder = torch.compile(model.sam_mask_decoder, backend=compile_backend)
        # automatic prompt batches, per (decoder, bf16, embedding size): sized once
        self._auto_batch: dict[tuple[str, bool, tuple[int, int]], int] = {}
        if self.device.type == "cuda" and not method.prompt_batch:
            side = self.input_size // 16  # SAM2's image embedding: stride 16
            self.prompt_batch((side, side))

    def _fast_decoder(self) -> SharedImageDecoder:
        """The fast decoder, in bf16 under ``autocast_bf16`` (built once per dtype)."""
        dtype = torch.bfloat16 if self.method.autocast_bf16 else torch.float32
        if self._fast is None or self._fast.dtype != dtype:
            self._fast = SharedImageDecoder(
                self.model, dtype=dtype, compile_backend=self.compile_backend
            )
        return self._fast

    def _autocast(self):
        return torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.method.autocast_bf16
        )

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image encoder once per image.

        Args:
            images: (B, 3, S, S) float in [0, 1], or uint8 as (B, 3, S, S) or (B, S, S, 3)
                (converted on the model's device, to the same values: see
                ``refseg.core.tensors.images_to_float``); S = the model's input size.

        Returns:
            image embeddings (B, C, S/16, S/16) and the high-resolution feature levels.
        """
        x = (images_to_float(images, self.device) - self._mean) / self._std
        with self._autocast():
            backbone_out = self._forward_image(x)
            _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.method.add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        b = x.shape[0]
        feats = [
            f.permute(1, 2, 0).reshape(b, -1, *size)
            for f, size in zip(vision_feats[::-1], feat_sizes[::-1], strict=True)
        ][::-1]
        return feats[-1], feats[:-1]

    @torch.inference_mode()
    def prepare(self, image_embed: torch.Tensor, high_res: list[torch.Tensor]) -> EncodedImage:
        """One image's decoder inputs (``image_embed`` (1, C, h, w)); with the fast decoder,
        its prompt-independent work is done here, once."""
        if self.method.decoder == "stock":
            return EncodedImage(image_embed, high_res)
        with torch.autocast(self.device.type, enabled=False):
            shared = self._fast_decoder().prepare(image_embed, high_res)
        return EncodedImage(image_embed, high_res, shared)

    @torch.inference_mode()
    def decode(
        self,
        image: EncodedImage,
        coords: torch.Tensor,
        labels: torch.Tensor,
        *,
        multimask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask decoder for P prompts on one image.

        Args:
            image: from :meth:`prepare`.
            coords: (P, K, 2) input-pixel (x, y); labels: (P, K) int (1 positive,
                2/3 box corners).

        Returns:
            low-res logits (P, M, S/4, S/4) and predicted IoU (P, M), float32, M = 3 or 1.
        """
        with self._autocast():
            sparse, dense = self.model.sam_prompt_encoder(
                points=(coords.to(self.device), labels.to(self.device)), boxes=None, masks=None
            )
        if image.shared is not None:
            # bf16 runs natively in a bf16 copy of the decoder, not under autocast
            with torch.autocast(self.device.type, enabled=False):
                low_res, iou = self._fast_decoder()(image.shared, sparse, multimask=multimask)
            return low_res.float(), iou.float()
        with self._autocast():
            low_res, iou, _, _ = self._stock_decoder(
                image_embeddings=image.embed,
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
                repeat_image=True,
                high_res_features=image.high_res,
            )
        return low_res.float(), iou.float()

    def prompt_batch(self, embed_hw: tuple[int, int]) -> int:
        """Prompts per decoder call: the method's ``prompt_batch``, or the automatic one.

        The automatic batch is sized once per setting (on CUDA when the proposer is built,
        from the device's free memory then and the bytes per prompt measured there by a
        probe call of the fast decoder); later calls reuse it.
        """
        m = self.method
        if m.prompt_batch:
            return m.prompt_batch
        key = (m.decoder, m.autocast_bf16, (int(embed_hw[0]), int(embed_hw[1])))
        if key not in self._auto_batch:
            per_prompt = None
            if self.device.type == "cuda" and m.decoder == "fast":
                per_prompt = probe_bytes_per_prompt(
                    lambda p: self._probe_decode(key[2], p), self.device
                )
            self._auto_batch[key] = auto_prompt_batch(
                m.decoder, self.device, key[2], bf16=m.autocast_bf16, bytes_per_prompt=per_prompt
            )
        return self._auto_batch[key]

    @torch.inference_mode()
    def _probe_decode(self, embed_hw: tuple[int, int], prompts: int) -> None:
        """One eager fast-decoder call of ``prompts`` grid prompts on a zero image embedding
        of ``embed_hw``: what ``probe_bytes_per_prompt`` measures."""
        dec = self._fast_decoder()
        c = int(self.model.sam_mask_decoder.transformer_dim)
        h, w = embed_hw
        zeros = {"device": self.device, "dtype": torch.float32}
        high_res = [torch.zeros(1, c // 8, 4 * h, 4 * w, **zeros)]
        high_res.append(torch.zeros(1, c // 4, 2 * h, 2 * w, **zeros))
        with torch.autocast(self.device.type, enabled=False):
            state = dec.prepare(torch.zeros(1, c, h, w, **zeros), high_res)
        pts = torch.full((prompts, 2), self.input_size / 2, device=self.device)
        labels = torch.ones(prompts, 1, dtype=torch.int, device=self.device)
        with self._autocast():
            sparse, _ = self.model.sam_prompt_encoder(
                points=(pts[:, None, :], labels), boxes=None, masks=None
            )
        with torch.autocast(self.device.type, enabled=False):
            dec._decode_eager(state, sparse, True)

    def grid(self, valid_hw: tuple[int, int]) -> torch.Tensor:
        """The (P, 2) point grid over the valid part of the input square."""
        return ops.point_grid(self.method.points_per_side, valid_hw[0], valid_hw[1])

    @torch.inference_mode()
    def propose(
        self,
        images: torch.Tensor,
        valid_hw: list[tuple[int, int]],
        orig_hw: list[tuple[int, int]],
    ) -> list[Proposals]:
        """Proposals for a batch of resized images.

        Args:
            images: (B, 3, S, S) float in [0, 1], or uint8 (B, S, S, 3) / (B, 3, S, S) as
                :meth:`encode` takes them (see ``refseg.core.imaging``).
            valid_hw: per image, the (h, w) of the image inside the square.
            orig_hw: per image, the original (H, W).
        """
        image_embed, high_res = self.encode(images)
        step = self.prompt_batch(tuple(image_embed.shape[-2:]))
        out = []
        for i in range(images.shape[0]):
            points = self.grid(valid_hw[i]).to(self.device)
            image = self.prepare(image_embed[i : i + 1], [f[i : i + 1] for f in high_res])
            keep_logits, keep_iou, keep_pts = [], [], []
            # every prompt is decoded, including a last partial batch
            for start in range(0, points.shape[0], step):
                pts = points[start : start + step]
                labels = torch.ones(pts.shape[0], 1, dtype=torch.int, device=self.device)
                logits, iou = self.decode(image, pts[:, None, :], labels)
                best = iou.argmax(dim=1)
                ar = torch.arange(pts.shape[0], device=self.device)
                logits, iou = logits[ar, best], iou[ar, best]
                ok = iou > self.method.iou_threshold
                keep_logits.append(logits[ok])
                keep_iou.append(iou[ok])
                keep_pts.append(pts[ok])
            out.append(
                Proposals(
                    torch.cat(keep_logits),
                    torch.cat(keep_iou),
                    torch.cat(keep_pts),
                    self.input_size,
                    tuple(valid_hw[i]),
                    tuple(orig_hw[i]),
                )
            )
        return out

    @torch.inference_mode()
    def segment_boxes(self, image: torch.Tensor, boxes_xyxy: torch.Tensor) -> torch.Tensor:
        """Single-mask output for box prompts (method.md §6, box-only references).

        Args:
            image: (3, S, S) float in [0, 1]; boxes_xyxy: (K, 4) in input pixels.

        Returns:
            (K, S/4, S/4) low-res logits.
        """
        emb, hr = self.encode(image[None])
        encoded = self.prepare(emb, hr)
        coords = boxes_xyxy.reshape(-1, 2, 2).float()
        labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(coords.shape[0], 1)
        step = self.prompt_batch(tuple(emb.shape[-2:]))
        logits = [
            self.decode(encoded, coords[s : s + step], labels[s : s + step], multimask=False)[0]
            for s in range(0, coords.shape[0], step)
        ]
        if not logits:
            side = self.input_size // 4
            return torch.zeros((0, side, side), device=self.device)
        return torch.cat(logits)[:, 0]
