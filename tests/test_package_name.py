"""Installed from its wheel, refseg imports under its own name only (issue 17 item 1).

A user's project very often has its own ``pipeline/`` or ``jobs/`` package; with ``ray job
submit --working-dir .`` it is on the workers' ``sys.path`` too. The wheel is built from a
copy of the sources, installed (``--no-deps``) into a fresh venv that sees this venv's
dependencies through a ``.pth`` file, and run from a working directory holding such
packages, on ``PYTHONPATH`` (so local Ray's workers have them as well): ``refseg --help``,
a tiny ``refseg label`` job, and the user's own ``pipeline`` and ``jobs`` still theirs in the
driver and in a Ray task afterwards.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "refseg", "refseg_core", "pipeline", "jobs")
# the user's packages: importing them is fine, refseg must never be the one importing them
USER_PACKAGE = 'MARKER = "{name} of the user"\n'
DRIVER = r"""
import sys, warnings
warnings.simplefilter("ignore")
import refseg
from refseg.jobs.cli import main
rc = main(sys.argv[1:])
assert rc == 0, rc
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "jobs", "refseg_core"))
assert leaked == [], leaked  # refseg imported nothing under the generic names
import jobs, pipeline, ray
assert pipeline.MARKER == "pipeline of the user" and jobs.MARKER == "jobs of the user"
if not ray.is_initialized():  # the label job's local Ray is still up: the same workers
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
@ray.remote(num_cpus=0)
def theirs():
    import jobs, pipeline, refseg.pipeline
    return pipeline.MARKER, jobs.MARKER, refseg.pipeline.__file__
print("worker sees", ray.get(theirs.remote()))
print("refseg from", refseg.__file__)
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    proc = subprocess.run([*cmd, "-w", str(dist), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = dist.glob("refseg-*.whl")
    return whl


def test_the_wheel_holds_refseg_alone(wheel):
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith((".dist-info", ".data"))} == {"refseg"}
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("refseg/core/models.py", "refseg/pipeline/run.py", "refseg/jobs/cli.py"):
        assert module in names


def test_installed_refseg_runs_beside_a_users_pipeline_and_jobs(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the dependencies of this venv, without its editable refseg
    deps = sorted({*site.getsitepackages(), sysconfig.get_paths()["purelib"]})
    (Path(purelib) / "deps.pth").write_text("\n".join(deps) + "\n")
    with zipfile.ZipFile(wheel) as z:  # a wheel is installed by unpacking it (PEP 427)
        z.extractall(purelib)

    work = tmp_path / "project"
    for name in ("pipeline", "jobs"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(USER_PACKAGE.format(name=name))
    images = work / "images"
    images.mkdir()
    from PIL import Image

    for i in range(2):
        Image.new("RGB", (64 + 8 * i, 48), (40 * i, 90, 160)).save(images / f"img_{i}.jpg")
    bank_file = _tiny_bank(tmp_path)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        "PYTHONPATH": str(work),  # the user's packages first, in the driver and the workers
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    refseg = [str(py), "-m", "refseg"]
    helped = subprocess.run([*refseg, "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "label" in helped.stdout, helped.stderr[-2000:]

    argv = ["label", "--memory", str(bank_file), "--images", str(images), "--out", "out"]
    argv += ["--preset", "tiny", "--random-weights", "--num-cpus", "2"]
    proc = subprocess.run(
        [str(py), "-c", DRIVER, *argv],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 images (2 ok, 0 errors)" in proc.stdout + proc.stderr
    worker = next(line for line in proc.stdout.splitlines() if line.startswith("worker sees"))
    assert "'pipeline of the user', 'jobs of the user'" in worker
    assert purelib in worker and str(REPO) not in worker  # the installed refseg, not ours
    assert f"refseg from {purelib}" in proc.stdout


def _tiny_bank(tmp_path: Path) -> Path:
    """A one-class bank made with the tiny preset's encoder (random weights, seeded)."""
    import warnings

    import numpy as np
    from refseg.core.config import get_preset, replace
    from refseg.core.factory import build_encoder
    from refseg.core.memory_bank import MemoryBank, ShotRecord, encode_shot

    preset = get_preset("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = build_encoder(replace(preset.model, random_weights=True), preset.method)
    img = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:80, 40:100] = True
    bank = MemoryBank(encoder=enc.name, image_size=enc.image_size)
    bank.add(ShotRecord(1, 1, 1), encode_shot(enc, img, mask, (40, 30, 60, 50)), "thing")
    path = tmp_path / "bank.safetensors"
    bank.save(str(path))
    return path
