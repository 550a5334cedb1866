"""Thin Ray Data actor stages: decode columns, call refseg.core's models, encode columns.

The CPU decode task is in :mod:`refseg.pipeline.dataflow.decode` (no torch there). Each
stage maps a ``dict[str, np.ndarray]`` batch to another. Method logic lives in refseg.core;
a failure on one image becomes an error row, never a failed batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from refseg.core.config import MethodConfig, ModelConfig
from refseg.core.factory import build_encoder, build_proposer
from refseg.core.imaging import PreparedTarget
from refseg.core.matching import Matcher, PooledMatcher
from refseg.core.memory_bank import MemoryBank
from refseg.core.tensors import stack_targets_uint8
from refseg.core.transport import decode_proposals, encode_proposals
from refseg.pipeline.dataflow.decode import error_text
from refseg.pipeline.dataflow.proposal_cache import pooled_from_bytes, pooled_to_bytes
from refseg.pipeline.dataflow.writer import instances_blob
from refseg.pipeline.schema import Col

__all__ = ["ProposalStage", "MatchStage", "RematchStage"]

log = logging.getLogger(__name__)
Batch = dict[str, np.ndarray]


def _targets(batch: Batch, rows: np.ndarray) -> list[PreparedTarget]:
    return [
        PreparedTarget(
            batch[Col.SQUARE][i],
            (int(batch[Col.VALID_H][i]), int(batch[Col.VALID_W][i])),
            (int(batch[Col.HEIGHT][i]), int(batch[Col.WIDTH][i])),
        )
        for i in rows
    ]


def _per_image(
    batch: Batch, rows: np.ndarray, fn: Callable[[list[int]], list[Any]]
) -> dict[int, Any]:
    """Run ``fn`` on all ok rows at once; if that fails, row by row (errors per image)."""
    try:
        return dict(zip(rows.tolist(), fn(rows.tolist()), strict=True))
    except Exception as exc:
        if len(rows) == 1:
            return {int(rows[0]): exc}
        log.warning("batch of %d failed (%s); retrying image by image", len(rows), exc)
    out: dict[int, Any] = {}
    for i in rows.tolist():
        try:
            out[i] = fn([i])[0]
        except Exception as exc:
            out[i] = exc
    return out


def _mark_errors(batch: Batch, results: dict[int, Any]) -> None:
    status = batch[Col.STATUS].astype(object)
    error = batch[Col.ERROR].astype(object)
    for i, r in results.items():
        if isinstance(r, BaseException):
            status[i], error[i] = "error", error_text(r)
    batch[Col.STATUS], batch[Col.ERROR] = status, error


class ProposalStage:
    """Actor: SAM2 proposals for the ok rows; adds the compact ``proposals`` column."""

    def __init__(self, model: ModelConfig, method: MethodConfig, torch_threads: int | None):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.proposer = build_proposer(model, method)

    def __call__(self, batch: Batch) -> Batch:
        t0 = time.perf_counter()
        rows = np.nonzero(batch[Col.STATUS] == "ok")[0]

        def propose(idx: list[int]) -> list[bytes]:
            targets = _targets(batch, np.asarray(idx))
            props = self.proposer.propose(
                stack_targets_uint8(targets),  # uint8 to the device, float made there
                [t.valid_hw for t in targets],
                [t.orig_hw for t in targets],
            )
            return [encode_proposals(p) for p in props]

        def run(idx: list[int]) -> list[bytes]:
            if self.proposer.device.type != "cpu":
                return propose(idx)  # the image encoder batched: the GPU's throughput
            # on the CPU a batch gains nothing and its logits (256 MiB an image at 1024,
            # 32 x 32) would all be held at once: one image at a time
            return [blob for i in idx for blob in propose([i])]

        results = _per_image(batch, rows, run) if len(rows) else {}
        _mark_errors(batch, results)
        n = len(batch[Col.IMAGE_ID])
        batch[Col.PROPOSALS] = np.asarray(
            [results.get(i) if isinstance(results.get(i), bytes) else b"" for i in range(n)],
            dtype=object,
        )
        batch[Col.T_PROPOSE] = np.full(n, (time.perf_counter() - t0) / max(len(rows), 1))
        return batch


class _Matching:
    """What both matching actors share: the bank's class names and one encode path.

    ``_finish`` turns per-image results into the writer's columns (instances as Arrow IPC,
    counts, per-stage seconds), so a labelling and a rematch write identical rows.
    """

    names: dict[int, str]

    def _encode(self, inst: Any, batch: Batch, i: int) -> tuple[bytes, int]:
        """One image's instances -> (Arrow IPC bytes of INSTANCES_SCHEMA rows, count)."""
        table = inst.with_rles(drop_masks=True).to_arrow(
            int(batch[Col.IMAGE_ID][i]), str(batch[Col.IMAGE_URI][i]), self.names
        )
        return instances_blob(table), table.num_rows

    @staticmethod
    def _finish(batch: Batch, results: dict[int, Any], t_match, t_encode) -> dict[int, Any]:
        _mark_errors(batch, results)
        n = len(batch[Col.IMAGE_ID])
        ok = {i: r for i, r in results.items() if not isinstance(r, BaseException)}
        batch[Col.INSTANCES] = np.asarray([ok[i][0] if i in ok else b"" for i in range(n)], object)
        batch[Col.N_INSTANCES] = np.asarray(
            [ok[i][1] if i in ok else 0 for i in range(n)], np.int32
        )
        batch[Col.T_MATCH], batch[Col.T_ENCODE] = t_match, t_encode
        return ok


class MatchStage(_Matching):
    """Actor holding the memory bank: DINOv2 matching, masks encoded to RLE here.

    With ``cache_proposals`` the batch keeps its ``proposals`` column and gains the pooled
    features (``Col.POOLED``, ``n_proposals``, ``n_pooled``, ``feature_dim``) for the
    proposal cache (refseg.pipeline.dataflow.proposal_cache).
    """

    def __init__(
        self,
        model: ModelConfig,
        method: MethodConfig,
        bank_bytes: bytes,
        torch_threads: int | None,
        cache_proposals: bool = False,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        bank = MemoryBank.from_bytes(bank_bytes, source="memory bank")
        self.matcher = Matcher(build_encoder(model, method), bank, method)
        self.names = dict(bank.names)
        self.cache_proposals = cache_proposals

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch[Col.IMAGE_ID])
        rows = np.nonzero(batch[Col.STATUS] == "ok")[0]
        t_match, t_encode = np.zeros(n), np.zeros(n)

        def run(idx: list[int]) -> list[tuple[bytes, int, tuple[bytes, int, int, int]]]:
            t0 = time.perf_counter()
            targets = _targets(batch, np.asarray(idx))
            feats = self.matcher.target_features(stack_targets_uint8(targets))
            out = []
            for k, i in enumerate(idx):
                t1 = time.perf_counter()
                props = decode_proposals(batch[Col.PROPOSALS][i])
                pooled = self.matcher.pool(props, feats[k])
                inst = self.matcher.match_pooled(props, pooled)
                t2 = time.perf_counter()
                cache = (pooled_to_bytes(pooled), len(props), *pooled.shape)
                out.append((*self._encode(inst, batch, i), cache))
                t_match[i] = t2 - t1
                t_encode[i] = time.perf_counter() - t2
            share = (time.perf_counter() - t0 - t_match[idx].sum() - t_encode[idx].sum()) / len(idx)
            t_match[idx] += share  # the batch's feature extraction, shared out
            return out

        results = _per_image(batch, rows, run) if len(rows) else {}
        ok = self._finish(batch, results, t_match, t_encode)
        del batch[Col.SQUARE]
        if not self.cache_proposals:
            del batch[Col.PROPOSALS]
            return batch
        cache = [ok[i][2] if i in ok else (b"", 0, 0, 0) for i in range(n)]
        batch[Col.POOLED] = np.asarray([c[0] for c in cache], dtype=object)
        for k, name in enumerate(("n_proposals", "n_pooled", "feature_dim"), 1):
            batch[name] = np.asarray([c[k] for c in cache], dtype=np.int32)
        return batch


#: The columns a rematch hands the writer (the cache's proposal columns stay behind).
_REMATCH_KEEP = (Col.IMAGE_ID, Col.IMAGE_URI, Col.WIDTH, Col.HEIGHT, Col.STATUS, Col.ERROR)


class RematchStage(_Matching):
    """Actor holding a memory bank: matches cached proposals and pooled features (no model).

    Input rows are proposal-cache rows (refseg.pipeline.dataflow.proposal_cache); the output
    has the columns ``MatchStage`` gives the writer (instances as Arrow IPC, per-stage
    seconds).
    """

    def __init__(
        self, method: MethodConfig, bank_bytes: bytes, device: str, torch_threads: int | None
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        bank = MemoryBank.from_bytes(bank_bytes, source="memory bank")
        self.matcher = PooledMatcher(bank, method, device=device)
        self.names = dict(bank.names)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch[Col.IMAGE_ID])
        rows = np.nonzero(batch[Col.STATUS] == "ok")[0]
        t_match, t_encode = np.zeros(n), np.zeros(n)

        def run(idx: list[int]) -> list[tuple[bytes, int]]:
            out = []
            for i in idx:
                t1 = time.perf_counter()
                props = decode_proposals(batch[Col.PROPOSALS][i])
                dim = int(batch["feature_dim"][i])
                pooled = pooled_from_bytes(batch[Col.POOLED][i], int(batch["n_pooled"][i]), dim)
                inst = self.matcher.match_pooled(props, pooled)
                t2 = time.perf_counter()
                out.append(self._encode(inst, batch, i))
                t_match[i], t_encode[i] = t2 - t1, time.perf_counter() - t2
            return out

        results = _per_image(batch, rows, run) if len(rows) else {}
        out = {c: batch[c] for c in _REMATCH_KEEP}
        self._finish(out, results, t_match, t_encode)
        # a rematch reads the cache: no decode, no SAM2
        out[Col.T_DECODE], out[Col.T_PROPOSE] = np.zeros(n), np.zeros(n)
        return out
