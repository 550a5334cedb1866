"""refseg.core.tensors.to_float_tensor on the read-only arrays Ray hands to its actors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from refseg.core.tensors import to_float_tensor

REPO = Path(__file__).resolve().parents[1]
# torch warns once per process: check in a fresh interpreter, warnings as errors
_PROBE = """
import warnings
import numpy as np
from refseg.core.tensors import to_float_tensor
warnings.simplefilter("error")
img = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
img.flags.writeable = False
to_float_tensor(img)
print("ok")
"""


def test_read_only_input_gives_no_torch_warning() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert "not writable" not in proc.stderr


def test_values_layout_and_ownership() -> None:
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img.flags.writeable = False
    t = to_float_tensor(img)
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32 and t.is_contiguous()
    want = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
    assert torch.equal(t, want)
    t.mul_(0)  # the tensor owns its memory: the input is untouched
    assert img.sum() > 0
