"""What keeps a GPU busy: uint8 images converted on the device, torch.compile of the code
that runs, TF32 as an option, the prompt batch sized once per proposer.

Everything here runs on the CPU with the tiny preset; the ``cuda`` tests repeat the checks
on a GPU and skip without one (bench/gpu_check.sh runs them on a GPU machine).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from refseg.core.config import MethodConfig, get_preset, replace
from refseg.core.imaging import prepare_target
from refseg.core.tensors import images_to_float, stack_targets, stack_targets_uint8

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = get_preset("tiny")


def _targets(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(37, 53), (64, 40), (90, 90)]
    return [
        prepare_target(rng.integers(0, 256, (*shapes[i % 3], 3), dtype=np.uint8), size)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny_models():
    from refseg.core.factory import build_encoder, build_proposer

    model = replace(TINY.model, random_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_proposer(model, TINY.method), build_encoder(model, TINY.method)


# ------------------------------------------------------------------------- uint8 images


def test_uint8_stack_converts_to_the_float_stack_bit_for_bit():
    targets = _targets(3, 40)
    u8 = stack_targets_uint8(targets)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 40, 40, 3)
    assert np.array_equal(u8.numpy(), np.stack([t.square for t in targets]))
    ref = stack_targets(targets)
    for x in (u8, u8.permute(0, 3, 1, 2), u8.permute(0, 3, 1, 2).contiguous()):
        out = images_to_float(x, "cpu")
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert torch.equal(out, ref)
    assert torch.equal(images_to_float(ref, "cpu"), ref)  # float input unchanged


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((2, 40, 40), torch.uint8), ((2, 4, 40, 40), torch.uint8), ((2, 40, 40, 3), torch.float32)],
)
def test_images_of_the_wrong_layout_are_refused(shape, dtype):
    with pytest.raises(ValueError, match=r"images must be|channels first"):
        images_to_float(torch.zeros(shape, dtype=dtype), "cpu")


def test_models_give_the_same_results_from_uint8(tiny_models):
    from refseg.core.matching import Matcher
    from refseg.core.memory_bank import MemoryBank, ShotRecord

    proposer, encoder = tiny_models
    proposer.method = replace(TINY.method, points_per_side=3, iou_threshold=0.0)
    targets = _targets(2, proposer.input_size, seed=1)
    valid, orig = [t.valid_hw for t in targets], [t.orig_hw for t in targets]
    ref = proposer.propose(stack_targets(targets), valid, orig)
    u8 = stack_targets_uint8(targets)
    for images in (u8, u8.permute(0, 3, 1, 2)):
        out = proposer.propose(images, valid, orig)
        for a, b in zip(ref, out, strict=True):
            assert len(a) == 9 and torch.equal(a.logits, b.logits) and torch.equal(a.iou, b.iou)
    bank = MemoryBank(encoder=encoder.name, image_size=encoder.image_size)
    bank.add(ShotRecord(1, 1, 1), torch.rand(384), "a")
    matcher = Matcher(encoder, bank, TINY.method)
    assert torch.equal(matcher.target_features(u8), matcher.target_features(stack_targets(targets)))


@cuda
def test_uint8_on_cuda_equals_float_on_cuda(tiny_models):
    targets = _targets(2, 64)
    ref = stack_targets(targets).cuda()
    assert torch.equal(images_to_float(stack_targets_uint8(targets), "cuda"), ref)


# ---------------------------------------------------------------------------- --compile


class RecordingBackend:
    """A ``torch.compile`` backend that runs each captured graph as is and counts its calls."""

    def __init__(self) -> None:
        self.graphs: list[str] = []  # each graph's Python code
        self.calls: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        k = len(self.graphs)
        self.graphs.append(gm.code)
        self.calls.append(0)

        def run(*args):
            self.calls[k] += 1
            return gm.forward(*args)

        return run

    def calls_of(self, marker: str) -> int:
        """Calls of the graphs whose code contains ``marker``."""
        return sum(c for g, c in zip(self.graphs, self.calls, strict=True) if marker in g)


def test_compile_runs_the_default_fast_decoder_and_the_image_encoder(tiny_models):
    """``--compile`` compiles what the default (fast) decoder calls: its per-prompt work runs
    through the compiled graphs, once per decoder call, with the eager results."""
    from refseg.core.factory import COMPILE_BACKEND, build_proposer
    from refseg.core.proposals import Sam2Proposer

    torch._dynamo.reset()
    eager = tiny_models[0]
    method = replace(TINY.method, points_per_side=3, prompt_batch=4, iou_threshold=0.0)
    assert method.decoder == "fast"  # the default
    backend = RecordingBackend()
    compiled = Sam2Proposer(eager.model, method, compile_backend=backend)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    args = (images, [(256, 256)], [(50, 60)])
    out = compiled.propose(*args)[0]
    # the fast decoder's own code (SharedImageDecoder._add_mix: keys.baddbmm_) ran compiled,
    # once per decoder call: 9 prompts in batches of 4
    assert backend.calls_of("baddbmm_") == 3
    assert backend.calls_of("conv2d") >= 1  # the image encoder's patch embedding
    eager.method = method
    ref = eager.propose(*args)[0]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.iou, ref.iou, rtol=1e-4, atol=1e-4)
    # the flag wires it: ModelConfig.compile -> the proposer's backend; the model is left alone
    model = replace(TINY.model, random_weights=True, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = build_proposer(model, TINY.method)
    assert built.compile_backend == COMPILE_BACKEND
    assert built._fast_decoder()._decode is not built._fast_decoder()._decode_eager
    assert type(built.model.image_encoder).__name__ != "OptimizedModule"
    torch._dynamo.reset()


def test_compile_runs_the_dinov2_encoder(tiny_models):
    from refseg.core.features import DinoEncoder
    from refseg.core.models import LoadedModel

    torch._dynamo.reset()
    eager = tiny_models[1]
    backend = RecordingBackend()
    loaded = LoadedModel(eager.model, eager.name, None, None, True)
    compiled = DinoEncoder(loaded, eager.image_size, compile_backend=backend)
    x = torch.rand(1, 3, eager.image_size, eager.image_size)
    out = compiled(x)
    assert backend.calls_of("conv2d") == 1  # patch embedding, blocks and norm: one graph
    torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------- --tf32


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_sets_both_switches_on_cuda(tf32_flags, enabled):
    from refseg.core.factory import set_tf32

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not enabled
    set_tf32(enabled, "cuda:0")  # the switches exist without a GPU
    assert torch.backends.cuda.matmul.allow_tf32 is enabled
    assert torch.backends.cudnn.allow_tf32 is enabled


def test_tf32_is_a_logged_no_op_on_cpu(tf32_flags, caplog):
    from refseg.core.factory import set_tf32

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    with caplog.at_level(logging.INFO, logger="refseg.core.factory"):
        set_tf32(True, "cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (
        False,
        True,
    )
    assert "tf32: no effect on cpu" in caplog.text


def test_tf32_is_off_by_default_a_flag_and_in_the_fingerprint():
    pytest.importorskip("ray")  # jobs and pipeline: not on the GPU check's machine
    import argparse

    from refseg.jobs.options import add_model_args, resolve_configs
    from refseg.pipeline.run_steps import config_fingerprint

    assert MethodConfig().tf32 is False
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    _, _, method = resolve_configs(parser.parse_args(["--tf32", "--preset", "tiny"]))
    assert method.tf32 is True
    model = TINY.model
    assert config_fingerprint(model, method, "x") != config_fingerprint(
        model, replace(method, tf32=False), "x"
    )


@cuda
def test_tf32_builders_set_the_switches_on_cuda(tf32_flags):
    from refseg.core.factory import build_proposer

    model = replace(TINY.model, random_weights=True, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_proposer(model, replace(TINY.method, tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        build_proposer(model, TINY.method)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


# ------------------------------------------------------------------------- prompt batch


def test_prompt_batch_is_sized_once_per_proposer(tiny_models, monkeypatch):
    from refseg.core import proposals

    proposer = tiny_models[0]
    proposer.method = replace(TINY.method, points_per_side=3, prompt_batch=0)
    proposer._auto_batch.clear()
    sized = []

    def counting(*args, **kwargs):
        sized.append(args)
        return 4

    monkeypatch.setattr(proposals, "auto_prompt_batch", counting)
    images = torch.rand(2, 3, 256, 256)
    for _ in range(2):
        proposer.propose(images, [(256, 256)] * 2, [(50, 60)] * 2)
    assert proposer.prompt_batch((16, 16)) == 4
    assert len(sized) == 1  # not once per call or per image
    proposer._auto_batch.clear()


def test_prompt_batch_on_cpu_is_unchanged(tiny_models):
    from refseg.core.sizing import CPU_PROMPT_BATCH, STOCK_PROMPT_BATCH

    proposer = tiny_models[0]
    proposer._auto_batch.clear()
    proposer.method = replace(TINY.method, prompt_batch=0)
    assert proposer.prompt_batch((16, 16)) == CPU_PROMPT_BATCH == 16
    proposer.method = replace(TINY.method, prompt_batch=0, decoder="stock")
    assert proposer.prompt_batch((16, 16)) == STOCK_PROMPT_BATCH
    proposer._auto_batch.clear()


@pytest.mark.parametrize(
    ("free_gib", "mib_per_prompt", "expected"),
    [(80, 16, 1024), (8, 16, 128), (1, 16, 64), (8, None, 128)],
)
def test_cuda_prompt_batch_from_free_memory_and_bytes_per_prompt(
    monkeypatch, free_gib, mib_per_prompt, expected
):
    from refseg.core import sizing

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_gib * 2**30, 0))
    per = None if mib_per_prompt is None else mib_per_prompt * 2**20
    n = sizing.auto_prompt_batch("fast", torch.device("cuda"), (64, 64), bytes_per_prompt=per)
    assert n == expected  # a quarter of the free memory, between 64 and 1024
    with pytest.raises(ValueError, match="CUDA"):
        sizing.probe_bytes_per_prompt(lambda p: None, torch.device("cpu"))


def test_probe_call_runs_the_fast_decoder(tiny_models):
    proposer = tiny_models[0]
    proposer.method = TINY.method
    proposer._probe_decode((16, 16), 5)  # what the CUDA probe measures, on the CPU


@cuda
def test_cuda_prompt_batch_is_measured_once_at_construction():
    from refseg.core.factory import build_proposer

    model = replace(TINY.model, random_weights=True, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proposer = build_proposer(model, TINY.method)
    assert len(proposer._auto_batch) == 1  # sized when built
    (batch,) = proposer._auto_batch.values()
    assert 64 <= batch <= 1024 and proposer.prompt_batch((16, 16)) == batch
