"""``refseg demo``: the whole path on a generated dataset, on this machine, in a few minutes.

1. write a small synthetic dataset (``refseg.jobs.sample_data``): targets with COCO ground truth
   and a pool of reference images with masks;
2. sample one reference per class (``refseg.core.sampling``);
3. build the memory bank (DINOv2 prototypes of the shots);
4. label the targets with the Ray pipeline (a local Ray started on the fly);
5. evaluate against the ground truth (COCO bbox and segm AP) and write the HTML report.

Models: the official ``sam2.1_hiera_tiny`` and ``dinov2_vits14`` checkpoints when they are
in the cache (``$REFSEG_CACHE``) or can be downloaded there; otherwise (no network, or
``--offline``) the same path runs with random weights at the ``tiny`` preset's sizes, and
says so: its numbers are then meaningless.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import socket
import time
import urllib.request
import warnings
from pathlib import Path

from refseg.core import checkpoints
from refseg.core.coco import evaluate, format_eval, load_coco
from refseg.core.config import MethodConfig, ModelConfig, get_preset
from refseg.core.sampling import sample_references

__all__ = ["DEMO_CHECKPOINTS", "add_demo_args", "choose_models", "run_demo"]

DEMO_CHECKPOINTS = {"sam2": "sam2.1_hiera_tiny", "dinov2": "dinov2_vits14"}
MARKER = ".refseg-demo"  # marks a folder the demo owns (so reruns may clear its outputs)
PROBE_TIMEOUT_S = 5.0  # a download that cannot even connect within this gives up
READ_TIMEOUT_S = 30.0
RANDOM_NOTE = "offline: no official checkpoints; running the same path with RANDOM weights, "
RANDOM_NOTE += "results are meaningless"


def _log(message: str) -> None:
    print(f"refseg demo: {message}", flush=True)


def _cached(name: str) -> bool:
    try:
        checkpoints.resolve_checkpoint(name)
    except (FileNotFoundError, ValueError):
        return False
    return True


def _download(name: str) -> None:
    """Download one official checkpoint; fails within seconds when there is no network."""
    url = checkpoints.OFFICIAL[name].url
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(READ_TIMEOUT_S)  # checkpoints.download opens with the default
    try:
        checkpoints.download(name, progress=True)
    finally:
        socket.setdefaulttimeout(previous)


def choose_models(
    *, offline: bool, random_weights: bool = False
) -> tuple[ModelConfig, MethodConfig, str]:
    """The demo's models: official checkpoints if cached or downloadable, else random weights.

    Returns ``(model, method, note)``; ``note`` says which weights run and why.
    """
    tiny = get_preset("tiny")
    random_cfg = dataclasses.replace(tiny.model, random_weights=True)
    if random_weights:
        return random_cfg, tiny.method, "--random-weights: results are meaningless"
    missing = [n for n in DEMO_CHECKPOINTS.values() if not _cached(n)]
    if missing and offline:
        return random_cfg, tiny.method, RANDOM_NOTE
    for name in missing:
        _log(f"downloading {name} into {checkpoints.cache_dir()}")
        try:
            _download(name)
        except Exception as exc:  # no network, DNS, proxy, HTTP error: all mean "offline"
            _log(f"cannot download {name} ({type(exc).__name__}: {exc})")
            return random_cfg, tiny.method, RANDOM_NOTE
    model = ModelConfig(
        sam2_config="sam2.1_hiera_t",
        sam2_checkpoint=DEMO_CHECKPOINTS["sam2"],
        dinov2_model="vits14",
        dinov2_checkpoint=DEMO_CHECKPOINTS["dinov2"],
        sam2_image_size=1024,
        dinov2_image_size=518,
    )
    method = MethodConfig(points_per_side=16, box_convention="standard")
    return model, method, "official checkpoints " + ", ".join(DEMO_CHECKPOINTS.values())


def _prepare_out(out: Path) -> None:
    """Create ``out``; clear the demo's own outputs of an earlier run, never anything else."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(
            f"{out} exists, is not empty and was not made by `refseg demo`: choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by refseg demo\n")
    for sub in ("dataset", "run"):
        shutil.rmtree(out / sub, ignore_errors=True)


def _build_bank(model: ModelConfig, method: MethodConfig, shots: Path, root: Path, dest: Path):
    from refseg.core.factory import build_encoder
    from refseg.core.references import build_memory_bank

    encoder = build_encoder(model, method)
    meta = {"demo": True, "random_weights": model.random_weights}
    bank = build_memory_bank(
        encoder, load_coco(shots), str(root), context_scale=method.context_scale, meta=meta
    )
    bank.save(str(dest))
    return bank


def _label(model: ModelConfig, method: MethodConfig, bank: Path, images: Path, gt: Path, out: Path):
    import ray
    from refseg.pipeline.dataflow.sources import ImageSource
    from refseg.pipeline.job import LabelJob, run_label

    started_here = not ray.is_initialized()
    job = LabelJob(
        memory=str(bank),
        source=ImageSource(images=str(images), targets=str(gt)),  # keeps the COCO image ids
        out=str(out),
        model=model,
        method=method,
        preset="demo",
        num_cpus=os.cpu_count(),
    )
    try:
        return run_label(job)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()


def _report(run_dir: Path, gt: Path) -> tuple[str | None, str | None]:
    """(path of report.html, None) or (None, why there is none)."""
    try:
        from refseg.jobs.report import write_report
    except ImportError as exc:
        return None, f"report not written: refseg.jobs.report could not be imported ({exc})"
    try:
        return str(write_report(str(run_dir), ground_truth=str(gt))), None
    except Exception as exc:
        return None, f"report not written: {type(exc).__name__}: {exc}"


def demo(out: Path, *, n_images: int, offline: bool, random_weights: bool, seed: int) -> int:
    """Run the demo into ``out``; print each step and where every artefact is."""
    from refseg.jobs.sample_data import make_sample_data

    t0 = time.perf_counter()
    out = out.resolve()
    _prepare_out(out)
    data = make_sample_data(out / "dataset", n_images=n_images, seed=seed)
    pool = load_coco(data.references)
    _log(f"sample dataset: {n_images} target images, {len(pool['images'])} reference images")
    model, method, note = choose_models(offline=offline, random_weights=random_weights)
    _log(note)
    shots = sample_references(
        pool, shots=1, seed=seed, category_ids=[c["id"] for c in pool["categories"]]
    )
    shots_path = out / "shots.json"
    shots_path.write_text(json.dumps(shots))
    bank_path = out / "memory.safetensors"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        bank = _build_bank(model, method, shots_path, data.references_dir, bank_path)
        _log(f"memory bank: {dict(bank.describe()['categories'])}")
        run_dir = out / "run"
        summary = _label(model, method, bank_path, data.images, data.targets, run_dir)
    _log(summary.line())
    report = evaluate(data.targets, run_dir / "coco_results.json")
    eval_path = out / "eval.json"
    eval_path.write_text(json.dumps(report, indent=2))
    print(format_eval(report), flush=True)
    report_path, problem = _report(run_dir, data.targets)
    if problem:
        _log(problem)
    seconds = time.perf_counter() - t0
    artefacts = [
        ("dataset", data.targets),
        ("target images", data.images),
        ("reference pool", data.references),
        ("references", shots_path),
        ("memory bank", bank_path),
        ("run", run_dir),
        ("results", run_dir / "coco_results.json"),
        ("eval", eval_path),
    ] + ([("report", report_path)] if report_path else [])
    stats = {t: report[t]["stats"]["AP"] for t in report}
    _log(f"done in {seconds:.1f} s; AP bbox {stats['bbox']:.3f}, segm {stats['segm']:.3f}")
    if model.random_weights:
        _log("RANDOM weights were used: these numbers are meaningless")
    _log("outputs")
    for label, path in artefacts:
        print(f"  {label}: {path}", flush=True)
    return 0 if report_path else 1


def add_demo_args(parser: argparse.ArgumentParser) -> None:
    """Add ``refseg demo``'s arguments to ``parser``."""
    parser.add_argument(
        "--out", metavar="DIR", default="refseg-demo",
        help="folder for the dataset, bank, run, evaluation and report (default ./refseg-demo)",
    )  # fmt: skip
    parser.add_argument(
        "--images", metavar="N", type=int, default=12, help="target images to generate (12)"
    )
    parser.add_argument(
        "--offline", action="store_true",
        help="do not try to download checkpoints (cached ones are still used)",
    )  # fmt: skip
    parser.add_argument(
        "--random-weights", action="store_true",
        help="use random weights even when the official checkpoints are available",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="dataset and sampling seed (0)")


def run_demo(args: argparse.Namespace) -> int:
    """Run ``refseg demo`` from parsed arguments; 0 when every artefact was written."""
    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    return demo(
        Path(args.out),
        n_images=args.images,
        offline=args.offline,
        random_weights=args.random_weights,
        seed=args.seed,
    )
