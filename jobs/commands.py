"""Small subcommands: ``refseg evaluate``, ``refseg checkpoints list|download``, ``version``.

The bigger ones live in ``jobs/cmd_memory.py`` (sample-references, build-memory) and
``jobs/cmd_label.py`` (label).
"""

from __future__ import annotations

import argparse
import json
import posixpath
from typing import Any

import fsspec
from refseg.core.coco import load_coco

__all__ = [
    "add_evaluate_args",
    "run_evaluate",
    "resolve_results",
    "add_checkpoints_args",
    "run_checkpoints",
    "add_version_args",
    "run_version",
]

# ---------------------------------------------------------------------------- evaluate


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results",
        required=True,
        metavar="OUT|RESULTS.json",
        help="a `refseg label` output folder (its coco_results.json) or a COCO results file",
    )
    parser.add_argument(
        "--ground-truth", required=True, metavar="GT.json", help="COCO annotation file"
    )
    parser.add_argument(
        "--split",
        metavar="NAME",
        help="categories evaluated: coco-fsod-novel, coco-all, or a comma list of ids/names "
        "(default: the run's memory-bank classes for a run folder, else all GT classes)",
    )
    parser.add_argument(
        "--out",
        metavar="EVAL.json",
        help="where to save the numbers (default OUT/eval.json, or RESULTS.eval.json beside "
        "a results file)",
    )


def _read_json(uri: str, what: str) -> Any:
    try:
        with fsspec.open(uri, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {uri}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {uri} is not valid JSON: {exc}") from None


def resolve_results(results: str) -> tuple[str, str | None, str]:
    """``(results file, run folder or None, default eval.json)`` of a ``--results`` value."""
    fs, path = fsspec.core.url_to_fs(results)
    if fs.isdir(path):
        base = results.rstrip("/")
        return posixpath.join(base, "coco_results.json"), base, posixpath.join(base, "eval.json")
    if not fs.exists(path):
        raise FileNotFoundError(f"results not found: {results}")
    stem = results[: -len(".json")] if results.endswith(".json") else results
    return results, None, stem + ".eval.json"


def _run_category_ids(run_dir: str) -> list[int] | None:
    """Category ids of a run's memory bank (from run.json), or None without a run record."""
    try:
        record = _read_json(posixpath.join(run_dir, "run.json"), "run record")
    except FileNotFoundError:
        return None
    ids = {int(r["category_id"]) for r in record.get("references", []) if "category_id" in r}
    return sorted(ids) or None


def run_evaluate(args: argparse.Namespace) -> int:
    from refseg.core.coco import evaluate, format_eval
    from refseg.core.sampling import resolve_split

    results_file, run_dir, default_out = resolve_results(args.results)
    try:
        gt = load_coco(args.ground_truth)
    except FileNotFoundError:
        raise FileNotFoundError(f"ground truth not found: {args.ground_truth}") from None
    results = _read_json(results_file, "results file" if run_dir is None else "run results")
    if not isinstance(results, list):
        raise ValueError(f"{results_file} is not a COCO results file (a JSON array)")
    if args.split:
        category_ids: list[int] | None = resolve_split(args.split, gt)
        source = f"split {args.split}"
    elif run_dir is not None and (category_ids := _run_category_ids(run_dir)) is not None:
        source = "the run's memory bank"
    else:
        category_ids, source = None, "all ground-truth categories"
    report = evaluate(gt, results, category_ids=category_ids)
    print(f"refseg evaluate: {len(results)} results, categories: {source}")
    print(format_eval(report))
    out = args.out or default_out
    payload = {
        "inputs": {
            "results": results_file,
            "ground_truth": args.ground_truth,
            "split": args.split,
            "categories_from": source,
            "category_ids": category_ids,
        },
        **report,
    }
    from refseg.jobs.cmd_memory import write_bytes

    write_bytes(out, (json.dumps(payload, indent=1) + "\n").encode())
    print(f"saved {out}")
    return 0


# ------------------------------------------------------------------------- checkpoints


def add_checkpoints_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="checkpoints_command", metavar="ACTION", required=True)
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument(
        "--cache-dir", metavar="DIR", help="checkpoint cache (default $REFSEG_CACHE or "
        "~/.cache/refseg/checkpoints)"
    )  # fmt: skip
    p = sub.add_parser("list", help="official checkpoints and whether they are cached",
                       parents=[cache])  # fmt: skip
    p.set_defaults(_full_command="checkpoints list")
    p = sub.add_parser("download", help="download an official checkpoint into the cache",
                       parents=[cache])  # fmt: skip
    p.add_argument("name", metavar="NAME", help="official name, see `refseg checkpoints list`")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(_full_command="checkpoints download")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _list_checkpoints() -> int:
    from refseg.core.checkpoints import OFFICIAL, cache_dir

    root = cache_dir()
    rows = [["name", "family", "arch", "cached", "sha256", "url"]]
    for ckpt in OFFICIAL.values():
        path = root / ckpt.filename
        sidecar = path.with_name(path.name + ".sha256")
        known = "published" if ckpt.sha256 else "recorded" if sidecar.is_file() else "-"
        cached = "yes" if path.is_file() else "no"
        rows.append([ckpt.name, ckpt.family, ckpt.arch, cached, known, ckpt.url])
    print(f"cache: {root}")
    print(_table(rows))
    return 0


def _download(name: str, progress: bool) -> int:
    from refseg.core.checkpoints import OFFICIAL, cache_dir, download, sha256_file

    was_cached = name in OFFICIAL and (cache_dir() / OFFICIAL[name].filename).is_file()
    path = download(name, progress=progress)
    digest = sha256_file(path)
    published = OFFICIAL[name].sha256
    check = "matches the published hash" if published else "recorded beside it"
    state = "already cached" if was_cached else "downloaded"
    print(f"{name}: {state}: {path}\nsha256 {digest} ({check})")
    return 0


def run_checkpoints(args: argparse.Namespace) -> int:
    if args.checkpoints_command == "list":
        return _list_checkpoints()
    return _download(args.name, progress=not args.no_progress)


# ----------------------------------------------------------------------------- version


def add_version_args(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run_version(args: argparse.Namespace) -> int:
    from refseg.pipeline.store.record import package_versions

    versions = package_versions()
    width = max(len(k) for k in versions)
    for name, version in versions.items():
        print(f"{name:<{width}}  {version}")
    return 0
