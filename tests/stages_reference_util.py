"""Constants shared by the stage-against-transcription tests.

``test_stages_reference.py`` (§2 class prototypes, §4 matching) and
``test_stages_reference_models.py`` (§1 shot prototypes, §3 SAM 2 proposals) use the same
colour palette for ``doubles.colour_dino_encoder`` and the same DINOv2 input size.
"""

from __future__ import annotations

PALETTE = [(220, 50, 50), (40, 180, 60), (50, 80, 220)]
DINO_SIZE = 56  # 4 x 4 patches
