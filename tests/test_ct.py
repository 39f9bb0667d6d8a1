"""CT operators: geometry against scikit-image, FBP quality, fan-beam line integrals, exact adjoints.

Parallel beam is checked against ``skimage.transform.radon(image, theta, circle=False)`` (same discrete
model, so the sinograms agree to rounding) and FBP against ``skimage.transform.iradon`` (different
back-projector: pixel-driven linear interpolation versus our transpose, so they agree to a few percent).
"""
import math

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

import invdiff
from invdiff.operators.ct import FILTERS, FanBeamCT, ParallelBeamCT, angular_weights

SIZE = 128


def _relative(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def _psnr(reference, estimate):
    """PSNR with data range ``reference.max()`` (the fastMRI convention)."""
    mse = np.mean((np.asarray(estimate) - reference) ** 2)
    return 10 * math.log10(reference.max() ** 2 / mse)


def _inner_product_gap(op, dtype, seed=0):
    """|<A x, y> - <x, A^T y>| / (|A x| |y|) for random x, y."""
    g = torch.Generator().manual_seed(seed)
    op = op.to(dtype)
    x = torch.randn((2, *op.in_shape), generator=g, dtype=dtype)
    ax = op.A(x)
    y = torch.randn(ax.shape, generator=g, dtype=dtype)
    return float(((ax * y).sum() - (x * op.A_adjoint(y)).sum()).abs() / (ax.norm() * y.norm()))


@pytest.fixture(scope="module")
def phantom():
    return resize(shepp_logan_phantom(), (SIZE, SIZE), anti_aliasing=True)


@pytest.fixture(scope="module")
def sparse_view():
    """60 equispaced views over 180 degrees, skimage's angle convention (degrees)."""
    theta = np.linspace(0.0, 180.0, 60, endpoint=False)
    return theta, ParallelBeamCT(SIZE, theta)


def _disc(size, radius, supersample=8):
    """Disc of value 1 and ``radius`` pixels about pixel (size // 2, size // 2), pixel values = area fraction."""
    fine = (np.arange(size * supersample) + 0.5) / supersample - 0.5 - size // 2
    inside = (fine[:, None] ** 2 + fine[None, :] ** 2) <= radius ** 2
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def test_parallel_projector_equals_skimage_radon(phantom, sparse_view):
    """A x = radon(x, theta, circle=False).T on the Shepp-Logan phantom (same rotate-and-sum model)."""
    theta, op = sparse_view
    ours = op.A(torch.from_numpy(phantom)[None, None])[0, 0].numpy()
    reference = radon(phantom, theta=theta, circle=False)
    assert ours.shape == reference.T.shape == (60, math.ceil(math.sqrt(2) * SIZE))
    difference = _relative(ours, reference.T)
    assert difference < 1e-6, f"relative L2 difference to skimage radon: {difference:.2e}"


def test_non_square_image_follows_skimage_centre_and_angles():
    """Rotation centre (H // 2, W // 2) and angle direction agree with skimage on a non-square, off-centre object."""
    image = np.zeros((20, 31))
    image[3:8, 20:27] = 1.0
    image[12, 5] = 2.0
    theta = np.array([0.0, 17.0, 90.0, 133.0, 250.0])
    ours = ParallelBeamCT((20, 31), theta).A(torch.from_numpy(image)[None, None])[0, 0].numpy()
    difference = _relative(ours, radon(image, theta=theta, circle=False).T)
    assert difference < 1e-6, f"relative L2 difference to skimage radon: {difference:.2e}"


@pytest.mark.parametrize("filter", FILTERS)
def test_fbp_close_to_skimage_iradon(phantom, sparse_view, filter):
    """FBP with our matched back-projector vs iradon's pixel-driven back-projection, same filter."""
    theta, op = sparse_view
    sinogram = radon(phantom, theta=theta, circle=False)
    ours = op.fbp(torch.from_numpy(sinogram.T.copy())[None, None], filter=filter)[0, 0].numpy()
    reference = iradon(sinogram, theta=theta, filter_name=filter, circle=False, output_size=SIZE)
    difference = _relative(ours, reference)
    assert difference < 0.05, f"{filter}: relative L2 difference to skimage iradon: {difference:.3f}"
    # Neither is closer to the truth by more than a little: same scale, same filter.
    assert abs(_relative(ours, phantom) - _relative(reference, phantom)) < 0.01


def test_fbp_psnr_on_phantom_with_180_views(phantom):
    op = ParallelBeamCT(SIZE, np.linspace(0.0, 180.0, 180, endpoint=False))
    estimate = op.fbp(op.A(torch.from_numpy(phantom).float()[None, None]))[0, 0].numpy()
    psnr = _psnr(phantom, estimate)
    assert psnr > 28.0, f"FBP PSNR at 180 views: {psnr:.2f} dB"


def test_detector_spacing_leaves_fbp_scale_unchanged(phantom):
    """Coarser bins (spacing 2, half as many) blur but must not rescale: A^T's 1/spacing density cancels the ramp's."""
    theta = np.linspace(0.0, 180.0, 90, endpoint=False)
    op = ParallelBeamCT(SIZE, theta, num_detectors=92, detector_spacing=2.0)
    estimate = op.fbp(op.A(torch.from_numpy(phantom)[None, None]))[0, 0].numpy()
    assert abs(estimate.mean() / phantom.mean() - 1) < 0.02
    assert _psnr(phantom, estimate) > 22.0


def test_fan_beam_rays_integrate_a_disc():
    """Centred disc of radius r: the ray at distance rho from the centre integrates 2 sqrt(r^2 - rho^2);
    on a flat detector bin u sees rho = D_so |u| / sqrt(D_sd^2 + u^2); the central ray sees 2 r."""
    size, radius = 64, 20.0
    op = FanBeamCT(size, [0.0, 33.0, 90.0, 200.0])
    y = op.A(torch.from_numpy(_disc(size, radius))[None, None])[0, 0].numpy()
    u = (np.arange(op.num_detectors) - op.num_detectors // 2) * op.detector_spacing
    d_sd = op.source_distance + op.detector_distance
    rho = op.source_distance * np.abs(u) / np.sqrt(d_sd ** 2 + u ** 2)
    chord = 2 * np.sqrt(np.clip(radius ** 2 - rho ** 2, 0, None))
    central = y[:, op.num_detectors // 2]
    assert np.allclose(central, 2 * radius, rtol=5e-3), f"central rays {central}, expected {2 * radius}"
    difference = _relative(y, np.broadcast_to(chord, y.shape))
    assert difference < 0.01, f"fan sinogram vs analytic chords: relative L2 {difference:.2e}"


def test_fan_beam_with_distant_source_is_parallel_beam(phantom):
    """D_so -> infinity with a virtual detector at the centre turns fan rays into parallel rays."""
    theta = np.linspace(0.0, 180.0, 12, endpoint=False)
    parallel = ParallelBeamCT(SIZE, theta)
    fan = FanBeamCT(SIZE, theta, source_distance=1e6, detector_distance=0.0,
                    num_detectors=parallel.num_detectors, detector_spacing=1.0)
    x = torch.from_numpy(phantom)[None, None]
    difference = float((fan.A(x) - parallel.A(x)).norm() / parallel.A(x).norm())
    assert difference < 1e-3, f"fan (distant source) vs parallel: {difference:.2e}"


def test_fan_beam_fbp_psnr_on_phantom(phantom):
    op = FanBeamCT(SIZE, np.linspace(0.0, 360.0, 180, endpoint=False))
    estimate = op.fbp(op.A(torch.from_numpy(phantom).float()[None, None]))[0, 0].numpy()
    psnr = _psnr(phantom, estimate)
    assert psnr > 27.0, f"fan-beam weighted FBP PSNR at 180 views over 360 degrees: {psnr:.2f} dB"
    assert abs(estimate.mean() / phantom.mean() - 1) < 0.03


@pytest.mark.parametrize("make", [
    lambda: ParallelBeamCT((17, 26), [3.0, 61.0, 145.0, 300.0], num_detectors=41, detector_spacing=0.7),
    lambda: FanBeamCT((22, 19), [0.0, 100.0, 215.0], detector_distance=0.0, num_detectors=30),
], ids=["parallel", "fan"])
def test_adjoint_is_the_transpose(make):
    """|<A x, y> - <x, A^T y>| / (|A x| |y|): < 1e-12 in float64, < 1e-6 in float32, off the default geometry."""
    gap64, gap32 = _inner_product_gap(make(), torch.float64), _inner_product_gap(make(), torch.float32)
    assert gap64 < 1e-12, f"float64 adjoint gap {gap64:.2e}"
    assert gap32 < 1e-6, f"float32 adjoint gap {gap32:.2e}"


def test_autograd_through_A_gives_A_adjoint():
    """Samplers differentiate through A: grad_x <A x, y> = A^T y."""
    op = ParallelBeamCT(16, [0.0, 45.0, 100.0]).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, 1, 16, 16), generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn((1, 1, 3, op.num_detectors), generator=g, dtype=torch.float64)
    (op.A(x) * y).sum().backward()
    assert torch.allclose(x.grad, op.A_adjoint(y), rtol=1e-12, atol=1e-12)


def test_channels_are_projected_independently():
    op = ParallelBeamCT(12, [0.0, 50.0])
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    y = op.A(x)
    assert y.shape == (2, 3, 2, op.num_detectors)
    assert torch.allclose(y[:, 1:2], op.A(x[:, 1:2]))


def test_angular_weights():
    """Equispaced views get pi / M; a 120-degree wedge gets its own spacing, not the missing 60 degrees."""
    assert np.allclose(angular_weights(np.arange(8) * 22.5, 180.0), np.pi / 8)
    assert np.allclose(angular_weights(np.arange(10) * 36.0, 360.0), 2 * np.pi / 10)
    wedge = angular_weights(np.arange(6) * 20.0, 180.0)
    assert np.allclose(wedge, np.deg2rad(20.0))


def test_matrix_memory_is_16_bytes_per_nonzero():
    """Two CSR copies (A and A^T) at int32 + float32 per non-zero, about 2.2 non-zeros per sample point
    (~ H W points per view): 256 x 256 with 180 views stays near 420 MB (< 600 MB)."""
    op = ParallelBeamCT(64, np.linspace(0.0, 180.0, 180, endpoint=False))
    row_pointers = 4 * (op.num_angles * op.num_detectors + 1) + 4 * (64 * 64 + 1)
    assert op.matrix_bytes() == 16 * op.nnz + row_pointers
    assert op.nnz < 2.5 * 65 * 65 * 180
    projected_256 = op.matrix_bytes() / (64 * 64) * (256 * 256)
    assert projected_256 < 600 * 2 ** 20


def test_vmap_over_images_matches_the_batch():
    """Samplers vmap operators over particles; CT's sparse product has its own vmap rule (no loop)."""
    op = ParallelBeamCT(20, [0.0, 33.0, 120.0])
    x = torch.randn(5, 3, 1, 20, 20, generator=torch.Generator().manual_seed(3))
    mapped = torch.func.vmap(op.A)(x)
    assert torch.allclose(mapped, op.A(x.reshape(15, 1, 20, 20)).reshape(mapped.shape), atol=1e-6)
    back = torch.func.vmap(op.A_adjoint)(mapped)
    assert torch.allclose(back, op.A_adjoint(mapped.reshape(15, *mapped.shape[2:])).reshape(back.shape), atol=1e-5)


def test_limited_angle_plugin_is_a_wedge_of_parallel_views():
    op = invdiff.operator("limited_angle_ct", img_size=32, max_angle=120.0, num_angles=8)
    assert isinstance(op, ParallelBeamCT)
    angles = op.angles.numpy()
    assert angles.min() >= 0 and angles.max() < 120 and len(angles) == 8
    wider = op.replace(max_angle=150.0)
    assert wider.angles.max() > 120 and op.angles.max() < 120  # replace makes a new operator


@pytest.mark.parametrize("build, message", [
    (lambda: ParallelBeamCT(32, []), "angles"),
    (lambda: ParallelBeamCT(32, [0.0, float("nan")]), "angles"),
    (lambda: ParallelBeamCT(32, 45.0), "angles"),
    (lambda: ParallelBeamCT(0, [0.0]), "img_size"),
    (lambda: ParallelBeamCT((32, -4), [0.0]), "img_size"),
    (lambda: ParallelBeamCT(32, [0.0], num_detectors=0), "num_detectors"),
    (lambda: ParallelBeamCT(32, [0.0], detector_spacing=-1.0), "detector_spacing"),
    (lambda: ParallelBeamCT(32, [0.0], detector_spacing=float("inf")), "detector_spacing"),
    (lambda: FanBeamCT(32, [0.0], source_distance=10.0), "source_distance"),
    (lambda: FanBeamCT(32, [0.0], detector_distance=-5.0), "detector_distance"),
    (lambda: invdiff.operator("limited_angle_ct", img_size=32, max_angle=200.0), "max_angle"),
    (lambda: invdiff.operator("limited_angle_ct", img_size=32, num_angles=0), "num_angles"),
])
def test_bad_arguments_name_themselves(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_inputs_name_themselves():
    op = ParallelBeamCT(16, [0.0, 90.0])
    with pytest.raises(ValueError, match="x must be"):
        op.A(torch.zeros(1, 1, 16, 15))
    with pytest.raises(ValueError, match="y must be"):
        op.A_adjoint(torch.zeros(1, 1, 3, op.num_detectors))
    with pytest.raises(ValueError, match="filter must be one of"):
        op.fbp(torch.zeros(1, 1, 2, op.num_detectors), filter="hamming-ish")
