"""``refseg rematch RUN --memory BANK --out NEW_OUT``: relabel a cached run with a new bank.

RUN is the output of ``refseg label --cache-proposals`` (or of an earlier rematch of one).
Every setting comes from RUN's run.json; flags may change only what acts after the
proposals (``--nms-iou``, ``--max-nms``, ``--max-instances``, ``--no-soft-merge``,
``--merge-power``, ``--merge-resolution``, ``--box-convention``, ``--score-threshold``,
``--negative-margin``). Any other model or method flag must agree with the cache, else
the command says so and how to make a cache that fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from refseg.core.config import MethodConfig, ModelConfig
from refseg.jobs.cmd_label import PIPELINE_FLAGS, pipeline_settings
from refseg.jobs.options import add_model_args, flag, load_config_file

__all__ = ["add_rematch_args", "run_rematch"]

log = logging.getLogger(__name__)
_CHECKPOINT_FIELDS = {"sam2_checkpoint": "sam2", "dinov2_checkpoint": "dinov2"}


def add_rematch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="output of `refseg label --cache-proposals` (or a rematch)"
    )
    parser.add_argument("--memory", required=True, metavar="BANK", help="memory bank file")
    parser.add_argument("--out", required=True, metavar="NEW_OUT", help="output folder or URI")
    parser.add_argument("--cache-dir", metavar="DIR", help="checkpoint cache ($REFSEG_CACHE)")
    add_model_args(parser)
    g = parser.add_argument_group("pipeline (also under `pipeline:` in --config)")
    for name, (typ, help_) in PIPELINE_FLAGS.items():
        metavar = {int: "N", float: "X"}.get(typ, "X")
        g.add_argument(flag(name), dest=name, type=typ, default=None, metavar=metavar, help=help_)
    g.add_argument("--s3-endpoint", default=None, metavar="URL", help="S3-compatible endpoint")
    g.add_argument("--num-cpus", type=int, default=None, metavar="N", help="CPUs of a local Ray")


def _explicit(args: argparse.Namespace, file_cfg: dict[str, Any]) -> dict[str, Any]:
    """Model and method settings given by flags or the config file (flags win)."""
    out: dict[str, Any] = {}
    for cls in (ModelConfig, MethodConfig):
        for f in dataclasses.fields(cls):
            value = getattr(args, f.name, None)
            if value is None:
                value = file_cfg.get(f.name)
            if value is not None:
                out[f.name] = value
    return out


def _checkpoint_hashes(explicit: dict[str, Any], random_weights: bool) -> dict[str, str | None]:
    """SHA-256 of the checkpoints named on the command line, to compare with the cache's."""
    from refseg.core.checkpoints import resolve_checkpoint

    if random_weights:
        return {}
    return {
        key: resolve_checkpoint(str(explicit[name])).sha256
        for name, key in _CHECKPOINT_FIELDS.items()
        if explicit.get(name)
    }


def run_rematch(args: argparse.Namespace) -> int:
    from refseg.core.memory_bank import MemoryBank
    from refseg.jobs.cli import scoped_env
    from refseg.pipeline.rematch import RematchJob, check_fits, configs_of, open_cache
    from refseg.pipeline.rematch import run_rematch as run_job

    file_cfg = load_config_file(getattr(args, "config", None))
    endpoint = args.s3_endpoint or file_cfg.get("s3_endpoint")
    cache = open_cache(args.run, s3_endpoint=endpoint)
    preset, model, method = configs_of(cache)
    asked_preset = args.preset or file_cfg.get("preset")
    if asked_preset and asked_preset != preset:
        raise ValueError(
            f"{args.run} was labelled with --preset {preset}, not {asked_preset}: a rematch "
            "keeps the run's models and proposals (drop --preset), or label again with "
            f"`refseg label --cache-proposals --preset {asked_preset}`"
        )
    explicit = _explicit(args, file_cfg)
    with scoped_env({"AWS_ENDPOINT_URL": endpoint} if endpoint else {}):
        hashes = _checkpoint_hashes(explicit, model.random_weights)
        bank = MemoryBank.load(args.memory)
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - set(_CHECKPOINT_FIELDS)
    model = dataclasses.replace(model, **{k: v for k, v in explicit.items() if k in model_fields})
    # where it runs is this run's choice, never the cached run's: --device, else the plan's
    model = dataclasses.replace(model, device=explicit.get("device") or "auto")
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)}
    method = dataclasses.replace(
        method, **{k: v for k, v in explicit.items() if k in method_fields}
    )
    check_fits(cache, bank, model=model, method=method, checkpoints=hashes)
    if model.random_weights:
        log.warning("RANDOM WEIGHTS: the cached run used random weights; outputs are meaningless")
    num_cpus = args.num_cpus if args.num_cpus is not None else file_cfg.get("num_cpus")
    job = RematchJob(
        cache=cache,
        memory=args.memory,
        out=args.out,
        model=model,
        method=method,
        settings=pipeline_settings(args, file_cfg),
        preset=preset,
        num_cpus=None if num_cpus is None else int(num_cpus),
        s3_endpoint=endpoint,
    )
    s = run_job(job)
    print(
        f"refseg rematch: {s.images} images ({s.ok} ok, {s.errors} errors), {s.instances} "
        f"instances, {s.images_per_second:.2f} images/s, {s.skipped_done} already done; "
        f"outputs in {s.out}"
    )
    return 0
