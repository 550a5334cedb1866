"""``refseg sample-references`` and ``refseg build-memory``: from a COCO file to a bank."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
from refseg.core.coco import load_coco
from refseg.jobs.options import add_model_args, resolve_configs

__all__ = [
    "add_sample_references_args",
    "run_sample_references",
    "add_build_memory_args",
    "run_build_memory",
    "write_bytes",
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


def run_build_memory(args: argparse.Namespace) -> int:
    from refseg.core.banks import build_memory_bank
    from refseg.core.memory_bank import MemoryBank

    if not args.references and not args.negatives:
        raise ValueError("pass --references REFS.json, --negatives NEG.json, or both")
    if args.negatives and not args.references and not args.add:
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
    update = build_memory_bank(
        references=args.references,
        negatives=args.negatives,
        images=args.images,
        add_to=bank,
        preset=preset,
        model=model,
        method=method,
    )
    for kind, dup in update.duplicates.items():
        more = ", ..." if len(dup) > 20 else ""
        print(
            f"refseg build-memory: {len(dup)} {kind} already in {args.out} are not added again "
            f"(annotation ids {str(dup[:20])[1:-1]}{more})"
        )
    if not update.changed:
        print(f"refseg build-memory: nothing new to add; {args.out} unchanged")
        return 0
    bank = update.bank
    assert bank is not None
    data = bank.to_bytes()
    write_bytes(args.out, data)
    added = ""
    if args.add:
        added = (
            f" (+{len(bank.category_ids) - before['classes']} classes, "
            f"+{len(bank) - before['shots']} shots"
        )
        if args.negatives:
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
