"""``refseg sample-references`` and ``refseg build-memory``: from a COCO file to a bank."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from jobs.options import add_model_args, resolve_configs
from refseg_core.checkpoints import default_checkpoint_for, resolve_checkpoint
from refseg_core.coco import load_coco
from refseg_core.config import ModelConfig

__all__ = [
    "add_sample_references_args",
    "run_sample_references",
    "add_build_memory_args",
    "run_build_memory",
    "write_bytes",
    "dinov2_checkpoint_uri",
]

log = logging.getLogger(__name__)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to a local path (through a temporary file and a rename) or a URI."""
    protocol, _ = fsspec.core.split_protocol(uri)
    if protocol not in (None, "file", "local"):
        with fsspec.open(uri, "wb") as f:
            f.write(data)
        return
    path = Path(fsspec.core.strip_protocol(uri)).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"output path is a folder: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ sample-references


def add_sample_references_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, metavar="ANN.json", help="COCO file")
    parser.add_argument("--shots", type=int, required=True, metavar="N", help="shots per class")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (0)")
    parser.add_argument(
        "--split",
        default="coco-all",
        metavar="NAME",
        help="coco-fsod-novel, coco-fsod-base, coco-all (default), or a comma list of "
        "category ids and/or names",
    )
    parser.add_argument("--out", required=True, metavar="REFS.json", help="output COCO file")
    parser.add_argument("--min-side", type=float, default=32, help="min box side, px (32)")
    parser.add_argument("--border", type=float, default=10, help="min distance to border (10)")


def run_sample_references(args: argparse.Namespace) -> int:
    from refseg_core.sampling import resolve_split, sample_references

    ann = load_coco(args.annotations)
    ids = resolve_split(args.split, ann)
    refs = sample_references(
        ann,
        shots=args.shots,
        seed=args.seed,
        category_ids=ids,
        min_side=args.min_side,
        border=args.border,
    )
    refs["info"]["source"] = str(args.annotations)
    refs["info"]["split"] = args.split
    write_bytes(args.out, (json.dumps(refs, indent=1, ensure_ascii=False) + "\n").encode())
    print(
        f"refseg sample-references: {len(refs['annotations'])} shots of "
        f"{len(refs['categories'])} classes from {len(refs['images'])} images "
        f"(seed {args.seed}, {args.shots} per class) -> {args.out}"
    )
    return 0


# ------------------------------------------------------------------------ build-memory


def add_build_memory_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--references",
        required=True,
        metavar="REFS.json",
        help="COCO file of the shots (from `refseg sample-references` or your own)",
    )
    parser.add_argument(
        "--images", required=True, metavar="ROOT", help="folder or URI prefix of the images"
    )
    parser.add_argument("--out", required=True, metavar="BANK", help="memory bank file to write")
    parser.add_argument(
        "--add",
        action="store_true",
        help="add the shots and classes to the existing BANK instead of replacing it",
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="checkpoint cache ($REFSEG_CACHE)")
    add_model_args(parser)


def dinov2_checkpoint_uri(model: ModelConfig) -> str | None:
    """URI of the DINOv2 file that ``model`` loads; None for random weights.

    Raises ``FileNotFoundError`` (saying where to get it) when that file is not available.
    """
    if model.random_weights:
        return None
    spec = model.dinov2_checkpoint
    if spec is None:
        official = default_checkpoint_for("dinov2", model.dinov2_model.replace("_reg4", "_reg"))
        if official is None:
            return None  # the models layer raises its own message when it builds
        spec = official.name
    return resolve_checkpoint(spec).uri


def _new_shots_only(refs: dict[str, Any], bank: Any, path: str) -> dict[str, Any]:
    """``refs`` without the shots (same annotation and image id) already in ``bank``."""
    present = {(r.annotation_id, r.image_id) for recs in bank.records.values() for r in recs}
    anns = refs["annotations"]
    is_dup = [(int(a["id"]), int(a["image_id"])) in present for a in anns]
    keep = [a for a, d in zip(anns, is_dup, strict=True) if not d]
    if len(keep) < len(anns):
        dup = sorted(int(a["id"]) for a, d in zip(anns, is_dup, strict=True) if d)
        more = ", ..." if len(dup) > 20 else ""
        print(
            f"refseg build-memory: {len(dup)} shots already in {path} are not added again "
            f"(annotation ids {str(dup[:20])[1:-1]}{more})"
        )
    return {**refs, "annotations": keep}


def _check_same_weights(bank: Any, meta: dict[str, Any], path: str) -> None:
    old_rw, new_rw = bank.meta.get("random_weights"), meta["random_weights"]
    old_sha, new_sha = bank.meta.get("dinov2_sha256"), meta["dinov2_sha256"]
    if (old_rw is not None and bool(old_rw) != bool(new_rw)) or (
        old_sha and new_sha and old_sha != new_sha
    ):
        raise ValueError(
            f"{path} was built with other DINOv2 weights (random_weights={old_rw}, sha256 "
            f"{old_sha}) than this run (random_weights={new_rw}, sha256 {new_sha}): "
            "prototypes of different weights cannot share a bank"
        )


def run_build_memory(args: argparse.Namespace) -> int:
    from refseg_core.factory import build_encoder
    from refseg_core.memory_bank import MemoryBank
    from refseg_core.references import build_memory_bank

    refs = load_coco(args.references)
    preset, model, method = resolve_configs(args)
    bank = MemoryBank.load(args.out) if args.add else None
    before = {"classes": 0, "shots": 0}
    if bank is not None:
        before = {"classes": len(bank.category_ids), "shots": len(bank)}
        refs = _new_shots_only(refs, bank, args.out)
        if not refs["annotations"]:
            print(f"refseg build-memory: nothing new to add; {args.out} unchanged")
            return 0
    encoder = build_encoder(model, method)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta: dict[str, Any] = {
        "preset": preset,
        "dinov2_model": model.dinov2_model,
        "dinov2_checkpoint": dinov2_checkpoint_uri(model),
        "dinov2_sha256": encoder.checkpoint_sha256,
        "random_weights": model.random_weights,
    }
    if bank is None:
        meta["created"] = now
    else:
        _check_same_weights(bank, meta, args.out)
        meta["updated"] = now
    bank = build_memory_bank(
        encoder,
        refs,
        args.images,
        bank=bank,
        context_scale=method.context_scale,
        min_weight=method.min_mask_weight,
        meta=meta,
    )
    data = bank.to_bytes()
    write_bytes(args.out, data)
    added = ""
    if args.add:
        added = (
            f" (+{len(bank.category_ids) - before['classes']} classes, "
            f"+{len(bank) - before['shots']} shots)"
        )
    print(
        f"refseg build-memory: {len(bank.category_ids)} classes, {len(bank)} shots{added}, "
        f"{len(data) / 1024:.1f} KiB -> {args.out}"
    )
    return 0
