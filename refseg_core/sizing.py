"""How much work one call does on a device: the mask decoder's prompt batch."""

from __future__ import annotations

import torch

__all__ = ["STOCK_PROMPT_BATCH", "CPU_PROMPT_BATCH", "BYTES_PER_PROMPT_64", "auto_prompt_batch"]

#: The paper's prompt batch (stock decoder, ``prompt_batch=0``).
STOCK_PROMPT_BATCH = 256
#: Fast-decoder prompts per call on CPU (``prompt_batch=0``): bench/decoder.py --batches
#: measured smaller batches faster per prompt on a 2-core CPU (the (P, 4096, 256)
#: activations then stay in cache).
CPU_PROMPT_BATCH = 16
#: Peak bytes of fast-decoder working memory per prompt at a 64 x 64 embedding, float32
#: (bench/decoder.py's peak_mib_per_call: 12-14 MiB at batches 16-64, rounded up; SAM2's
#: own call needs 28 MiB); bf16 needs half.
BYTES_PER_PROMPT_64 = 16 * 2**20


def auto_prompt_batch(
    decoder: str, device: torch.device, embed_hw: tuple[int, int], *, bf16: bool = False
) -> int:
    """Prompts per mask-decoder call for ``prompt_batch=0``.

    Stock: the paper's 256. Fast decoder: ``CPU_PROMPT_BATCH`` on CPU; on CUDA as many as a
    quarter of the free memory holds (``BYTES_PER_PROMPT_64`` scaled by the embedding size
    and dtype), between 64 and 1024.
    """
    if decoder == "stock":
        return STOCK_PROMPT_BATCH
    if device.type != "cuda":
        return CPU_PROMPT_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    per_prompt = BYTES_PER_PROMPT_64 * embed_hw[0] * embed_hw[1] / 4096 / (2 if bf16 else 1)
    return int(min(1024, max(64, free / 4 / per_prompt)))
