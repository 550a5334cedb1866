"""Fault injection, security (issue 6, item 7): nothing a user hands refseg executes code.

Every file a user gives (memory bank, checkpoint, config, class thresholds, references,
proposals in transit) is tried with a pickle payload that would create a marker file when
unpickled: each load must fail with a clear error and the marker must not exist. A
checkpoint with a given SHA-256 is checked before it is read. A scan of the source keeps
pickle-capable loaders out. (Crafted image names and credentials are checked on a real
job in test_faults_images.py.)
"""

from __future__ import annotations

import ast
import io
import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from refseg.core.checkpoints import sha256_file
from refseg.core.transport import decode_proposals

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("refseg", "refseg_core", "pipeline", "jobs")


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a user file executed code"


def _pickle_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    return path


def _torch_file(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, path)
    return path


# ------------------------------------------------------------------------ user files


def test_a_pickled_memory_bank_is_refused(tmp_path, marker):
    from refseg.core.memory_bank import MemoryBank

    bank = _pickle_file(tmp_path / "bank.safetensors", marker)
    with pytest.raises(ValueError, match="is not a refseg memory bank"):
        MemoryBank.load(str(bank))


def test_a_pickled_checkpoint_is_refused_by_weights_only_loading(tmp_path, marker):
    from refseg.core.models import build_dinov2

    ckpt = _torch_file(tmp_path / "dinov2.pth", marker)
    with pytest.raises(pickle.UnpicklingError, match=r"[Ww]eights only load failed"):
        build_dinov2("vits14", str(ckpt), image_size=56)


def test_a_checkpoint_is_checked_against_its_sha256_before_it_is_read(tmp_path, marker):
    from refseg.core.models import build_dinov2, build_sam2

    ckpt = _torch_file(tmp_path / "model.pt", marker)
    wrong = "0" * 64
    for build, name in ((build_dinov2, "vits14"), (build_sam2, "sam2.1_hiera_t")):
        with pytest.raises(ValueError, match=f"SHA-256 mismatch for .*model.pt: expected {wrong}"):
            build(name, str(ckpt), sha256=wrong)
    # the right hash passes the check; the file is then refused for its pickle payload
    with pytest.raises(pickle.UnpicklingError):
        build_dinov2("vits14", str(ckpt), image_size=56, sha256=sha256_file(ckpt).upper())


def test_a_yaml_config_cannot_construct_python_objects(tmp_path, marker):
    from refseg.jobs.options import load_config_file

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"preset: tiny\nevil: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        load_config_file(str(cfg))


def test_yaml_class_thresholds_cannot_construct_python_objects(tmp_path, marker):
    from refseg.jobs.export import parse_class_thresholds

    spec = tmp_path / "thresholds.yaml"
    spec.write_text(f"car: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(yaml.YAMLError):
        parse_class_thresholds(str(spec))


def test_pickled_references_are_not_json(tmp_path, marker):
    from refseg.core.coco import load_coco

    refs = _pickle_file(tmp_path / "refs.json", marker)
    with pytest.raises(ValueError):
        load_coco(str(refs))


def test_proposals_in_transit_refuse_pickled_arrays(marker):

    buf = io.BytesIO()
    np.savez(buf, shape=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_proposals(buf.getvalue())


# ------------------------------------------------------------------------ source scan

_FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = (
                f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            )
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    assert len(files) > 20
    return files


def _violations(source: str, where: str) -> list[str]:
    """Pickle-capable loading in ``source``: imports of pickle & co, ``torch.load`` without
    ``weights_only=True``, ``np.load`` without ``allow_pickle=False``, unsafe YAML, eval."""
    tree = ast.parse(source, where)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            continue
        if names & _FORBIDDEN_MODULES:
            found.append(f"{where}:{node.lineno} imports {sorted(names)}")
    for owner, name, kw, node in _calls(tree):
        at = f"{where}:{node.lineno} {owner}.{name}"
        safe = {"torch": ("weights_only", True), "np": ("allow_pickle", False)}
        safe = {**safe, "numpy": safe["np"]}.get(owner)
        if safe and name == "load":
            flag = kw.get(safe[0])
            if not (isinstance(flag, ast.Constant) and flag.value is safe[1]):
                found.append(at)
        if owner == "yaml" and name in ("load", "full_load", "unsafe_load"):
            found.append(at)
        if isinstance(node.func, ast.Name) and name in ("eval", "exec", "__import__"):
            found.append(at)
    return found


def test_the_source_scan_finds_each_kind_of_violation():
    bad = textwrap.dedent(
        """
        import pickle
        from dill import loads
        torch.load(p)
        torch.load(p, weights_only=False)
        np.load(p)
        yaml.load(s)
        eval(s)
        torch.load(p, map_location="cpu", weights_only=True)
        np.load(p, allow_pickle=False)
        model.to(d).eval()
        """
    )
    found = _violations(bad, "bad.py")
    assert [int(v.split(":")[1].split()[0]) for v in found] == [2, 3, 4, 5, 6, 7, 8], found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_source_loads_nothing_with_pickle(path):
    assert _violations(path.read_text(), str(path.relative_to(REPO))) == []
