"""Inpainting and super-resolution: exact pseudo-inverses, seeded masks, agreement with torch's resize."""
import math

import pytest
import torch
import torch.nn.functional as F

from invdiff.operators.inpainting import Inpainting, box_mask, random_pixel_mask, stroke_mask
from invdiff.operators.superres import SuperResolution, decimation_matrix, downsampling_taps

F64 = torch.float64


def _randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dense(op, dtype=F64):
    """The operator as a matrix, column j = A e_j (tiny sizes only)."""
    n = math.prod(op.in_shape)
    basis = torch.eye(n, dtype=dtype).reshape(n, *op.in_shape)
    return op.A(basis).reshape(n, -1).T


# ---- inpainting ------------------------------------------------------------------------------------------

def test_inpainting_writes_exact_positive_zeros():
    """y = M x with unobserved entries +0.0: no -0.0 from negative pixels, no NaN from unobserved NaN."""
    mask = box_mask((6, 6), (1, 1, 3, 3))
    x = -torch.ones(1, 2, 6, 6, dtype=F64)
    x[..., 2, 2] = float("nan")
    y = Inpainting(mask, channels=2).A(x)
    hidden = ~mask.expand_as(y)
    assert torch.equal(y[hidden], torch.zeros(int(hidden.sum()), dtype=F64))
    assert not torch.signbit(y[hidden]).any()
    assert torch.equal(y[~hidden], x[~hidden])


def test_inpainting_pinv_satisfies_moore_penrose():
    """A^+ = A^T = M and the four Penrose conditions: A A^+ A = A, A^+ A A^+ = A^+, (A A^+)^T = A A^+."""
    op = Inpainting(random_pixel_mask((5, 4), 0.5, generator=3), channels=2)
    matrix = _dense(op)
    pinv = _dense_pinv(op)
    assert torch.equal(pinv, matrix.T)
    assert torch.allclose(matrix @ pinv @ matrix, matrix)
    assert torch.allclose(pinv @ matrix @ pinv, pinv)
    assert torch.allclose(matrix @ pinv, (matrix @ pinv).T)
    assert torch.allclose(pinv, torch.linalg.pinv(matrix))


def _dense_pinv(op):
    n_out = op.A(torch.zeros(1, *op.in_shape, dtype=F64)).numel()
    out_shape = op.A(torch.zeros(1, *op.in_shape, dtype=F64)).shape[1:]
    basis = torch.eye(n_out, dtype=F64).reshape(n_out, *out_shape)
    return op.A_dagger(basis).reshape(n_out, -1).T


def test_inpainting_mask_broadcasts_over_channels_and_per_channel_masks_work():
    mask2d = random_pixel_mask((4, 5), 0.5, generator=1)
    x = _randn((2, 3, 4, 5), 0)
    assert torch.equal(Inpainting(mask2d).A(x), torch.where(mask2d, x, 0.0))
    per_channel = torch.stack([mask2d, ~mask2d, mask2d])[None]           # (1, 3, H, W)
    op = Inpainting(per_channel)
    assert op.in_shape == (3, 4, 5)
    assert torch.equal(op.A(x)[:, 1], torch.where(~mask2d, x[:, 1], 0.0))


def test_random_pixel_mask_has_requested_fraction_and_is_seeded():
    """Exactly round(f H W) observed pixels; same seed (int or Generator) -> same mask; global RNG untouched."""
    state = torch.get_rng_state()
    for fraction in (0.0, 0.1, 0.37, 1.0):
        mask = random_pixel_mask((20, 30), fraction, generator=7)
        assert mask.dtype == torch.bool and mask.shape == (20, 30)
        assert int(mask.sum()) == round(fraction * 600)
    same = random_pixel_mask((20, 30), 0.37, generator=torch.Generator().manual_seed(7))
    assert torch.equal(same, random_pixel_mask((20, 30), 0.37, generator=7))
    assert not torch.equal(same, random_pixel_mask((20, 30), 0.37, generator=8))
    assert torch.equal(torch.get_rng_state(), state)


def test_box_mask_centred_and_explicit():
    centred = box_mask((8, 10), fraction=0.5)                           # 4 x 5 hole at rows 2..5, cols 2..6
    expected = torch.ones(8, 10, dtype=torch.bool)
    expected[2:6, 2:7] = False
    assert torch.equal(centred, expected)
    explicit = box_mask((8, 10), (0, 7, 8, 3))
    assert int((~explicit).sum()) == 24 and not explicit[:, 7:].any() and explicit[:, :7].all()


def test_stroke_masks_are_seeded_nonempty_partial():
    state = torch.get_rng_state()
    masks = [stroke_mask((48, 40), seed) for seed in range(12)]
    for mask in masks:
        assert mask.dtype == torch.bool and mask.shape == (48, 40)
        missing = 1 - mask.double().mean()
        assert 0 < missing < 1, f"missing fraction {missing}"
    assert torch.equal(masks[3], stroke_mask((48, 40), torch.Generator().manual_seed(3)))
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)
    assert torch.equal(torch.get_rng_state(), state)


def test_stroke_width_and_count_follow_arguments():
    """A single one-segment stroke of fixed width w covers between a disc of area pi w^2/4 and the whole
    capsule bound (w x (length + w)); wider brushes never cover fewer pixels for the same walk."""
    common = dict(num_strokes=(1, 1), num_vertices=(1, 1), max_segment=0.5)
    thin = ~stroke_mask((64, 64), 5, width=(0.1, 0.1), **common)
    thick = ~stroke_mask((64, 64), 5, width=(0.2, 0.2), **common)
    w, max_length = 0.1 * 64, 0.5 * 64
    assert math.pi * w * w / 4 * 0.8 <= int(thin.sum()) <= w * (max_length + w) * 1.2
    assert (thick | thin).equal(thick)      # the same walk with a wider brush contains the thin stroke


@pytest.mark.parametrize("call, argument", [
    (lambda: Inpainting(torch.ones(4, 4)), "mask"),
    (lambda: Inpainting(torch.ones(2, 4, 4, dtype=torch.bool)), "mask"),
    (lambda: Inpainting(torch.ones(1, 2, 4, 4, dtype=torch.bool), channels=3), "channels"),
    (lambda: Inpainting(torch.ones(4, 4, dtype=torch.bool), channels=0), "channels"),
    (lambda: random_pixel_mask((4, 4), 1.5, generator=0), "fraction_observed"),
    (lambda: random_pixel_mask((4, 4), 0.5, generator="seed"), "generator"),
    (lambda: random_pixel_mask((4,), 0.5, generator=0), "shape"),
    (lambda: box_mask((4, 4), (2, 2, 3, 1)), "box"),
    (lambda: box_mask((4, 4), fraction=2.0), "fraction"),
    (lambda: stroke_mask((8, 8), 0, num_strokes=(0, 2)), "num_strokes"),
    (lambda: stroke_mask((8, 8), 0, width=(0.2, 0.1)), "width"),
])
def test_inpainting_bad_arguments_are_named(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# ---- super-resolution ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 4])
def test_box_is_average_pooling_with_pinv_f2_adjoint(factor):
    """box: A = average pooling, A A^T = I / f^2, A^+ = f^2 A^T, ||A|| = 1/f."""
    op = SuperResolution((8, 12), factor, "box", channels=2)
    x = _randn((2, 2, 8, 12), 0)
    assert torch.allclose(op.A(x), F.avg_pool2d(x, factor), atol=1e-15)
    y = _randn((2, 2, 8 // factor, 12 // factor), 1)
    assert torch.allclose(op.A(op.A_adjoint(y)), y / factor ** 2, atol=1e-15)
    assert torch.equal(op.A_dagger(y), factor ** 2 * op.A_adjoint(y))
    assert op.spectral_norm() == pytest.approx(1 / factor, abs=1e-15)


@pytest.mark.parametrize("kernel", ["box", "bicubic"])
@pytest.mark.parametrize("factor", [2, 4])
def test_pinv_equals_dense_moore_penrose(kernel, factor):
    """A_dagger (FFT on the low-resolution grid) equals torch.linalg.pinv of the dense matrix of A."""
    op = SuperResolution((8, 12), factor, kernel, channels=1)
    matrix = _dense(op)
    assert torch.allclose(_dense_pinv(op), torch.linalg.pinv(matrix), atol=1e-12)


@pytest.mark.parametrize("factor", [2, 4])
def test_spectral_norm_is_max_of_aliased_kernel_spectrum(factor):
    """||A||^2 = prod over axes of max_k (1/f) sum_j |h_hat(k + j N/f)|^2 (decimated |H|^2), and <= 1."""
    op = SuperResolution((16, 24), factor, "bicubic")
    per_axis = []
    for n in op.size:
        taps, first = downsampling_taps(factor, "bicubic")
        row = torch.zeros(n, dtype=F64)
        row.index_add_(0, (first + torch.arange(len(taps))) % n, taps)     # y[0] = sum_m h[m] x[m]
        power = torch.fft.fft(row).abs() ** 2
        per_axis.append(float(power.reshape(factor, n // factor).sum(0).max() / factor))
    assert op.spectral_norm() ** 2 == pytest.approx(per_axis[0] * per_axis[1], rel=1e-12)
    assert op.spectral_norm() == pytest.approx(torch.linalg.matrix_norm(_dense(SuperResolution(
        (8, 12), factor, "bicubic")), ord=2).item(), rel=1e-12)
    assert op.spectral_norm() <= 1


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
@pytest.mark.parametrize("factor", [2, 4])
def test_bicubic_matches_torch_antialias_away_from_border(factor, dtype, tolerance):
    """Same kernel as F.interpolate(bicubic, antialias=True): equal where no tap crosses the border;
    different near it (periodic wrap here, truncation and renormalisation in torch)."""
    n = 64
    t = torch.arange(n, dtype=dtype) / n
    smooth = (torch.sin(2 * math.pi * 3 * t)[:, None] * torch.cos(2 * math.pi * 5 * t)[None, :]
              + torch.exp(-((t[:, None] - 0.4) ** 2 + (t[None, :] - 0.7) ** 2) / 0.02))[None, None]
    ours = SuperResolution(n, factor, "bicubic").to(dtype).A(smooth)
    reference = F.interpolate(smooth, scale_factor=1 / factor, mode="bicubic", antialias=True)
    border = 2  # low-resolution pixels whose 4f taps reach past the image edge
    interior = (ours - reference)[..., border:-border, border:-border]
    assert interior.abs().max() < tolerance
    assert (ours - reference).abs().max() > 1e-3


def test_boundary_is_periodic():
    """Periodic model: shifting x by f pixels (circularly) shifts y by one pixel."""
    op = SuperResolution((16, 16), 2, "bicubic")
    x = _randn((1, 1, 16, 16), 2)
    assert torch.allclose(op.A(torch.roll(x, (2, -2), (-2, -1))), torch.roll(op.A(x), (1, -1), (-2, -1)))


def test_decimation_matrix_rows_sum_to_one():
    """Normalised kernels preserve constants: A 1 = 1."""
    for kernel in ("box", "bicubic"):
        for factor in (2, 4):
            assert torch.allclose(decimation_matrix(16, factor, kernel).sum(1), torch.ones(16 // factor, dtype=F64))


@pytest.mark.parametrize("kwargs, argument", [
    (dict(img_size=16, factor=3), "factor"),
    (dict(img_size=16, factor=2, kernel="lanczos"), "kernel"),
    (dict(img_size=(16, 18), factor=4), "divisible"),
    (dict(img_size=(4, 4, 4, 4), factor=2), "img_size"),
    (dict(img_size=16, factor=2, channels=0), "channels"),
])
def test_super_resolution_bad_arguments_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SuperResolution(**kwargs)
