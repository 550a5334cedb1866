"""The Makefile: `make demo` needs no root, no apt-get and no browser; `make test` gets one.

The recipes run for real in a copy of the Makefile, with a PATH that holds only a few
core tools (no apt-get, no sudo, no chromium), a fake ``python3`` whose venv's ``pip`` and
``refseg`` log their arguments, and a fake ``id`` for root or not.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")
TOOLS = ("touch", "test", "mkdir", "chmod", "cat", "rm", "sh", "dirname")

# A stand-in for `python3 -m venv DIR`: DIR/bin/{python,pip,refseg,ruff} log and succeed.
_FAKE_PYTHON = f"""#!{sys.executable}
import os, sys
log = os.environ["FAKE_LOG"]
assert sys.argv[1:3] == ["-m", "venv"], sys.argv
bin_ = os.path.join(sys.argv[3], "bin")
os.makedirs(bin_, exist_ok=True)
for name in ("python", "pip", "refseg", "ruff"):
    path = os.path.join(bin_, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\\n")
        f.write('echo "' + name + ' SAM2_BUILD_CUDA=$SAM2_BUILD_CUDA $*" >> ' + log + "\\n")
    os.chmod(path, 0o755)
with open(log, "a") as f:
    f.write("python3 -m venv " + sys.argv[3] + "\\n")
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def sandbox(tmp_path: Path) -> dict:
    """A copy of the Makefile and what its targets read, and a bin/ without apt-get."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("Makefile", "pyproject.toml", "constraints.txt", "deploy/install.sh"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, work / name)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_ / tool).symlink_to(found)
    _script(bin_ / "python3", _FAKE_PYTHON)
    _script(bin_ / "id", '#!/bin/sh\n[ "$1" = -u ] && echo "${FAKE_UID:-1000}"\n')
    log = tmp_path / "log.txt"
    env = {"PATH": str(bin_), "HOME": str(tmp_path), "FAKE_LOG": str(log)}
    return {"work": work, "bin": bin_, "log": log, "env": env}


def _make(sandbox: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAKE, "--no-print-directory", *args],
        cwd=sandbox["work"],
        env={**sandbox["env"], **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_dry_run_names_no_system_package_step(sandbox):
    proc = _make(sandbox, "-n", "demo")
    assert proc.returncode == 0, proc.stderr
    for word in ("apt-get", "sudo", "chromium", "browser", "id -u"):
        assert word not in proc.stdout, f"`make demo` would run {word!r}:\n{proc.stdout}"
    assert "-m venv .venv" in proc.stdout and ".venv/bin/refseg demo --out demo_out" in proc.stdout


def test_demo_setup_path_runs_without_root_or_apt_get(sandbox):
    assert shutil.which("apt-get", path=sandbox["env"]["PATH"]) is None
    proc = _make(sandbox, "demo", FAKE_UID="1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = sandbox["log"].read_text().splitlines()
    assert steps[0] == "python3 -m venv .venv"
    installs = [s for s in steps if s.startswith("pip ") and " install " in s]
    assert "torch torchvision" in installs[1]  # after pip's own upgrade: torch first
    assert (
        installs[2].startswith("pip SAM2_BUILD_CUDA=0 ") and "--no-build-isolation" in installs[2]
    )
    assert "-e .[dev]" in installs[3] and "dinov2==0.0.1.dev2" in installs[4]
    assert len(installs) == 5
    assert steps[-1] == "refseg SAM2_BUILD_CUDA= demo --out demo_out"
    assert (sandbox["work"] / ".venv" / ".refseg-installed").exists()


def test_setup_runs_the_install_script_the_dockerfile_runs(sandbox):
    proc = _make(sandbox, "-n", "setup")
    assert proc.returncode == 0, proc.stderr
    assert "sh deploy/install.sh .venv/bin/pip --dev --editable" in proc.stdout
    for step in ("torch", "sam2", "--no-build-isolation", "constraints.txt"):
        assert step not in proc.stdout  # the steps themselves live in the script only


def test_browser_without_root_says_how_and_does_not_fail(sandbox):
    proc = _make(sandbox, "browser", FAKE_UID="1000")
    assert proc.returncode == 0, proc.stderr
    assert "report's rendering test will be skipped" in proc.stdout
    assert "sudo apt-get install chromium" in proc.stdout and "REFSEG_CHROMIUM" in proc.stdout


def test_browser_required_on_ci_fails_loudly_without_one(sandbox):
    proc = _make(sandbox, "browser", FAKE_UID="1000", REFSEG_REQUIRE_BROWSER="1")
    assert proc.returncode != 0
    assert "error: REFSEG_REQUIRE_BROWSER=1 but there is no Chromium" in proc.stderr


def test_browser_as_root_installs_debians_chromium(sandbox):
    log = sandbox["log"]
    _script(sandbox["bin"] / "apt-get", f'#!/bin/sh\necho "apt-get $*" >> {log}\n')
    proc = _make(sandbox, "browser", FAKE_UID="0")
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        "apt-get update -qq",
        "apt-get install -y -qq chromium",
    ]


def test_browser_present_is_left_alone(sandbox):
    _script(sandbox["bin"] / "chromium", "#!/bin/sh\nexit 0\n")
    proc = _make(sandbox, "browser", FAKE_UID="1000", REFSEG_REQUIRE_BROWSER="1")
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_make_test_gets_the_browser_and_ci_requires_it(sandbox):
    proc = _make(sandbox, "-n", "test")
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install -y -qq chromium" in proc.stdout  # the browser step is part of it
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    assert lines.index("export REFSEG_REQUIRE_BROWSER=1") < lines.index("make test")
