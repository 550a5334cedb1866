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
from refseg.core.checkpoints import default_checkpoint_for, resolve_checkpoint
from refseg.core.coco import load_coco
from refseg.core.config import ModelConfig
from refseg.jobs.options import add_model_args, resolve_configs

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
    from refseg.core.sampling import resolve_split, sample_references

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
        metavar="REFS.json",
        help="COCO file of the shots (from `refseg sample-references`, `refseg import-review` "
        'or your own); annotations marked "refseg_kind": "negative" are skipped',
    )
    parser.add_argument(
        "--negatives",
        metavar="NEG.json",
        help="COCO file of things that must NOT get a category: each annotation's "
        "category_id names the class it is not (a class of the bank); annotations marked "
        '"refseg_kind": "shot" are skipped',
    )
    parser.add_argument(
        "--images",
        default="",
        metavar="ROOT",
        help="folder or URI prefix that relative file_names are under (absolute paths and "
        "URIs, as `refseg import-review` writes, need none)",
    )
    parser.add_argument("--out", required=True, metavar="BANK", help="memory bank file to write")
    parser.add_argument(
        "--add",
        action="store_true",
        help="add the shots, classes and negatives to the existing BANK instead of replacing it",
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


#: Key that marks an annotation of a corrections file (``refseg import-review``) as a new
#: shot or a negative, so that one file serves both --references and --negatives.
KIND_KEY = "refseg_kind"


def _of_kind(coco: dict[str, Any], kind: str) -> dict[str, Any]:
    """``coco`` without the annotations marked as the other kind (shot / negative)."""
    other = "negative" if kind == "shot" else "shot"
    return {**coco, "annotations": [a for a in coco["annotations"] if a.get(KIND_KEY) != other]}


def _new_shots_only(
    refs: dict[str, Any], bank: Any, path: str, *, negatives: bool = False
) -> dict[str, Any]:
    """``refs`` without the shots (same annotation and image id) already in ``bank``."""
    records = bank.negative_records if negatives else bank.records
    present = {(r.annotation_id, r.image_id) for recs in records.values() for r in recs}
    anns = refs["annotations"]
    is_dup = [(int(a["id"]), int(a["image_id"])) in present for a in anns]
    keep = [a for a, d in zip(anns, is_dup, strict=True) if not d]
    if len(keep) < len(anns):
        dup = sorted(int(a["id"]) for a, d in zip(anns, is_dup, strict=True) if d)
        more = ", ..." if len(dup) > 20 else ""
        what = "negatives" if negatives else "shots"
        print(
            f"refseg build-memory: {len(dup)} {what} already in {path} are not added again "
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
    from refseg.core.factory import build_encoder
    from refseg.core.memory_bank import MemoryBank
    from refseg.core.references import build_memory_bank

    if not args.references and not args.negatives:
        raise ValueError("pass --references REFS.json, --negatives NEG.json, or both")
    refs = _of_kind(load_coco(args.references), "shot") if args.references else None
    negs = _of_kind(load_coco(args.negatives), "negative") if args.negatives else None
    if negs is not None and refs is None and not args.add:
        raise ValueError(
            "negatives are added to a bank with positive shots: pass --add to add them to "
            f"{args.out}, or --references to build the bank in the same call"
        )
    preset, model, method = resolve_configs(args)
    bank = MemoryBank.load(args.out) if args.add else None
    before = {"classes": 0, "shots": 0, "negatives": 0}
    if bank is not None:
        before = {"classes": len(bank.category_ids), "shots": len(bank)}
        before["negatives"] = _n_negatives(bank)
        refs = _new_shots_only(refs, bank, args.out) if refs is not None else None
        negs = _new_shots_only(negs, bank, args.out, negatives=True) if negs is not None else None
    refs = refs if refs is not None and refs["annotations"] else None
    negs = negs if negs is not None and negs["annotations"] else None
    if refs is None and negs is None:
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
    for coco, negatives in ((refs, False), (negs, True)):
        if coco is not None:
            bank = build_memory_bank(
                encoder,
                coco,
                args.images,
                bank=bank,
                context_scale=method.context_scale,
                min_weight=method.min_mask_weight,
                meta=meta,
                negatives=negatives,
            )
    assert bank is not None
    data = bank.to_bytes()
    write_bytes(args.out, data)
    added = ""
    if args.add:
        added = (
            f" (+{len(bank.category_ids) - before['classes']} classes, "
            f"+{len(bank) - before['shots']} shots"
        )
        if negs is not None:
            added += f", +{_n_negatives(bank) - before['negatives']} negatives"
        added += ")"
    negatives = f", {_n_negatives(bank)} negatives" if bank.negatives else ""
    print(
        f"refseg build-memory: {len(bank.category_ids)} classes, {len(bank)} shots"
        f"{negatives}{added}, {len(data) / 1024:.1f} KiB -> {args.out}"
    )
    return 0


def _n_negatives(bank: Any) -> int:
    return sum(int(t.shape[0]) for t in bank.negatives.values())
