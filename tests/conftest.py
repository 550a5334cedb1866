"""Shared fixtures: a real S3 endpoint on loopback (moto), one local Ray, a tiny bank."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1; credentials and endpoint exported for every process.

    Started before Ray so that Ray's workers inherit the environment.
    """
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert exe, "moto_server not found: install the dev extras (make setup)"
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120  # a safety net: moto starts in ~2 s
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the session: 2 CPUs, as on CI."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """The tiny preset with random weights, and a 2-class bank built from one image."""
    from refseg.core.config import get_preset, replace
    from refseg.core.factory import build_encoder
    from refseg.core.memory_bank import MemoryBank, ShotRecord, encode_shot

    preset = get_preset("tiny")
    model = replace(preset.model, random_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = build_encoder(model, preset.method)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:80, 40:100] = True
    bank = MemoryBank(encoder=enc.name, image_size=enc.image_size)
    for cid, name in ((3, "car"), (17, "cat")):
        bank.add(ShotRecord(cid, 1, cid), encode_shot(enc, img, mask, (40, 30, 60, 50)), name)
    path = tmp_path_factory.mktemp("bank") / "bank.safetensors"
    bank.save(str(path))
    return {"model": model, "method": preset.method, "bank": str(path)}


def write_images(folder: Path, n: int, *, start: int = 0, seed: int = 0) -> list[Path]:
    """n small random JPEGs of varied sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + start)
    paths = []
    for i in range(start, start + n):
        arr = rng.integers(0, 255, (60 + 7 * i, 80 + 5 * i, 3), dtype=np.uint8)
        p = folder / f"img_{i:03d}.jpg"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths
