"""One-way layers: refseg.core never imports Ray (checked in a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = sorted(p.stem for p in (ROOT / "refseg_core").glob("*.py") if p.stem != "__init__")


def _imported_after(modules: list[str]) -> set[str]:
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(' '.join(sorted(k for k in sys.modules if k.startswith('refseg'))))\n"
        "print(' '.join(sorted({k.split('.')[0] for k in sys.modules})))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ours, top = r.stdout.splitlines()
    return set(ours.split()) | set(top.split())


def test_importing_every_core_module_does_not_import_ray():
    assert len(CORE_MODULES) >= 10
    loaded = _imported_after([f"refseg.core.{m}" for m in CORE_MODULES])
    assert f"refseg.core.{CORE_MODULES[0]}" in loaded and "ray" not in loaded


def test_core_sources_have_no_ray_import_lines():
    for path in (ROOT / "refseg_core").glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith("import ray") or s.startswith("from ray")), (path, line)


def test_cpu_task_stages_do_not_import_torch():
    """Decode, read and write tasks start fast: their modules never import torch."""
    loaded = _imported_after(
        [
            "refseg.pipeline.dataflow.decode",
            "refseg.pipeline.store.layout",
            "refseg.pipeline.dataflow.sources",
        ]
    )
    assert "refseg.pipeline.dataflow.decode" in loaded and "PIL" in loaded
    assert not loaded & {"torch", "torchvision", "timm", "sam2"}, loaded & {"torch", "sam2"}


def test_proposal_stage_does_not_import_torchvision_or_timm():
    """The SAM2 actor imports torch and sam2 only (torchvision/timm cost seconds each)."""
    loaded = _imported_after(["refseg.pipeline.dataflow.stages", "refseg.core.factory"])
    assert "torch" in loaded
    assert not loaded & {"torchvision", "timm"}


# What each folder's modules may import of refseg's own (README "Layout"): top to bottom.
_SHARED = ("refseg.pipeline.schema", "refseg.pipeline.storage", "refseg.pipeline.identity")
_ALLOWED = {
    "refseg_core": ("refseg.core",),
    "pipeline/store": ("refseg.core", "refseg.pipeline.store", *_SHARED),
    "pipeline/dataflow": (
        "refseg.core",
        "refseg.pipeline.dataflow",
        "refseg.pipeline.store",
        *_SHARED,
    ),
    "pipeline": ("refseg.core", "refseg.pipeline"),
    "jobs": ("refseg.core", "refseg.pipeline", "refseg.jobs"),
}


def _refseg_imports(text: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n == "refseg" or n.startswith("refseg.")]


def _violations(folder: str, modules: dict[str, str]) -> list[tuple[str, str]]:
    """(module, import) pairs of ``modules`` (stem -> source) that go up from ``folder``.
    ``from refseg.pipeline import store`` is checked as ``refseg.pipeline.store``."""
    bad = []
    for stem, text in modules.items():
        shared = folder == "pipeline" and f"refseg.pipeline.{stem}" in _SHARED
        ok = ("refseg.core", *_SHARED) if shared else _ALLOWED[folder]
        for name in _refseg_imports(text):
            if not any(name == a or name.startswith(a + ".") for a in ok):
                bad.append((f"{folder}/{stem}.py", name))
    return bad


def test_imports_go_one_way_down_the_layers():
    bad = []
    for folder in _ALLOWED:
        modules = {p.stem: p.read_text() for p in sorted((ROOT / folder).glob("*.py"))}
        assert len(modules) >= 3, folder
        bad += _violations(folder, modules)
    assert bad == []


def test_the_layer_check_refuses_upward_imports():
    assert _violations("pipeline/store", {"x": "from refseg.pipeline.dataflow import graph"})
    assert _violations("refseg_core", {"x": "import refseg.jobs.cli"})
    assert _violations("pipeline", {"schema": "from refseg.pipeline import run"})
    assert _violations("pipeline/dataflow", {"x": "from refseg.pipeline import job"})
    assert not _violations("pipeline/dataflow", {"x": "from refseg.pipeline import schema"})
