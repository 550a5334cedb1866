"""refseg: training-free reference-based instance segmentation at cluster scale.

The public API is the names in ``__all__`` (each documented, with type hints; imported on
first use, so ``import refseg`` stays light):

- in process (no Ray): :class:`Labeller` labels paths, PIL images or arrays against a
  :class:`MemoryBank` built by :func:`build_memory_bank` (from COCO references or
  :class:`Shot` arrays) and returns :class:`Instances` (boxes, masks, scores, category
  ids; to COCO results and RLE, to supervision's ``Detections``);
- on Ray Data: :func:`label_dataset` appends refseg's stages to any dataset;
  :func:`run_label` / :func:`run_rematch` run the ``refseg label`` / ``refseg rematch``
  jobs (resumable runs into an OUT folder or prefix);
- :func:`evaluate`: COCO AP against ground truth with pycocotools.

Installed, refseg's code imports under this one name: ``refseg.core`` (the method; the
repository's ``refseg_core/``), ``refseg.pipeline`` (Ray Data; ``pipeline/``) and
``refseg.jobs`` (the ``refseg`` command line; ``jobs/``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Labeller": "refseg.core.labeller",
    "load_image": "refseg.core.labeller",
    "Instances": "refseg.core.instances",
    "MemoryBank": "refseg.core.memory_bank",
    "Shot": "refseg.core.banks",
    "BankUpdate": "refseg.core.banks",
    "build_memory_bank": "refseg.core.banks",
    "ModelConfig": "refseg.core.config",
    "MethodConfig": "refseg.core.config",
    "preset_configs": "refseg.core.config",
    "evaluate": "refseg.core.coco",
    "PipelineSettings": "refseg.pipeline.dataflow.settings",
    "label_dataset": "refseg.pipeline.api",
    "ImageSource": "refseg.pipeline.dataflow.sources",
    "LabelJob": "refseg.pipeline.job",
    "run_label": "refseg.pipeline.job",
    "RematchJob": "refseg.pipeline.rematch",
    "open_cache": "refseg.pipeline.rematch",
    "run_rematch": "refseg.pipeline.rematch",
    "JobSummary": "refseg.pipeline.run",
}

__all__ = [
    "BankUpdate",
    "ImageSource",
    "Instances",
    "JobSummary",
    "LabelJob",
    "Labeller",
    "MemoryBank",
    "MethodConfig",
    "ModelConfig",
    "PipelineSettings",
    "RematchJob",
    "Shot",
    "build_memory_bank",
    "evaluate",
    "label_dataset",
    "load_image",
    "open_cache",
    "preset_configs",
    "run_label",
    "run_rematch",
]

if TYPE_CHECKING:
    from refseg.core.banks import BankUpdate, Shot, build_memory_bank
    from refseg.core.coco import evaluate
    from refseg.core.config import MethodConfig, ModelConfig, preset_configs
    from refseg.core.instances import Instances
    from refseg.core.labeller import Labeller, load_image
    from refseg.core.memory_bank import MemoryBank
    from refseg.pipeline.api import label_dataset
    from refseg.pipeline.dataflow.settings import PipelineSettings
    from refseg.pipeline.dataflow.sources import ImageSource
    from refseg.pipeline.job import LabelJob, run_label
    from refseg.pipeline.rematch import RematchJob, open_cache, run_rematch
    from refseg.pipeline.run import JobSummary


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'refseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
