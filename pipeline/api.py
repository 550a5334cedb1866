"""refseg's stages inside a user's own Ray Data pipeline.

:func:`label_dataset` appends the stages ``refseg label`` runs between its source and its
OUT (``dataflow/graph.py``'s ``append_labelling``: decode, SAM2 proposals, DINOv2 matching,
with the same resource planning) to any dataset with an image-bytes or image-URI column,
and returns a dataset of instance rows the user writes wherever they like.
"""

from __future__ import annotations

from typing import Any, Literal

import ray.data
from refseg.core.config import MethodConfig, ModelConfig, preset_configs
from refseg.core.memory_bank import MemoryBank
from refseg.pipeline.dataflow.graph import LabelStages, append_labelling
from refseg.pipeline.dataflow.rows import InputColumns
from refseg.pipeline.dataflow.settings import PipelineSettings
from refseg.pipeline.run import ensure_ray

__all__ = ["label_dataset"]


def label_dataset(
    ds: ray.data.Dataset,
    memory: MemoryBank | str,
    *,
    preset: str = "ntt",
    model: ModelConfig | None = None,
    method: MethodConfig | None = None,
    settings: PipelineSettings | None = None,
    bytes_column: str | None = "bytes",
    uri_column: str | None = None,
    id_column: str | None = None,
    output: Literal["instances", "images"] = "instances",
    s3_endpoint: str | None = None,
    **overrides: Any,
) -> ray.data.Dataset:
    """Label every image of ``ds`` with refseg's Ray Data stages; lazy, like any dataset.

    Args:
        ds: one row per image. ``bytes_column`` holds encoded image bytes (JPEG, PNG,
            TIFF...); set it to ``None`` and name ``uri_column`` to have refseg read the
            files (local paths, s3://, gs://). ``uri_column`` also fills ``image_uri``;
            ``id_column`` gives int64 image ids (default: a 52-bit hash of the URI, or of
            the bytes without a URI column).
        memory: the memory bank, or its path/URI.
        preset, model, method, overrides: the method's settings, as ``preset_configs``
            takes them (e.g. ``preset="tiny", random_weights=True, device="cuda"``).
        settings: batch sizes, pool sizes and per-task CPUs (``PipelineSettings``).
        output: ``"instances"``: one row per instance in ``OUT/instances``' schema
            (``image_id, image_uri, category_id, category_name, score, bbox`` (COCO xywh),
            ``segmentation`` (COCO RLE), ``area, proposal_iou``); ``"images"``: one row per
            image in ``OUT/images``' schema (``status``, ``error`` for an unreadable image,
            ``n_instances``, seconds per stage).
        s3_endpoint: an S3-compatible endpoint for ``uri_column`` reads.

    Returns:
        The dataset of rows; nothing runs until it is consumed (``write_parquet``...).
        An unreadable image gives no instance row (``output="images"`` says why).
    """
    if output not in ("instances", "images"):
        raise ValueError(f"output must be 'instances' or 'images', got {output!r}")
    model, method = preset_configs(preset, model=model, method=method, **overrides)
    bank = memory if isinstance(memory, MemoryBank) else MemoryBank.load(memory)
    bank.check_encoder(model.dinov2_model, model.dinov2_image_size)
    ensure_ray()
    return append_labelling(
        ds,
        LabelStages(model, method, bank.to_bytes()),
        settings=settings,
        columns=InputColumns(bytes_column, uri_column, id_column),
        output=output,
        s3_endpoint=s3_endpoint,
    )
