"""refseg.core: training-free reference-based instance segmentation (arXiv 2507.02798).

The method itself: model builders, memory bank, SAM2 proposals, DINOv2 matching, the
columnar instances type and COCO I/O. It never imports Ray.
"""

__version__ = "0.1.0"
