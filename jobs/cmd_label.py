"""``refseg label``: label a folder, URI prefix, manifest or COCO image list on Ray.

Settings come from the preset, then the YAML config (``--config``; pipeline knobs under
``pipeline:``), then flags. Images that fail to read or decode become error rows and do not
fail the job; the exit status is 0 unless the job itself fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import warnings
from typing import Any

from refseg.core.checkpoints import default_checkpoint_for, resolve_checkpoint
from refseg.core.config import ModelConfig
from refseg.jobs.options import add_model_args, flag, load_config_file, resolve_configs

__all__ = ["add_label_args", "run_label", "PIPELINE_FLAGS", "pipeline_settings", "preflight"]

log = logging.getLogger(__name__)

# Every PipelineSettings field, its type and help; plus the job-level knobs after them.
PIPELINE_FLAGS: dict[str, tuple[type, str]] = {
    "decode_batch_size": (int, "images per decode task"),
    "proposal_batch_size": (int, "images per SAM2 proposal call"),
    "match_batch_size": (int, "images per DINOv2 matching call"),
    "write_batch_size": (int, "images per output part file"),
    "proposal_actors": (int, "SAM2 actors (default: from the cluster's GPUs, 1 on CPU)"),
    "match_actors": (int, "DINOv2 matching actors (default: from the cluster)"),
    "gpus_per_actor": (float, "GPUs per model actor (default 1; 0.5 on a single GPU)"),
    "cpus_per_actor": (float, "CPUs per model actor (default 1 on GPU, 0.5 on CPU)"),
    "decode_cpus": (float, "CPUs per fetch/decode task"),
    "write_cpus": (float, "CPUs per write task"),
    "torch_threads": (int, "torch threads per CPU actor"),
    "match_torch_threads": (int, "torch threads of the matching actor (default: as above)"),
    "max_pixels": (int, "images with more pixels are error rows (decompression bombs)"),
}
_JOB_FLAGS: dict[str, tuple[type, str]] = {
    "s3_endpoint": (str, "S3-compatible endpoint URL (MinIO, moto); or AWS_ENDPOINT_URL"),
    "num_cpus": (int, "CPUs of the local Ray started when RAY_ADDRESS is not set"),
    "progress_interval": (
        float,
        "seconds between progress lines when stderr is not a terminal (default 30; 0: none)",
    ),
}


def add_label_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", required=True, metavar="BANK", help="memory bank file")
    parser.add_argument(
        "--images",
        required=True,
        metavar="URI",
        help="folder, URI prefix (s3://, gs://), manifest (.txt, .parquet), or with "
        "--targets the root the COCO file names are under",
    )
    parser.add_argument("--out", required=True, metavar="OUT", help="output folder or URI")
    parser.add_argument(
        "--targets", metavar="COCO.json", help="COCO file whose images list the targets"
    )
    parser.add_argument("--cache-dir", metavar="DIR", help="checkpoint cache ($REFSEG_CACHE)")
    add_model_args(parser)
    g = parser.add_argument_group("pipeline (also under `pipeline:` in --config)")
    for name, (typ, help_) in {**PIPELINE_FLAGS, **_JOB_FLAGS}.items():
        metavar = {int: "N", float: "X"}.get(typ, "URL")
        g.add_argument(flag(name), dest=name, type=typ, default=None, metavar=metavar, help=help_)
    parser.add_argument(
        "--cache-proposals",
        action="store_true",
        default=None,
        help="also write OUT/proposals/ (SAM2 proposals and their pooled DINOv2 features) so "
        "that `refseg rematch` can label the same images with another memory bank without "
        "SAM2 or DINOv2",
    )
    g.add_argument(
        "--all-files",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read every file under --images, not only image extensions",
    )
    g.add_argument(
        "--retry-errors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the images of earlier error rows again (changed files always run again)",
    )
    g.add_argument(
        "--allow-outside-root",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let --targets file names be absolute paths, URIs or ../ paths outside --images",
    )
    g.add_argument(
        "--take-over-lock",
        action="store_true",
        default=None,
        help="take over OUT's S3 lease held by another run now (only if that run is stopped)",
    )
    g.add_argument(
        "--ray-progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show Ray Data's per-operator progress bars instead of the job's one bar",
    )


def pipeline_settings(args: argparse.Namespace, file_cfg: dict[str, Any]) -> Any:
    """``PipelineSettings`` from the defaults < config file < flags."""
    from refseg.pipeline.dataflow.settings import PipelineSettings

    values: dict[str, Any] = {}
    for f in dataclasses.fields(PipelineSettings):
        typ = PIPELINE_FLAGS[f.name][0]
        value = getattr(args, f.name, None)
        if value is None and file_cfg.get(f.name) is not None:
            value = typ(file_cfg[f.name])
        if value is not None:
            values[f.name] = value
    return PipelineSettings(**values)


def _job_value(args: argparse.Namespace, file_cfg: dict[str, Any], name: str) -> Any:
    value = getattr(args, name, None)
    return file_cfg.get(name) if value is None else value


def _checkpoint_sha(family: str, arch: str, spec: str | None) -> str | None:
    if spec is None:
        official = default_checkpoint_for(family, arch)  # type: ignore[arg-type]
        if official is None:
            return None  # the models layer names the problem when it builds
        spec = official.name
    return resolve_checkpoint(spec).sha256


def preflight(model: ModelConfig) -> dict[str, str | None]:
    """SHA-256 of the SAM2 and DINOv2 files a run would load (None: random weights).

    Raises the checkpoint layer's ``FileNotFoundError`` (which says where to get the file)
    here, before Ray starts, rather than inside every actor.
    """
    if model.random_weights:
        return {"sam2": None, "dinov2": None}
    from refseg.core.models import sam2_config_name

    short, _ = sam2_config_name(model.sam2_config)
    dinov2 = model.dinov2_model.replace("_reg4", "_reg")
    return {
        "sam2": _checkpoint_sha("sam2", short, model.sam2_checkpoint),
        "dinov2": _checkpoint_sha("dinov2", dinov2, model.dinov2_checkpoint),
    }


def _check_bank(memory: str, model: ModelConfig, dinov2_sha: str | None) -> None:
    """Refuse a bank whose prototypes come from other DINOv2 weights than this run's."""
    from refseg.core.memory_bank import MemoryBank

    bank = MemoryBank.load(memory)
    bank.check_encoder(model.dinov2_model, model.dinov2_image_size)
    bank_sha = bank.meta.get("dinov2_sha256")
    if bank_sha and dinov2_sha and bank_sha != dinov2_sha:
        raise ValueError(
            f"memory bank {memory} was built with DINOv2 weights {bank_sha} but this run "
            f"loads {dinov2_sha}: rebuild the bank with the same --dinov2-checkpoint"
        )
    bank_rw = bank.meta.get("random_weights")
    if bank_rw is not None and bool(bank_rw) != model.random_weights:
        warnings.warn(
            f"memory bank {memory} has random_weights={bank_rw} but this run has "
            f"random_weights={model.random_weights}: the matches are meaningless",
            UserWarning,
            stacklevel=2,
        )


def run_label(args: argparse.Namespace) -> int:
    from refseg.jobs.cli import scoped_env
    from refseg.pipeline.dataflow.sources import ImageSource
    from refseg.pipeline.job import LabelJob
    from refseg.pipeline.job import run_label as run_job
    from refseg.pipeline.store.progress import ProgressOptions

    file_cfg = load_config_file(getattr(args, "config", None))
    preset, model, method = resolve_configs(args)
    settings = pipeline_settings(args, file_cfg)
    source = ImageSource(
        images=args.images,
        targets=args.targets,
        s3_endpoint=_job_value(args, file_cfg, "s3_endpoint"),
        all_files=bool(_job_value(args, file_cfg, "all_files")),
        allow_outside_root=bool(_job_value(args, file_cfg, "allow_outside_root")),
    )
    env = {"AWS_ENDPOINT_URL": source.s3_endpoint} if source.s3_endpoint else {}
    with scoped_env(env):  # fsspec reads the bank (and checkpoints) through the same endpoint
        hashes = preflight(model)
        _check_bank(args.memory, model, hashes["dinov2"])
    num_cpus = _job_value(args, file_cfg, "num_cpus")
    interval = _job_value(args, file_cfg, "progress_interval")
    progress = ProgressOptions(
        line_interval_s=30.0 if interval is None else float(interval),
        ray_bars=bool(_job_value(args, file_cfg, "ray_progress")),
    )
    job = LabelJob(
        memory=args.memory,
        source=source,
        out=args.out,
        model=model,
        method=method,
        settings=settings,
        preset=preset,
        num_cpus=None if num_cpus is None else int(num_cpus),
        retry_errors=bool(_job_value(args, file_cfg, "retry_errors")),
        take_over_lock=bool(getattr(args, "take_over_lock", None)),
        progress=progress,
        cache_proposals=bool(_job_value(args, file_cfg, "cache_proposals")),
        checkpoints=hashes,
    )
    summary = run_job(job)
    print(summary.line())
    return 0
