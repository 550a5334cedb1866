"""SAM2's mask decoder with each image's prompt-independent work done once.

SAM2's ``MaskDecoder(..., repeat_image=True)`` copies the image embedding, the dense
prompt embedding and the positional encoding once per prompt and runs its two-way
transformer on every copy. :class:`SharedImageDecoder` computes the same function in
another order, with the loaded SAM2 modules and their weights:

1. Per image (:meth:`SharedImageDecoder.prepare`): the image embedding plus the dense
   (no-mask) embedding and the positional encoding, flattened once; the first block's
   image-side projections (token-to-image keys and values, image-to-token queries), which
   do not depend on the prompt; the high-resolution features in the layout the upscaling
   below reads them in.
2. Per prompt, where a few tokens meet the 64 x 64 = 4096 image positions, the linear
   projections are applied on the token side (associativity): ``q (k W^T)^T = (q W) k^T``
   and ``softmax(.) (v W^T) = (softmax(.) v) W^T``, so no (P, 4096, C) projection is made.
   Row-constant terms that softmax removes (a query's dot product with the key bias) are
   dropped.
3. The final token-to-image attention runs only for the tokens whose outputs are used (the
   IoU token and the mask tokens).
4. The two transposed 2 x 2 convolutions of the upscaling are per-pixel linear maps: they
   run as matrix products on the channels-last tokens, and the masks are assembled from
   the sub-pixel layout at the end, so no channels-first copy of the upscaled features is
   made. The hypernetwork MLPs run only for the mask tokens whose masks are returned.

Outputs equal SAM2's call up to float rounding (tests/test_decoder.py; bench/decoder.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ImageState", "SharedImageDecoder"]

#: Prompts upscaled per step on CPU (their (4h, 4w, C/8) features then stay in cache); a
#: GPU upscales a whole batch at once.
UPSCALE_CHUNK = 4


@dataclass(frozen=True)
class ImageState:
    """The prompt-independent part of one image's decoding.

    Shapes: N = h * w image positions, C the transformer width (256), H heads, d the
    cross-attention head width (C / 2 / H = 16).

    Attributes:
        keys: (N, C) image embedding + dense prompt embedding, row-major positions.
        pe: (N, C) SAM2's dense positional encoding of the same positions.
        t2i_k, t2i_v: (H, N, d) first block's token-to-image keys and values.
        i2t_q: (H, N, d) first block's image-to-token queries.
        up1_weight: (C, 2*2*C/4) the first transposed convolution as a matrix, columns
            (a, b, c) = output pixel (2i + a, 2j + b), channel c.
        up1_bias: (h, w, 2, 2, C/4) its bias plus the stride-8 high-res features, laid out
            as (i, j, a, b, c) (the bias alone, broadcastable, without high-res features).
        up2_weight: (C/4, 2*2*C/8) the second transposed convolution likewise.
        up2_bias: (h, w, 2, 2, 2, 2, C/8) its bias plus the stride-4 features as
            (i, j, a, b, e, f, c) = pixel (4i + 2a + e, 4j + 2b + f).
        hw: (h, w) of the image embedding.
    """

    keys: torch.Tensor
    pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    up1_weight: torch.Tensor
    up1_bias: torch.Tensor
    up2_weight: torch.Tensor
    up2_bias: torch.Tensor
    hw: tuple[int, int]


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., T, H*d) -> (..., H, T, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _head_weights(linear: torch.nn.Linear, heads: int) -> torch.Tensor:
    """A projection's weight (H*d, C_in) as (H, d, C_in)."""
    return linear.weight.unflatten(0, (heads, -1))


class SharedImageDecoder:
    """SAM2's mask decoder, restructured so that each image's shared work runs once.

    Args:
        model: a built ``SAM2Base``; its ``sam_mask_decoder`` and ``sam_prompt_encoder``
            are used as loaded (SAM 2.0 and 2.1, with or without high-res features and
            object-score tokens).
        dtype: the decoder's compute dtype. ``torch.bfloat16`` runs a bf16 copy of the mask
            decoder's weights natively (call it outside autocast: autocast would cast the
            (P, N, C) activations at every op); the model itself is left unchanged.
        compile_backend: a ``torch.compile`` backend (``"inductor"``, or a callable) for the
            per-prompt work (:meth:`__call__`'s body: the two-way transformer, the
            upscaling and the hypernetworks); ``None`` runs it eagerly.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        compile_backend: str | Callable[..., Any] | None = None,
    ) -> None:
        from sam2.modeling.sam.mask_decoder import MaskDecoder

        if not isinstance(model.sam_mask_decoder, MaskDecoder):
            raise TypeError(
                f"the fast decoder runs SAM2's MaskDecoder, not a "
                f"{type(model.sam_mask_decoder).__name__}: use decoder='stock' (--decoder stock)"
            )
        self.dtype = dtype
        self.decoder = model.sam_mask_decoder
        if dtype != next(self.decoder.parameters()).dtype:
            self.decoder = copy.deepcopy(self.decoder).to(dtype)
        self.prompt_encoder = model.sam_prompt_encoder
        self.transformer = self.decoder.transformer
        blocks = self.transformer.layers
        if len(blocks) < 1 or not blocks[0].skip_first_layer_pe:
            raise ValueError("expected SAM2's TwoWayTransformer (first block skips the PE)")
        self.heads = self.transformer.num_heads
        # token positions: [obj score]?, IoU, mask tokens..., prompt tokens
        self.first = 1 if self.decoder.pred_obj_scores else 0
        self._decode = self._decode_eager
        if compile_backend is not None:
            self._decode = torch.compile(self._decode_eager, backend=compile_backend)

    # ------------------------------------------------------------------ per image

    @torch.inference_mode()
    def prepare(self, image_embed: torch.Tensor, high_res: list[torch.Tensor]) -> ImageState:
        """The shared part of decoding one image.

        Args:
            image_embed: (1, C, h, w) SAM2 image embedding (after ``no_mem_embed`` if used).
            high_res: SAM2's high-resolution levels [(1, C/8, 4h, 4w), (1, C/4, 2h, 2w)]
                (ignored when the decoder does not use them).
        """
        _, dense = self.prompt_encoder(points=None, boxes=None, masks=None)
        h, w = image_embed.shape[-2:]
        pe = self.prompt_encoder.get_dense_pe()
        keys = (image_embed + dense)[0].flatten(1).T.to(self.dtype).contiguous()  # (N, C)
        pe = pe[0].flatten(1).T.to(self.dtype).contiguous()
        high_res = [f.to(self.dtype) for f in high_res]
        block = self.transformer.layers[0]
        t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
        keys_pe = keys + pe
        dc1, _, _, dc2, _ = self.decoder.output_upscaling
        # ConvTranspose2d (kernel = stride = 2) weight (C_in, C_out, 2, 2) -> (C_in, 2*2*C_out)
        up1_bias = dc1.bias.view(1, 1, 1, 1, -1)
        up2_bias = dc2.bias.view(1, 1, 1, 1, 1, 1, -1)
        if self.decoder.use_high_res_features:
            s0, s1 = high_res
            # (1, c, 2h, 2w) -> (h, w, a, b, c); (1, c, 4h, 4w) -> (h, w, a, b, e, f, c)
            up1_bias = up1_bias + s1[0].unflatten(1, (h, 2)).unflatten(3, (w, 2)).permute(
                1, 3, 2, 4, 0
            )
            s0 = s0[0].unflatten(1, (h, 2, 2)).unflatten(4, (w, 2, 2))
            up2_bias = up2_bias + s0.permute(1, 4, 2, 5, 3, 6, 0)
        return ImageState(
            keys=keys,
            pe=pe,
            t2i_k=_heads(t2i.k_proj(keys_pe), self.heads),
            t2i_v=_heads(t2i.v_proj(keys), self.heads),
            i2t_q=_heads(i2t.q_proj(keys_pe), self.heads),
            up1_weight=dc1.weight.permute(0, 2, 3, 1).flatten(1),
            up1_bias=up1_bias.contiguous(),
            up2_weight=dc2.weight.permute(0, 2, 3, 1).flatten(1),
            up2_bias=up2_bias.contiguous(),
            hw=(int(h), int(w)),
        )

    # ------------------------------------------------------------------ per prompt

    @torch.inference_mode()
    def __call__(
        self, state: ImageState, sparse: torch.Tensor, *, multimask: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks and predicted IoUs of P prompts on the prepared image.

        Args:
            sparse: (P, K, C) sparse prompt embeddings from ``sam_prompt_encoder``.
            multimask: SAM2's ``multimask_output``.

        Returns:
            low-res mask logits (P, M, 4h, 4w) and predicted IoUs (P, M), M = 3 or 1, as
            ``sam_mask_decoder(..., repeat_image=True)`` returns them.
        """
        return self._decode(state, sparse, multimask)

    def _decode_eager(
        self, state: ImageState, sparse: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`__call__`'s work (compiled when a backend was given)."""
        dec = self.decoder
        s = self.first
        sparse = sparse.to(self.dtype)
        parts = [dec.iou_token.weight, dec.mask_tokens.weight]
        if dec.pred_obj_scores:
            parts.insert(0, dec.obj_score_token.weight)
        out_tokens = torch.cat(parts)
        tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)

        queries, keys = self._first_block(state, tokens)
        for block in self.transformer.layers[1:]:
            queries, keys = self._block(block, state, queries, keys, tokens)

        # final token-to-image attention, only for the tokens whose outputs are used
        n_mask = dec.num_mask_tokens
        used = slice(s, s + 1 + n_mask)
        q_used = queries[:, used]
        attn = self._tokens_to_dense(
            self.transformer.final_attn_token_to_image,
            q_used + tokens[:, used],
            keys + state.pe,
            keys,
        )
        hs = self.transformer.norm_final_attn(q_used + attn)
        iou_pred = dec.iou_prediction_head(hs[:, 0])
        mask_tokens_out = hs[:, 1:]

        dynamic = not multimask and dec.dynamic_multimask_via_stability and not dec.training
        if multimask:
            which = range(1, n_mask)
        elif dynamic:
            which = range(n_mask)
        else:
            which = range(1)
        masks = self._masks(state, keys, mask_tokens_out, list(which))
        if multimask:
            return masks, iou_pred[:, 1:]
        if dynamic:
            return dec._dynamic_multimask_via_stability(masks, iou_pred)
        return masks, iou_pred[:, 0:1]

    def _first_block(
        self, state: ImageState, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block 0: its image side is the same for every prompt (``state``)."""
        block = self.transformer.layers[0]
        queries = block.norm1(block.self_attn(q=tokens, k=tokens, v=tokens))
        # tokens -> image, keys and values shared: the prompts' tokens are one query set
        t2i = block.cross_attn_token_to_image
        p, t, _ = queries.shape
        q = _heads(t2i.q_proj(queries + tokens), self.heads)  # (P, H, T, d)
        q = q.transpose(0, 1).reshape(1, self.heads, p * t, -1)
        out = F.scaled_dot_product_attention(q, state.t2i_k[None], state.t2i_v[None])
        out = out[0].unflatten(1, (p, t)).permute(1, 2, 0, 3).reshape(p, t, -1)
        queries = block.norm2(queries + t2i.out_proj(out))
        queries = block.norm3(queries + block.mlp(queries))
        # image -> tokens, queries shared
        i2t = block.cross_attn_image_to_token
        k = _heads(i2t.k_proj(queries + tokens), self.heads)  # (P, H, T, d)
        v = _heads(i2t.v_proj(queries), self.heads)
        scores = torch.einsum("phtd,hnd->phtn", k / math.sqrt(k.shape[-1]), state.i2t_q)
        keys = state.keys.expand(queries.shape[0], -1, -1).clone()
        keys = block.norm4(self._add_mix(keys, i2t, scores.softmax(dim=2), v))
        return queries, keys

    def _block(
        self,
        block: torch.nn.Module,
        state: ImageState,
        queries: torch.Tensor,
        keys: torch.Tensor,
        tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A later two-way block, with projections moved to the token side."""
        q = queries + tokens
        queries = block.norm1(queries + block.self_attn(q=q, k=q, v=queries))
        keys_pe = keys + state.pe
        attn = self._tokens_to_dense(
            block.cross_attn_token_to_image, queries + tokens, keys_pe, keys
        )
        queries = block.norm2(queries + attn)
        queries = block.norm3(queries + block.mlp(queries))
        i2t = block.cross_attn_image_to_token
        k = _heads(i2t.k_proj(queries + tokens), self.heads)  # (P, H, T, d)
        v = _heads(i2t.v_proj(queries), self.heads)
        # (keys_pe Wq^T + bq) k^T = keys_pe (Wq_h^T k_h^T) + bq_h k_h^T, per head
        wq = _head_weights(i2t.q_proj, self.heads)  # (H, d, C)
        k = k / math.sqrt(k.shape[-1])
        g = torch.einsum("phtd,hdc->phtc", k, wq).flatten(1, 2)  # (P, H*T, C)
        bias = torch.einsum("phtd,hd->pht", k, i2t.q_proj.bias.unflatten(0, (self.heads, -1)))
        scores = torch.baddbmm(bias.flatten(1)[..., None], g, keys_pe.transpose(1, 2))
        probs = scores.unflatten(1, (self.heads, -1)).softmax(dim=2)  # (P, H, T, N)
        keys = block.norm4(self._add_mix(keys, i2t, probs, v))
        return queries, keys

    def _tokens_to_dense(
        self, attn: torch.nn.Module, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor
    ) -> torch.Tensor:
        """``attn(q=q_in, k=k_in, v=v_in)`` for few queries on per-prompt dense keys.

        q_in: (P, T, C); k_in, v_in: (P, N, C). The key and value projections act on the
        T queries' side: scores = (q_h Wk_h) k_in^T, out_h = (softmax v_in) Wv_h^T + bv_h.
        """
        heads = self.heads
        q = _heads(attn.q_proj(q_in), heads)  # (P, H, T, d)
        scale = 1.0 / math.sqrt(q.shape[-1])
        qk = torch.einsum("phtd,hdc->phtc", q * scale, _head_weights(attn.k_proj, heads))
        p, _, t, c = qk.shape
        scores = torch.bmm(qk.reshape(p, heads * t, c), k_in.transpose(1, 2))  # (P, H*T, N)
        pooled = torch.bmm(scores.softmax(dim=-1), v_in).unflatten(1, (heads, t))  # (P,H,T,C)
        out = torch.einsum("phtc,hdc->phtd", pooled, _head_weights(attn.v_proj, heads))
        out = out + attn.v_proj.bias.unflatten(0, (heads, -1))[:, None]
        return attn.out_proj(out.transpose(1, 2).flatten(2))

    @staticmethod
    def _add_mix(
        keys: torch.Tensor, attn: torch.nn.Module, probs: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """``keys + attn.out_proj(probs @ v)`` of image-to-token attention, in place.

        keys: (P, N, C), overwritten; probs: (P, H, T, N) attention of each image position
        over the T tokens (softmax over dim 2); v: (P, H, T, d). ``out_proj`` acts on the
        token side: sum_h probs_h^T (v_h Wo_h^T + bo / H), since each head's attention sums
        to 1 over the tokens.
        """
        heads = v.shape[1]
        wo = attn.out_proj.weight.unflatten(1, (heads, -1))  # (C, H, d)
        u = torch.einsum("phtd,chd->phtc", v, wo) + attn.out_proj.bias / heads
        return keys.baddbmm_(probs.flatten(1, 2).transpose(1, 2), u.flatten(1, 2))

    def _masks(
        self,
        state: ImageState,
        keys: torch.Tensor,
        mask_tokens: torch.Tensor,
        which: list[int],
    ) -> torch.Tensor:
        """Upscaled embedding times the hypernetwork outputs: (P, len(which), 4h, 4w).

        The transposed convolutions (kernel = stride = 2) are per-pixel linear maps; they run
        on channels-last tokens and keep the sub-pixel indices as separate dimensions.
        """
        dec = self.decoder
        _, ln1, act1, _, act2 = dec.output_upscaling
        p = keys.shape[0]
        h, w = state.hw
        hyper = torch.stack(
            [dec.output_hypernetworks_mlps[i](mask_tokens[:, i]) for i in which], dim=2
        )  # (P, c, M)
        out = []
        chunk = UPSCALE_CHUNK if keys.device.type == "cpu" else p
        for s in range(0, p, chunk):
            k = keys[s : s + chunk]
            x = torch.matmul(k, state.up1_weight).view(k.shape[0], h, w, 2, 2, -1)
            x += state.up1_bias  # (P, i, j, a, b, c): pixel (2i + a, 2j + b)
            x = act1(F.layer_norm(x, x.shape[-1:], ln1.weight, ln1.bias, ln1.eps))
            x = torch.matmul(x, state.up2_weight).view(k.shape[0], h, w, 2, 2, 2, 2, -1)
            x += state.up2_bias  # (P, i, j, a, b, e, f, c)
            x = act2(x)
            m = torch.bmm(x.view(k.shape[0], -1, x.shape[-1]), hyper[s : s + chunk])
            m = m.view(k.shape[0], h, w, 2, 2, 2, 2, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
            out.append(m.reshape(k.shape[0], -1, 4 * h, 4 * w))
        return torch.cat(out)
