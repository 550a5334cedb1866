"""Matching at the original size in bounded memory: the windowed path against today's.

``PooledMatcher.match_pooled`` computes every full-resolution mask inside its own window
(refseg.core.fullres) and encodes the kept ones to RLE one at a time;
``PooledMatcher._match_pooled_dense`` is the path it replaced (every survivor upsampled to
the whole image, K x H x W). Both run here on the same proposals: same instances, masks
equal bit for bit, scores within 1e-6, from under 256 px to over 4096 px, both resize modes,
both merge resolutions, both box conventions, masks touching the borders.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from refseg.core import fullres, matching, ops
from refseg.core import rle as rle_ops
from refseg.core.config import MethodConfig
from refseg.core.fullres import FullResolution, Window, exact_fma, exactness
from refseg.core.imaging import ResizeInfo, longest_side_hw
from refseg.core.matching import PooledMatcher
from refseg.core.memory_bank import MemoryBank, ShotRecord
from refseg.core.proposals import Proposals

DIM, CLASSES, LOW = 16, 3, 256


def _bank() -> MemoryBank:
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(encoder="vits14", image_size=56)
    for c in range(CLASSES):
        proto = torch.randn(DIM, generator=g)
        bank.add(ShotRecord(c + 1, image_id=c, annotation_id=c), proto, f"class{c}")
    return bank


def ellipses(n: int, seed: int, size: int = LOW, radius: float = 0.2) -> torch.Tensor:
    """(n, size, size) object-like logits: ellipses with radii of 2 % to 2 % + ``radius``
    of the side, positive inside."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    c = torch.rand(n, 2, generator=g) * size
    r = (0.02 + torch.rand(n, 2, generator=g) * radius) * size
    dy = (yy[None] - c[:, 0, None, None]) / r[:, 0, None, None]
    dx = (xx[None] - c[:, 1, None, None]) / r[:, 1, None, None]
    return 4 * (1 - dy**2 - dx**2)


def speckles(n: int, seed: int, size: int = LOW) -> torch.Tensor:
    """(n, size, size) frame-filling speckled logits, like SAM2's with random weights."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, size // 8, size // 8, generator=g)
    up = F.interpolate(base, size=(size, size), mode="bilinear")[:, 0]
    return up + 0.3 * torch.randn(n, size, size, generator=g)


def borders(size: int = LOW) -> torch.Tensor:
    """(4, size, size): a band along each edge of the input square, and a corner."""
    x = torch.full((4, size, size), -3.0)
    x[0, :6, :] = 2.0  # top rows
    x[1, :, -5:] = 2.0  # right columns
    x[2, -3:, 40:200] = 2.0  # bottom rows
    x[3, :30, :30] = 2.0  # top-left corner
    return x


def _proposals(logits: torch.Tensor, hw: tuple[int, int], resize: str) -> Proposals:
    n = logits.shape[0]
    iou = 0.4 + 0.6 * torch.rand(n, generator=torch.Generator().manual_seed(n))
    s = 4 * logits.shape[-1]
    valid = (s, s) if resize == "square" else longest_side_hw(hw, s)
    return Proposals(logits, iou, torch.zeros(n, 2), s, valid, hw)


def _pooled(bank: MemoryBank, logits: torch.Tensor) -> torch.Tensor:
    k = int((logits > 0).flatten(1).any(dim=1).sum())
    g = torch.Generator().manual_seed(k)
    protos = bank.class_prototypes()[torch.arange(k) % CLASSES]
    return 3 * protos + torch.randn(k, DIM, generator=g)


@pytest.fixture(autouse=True)
def _windows_always(monkeypatch):
    """The equality tests run the windowed path at every size: no dense route for small
    images of frame-filling masks (``matching.dense_is_cheaper``, tested on its own)."""
    monkeypatch.setattr(matching, "DENSE_MAX_PIXELS", 0)


def test_small_images_of_frame_filling_masks_take_the_dense_path(monkeypatch):
    bank = _bank()
    matcher = PooledMatcher(bank, MethodConfig(nms_iou=1.0))
    taken = []
    dense = matcher._finish_dense
    monkeypatch.setattr(matcher, "_finish_dense", lambda sv: taken.append(1) or dense(sv))
    for kind, logits, budget, route in [
        ("speckled, small", speckles(12, 1), 2**28, [1]),
        ("object-like, small", ellipses(12, 1), 2**28, []),
        ("speckled, over the budget", speckles(12, 1), 12 * 300 * 410 - 1, []),
    ]:
        taken.clear()
        hw = (300, 410)
        monkeypatch.setattr(matching, "DENSE_MAX_PIXELS", budget)
        props, pooled = _proposals(logits, hw, "square"), _pooled(bank, logits)
        got = matcher.match_pooled(props, pooled)
        assert taken == route, kind
        assert got.masks is None and len(got.rles) == len(got) > 0
    windows = [Window(0, 10, 0, 10), None]
    assert matching.dense_is_cheaper(windows, (10, 10))  # 100 of 200 pixels: half
    assert not matching.dense_is_cheaper([Window(0, 9, 0, 10), None], (10, 10))
    monkeypatch.setattr(matching, "DENSE_MAX_PIXELS", 199)
    assert not matching.dense_is_cheaper(windows, (10, 10))


def assert_same(dense, windowed) -> None:
    """Same instances in the same order, bit-identical masks, scores within 1e-6."""
    assert windowed.masks is None and windowed.rles is not None
    assert len(windowed) == len(dense) > 0
    np.testing.assert_array_equal(windowed.category_ids, dense.category_ids)
    np.testing.assert_allclose(windowed.scores, dense.scores, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(windowed.proposal_iou, dense.proposal_iou)
    np.testing.assert_array_equal(windowed.boxes, dense.boxes)
    for k, r in enumerate(windowed.rles):
        assert np.array_equal(rle_ops.decode_rle(r), dense.masks[k]), f"mask {k} differs"
    # the RLE strings are pycocotools' own for the same masks
    assert [r["counts"] for r in windowed.rles] == [
        r["counts"] for r in rle_ops.encode_masks(dense.masks)
    ]


SIZES = [(37, 53), (200, 300), (480, 640), (97, 4500), (4200, 150)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("resize", ["square", "longest-side"])
@pytest.mark.parametrize("merge", ["full", "lowres"])
def test_windowed_matching_equals_dense(hw, resize, merge):
    box = "ntt" if (hw[0] + (merge == "full")) % 2 else "standard"  # both conventions
    bank = _bank()
    seed = hw[0] + hw[1]
    logits = torch.cat([ellipses(14, seed), speckles(6, seed), borders()])
    method = MethodConfig(merge_resolution=merge, box_convention=box, nms_iou=0.9, resize=resize)
    matcher = PooledMatcher(bank, method)
    props, pooled = _proposals(logits, hw, resize), _pooled(bank, logits)
    dense = matcher._match_pooled_dense(props, pooled)
    got = matcher.match_pooled(props, pooled)
    assert_same(dense, got)
    if merge == "full":  # the soft merge did change scores: a real comparison of IoS
        plain = PooledMatcher(bank, MethodConfig(soft_merge=False, nms_iou=0.9, resize=resize))
        unmerged = plain.match_pooled(props, pooled)
        assert not np.array_equal(np.sort(unmerged.scores), np.sort(got.scores))


@pytest.mark.parametrize("box", ["ntt", "standard"])
def test_frame_filling_masks_touching_every_border(box):
    """Speckled masks fill the frame: windows are the whole image; bands split the merge."""
    bank = _bank()
    logits = torch.cat([speckles(10, 3), borders()])
    method = MethodConfig(nms_iou=1.0, box_convention=box)
    matcher = PooledMatcher(bank, method)
    props, pooled = _proposals(logits, (300, 410), "square"), _pooled(bank, logits)
    dense = matcher._match_pooled_dense(props, pooled)
    got = matcher.match_pooled(props, pooled)
    assert_same(dense, got)
    edges = np.stack([rle_ops.decode_rle(r) for r in got.rles])
    assert edges[:, 0].any() and edges[:, -1].any() and edges[:, :, 0].any()


def test_small_bands_give_the_same_scores(monkeypatch):
    """A merge budget of a few rows forces many bands: counts stay exact."""
    bank = _bank()
    logits = torch.cat([ellipses(20, 5), speckles(4, 5)])
    matcher = PooledMatcher(bank, MethodConfig(nms_iou=1.0))
    props, pooled = _proposals(logits, (333, 517), "square"), _pooled(bank, logits)
    dense = matcher._match_pooled_dense(props, pooled)
    monkeypatch.setattr(matching, "window_overlaps", _tight(matching.window_overlaps))
    got = matcher.match_pooled(props, pooled)
    assert_same(dense, got)
    np.testing.assert_array_equal(got.scores, dense.scores)  # bit for bit, in fact


def _tight(fn):
    def wrapped(*args, **kwargs):
        kwargs["budget"] = 20 * 517 * 3  # 3 rows of 20 masks per band
        return fn(*args, **kwargs)

    return wrapped


def test_no_whole_image_upsampling_on_the_windowed_path(monkeypatch):
    """The windowed path never builds a whole-image float map per mask (K x H x W)."""

    def refuse(*args, **kwargs):
        raise AssertionError("lowres_to_original called: whole-image masks")

    monkeypatch.setattr(matching, "lowres_to_original", refuse)
    bank = _bank()
    logits = ellipses(40, 9, radius=0.03)
    matcher = PooledMatcher(bank, MethodConfig(nms_iou=1.0))
    props, pooled = _proposals(logits, (6000, 8000), "square"), _pooled(bank, logits)
    got = matcher.match_pooled(props, pooled)  # dense: 40 x 48 MP
    assert len(got) > 10 and got.rles[0]["size"] == [6000, 8000]
    area = rle_ops.rle_area(got.rles)
    assert (area > 0).all() and (area < 0.01 * 48e6).all()


# ------------------------------------------------------------------ fullres, window by window

CASES = [
    ResizeInfo((1100, 1500), 1024, "square", (1024, 1024)),
    ResizeInfo((200, 5000), 1024, "square", (1024, 1024)),  # shrinks vertically
    ResizeInfo((37, 53), 1024, "square", (1024, 1024)),  # shrinks both ways
    ResizeInfo((256, 256), 1024, "square", (1024, 1024)),  # the low-res size itself
    ResizeInfo((1100, 1500), 1024, "longest-side", (751, 1024)),
    ResizeInfo((4097, 300), 1024, "longest-side", (1024, 75)),
]


@pytest.mark.parametrize("info", CASES, ids=lambda i: f"{i.mode}-{i.orig_hw}")
@pytest.mark.parametrize("threshold", [0.0, 0.7, -0.5])
def test_window_masks_equal_the_whole_image(info, threshold, monkeypatch):
    x = torch.cat([ellipses(3, 1), speckles(2, 1)])
    x[0] = -5.0
    x[0, 100:140, 30:90] = torch.randn(40, 60)  # a small noisy blob
    ref = lowres_to_original_mask(x, info, threshold)
    fr = FullResolution(info, (LOW, LOW), threshold=threshold)
    for k, win in enumerate(fr.windows(x)):
        full = torch.zeros_like(ref[k])
        if win is not None:
            full[win.y0 : win.y1, win.x0 : win.x1] = fr.mask(x[k], win)
            if fr.square and fr._two_tap:  # every vertical route, forced
                kernel = fr._kernel_mask(x[k], win)
                for share in (0.0, 2.0):  # every pixel in float64; or the sure-sign test
                    monkeypatch.setattr(fullres, "UNSURE_SHARE", share)
                    assert torch.equal(fr._emulated_mask(x[k], win), kernel)
        assert torch.equal(full, ref[k]), f"mask {k}, window {win}"


def lowres_to_original_mask(x: torch.Tensor, info: ResizeInfo, threshold: float) -> torch.Tensor:
    from refseg.core.tensors import lowres_to_original

    return lowres_to_original(x, info) > threshold


def test_values_inside_a_window_are_bit_identical():
    info = ResizeInfo((1100, 1500), 1024, "square", (1024, 1024))
    x = speckles(2, 4)
    from refseg.core.tensors import lowres_to_original

    ref = lowres_to_original(x, info)
    fr = FullResolution(info, (LOW, LOW))
    win = Window(333, 1001, 17, 1499)
    for k in range(2):
        assert torch.equal(fr.values(x[k], win), ref[k, 333:1001, 17:1499])


def test_this_cpu_reproduces_torchs_resize():
    variant, exact = exactness(torch.device("cpu"))
    assert exact and variant in ("fma", "plain")


def _round_f32(x: Fraction) -> float:
    """The float32 nearest to ``x``, ties to even, by exact comparison."""
    f = np.float32(float(x))
    best = None
    for c in (np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))):
        key = (abs(Fraction(float(c)) - x), int(np.float32(c).view(np.int32)) & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return float(best[1])


def test_exact_fma_rounds_once():
    one = 1 + 2.0**-23
    # a * b + c lands 2**-70 below a float32 midpoint: a float64 sum rounds onto the
    # midpoint, and rounding that to float32 would go up (to even); once-rounded goes down
    a = torch.tensor([one], dtype=torch.float32)
    b = torch.tensor([2.0**-24 * (1 - 2.0**-23)], dtype=torch.float32)
    c = torch.tensor([one], dtype=torch.float32)
    twice = ((a.double() * b.double()) + c.double()).float()
    assert float(twice[0]) == 1 + 2.0**-22  # the double rounding this guards against
    assert float(exact_fma(a, b, c)[0]) == one
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, generator=g) * 10
    b = torch.rand(500, generator=g)
    c = -a * b * (1 + 1e-7 * torch.randn(500, generator=g))  # near cancellation
    got = exact_fma(a, b, c)
    for i in range(500):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert float(got[i]) == _round_f32(exact)


# ------------------------------------------------------------------ RLE and boxes of windows


@pytest.mark.parametrize(
    ("hw", "win"),
    [
        ((40, 30), Window(0, 40, 0, 30)),  # the whole image
        ((40, 30), Window(0, 40, 5, 12)),  # full height: runs join across columns
        ((40, 30), Window(3, 17, 0, 4)),
        ((40, 30), Window(35, 40, 25, 30)),  # the last pixel
        ((1, 50), Window(0, 1, 10, 50)),
    ],
)
@pytest.mark.parametrize("fill", ["random", "ones", "zeros"])
def test_encode_window_is_pycocotools_encoding(hw, win, fill):
    rng = np.random.default_rng(hash((hw, win, fill)) % 2**32)
    crop = {
        "random": rng.random(win.shape) < 0.5,
        "ones": np.ones(win.shape, bool),
        "zeros": np.zeros(win.shape, bool),
    }[fill]
    full = np.zeros(hw, bool)
    full[win.y0 : win.y1, win.x0 : win.x1] = crop
    got = rle_ops.encode_window(crop, win.y0, win.x0, hw)
    assert got == rle_ops.encode_masks(full[None])[0]
    assert got == rle_ops.encode_window(crop.T.copy(), win.y0, win.x0, hw, columns=True)
    for inclusive in (True, False):
        box = ops.box_of_window(crop, win.y0, win.x0, inclusive=inclusive)
        want = ops.masks_to_boxes(torch.from_numpy(full[None]), inclusive=inclusive)[0]
        np.testing.assert_array_equal(box, want.numpy())


def test_encode_window_refuses_a_window_outside_the_image():
    with pytest.raises(ValueError, match="outside"):
        rle_ops.encode_window(np.ones((3, 3), bool), 9, 0, (10, 10))


def test_exact_sums_in_overlap_counts():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand((7, 5000), generator=g) > 0.5
    inter, area = ops.overlap_counts(masks)
    m = masks.double()
    assert torch.equal(inter, m @ m.T) and torch.equal(area, m.sum(1))
    assert math.isclose(float(area.sum()), float(masks.sum()))
