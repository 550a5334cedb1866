"""Model builders and the checkpoint registry: real architectures, random weights, no network."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import fsspec
import pytest
import torch
from refseg.core import checkpoints as ck
from refseg.core.models import (
    DINOV2_MODELS,
    SAM2_CONFIGS,
    build_dinov2,
    build_sam2,
    dinov2_mean_std,
    dinov2_patch_tokens,
    sam2_config_name,
)


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch) -> Path:
    """Every test sees its own empty checkpoint cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("REFSEG_CACHE", str(cache))
    return cache


def _random(build, *args, **kwargs):
    with pytest.warns(UserWarning, match="random weights"):
        return build(*args, random_weights=True, **kwargs)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ registry


def test_official_registry_is_consistent():
    names = [c.name for c in ck.OFFICIAL.values()]
    assert len(names) == len(set(names)) == 16
    assert len({c.filename for c in ck.OFFICIAL.values()}) == 16
    for key, c in ck.OFFICIAL.items():
        assert key == c.name
        assert c.url.startswith("https://") and c.url.endswith("/" + c.filename)
        assert c.sha256 is None or len(c.sha256) == 64
    assert {c.arch for c in ck.OFFICIAL.values() if c.family == "sam2"} == set(SAM2_CONFIGS)
    assert {c.arch for c in ck.OFFICIAL.values() if c.family == "dinov2"} == set(DINOV2_MODELS)


@pytest.mark.parametrize(
    ("family", "arch", "name", "url_tail"),
    [
        ("sam2", "sam2_hiera_l", "sam2_hiera_large", "072824/sam2_hiera_large.pt"),
        ("sam2", "sam2.1_hiera_b+", "sam2.1_hiera_base_plus", "092824/sam2.1_hiera_base_plus.pt"),
        ("dinov2", "vitl14", "dinov2_vitl14", "dinov2_vitl14/dinov2_vitl14_pretrain.pth"),
        (
            "dinov2",
            "vits14_reg",
            "dinov2_vits14_reg",
            "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
        ),
    ],
)
def test_default_checkpoint_for(family, arch, name, url_tail):
    c = ck.default_checkpoint_for(family, arch)
    assert c is not None and c.name == name and c.url.endswith(url_tail)


def test_default_checkpoint_for_unknown_is_none():
    assert ck.default_checkpoint_for("sam2", "vitl14") is None


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    assert ck.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("REFSEG_CACHE")
    assert ck.cache_dir() == Path.home() / ".cache" / "refseg" / "checkpoints"


# ---------------------------------------------------------------------- files and hashes


def test_sha256_file_and_verify(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # spans several read chunks
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert ck.sha256_file(path) == digest
    ck.verify_sha256(path, digest.upper())
    with pytest.raises(ValueError, match=f"blob.bin.*expected {'0' * 64}.*{digest}"):
        ck.verify_sha256(path, "0" * 64)


def test_resolve_local_path_and_file_uri(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    local = ck.resolve_checkpoint(str(path))
    assert (local.path, local.uri, local.sha256) == (path, path.as_uri(), digest)
    uri = ck.resolve_checkpoint(path.as_uri())
    assert (uri.path, uri.uri, uri.sha256) == (path, path.as_uri(), digest)


@pytest.mark.parametrize("spec_kind", ["path", "file-uri", "memory-uri", "unknown-name"])
def test_resolve_missing_raises(tmp_path, spec_kind):
    spec = {
        "path": str(tmp_path / "nope.pt"),
        "file-uri": (tmp_path / "nope.pt").as_uri(),
        "memory-uri": "memory://refseg-test/nope.pt",
        "unknown-name": "sam3_hiera_huge",
    }[spec_kind]
    with pytest.raises(FileNotFoundError, match=r"nope\.pt|sam3_hiera_huge"):
        ck.resolve_checkpoint(spec)


def test_resolve_remote_uri_copies_into_cache(_empty_cache):
    uri = "memory://refseg-test/remote/w.pt"
    with fsspec.open(uri, "wb") as f:
        f.write(b"remote weights")
    try:
        first = ck.resolve_checkpoint(uri)
        second = ck.resolve_checkpoint(uri)
    finally:
        fsspec.filesystem("memory").rm(uri)
    assert first.path.read_bytes() == b"remote weights"
    assert first.path.is_relative_to(_empty_cache) and first.path.name.endswith("-w.pt")
    assert first == second and first.uri == uri
    assert first.sha256 == hashlib.sha256(b"remote weights").hexdigest()
    assert not list(first.path.parent.glob("*.part"))


def test_official_name_not_in_cache_says_how_to_get_it():
    with pytest.raises(FileNotFoundError) as info:
        ck.resolve_checkpoint("sam2.1_hiera_tiny")
    message = str(info.value)
    assert "refseg checkpoints download sam2.1_hiera_tiny" in message
    assert ck.OFFICIAL["sam2.1_hiera_tiny"].url in message


@pytest.fixture
def fake_official(tmp_path, monkeypatch):
    """An official entry whose URL is a local file:// URL (no network)."""

    def make(data: bytes, sha256: str | None) -> ck.OfficialCheckpoint:
        src = tmp_path / "served" / "fake_ckpt.pt"
        src.parent.mkdir(exist_ok=True)
        src.write_bytes(data)
        entry = ck.OfficialCheckpoint("fake_ckpt", "sam2", "fake", src.as_uri(), sha256, src.name)
        monkeypatch.setitem(ck.OFFICIAL, entry.name, entry)
        return entry

    return make


def test_download_records_hash_and_resolves(fake_official, _empty_cache):
    data = b"x" * 3_000_000
    fake_official(data, None)
    path = ck.download("fake_ckpt", progress=False)
    digest = hashlib.sha256(data).hexdigest()
    assert path == _empty_cache / "fake_ckpt.pt" and path.read_bytes() == data
    assert (_empty_cache / "fake_ckpt.pt.sha256").read_text().split()[0] == digest
    assert ck.resolve_checkpoint("fake_ckpt").sha256 == digest
    assert not list(_empty_cache.glob("*.part"))
    # a file changed after download no longer matches what was recorded
    path.write_bytes(b"corrupted")
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        ck.resolve_checkpoint("fake_ckpt")


def test_download_hash_mismatch_deletes_the_file(fake_official, _empty_cache):
    fake_official(b"payload", "f" * 64)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        ck.download("fake_ckpt", progress=False)
    assert not list(_empty_cache.iterdir())


def test_download_verifies_known_hash(fake_official):
    fake_official(b"payload", hashlib.sha256(b"payload").hexdigest())
    assert ck.download("fake_ckpt", progress=False).read_bytes() == b"payload"


def test_download_unknown_name():
    with pytest.raises(ValueError, match="unknown checkpoint"):
        ck.download("sam3_hiera_huge")


# ---------------------------------------------------------------------------------- SAM2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("sam2_hiera_l", "configs/sam2/sam2_hiera_l.yaml"),
        ("sam2_hiera_b+.yaml", "configs/sam2/sam2_hiera_b+.yaml"),
        ("configs/sam2.1/sam2.1_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_t.yaml"),
        ("sam2.1_hiera_s", "configs/sam2.1/sam2.1_hiera_s.yaml"),
    ],
)
def test_sam2_config_name(config, expected):
    assert sam2_config_name(config)[1] == expected


@pytest.mark.parametrize("config", ["sam2_hiera_xl", "sam2.2_hiera_t", "vitl14", ""])
def test_sam2_config_name_rejects(config):
    with pytest.raises(ValueError, match="unknown SAM2 config"):
        sam2_config_name(config)


# Published sizes (millions of parameters): T 38.9, S 46, B+ 80.8, L 224.4.
@pytest.mark.parametrize(
    ("config", "millions"),
    [(f"{v}_hiera_{s}", m) for v in ("sam2", "sam2.1") for s, m in
     (("t", 38.9), ("s", 46.0), ("b+", 80.8), ("l", 224.4))],
)  # fmt: skip
def test_every_sam2_config_builds_with_random_weights(config, millions):
    loaded = _random(build_sam2, config, None, image_size=256)
    assert abs(_n_params(loaded.model) / 1e6 - millions) < 0.1
    assert loaded.model.image_size == 256 and not loaded.model.training
    assert (loaded.name, loaded.checkpoint, loaded.sha256) == (config, None, None)
    assert loaded.random_weights


def test_sam2_tiny_image_encoder_forward_at_256():
    model = _random(build_sam2, "sam2.1_hiera_t", None, image_size=256).model
    with torch.no_grad():
        out = model.forward_image(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in out["backbone_fpn"]] == [
        (1, 32, 64, 64),
        (1, 64, 32, 32),
        (1, 256, 16, 16),
    ]
    assert tuple(out["vision_features"].shape) == (1, 256, 16, 16)
    assert all(torch.isfinite(f).all() for f in out["backbone_fpn"])


@pytest.fixture(scope="module")
def tiny_sam2_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_sam2("sam2_hiera_t", None, image_size=256, random_weights=True).model
    return {k: v.clone() for k, v in model.state_dict().items()}


def _save(path: Path, state: dict[str, torch.Tensor], wrap: bool = True) -> Path:
    torch.save({"model": state} if wrap else state, path)
    return path


def _same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sam2_state_dict_round_trips(tmp_path, tiny_sam2_state):
    path = _save(tmp_path / "tiny.pt", tiny_sam2_state)
    digest = ck.sha256_file(path)
    # weights do not depend on the image size: a 256 model's file loads into a 512 model
    loaded = build_sam2("sam2_hiera_t", str(path), image_size=512, sha256=digest)
    assert _same_weights(loaded.model, tiny_sam2_state)
    assert (loaded.checkpoint, loaded.sha256) == (path.as_uri(), digest)
    assert not loaded.random_weights and not loaded.model.training


def test_sam2_default_checkpoint_from_cache(_empty_cache, tiny_sam2_state):
    _empty_cache.mkdir()
    path = _save(_empty_cache / "sam2_hiera_tiny.pt", tiny_sam2_state)
    loaded = build_sam2("sam2_hiera_t", None, image_size=256)
    assert _same_weights(loaded.model, tiny_sam2_state)
    assert loaded.checkpoint == ck.OFFICIAL["sam2_hiera_tiny"].url
    assert loaded.sha256 == ck.sha256_file(path)


@pytest.mark.parametrize("defect", ["extra", "missing", "shape", "bare-extra"])
def test_sam2_strict_loading_raises(tmp_path, tiny_sam2_state, defect):
    state = dict(tiny_sam2_state)
    if defect in ("extra", "bare-extra"):
        state["not_a_sam2_param"] = torch.zeros(3)
    elif defect == "missing":
        state.pop("sam_mask_decoder.iou_token.weight")
    else:
        state["no_mem_embed"] = torch.zeros(1, 1, 7)
    path = _save(tmp_path / "bad.pt", state, wrap=defect != "bare-extra")
    what = {"shape": "size mismatch"}.get(defect, "not_a_sam2_param|iou_token")
    pattern = rf"(?s)bad\.pt does not fit config .*sam2_hiera_t.*({what})"
    with pytest.raises(RuntimeError, match=pattern):
        build_sam2("sam2_hiera_t", str(path), image_size=256)


def test_sam2_sha256_mismatch_raises(tmp_path):
    path = tmp_path / "any.pt"
    path.write_bytes(b"not even a checkpoint")
    with pytest.raises(ValueError, match=r"SHA-256 mismatch.*any\.pt"):
        build_sam2("sam2_hiera_t", str(path), sha256="0" * 64)


@pytest.mark.parametrize(
    ("config", "name"),
    [("sam2_hiera_l", "sam2_hiera_large"), ("sam2.1_hiera_t", "sam2.1_hiera_tiny")],
)
def test_sam2_missing_default_checkpoint_message(config, name):
    with pytest.raises(FileNotFoundError) as info:
        build_sam2(config, None)
    message = str(info.value)
    assert f"refseg checkpoints download {name}" in message
    assert ck.OFFICIAL[name].url in message and "--random-weights" in message


def test_sam2_missing_local_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing_dir/sam2\.pt"):
        build_sam2("sam2_hiera_t", str(tmp_path / "missing_dir" / "sam2.pt"))


def test_random_weights_with_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="random_weights"):
        build_sam2("sam2_hiera_t", str(tmp_path / "w.pt"), random_weights=True)


# -------------------------------------------------------------------------------- DINOv2


@pytest.mark.parametrize("name", ["vits14", "vits14_reg"])
@pytest.mark.parametrize("size", [112, 224])
def test_dinov2_patch_tokens_random_weights(name, size):
    model = _random(build_dinov2, name, None, image_size=size).model
    assert model.num_prefix_tokens == (5 if name.endswith("_reg") else 1)
    tokens = dinov2_patch_tokens(model, torch.randn(2, 3, size, size))
    assert tuple(tokens.shape) == (2, size // 14, size // 14, 384)
    assert torch.isfinite(tokens).all() and tokens.std() > 0


@pytest.mark.parametrize("name", ["vitx14", "vits16", "vits14_reg8", "sam2_hiera_t"])
def test_dinov2_unknown_name(name):
    with pytest.raises(ValueError, match="unknown DINOv2 model"):
        build_dinov2(name, None, random_weights=True)


def test_dinov2_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of 14"):
        build_dinov2("vits14", None, image_size=100, random_weights=True)
    model = _random(build_dinov2, "vits14", None, image_size=112).model
    with pytest.raises(ValueError, match="built for"):
        dinov2_patch_tokens(model, torch.randn(1, 3, 224, 224))


def test_dinov2_mean_std_is_imagenet():
    model = _random(build_dinov2, "vits14", None, image_size=112).model
    mean, std = dinov2_mean_std(model)
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (mean, std) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))


@pytest.fixture(scope="module")
def vits14_release_state() -> dict[str, torch.Tensor]:
    """A random ViT-S/14 state dict in Meta's release layout, made by inverting timm's
    conversion (no cls/pos split, plus a ``mask_token``)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = build_dinov2("vits14", None, random_weights=True).model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 384)
    return state


def test_dinov2_loads_release_layout(tmp_path, vits14_release_state):
    path = _save(tmp_path / "dinov2.pth", vits14_release_state, wrap=False)
    loaded = build_dinov2("vits14", path.as_uri(), sha256=ck.sha256_file(path))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, vits14_release_state[k]), k
    assert loaded.checkpoint == path.as_uri() and not loaded.random_weights


@pytest.mark.parametrize("defect", ["extra", "missing"])
def test_dinov2_strict_loading_raises(tmp_path, vits14_release_state, defect):
    state = dict(vits14_release_state)
    if defect == "extra":
        state["head.weight"] = torch.zeros(10, 384)
    else:
        state.pop("blocks.3.ls1.gamma")
    path = _save(tmp_path / "bad.pth", state, wrap=False)
    with pytest.raises(RuntimeError, match=r"bad\.pth does not fit DINOv2 vits14.*(head|ls1)"):
        build_dinov2("vits14", str(path))


def test_dinov2_missing_default_checkpoint_message():
    with pytest.raises(FileNotFoundError, match="refseg checkpoints download dinov2_vitl14_reg"):
        build_dinov2("vitl14_reg", None)
