"""Run by test_install_script's slow test inside a fresh venv: label two images there.

Usage: python install_check.py WORKDIR. Prints where refseg was imported from and the
`refseg label` summary line. Random weights at the tiny preset, a local 2-CPU Ray.
"""

import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from refseg.core.config import get_preset, replace
from refseg.core.factory import build_encoder
from refseg.core.memory_bank import MemoryBank, ShotRecord, encode_shot
from refseg.jobs.cli import main

import refseg

work = Path(sys.argv[1])
(work / "images").mkdir(parents=True)
rng = np.random.default_rng(0)
for i in range(2):
    arr = rng.integers(0, 255, (60 + 8 * i, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(work / "images" / f"img_{i}.jpg")
preset = get_preset("tiny")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    enc = build_encoder(replace(preset.model, random_weights=True), preset.method)
img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
mask = np.zeros((120, 160), bool)
mask[30:80, 40:100] = True
bank = MemoryBank(encoder=enc.name, image_size=enc.image_size)
bank.add(ShotRecord(1, 1, 1), encode_shot(enc, img, mask, (40, 30, 60, 50)), "thing")
bank.save(str(work / "bank.safetensors"))
print("refseg from", refseg.__file__)
argv = ["label", "--memory", str(work / "bank.safetensors"), "--images", str(work / "images")]
argv += ["--out", str(work / "out"), "--preset", "tiny", "--random-weights", "--num-cpus", "2"]
sys.exit(main(argv))
