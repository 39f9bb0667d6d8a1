"""Cartesian MRI operators and the centred FFT (``invdiff.operators.fft`` / ``invdiff.operators.mri``).

Math checked:
* ``fft2c`` is the centred unitary DFT ``P_f W P_i`` (W the DFT matrix / sqrt(n), P the fft/ifft shifts),
  equal to deepinv's MRI transform; ``ifft2c`` is its inverse and adjoint.
* ``CartesianMRI``: ``y = M F x`` equals deepinv ``MRI`` and a dense ``diag(m) (F_H kron F_W)`` matrix;
  unsampled entries are exactly +0.0; ``A^+ = A^H`` and ``A A^H = M``.
* ``SenseMRI``: ``<A x, y> = <x, A^H y>`` with random complex maps; equals deepinv ``MultiCoilMRI``; one
  coil with ``S = 1`` is ``CartesianMRI``; ``op.normalized`` iff ``max sum_c |S_c|^2 <= 1``.
"""
import numpy as np
import pytest
import torch

import invdiff
from invdiff.operators.fft import complex_dtype, complex_to_real, fft2c, ifft2c, real_to_complex
from invdiff.operators.masks import make_mask
from invdiff.operators.mri import CartesianMRI, SenseMRI


def _randn(shape, dtype=torch.float64, seed=0):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _complex_randn(shape, dtype=torch.complex128, seed=0):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def _adjoint_error(op, x, y):
    """|<A x, y> - <x, A^H y>| / (|A x| |y|) for real tensors."""
    ax = op.A(x)
    return float(((ax * y).sum() - (x * op.A_adjoint(y)).sum()).abs() / (ax.norm() * y.norm()))


def _centred_dft_matrix(n):
    """Dense matrix of ``fftshift o fft(norm="ortho") o ifftshift`` in 1-D, built from index formulas."""
    j = np.arange(n)
    dft = np.exp(-2j * np.pi * np.outer(j, j) / n) / np.sqrt(n)
    ifftshift = np.zeros((n, n))
    ifftshift[j, (j + n // 2) % n] = 1   # (ifftshift x)[j] = x[(j + n//2) mod n]
    fftshift = np.zeros((n, n))
    fftshift[j, (j - n // 2) % n] = 1    # (fftshift k)[j] = k[(j - n//2) mod n]
    return fftshift @ dft @ ifftshift


# ---- FFT and channel conversion ----------------------------------------------------------------------

# odd sizes take the shifted form; even ones the checkerboard modulation, with global sign -1 (6, 4) and +1 (4, 8)
@pytest.mark.parametrize("shape", [(5, 4), (6, 7), (6, 4), (4, 8)])
def test_fft2c_is_the_centred_unitary_dft(shape):
    image = _complex_randn((2, *shape))
    dense = np.kron(_centred_dft_matrix(shape[0]), _centred_dft_matrix(shape[1]))  # row-major vec
    expected = (dense @ image.reshape(2, -1).numpy().T).T.reshape(2, *shape)
    np.testing.assert_allclose(fft2c(image).numpy(), expected, atol=1e-12)
    assert torch.allclose(ifft2c(fft2c(image)), image, atol=1e-12)
    assert torch.allclose(fft2c(image).norm(), image.norm())  # Parseval: unitary


def test_fft2c_equals_deepinv_mri_transform():
    from deepinv.utils.mixins import MRIMixin
    image = _complex_randn((3, 9, 6))
    assert torch.allclose(fft2c(image), MRIMixin.fft(image), atol=1e-12)
    assert torch.allclose(ifft2c(image), MRIMixin.ifft(image), atol=1e-12)


@pytest.mark.parametrize("real,cplx", [(torch.float32, torch.complex64), (torch.float64, torch.complex128)])
def test_real_complex_conversion_keeps_precision(real, cplx):
    x = _randn((2, 2, 3, 4), real)
    z = real_to_complex(x)
    assert z.dtype == cplx and z.shape == (2, 3, 4) and complex_dtype(real) == cplx
    assert torch.equal(z.real, x[:, 0]) and torch.equal(z.imag, x[:, 1])
    back = complex_to_real(z)
    assert back.dtype == real and torch.equal(back, x)


def test_conversion_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="x must be"):
        real_to_complex(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="float16"):
        real_to_complex(torch.zeros(2, 2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="complex"):
        fft2c(torch.zeros(4, 4))


# ---- CartesianMRI ------------------------------------------------------------------------------------

def test_cartesian_equals_deepinv_mri():
    from deepinv.physics import MRI
    height, width = 16, 12
    mask = make_mask("random", (height, width), 4, 0.08, seed="file1000001.h5")
    op = CartesianMRI(mask, img_size=(height, width))
    reference = MRI(mask=mask.float().expand(height, width).clone(), img_size=(height, width))
    x = _randn((2, 2, height, width), torch.float32, seed=1)
    assert torch.allclose(op.A(x), reference.A(x), atol=1e-6)
    y = op.A(x)
    assert torch.allclose(op.A_adjoint(y), reference.A_adjoint(y), atol=1e-6)


def test_cartesian_equals_dense_matrix():
    """y = diag(vec M) (F_H kron F_W) vec(x) on a 5 x 4 image with a 2-D mask."""
    height, width = 5, 4
    mask = _randn((height, width), seed=2) > 0
    op = CartesianMRI(mask).to(torch.float64)
    dense = np.diag(mask.reshape(-1).numpy()) @ np.kron(_centred_dft_matrix(height), _centred_dft_matrix(width))
    x = _randn((1, 2, height, width), seed=3)
    z = x[0, 0].numpy() + 1j * x[0, 1].numpy()
    expected = (dense @ z.reshape(-1)).reshape(height, width)
    y = op.A(x)[0]
    np.testing.assert_allclose(y[0].numpy() + 1j * y[1].numpy(), expected, atol=1e-12)
    w = _randn((1, 2, height, width), seed=4)
    back = op.A_adjoint(w)[0]
    expected_back = (dense.conj().T @ (w[0, 0].numpy() + 1j * w[0, 1].numpy()).reshape(-1)).reshape(height, width)
    np.testing.assert_allclose(back[0].numpy() + 1j * back[1].numpy(), expected_back, atol=1e-12)


@pytest.mark.parametrize("op_builder", ["cartesian", "sense"])
def test_unsampled_entries_are_exactly_positive_zero(op_builder):
    height, width = 16, 12
    mask = make_mask("equispaced", (height, width), 4, 0.08, seed=0)
    if op_builder == "cartesian":
        op = CartesianMRI(mask, img_size=(height, width))
    else:
        op = SenseMRI(mask, _complex_randn((1, 3, height, width), torch.complex64, seed=5))
    x = _randn((2, 2, height, width), torch.float32, seed=6)
    y = op.A(x)
    unsampled = y[..., ~mask]
    assert unsampled.numel() > 0
    assert (unsampled == 0).all() and not torch.signbit(unsampled).any(), "unsampled k-space holds -0.0"
    assert (y[..., mask] < 0).any()  # negative values exist, so a multiply would have left -0.0


def test_cartesian_algebra_projection_and_pinv():
    """A A^H = M (a projection): A^+ = A^H, normal = F^H M F, ||A|| = 1."""
    op = invdiff.example_operator("cartesian_mri").to(torch.float64)
    x = _randn((2, *op.in_shape), seed=7)
    y = op.A(x)
    assert torch.allclose(op.A(op.A_adjoint(y)), y, atol=1e-12)
    assert torch.allclose(op.A_dagger(y), op.A_adjoint(y))
    assert torch.allclose(op.zero_filled(y), op.A_adjoint(y))
    assert torch.allclose(op.A_adjoint_A(x), op.A_adjoint(op.A(x)), atol=1e-12)
    assert op.normalized and op.has_exact_pinv


@pytest.mark.parametrize("mask_shape", ["columns", "2d"])
def test_per_batch_masks_equal_single_operators(mask_shape):
    height, width, batch = 16, 12, 3
    columns = [make_mask("random", (height, width), 2, 0.25, seed=f"file{i}.h5") for i in range(batch)]
    if mask_shape == "columns":
        singles = columns
        batched_mask = torch.stack(columns)[:, None, :]                     # (B, 1, W)
    else:
        singles = [make_mask("poisson", (height, width), 2, 0.25, seed=i) for i in range(batch)]
        batched_mask = torch.stack(singles)                                 # (B, H, W)
    op = CartesianMRI(batched_mask, img_size=(height, width)).to(torch.float64)
    x = _randn((batch, 2, height, width), seed=8)
    for i, single in enumerate(singles):
        single_op = CartesianMRI(single, img_size=(height, width)).to(torch.float64)
        assert torch.equal(op.A(x)[i], single_op.A(x[i:i + 1])[0])
        assert torch.equal(op.A_adjoint(x)[i], single_op.A_adjoint(x[i:i + 1])[0])
    with pytest.raises(ValueError, match="mask"):
        op.A(x[:2])


def test_shared_batch_mask_broadcasts():
    height, width = 16, 12
    column = make_mask("random", (height, width), 2, 0.25, seed=1)
    op_1d = CartesianMRI(column, img_size=(height, width))
    op_b1 = CartesianMRI(column[None, None, :], img_size=(height, width))
    op_2d = CartesianMRI(column.expand(height, width).clone())
    x = _randn((4, 2, height, width), torch.float32, seed=9)
    assert torch.equal(op_1d.A(x), op_b1.A(x)) and torch.equal(op_1d.A(x), op_2d.A(x))


@pytest.mark.parametrize("mask,img_size", [
    (torch.ones(11, dtype=torch.bool), (16, 12)),
    (torch.ones(16, 11, dtype=torch.bool), (16, 12)),
    (torch.ones(12, 16, dtype=torch.bool), (16, 12)),
    (torch.ones(2, 5, 12, dtype=torch.bool), (16, 12)),
    (torch.ones(1, 1, 16, 12, dtype=torch.bool), (16, 12)),
])
def test_mask_not_matching_image_names_mask_and_both_shapes(mask, img_size):
    with pytest.raises(ValueError, match="mask") as info:
        CartesianMRI(mask, img_size=img_size)
    assert str(tuple(mask.shape)) in str(info.value) and str(img_size) in str(info.value)


def test_cartesian_bad_arguments():
    with pytest.raises(ValueError, match="img_size"):
        CartesianMRI(torch.ones(12, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        CartesianMRI(torch.full((12,), 0.5), img_size=(16, 12))
    op = CartesianMRI(torch.ones(12, dtype=torch.bool), img_size=(16, 12))
    with pytest.raises(ValueError, match="x must have shape"):
        op.A(torch.zeros(1, 2, 12, 16))
    with pytest.raises(ValueError, match="y must have shape"):
        op.A_adjoint(torch.zeros(1, 1, 16, 12))
    assert torch.equal(CartesianMRI(torch.ones(12), img_size=(16, 12)).mask, torch.ones(12, dtype=torch.bool))


def test_replace_mask_keeps_original():
    op = invdiff.example_operator("cartesian_mri")
    more = op.replace(mask=op.mask | torch.ones_like(op.mask))
    x = _randn((1, *op.in_shape), torch.float32, seed=10)
    assert not op.mask.all() and more.mask.all()
    assert torch.allclose(more.A_adjoint(more.A(x)), x, atol=1e-5)  # full sampling: A^H A = I
    assert not torch.allclose(op.A_adjoint(op.A(x)), x, atol=1e-3)


# ---- SenseMRI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("maps_batch,mask_kind", [(1, "column"), (2, "column"), (2, "per_batch_2d")])
def test_sense_adjointness_with_random_complex_maps(dtype, bound, maps_batch, mask_kind):
    height, width, coils = 16, 12, 5
    maps = _complex_randn((maps_batch, coils, height, width), torch.complex64, seed=11)
    if mask_kind == "column":
        mask = make_mask("random", (height, width), 3, 0.1, seed="file1.h5")
    else:
        mask = torch.stack([make_mask("poisson", (height, width), 2, 0.25, seed=i) for i in range(2)])
    op = SenseMRI(mask, maps).to(dtype)
    assert not op.normalized  # random maps carry sum_c |S_c|^2 ~ 2 C
    for seed in range(3):
        x = _randn((2, 2, height, width), dtype, seed=20 + seed)
        y = _randn((2, 2, coils, height, width), dtype, seed=30 + seed)
        assert _adjoint_error(op, x, y) < bound


@pytest.mark.parametrize("height,width", [(16, 12), (14, 12), (15, 12), (16, 9)])
def test_sense_normal_equals_adjoint_of_forward(height, width):
    """The fused ``normal`` (checkerboard in the maps on even sizes, the plain path on odd ones) is A^H A."""
    maps = _complex_randn((2, 3, height, width), torch.complex128, seed=14)
    mask = torch.stack([make_mask("poisson", (height, width), 2, 0.25, seed=i) for i in range(2)])
    op = SenseMRI(mask, maps)
    x = _randn((2, 2, height, width), torch.float64, seed=15)
    assert torch.allclose(op.A_adjoint_A(x), op.A_adjoint(op.A(x)), atol=1e-12)


def test_sense_equals_deepinv_multicoil_mri():
    from deepinv.physics import MultiCoilMRI
    height, width, coils = 16, 12, 4
    mask = make_mask("random", (height, width), 4, 0.08, seed="file1000001.h5")
    maps = _complex_randn((1, coils, height, width), torch.complex64, seed=12)
    op = SenseMRI(mask, maps)
    reference = MultiCoilMRI(mask=mask.float().expand(height, width).clone(), coil_maps=maps,
                             img_size=(height, width))
    x = _randn((2, 2, height, width), torch.float32, seed=13)
    y = op.A(x)
    assert y.shape == (2, 2, coils, height, width)
    assert torch.allclose(y, reference.A(x), atol=1e-5)
    assert torch.allclose(op.A_adjoint(y), reference.A_adjoint(y), atol=1e-5)


def test_sense_with_one_unit_coil_is_cartesian():
    height, width = 16, 12
    mask = make_mask("equispaced_fraction", (height, width), 2, 0.25, seed=3)
    sense = SenseMRI(mask, torch.ones(1, 1, height, width, dtype=torch.complex64))
    cartesian = CartesianMRI(mask, img_size=(height, width))
    x = _randn((2, 2, height, width), torch.float32, seed=14)
    assert torch.allclose(sense.A(x)[:, :, 0], cartesian.A(x), atol=1e-6)
    assert sense.normalized


def test_sense_normalized_flag_reads_the_maps():
    """normalized iff max_pixels sum_c |S_c|^2 <= 1 (ESPIRiT normalisation); then ||A|| <= 1."""
    op = invdiff.example_operator("sense_mri")
    energy = op.coil_maps.abs().square().sum(dim=1)
    assert op.normalized and torch.allclose(energy, torch.ones_like(energy), atol=1e-5)
    mask = op.mask
    assert not SenseMRI(mask, 1.01 * op.coil_maps).normalized
    assert SenseMRI(mask, 0.5 * op.coil_maps).normalized


def test_sense_float64_keeps_complex_maps_and_computes_in_complex128():
    op = invdiff.example_operator("sense_mri")
    op64 = op.to(torch.float64)
    assert torch.equal(op64.coil_maps.to(torch.complex64), op.coil_maps)  # imaginary part survived .to()
    assert op.coil_maps.imag.abs().max() > 0.1
    x = _randn((1, *op.in_shape), torch.float64, seed=15)
    y64 = op64.A(x)
    assert y64.dtype == torch.float64
    assert torch.allclose(y64.float(), op.A(x.float()), atol=1e-5)
    # float64 input on the float32-buffer operator is computed in complex128 too: adjointness at 1e-12.
    y = _randn(y64.shape, torch.float64, seed=16)
    assert _adjoint_error(op, x, y) < 1e-12


def test_sense_normal_and_zero_filled():
    op = invdiff.example_operator("sense_mri").to(torch.float64)
    x = _randn((2, *op.in_shape), seed=17)
    assert torch.allclose(op.A_adjoint_A(x), op.A_adjoint(op.A(x)), atol=1e-12)
    y = op.A(x)
    assert torch.equal(op.zero_filled(y), op.A_adjoint(y))
    # CG-SENSE (inherited A_dagger) reproduces the data on the range.
    assert (op.A(op.A_dagger(y)) - y).norm() / y.norm() < 1e-4


def test_sense_replace_and_bad_arguments():
    op = invdiff.example_operator("sense_mri")
    height, width = op.img_size
    full = op.replace(mask=torch.ones(width, dtype=torch.bool))
    assert full.mask.all() and not op.mask.all()
    assert torch.equal(full.coil_maps, op.coil_maps)
    with pytest.raises(ValueError, match="coil_maps"):
        SenseMRI(op.mask, op.coil_maps[0])                                  # 3-D maps
    with pytest.raises(ValueError, match="mask") as info:
        SenseMRI(torch.ones(width + 1, dtype=torch.bool), op.coil_maps)
    assert str((height, width)) in str(info.value)
    with pytest.raises(ValueError, match="coil_maps"):
        SenseMRI(op.mask, op.coil_maps.expand(2, -1, -1, -1)).A(_randn((3, *op.in_shape), torch.float32))
    with pytest.raises(ValueError, match="NaN"):
        SenseMRI(op.mask, torch.full_like(op.coil_maps, float("nan")))
    with pytest.raises(ValueError, match="y must have shape"):
        op.A_adjoint(torch.zeros(1, 2, op.num_coils + 1, height, width))


def test_sense_image_support_is_where_a_coil_sees_and_a_is_blind_outside():
    """Pixels with S_c = 0 for every coil are outside ``image_support()``: A ignores them, restrict_to_support zeros them."""
    from invdiff.operators.base import restrict_to_support
    maps = _complex_randn((1, 3, 12, 10), seed=3)
    maps[..., :, :3] = 0                                               # a band no coil sees
    op = SenseMRI(make_mask("random", shape=(12, 10), acceleration=2, center_fraction=0.2, seed="s"), maps)
    support = op.image_support()
    assert support.shape == (1, 1, 12, 10) and support.dtype == torch.bool
    assert not support[..., :3].any() and support[..., 3:].all()
    x = _randn((2, 2, 12, 10), seed=4)
    outside = torch.zeros_like(x)
    outside[..., :3] = _randn((2, 2, 12, 3), seed=5)
    assert torch.allclose(op.A(x + outside), op.A(x), atol=1e-12)
    restricted = restrict_to_support(op, x + outside)
    assert not restricted[..., :3].any() and torch.equal(restricted[..., 3:], (x + outside)[..., 3:])
    assert CartesianMRI(torch.ones(10, dtype=torch.bool), img_size=(12, 10)).image_support() is None
    assert restrict_to_support(CartesianMRI(torch.ones(10, dtype=torch.bool), img_size=(12, 10)), x) is x
