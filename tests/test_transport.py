"""The proposals' transport form, computed on the proposals' device (refseg.core.transport).

The torch encoder must give the same arrays, bit for bit, as the NumPy form it replaced
(``_reference_encode`` below: max-pools on the host, ``np.packbits``), and must copy only the
packed arrays to the host, never the (N, h, w) logits.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refseg.core import transport
from refseg.core.imaging import ResizeInfo
from refseg.core.proposals import Proposals
from refseg.core.tensors import lowres_to_original
from refseg.core.transport import decode_proposals, encode_proposals, pack_bits
from torch.overrides import TorchFunctionMode

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _reference_encode(p: Proposals) -> bytes:
    """The host-side encoder this module had before (logits copied to the CPU first)."""
    logits = p.logits.detach().float().cpu()
    fg = logits > 0
    n, h, w = fg.shape
    if n:
        f = fg[:, None].float()
        boundary = F.max_pool2d(f, 3, 1, 1) != -F.max_pool2d(-f, 3, 1, 1)
        ry, rx = transport._shrink_margin(p, h, w)
        if ry or rx:
            band = F.max_pool2d(boundary.float(), (2 * ry + 1, 2 * rx + 1), 1, (ry, rx))
            boundary = band > 0
        boundary = boundary[:, 0]
    else:
        boundary = torch.zeros((0, h, w), dtype=torch.bool)
    idx = torch.nonzero(boundary.reshape(-1)).flatten()
    buf = io.BytesIO()
    np.savez(
        buf,
        signs=np.packbits(fg.numpy().reshape(n, h * w), axis=1),
        boundary_index=idx.numpy().astype(np.int32),
        boundary_value=logits.reshape(-1)[idx].numpy(),
        iou=p.iou.detach().float().cpu().numpy(),
        points=p.points.detach().float().cpu().numpy(),
        shape=np.array([n, h, w], dtype=np.int64),
        sizes=np.array([p.input_size, *p.valid_hw, *p.orig_hw], dtype=np.int64),
    )
    return buf.getvalue()


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return {k: z[k] for k in z.files}


def _as_index_form(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays with a ``boundary_mask`` written as the ``boundary_index`` it stands for."""
    if "boundary_mask" not in x:
        return x
    _, h, w = (int(v) for v in x["shape"])
    kept = np.unpackbits(x["boundary_mask"], axis=1, count=h * w).reshape(-1)
    out = {k: v for k, v in x.items() if k != "boundary_mask"}
    out["boundary_index"] = np.flatnonzero(kept).astype(np.int32)
    return {k: out[k] for k in _INDEX_FORM_ORDER}


_INDEX_FORM_ORDER = ("signs", "boundary_index", "boundary_value", "iou", "points", "shape", "sizes")


def _assert_same_arrays(a: bytes, b: bytes) -> None:
    """Same arrays, bit for bit; a boundary sent as a bit mask is compared as the indices
    of its set bits (the reference encoder only knows indices)."""
    x, y = _as_index_form(_arrays(a)), _as_index_form(_arrays(b))
    assert list(x) == list(y)
    for k in x:
        assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
        assert x[k].tobytes() == y[k].tobytes(), k


def _logits(kind: str, n: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randn(n, side, side, generator=g)
    if kind == "smooth":
        coarse = torch.randn(n, 1, 6, 6, generator=g)
        return F.interpolate(coarse, size=(side, side), mode="bilinear")[:, 0]
    yy, xx = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    r = torch.rand(n, 1, 1, generator=g) * side / 3 + 2
    c = torch.rand(n, 2, 1, 1, generator=g) * side
    return r**2 - (xx - c[:, 0]) ** 2 - (yy - c[:, 1]) ** 2  # discs


def _proposals(logits, valid_hw, orig_hw, size=256) -> Proposals:
    n = logits.shape[0]
    g = torch.Generator().manual_seed(1)
    return Proposals(
        logits, torch.rand(n, generator=g), torch.rand(n, 2, generator=g) * size, size,
        valid_hw, orig_hw,
    )  # fmt: skip


@pytest.mark.parametrize("length", [1, 7, 8, 9, 15, 16, 17, 64, 4097, 65536])
def test_pack_bits_equals_numpy_packbits(length):
    g = torch.Generator().manual_seed(length)
    bits = torch.rand(3, 2, length, generator=g) > 0.5
    ours = pack_bits(bits)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 2, math.ceil(length / 8))
    assert np.array_equal(ours.numpy(), np.packbits(bits.numpy(), axis=-1))
    for fill in (True, False):
        const = torch.full((2, length), fill)
        assert np.array_equal(pack_bits(const).numpy(), np.packbits(const.numpy(), axis=-1))


@pytest.mark.parametrize("kind", ["noise", "smooth", "discs"])
@pytest.mark.parametrize(
    ("valid_hw", "orig_hw"),
    [
        ((256, 256), (300, 250)),  # square, enlarging: 3x3 boundary only
        ((256, 256), (97, 411)),  # square, shrinking one axis: band widened on it
        ((256, 256), (20, 9)),  # square, shrinking both axes a lot: wide band
        ((256, 200), (30, 25)),  # longest-side: no band
    ],
)
def test_device_encoder_gives_the_host_encoders_arrays(kind, valid_hw, orig_hw, monkeypatch):
    monkeypatch.setattr(transport, "ENCODE_CHUNK", 4)  # several chunks, one partial
    for n in (0, 1, 11):
        p = _proposals(_logits(kind, n, 64, seed=n), valid_hw, orig_hw)
        ours, ref = encode_proposals(p), _reference_encode(p)
        _assert_same_arrays(ours, ref)
        q, r = decode_proposals(ours), decode_proposals(ref)
        assert torch.equal(q.logits, r.logits) and torch.equal(q.points, r.points)
        assert (q.input_size, q.valid_hw, q.orig_hw) == (256, valid_hw, orig_hw)
        # exact where it matters: the masks at the original size
        mode = "square" if valid_hw == (256, 256) else "longest-side"
        info = ResizeInfo(orig_hw, 256, mode, valid_hw)
        assert torch.equal(
            lowres_to_original(q.logits, info) > 0, lowres_to_original(p.logits, info) > 0
        )


def test_the_boundary_is_sent_in_the_smaller_of_its_two_forms():
    """Speckled masks (random SAM2 weights) keep most pixels exactly: a bit per pixel
    then replaces the int32 indices, about halving the bytes; compact objects keep the
    indices. Both decode to the same logits as the index form."""
    sizes = {}
    for kind in ("noise", "discs"):
        p = _proposals(_logits(kind, 24, 256, seed=2), (256, 256), (144, 192))
        ours, ref = encode_proposals(p), _reference_encode(p)
        form = "boundary_mask" if "boundary_mask" in _arrays(ours) else "boundary_index"
        sizes[kind] = (form, len(ours) / len(ref))
        assert torch.equal(decode_proposals(ours).logits, decode_proposals(ref).logits)
    assert sizes["noise"][0] == "boundary_mask" and sizes["noise"][1] < 0.6, sizes
    assert sizes["discs"] == ("boundary_index", 1.0), sizes


def test_odd_low_res_side_pads_the_last_byte():
    p = _proposals(_logits("noise", 5, 13, seed=3), (52, 52), (40, 41), size=52)
    _assert_same_arrays(encode_proposals(p), _reference_encode(p))
    assert torch.equal(decode_proposals(encode_proposals(p)).logits > 0, p.logits > 0)


class _HostCopies(TorchFunctionMode):
    """Records the bytes of every tensor handed to NumPy or copied by ``.cpu()``/``.to()``."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        kwargs = kwargs or {}
        moves = (
            name in ("cpu", "numpy", "__array__")
            or (
                name == "to"  # a device given (dtype-only conversions stay where they are)
                and any(isinstance(a, str | torch.device) for a in (*args[1:], *kwargs.values()))
            )
        )
        if moves and isinstance(args[0], torch.Tensor):
            self.nbytes.append(args[0].numel() * args[0].element_size())
        return func(*args, **kwargs)


def test_only_packed_arrays_reach_the_host():
    """The (N, h, w) logits (and their foreground) are never copied off their device."""
    p = _proposals(_logits("discs", 40, 256, seed=5), (1024, 1024), (480, 640), size=1024)
    dense = p.logits.numel() * 4
    with _HostCopies() as copies:
        data = encode_proposals(p)
    assert copies.nbytes, "the mode saw no host copy: it does not observe the encoder"
    assert max(copies.nbytes) <= dense // 16  # signs: 1 bit per pixel (1/32 of the logits)
    with _HostCopies() as copies:
        _reference_encode(p)
    assert max(copies.nbytes) >= dense  # the check sees a dense copy where there is one
    assert len(data) < dense / 8


@cuda
@pytest.mark.parametrize("orig_hw", [(480, 640), (20, 9)])
def test_cuda_encoder_equals_cpu_encoder(orig_hw):
    p = _proposals(_logits("smooth", 300, 256, seed=7), (1024, 1024), orig_hw, size=1024)
    on_gpu = Proposals(
        p.logits.cuda(), p.iou.cuda(), p.points.cuda(), p.input_size, p.valid_hw, p.orig_hw
    )
    _assert_same_arrays(encode_proposals(on_gpu), _reference_encode(p))
    arrays = transport.transport_arrays(on_gpu)
    assert all(v.device.type == "cuda" for v in arrays.values())
