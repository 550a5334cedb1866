"""How much work one call does on a device: the mask decoder's prompt batch."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "STAGE_GFLOP_PER_IMAGE",
    "STOCK_PROMPT_BATCH",
    "CPU_PROMPT_BATCH",
    "BYTES_PER_PROMPT_64",
    "auto_prompt_batch",
    "probe_bytes_per_prompt",
]

#: The paper's prompt batch (stock decoder, ``prompt_batch=0``).
STOCK_PROMPT_BATCH = 256
#: Fast-decoder prompts per call on CPU (``prompt_batch=0``): bench/decoder.py --batches
#: measured smaller batches faster per prompt on a 2-core CPU (the (P, 4096, 256)
#: activations then stay in cache).
CPU_PROMPT_BATCH = 16
#: Peak bytes of fast-decoder working memory per prompt at a 64 x 64 embedding, float32
#: (bench/decoder.py's peak_mib_per_call: 12-14 MiB at batches 16-64, rounded up; SAM2's
#: own call needs 28 MiB); bf16 needs half. Measured on CPU, so on CUDA ``Sam2Proposer``
#: measures its own (``probe_bytes_per_prompt``); this is ``auto_prompt_batch``'s fallback.
BYTES_PER_PROMPT_64 = 16 * 2**20


#: FLOPs per image (GFLOP, float32, ``torch.utils.flop_counter``: 2 per multiply-add,
#: attention included) of the two model stages at the ``ntt`` preset with the default fast
#: decoder. "propose": SAM2 Hiera-L's image encoder at 1024 (1823) + the decoder's per-image
#: work (0.8) + prompt encoder and mask decoder for the 32 x 32 grid (1024 x 1.465);
#: "match": DINOv2 ViT-L/14 at 518 (1014) + pooling 800 proposals (6.8) + scoring, NMS and
#: soft merging (53, a synthetic scene at 480 x 640: it depends on the scene). Measured by
#: ``python bench/flops.py`` (bench/results/flops.json; the prompt part counted on 64
#: prompts and scaled, exactly linear). Their ratio, 3.1 : 1 (SAM2 76 % of the FLOPs),
#: splits the GPUs between the SAM2 and DINOv2 pools. SAM2's stock decoder: "propose" 5550.
STAGE_GFLOP_PER_IMAGE: dict[str, float] = {"propose": 3323.6, "match": 1073.0}

#: Prompts of the probe decoder call that measures the bytes per prompt on CUDA.
PROBE_PROMPTS = 64
#: Share of the device's free memory (read once, when the proposer is built) that the
#: decoder's working memory may take; the rest is left to the other stage's actor sharing
#: the GPU, the allocator's caching and the image batch.
FREE_MEMORY_SHARE = 0.25
MIN_CUDA_PROMPT_BATCH = 64
MAX_CUDA_PROMPT_BATCH = 1024


def auto_prompt_batch(
    decoder: str,
    device: torch.device,
    embed_hw: tuple[int, int],
    *,
    bf16: bool = False,
    bytes_per_prompt: float | None = None,
) -> int:
    """Prompts per mask-decoder call for ``prompt_batch=0``.

    Stock: the paper's 256. Fast decoder: ``CPU_PROMPT_BATCH`` on CPU; on CUDA as many as
    ``FREE_MEMORY_SHARE`` of the device's free memory holds, between 64 and 1024, at
    ``bytes_per_prompt`` (measured on the device, :func:`probe_bytes_per_prompt`; without
    it ``BYTES_PER_PROMPT_64`` scaled by the embedding size and dtype, a CPU measurement).
    It reads the free memory: call it once per model, not per call
    (``Sam2Proposer`` does).
    """
    if decoder == "stock":
        return STOCK_PROMPT_BATCH
    if device.type != "cuda":
        return CPU_PROMPT_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    if bytes_per_prompt is None:
        scale = embed_hw[0] * embed_hw[1] / 4096 / (2 if bf16 else 1)
        bytes_per_prompt = BYTES_PER_PROMPT_64 * scale
    fits = free * FREE_MEMORY_SHARE / max(bytes_per_prompt, 1.0)
    return int(min(MAX_CUDA_PROMPT_BATCH, max(MIN_CUDA_PROMPT_BATCH, fits)))


def probe_bytes_per_prompt(
    run: Callable[[int], object], device: torch.device, prompts: int = PROBE_PROMPTS
) -> float:
    """Working bytes per prompt of a decoder call on a CUDA ``device``, measured.

    ``run(p)`` makes one decoder call of ``p`` prompts. The call's peak allocation above
    what was allocated before it, divided by ``p``: the fixed part of the call is shared out
    over the prompts, so it is an upper estimate for larger batches.
    """
    if device.type != "cuda":
        raise ValueError(f"probe_bytes_per_prompt measures CUDA memory, not {device}")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(prompts)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / prompts
