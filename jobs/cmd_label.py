"""``refseg label``: label a folder, URI prefix, manifest or COCO image list on Ray.

Settings come from the preset, then the YAML config (``--config``; pipeline knobs under
``pipeline:``), then flags. Images that fail to read or decode become error rows and do not
fail the job; the exit status is 0 unless the job itself fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from refseg.jobs.options import add_model_args, flag, load_config_file, resolve_configs

__all__ = ["add_label_args", "run_label", "PIPELINE_FLAGS", "pipeline_settings", "with_job_device"]

log = logging.getLogger(__name__)

# Every PipelineSettings field, its type and help; plus the job-level knobs after them.
PIPELINE_FLAGS: dict[str, tuple[type, str]] = {
    "decode_batch_size": (int, "images per decode task"),
    "proposal_batch_size": (int, "images per SAM2 proposal call"),
    "match_batch_size": (int, "images per DINOv2 matching call (default: 1 on CPU, 4 on GPU)"),
    "write_batch_size": (int, "images per output part file"),
    "proposal_actors": (int, "SAM2 actors, a fixed pool (default: 1 to one per GPU; CPU: 1)"),
    "match_actors": (int, "DINOv2 matching actors, a fixed pool (default: as SAM2's)"),
    "gpus_per_actor": (
        float,
        "GPU share of every model actor (default: a SAM2 and a DINOv2 actor per GPU, "
        "shares by FLOPs)",
    ),
    "cpus_per_actor": (float, "CPUs per model actor (default 1 on GPU, 0.5 on CPU)"),
    "decode_cpus": (float, "CPUs per fetch/decode task"),
    "write_cpus": (float, "CPUs per write task"),
    "torch_threads": (int, "torch threads per CPU actor"),
    "match_torch_threads": (int, "torch threads of the matching actor (default: as above)"),
    "max_pixels": (int, "images with more pixels are error rows (decompression bombs)"),
    "max_gpus": (
        int,
        "the most GPUs the job uses (default: the most the cluster can provide; 0: CPU only)",
    ),
    "gpu_wait_s": (float, "seconds to wait for a first GPU node before failing (default 900)"),
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


def with_job_device(model: Any, args: argparse.Namespace, file_cfg: dict[str, Any]) -> Any:
    """``model`` with ``device="auto"`` unless ``--device`` (or the config file) names one:
    a Ray job's resource plan then picks GPUs when the cluster has or can start them."""
    if _job_value(args, file_cfg, "device") is not None:
        return model
    return dataclasses.replace(model, device="auto")


def _job_value(args: argparse.Namespace, file_cfg: dict[str, Any], name: str) -> Any:
    value = getattr(args, name, None)
    return file_cfg.get(name) if value is None else value


def run_label(args: argparse.Namespace) -> int:
    from refseg.pipeline.dataflow.sources import ImageSource
    from refseg.pipeline.job import LabelJob
    from refseg.pipeline.job import run_label as run_job
    from refseg.pipeline.store.progress import ProgressOptions

    file_cfg = load_config_file(getattr(args, "config", None))
    preset, model, method = resolve_configs(args)
    model = with_job_device(model, args, file_cfg)
    settings = pipeline_settings(args, file_cfg)
    source = ImageSource(
        images=args.images,
        targets=args.targets,
        s3_endpoint=_job_value(args, file_cfg, "s3_endpoint"),
        all_files=bool(_job_value(args, file_cfg, "all_files")),
        allow_outside_root=bool(_job_value(args, file_cfg, "allow_outside_root")),
    )
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
    )
    summary = run_job(job)
    print(summary.line())
    return 0
