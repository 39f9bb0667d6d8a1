"""3-D reconstruction with 2-D priors: volume operators, the ADMM-TV_z inner solver, slice-wise priors, the samplers
and the volume tasks. CPU, float64 where the check is exact, a few seconds in all.

The math checked:
* volume operators are their 2-D operators slice by slice (CT, multi-slice SENSE) or the 3-D DFT (3-D Cartesian);
* the ADMM x-update (CG on ``A^T A + rho D_z^T D_z``) reaches the dense solution of its linear system;
* ADMM iterations carried across calls reach the closed-form minimiser of ``1/2 ||x - y||^2 + lam ||D_z x||_1`` on
  two slices (``d = x_1 - x_0`` is ``soft(y_1 - y_0, 4 lam)``, the mean is kept);
* with a Gaussian prior exact along slices, DDS's data step (warm-started CG, lam 0) is the closed form
  ``x0_hat + A^+ (y - A x0_hat)`` (the Tweedie estimate keeps its null-space part);
* chunked and unchunked slice evaluation agree to float precision.
"""
import numpy as np
import pytest
import torch

import invdiff
from invdiff.operators.base import Operator
from invdiff.operators.ct import ParallelBeamCT
from invdiff.operators.mri import SenseMRI
from invdiff.operators.volume import (Cartesian3DMRI, MultiSliceSenseMRI, VolumeParallelBeamCT, _example_volume_maps,
                                      fft3c, ifft3c, phase_encode_mask)
from invdiff.priors.analytic import GaussianPrior
from invdiff.priors.base import SliceDenoiser
from invdiff.problem import InverseProblem
from invdiff.samplers.volume3d import (admm_tv_z_step, difference_z, difference_z_adjoint, gradient_3d,
                                       gradient_3d_adjoint, sample_dds, sample_diffusion_mbir, sample_tv_3d)

F64 = torch.float64


def _randn(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class _Identity(Operator):
    """``A = I`` on (B, 1, D, H, W): the denoising problem, whose TV_z minimiser has a closed form."""

    def __init__(self, shape: tuple = (2, 3, 3)):
        super().__init__()
        self.shape = tuple(shape)

    @property
    def in_shape(self):
        return (1, *self.shape)

    def A(self, x, **kwargs):  # noqa: N802
        return x

    def A_adjoint(self, y, **kwargs):  # noqa: N802
        return y


# ---- operators ---------------------------------------------------------------------------------------------
def test_volume_operators_are_registered_for_the_contract_tests():
    names = invdiff.list_operators()
    assert {"volume_parallel_beam_ct", "multislice_sense_mri", "cartesian3d_mri"} <= set(names)


def test_volume_ct_is_the_2d_projector_on_every_slice_and_fbp_too():
    angles = [0.0, 40.0, 95.0, 130.0]
    op, slice_op = VolumeParallelBeamCT(12, angles, depth=4).double(), ParallelBeamCT(12, angles).double()
    x = _randn((2, 1, 4, 12, 12), 0)
    y = op.A(x)
    for d in range(4):
        assert torch.allclose(y[:, :, d], slice_op.A(x[:, :, d]), atol=1e-12)
        assert torch.allclose(op.fbp(y)[:, :, d], slice_op.fbp(y[:, :, d]), atol=1e-12)
    with pytest.raises(ValueError, match="depth"):
        VolumeParallelBeamCT(12, angles, depth=0)


def test_multislice_sense_is_2d_sense_on_every_slice_with_its_own_mask():
    maps = _example_volume_maps(3, 4, (8, 6))
    masks = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    op = MultiSliceSenseMRI(masks, maps).double()
    x = _randn((2, 2, 4, 8, 6), 2)
    y = op.A(x)
    for d in range(4):
        slice_op = SenseMRI(masks[d], maps[:, :, d]).double()
        assert torch.allclose(y[:, :, :, d], slice_op.A(x[:, :, d]), atol=1e-12)
        assert torch.allclose(op.A_adjoint(y)[:, :, d], slice_op.A_adjoint(y[:, :, :, d]), atol=1e-12)


def test_cartesian_3d_with_a_full_mask_and_normalised_maps_is_an_isometry():
    maps = _example_volume_maps(4, 6, (4, 8))
    op = Cartesian3DMRI(torch.ones(6, 8, dtype=torch.bool), maps).double()
    x = _randn((1, 2, 6, 4, 8), 3)
    assert op.normalized
    assert torch.allclose(op.A_adjoint_A(x), x, atol=1e-6)            # sum_c |S_c|^2 = 1 (float32 maps)
    volume = torch.complex(_randn((6, 4, 8), 4), _randn((6, 4, 8), 5))
    assert torch.allclose(ifft3c(fft3c(volume)), volume, atol=1e-12)
    assert torch.allclose(fft3c(volume).abs().square().sum(), volume.abs().square().sum())
    mask = phase_encode_mask((16, 16), 4, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (16, 16) and mask[8, 8] and int(mask.sum()) == 64


# ---- z total variation and the ADMM inner solver --------------------------------------------------------------
def test_difference_operators_are_exact_transposes():
    for forward, adjoint, shape in ((difference_z, difference_z_adjoint, (2, 2, 5, 3, 4)),
                                    (gradient_3d, gradient_3d_adjoint, (2, 2, 5, 3, 4))):
        x = _randn(shape, 6)
        v = _randn(forward(x).shape, 7)
        assert abs(float((forward(x) * v).sum() - (x * adjoint(v)).sum())) < 1e-10


def test_admm_x_update_reaches_the_dense_solution_of_its_system():
    """x = (A^T A + rho D_z^T D_z)^-1 (A^T y + rho D_z^T (z - w)) with the step's own z, against a dense solve."""
    op = VolumeParallelBeamCT(6, [15.0 * k for k in range(12)], depth=3).double()   # full column rank: a unique solution
    x_true = _randn((1, *op.in_shape), 8)
    problem = InverseProblem(op, op.A(x_true), 0.01)
    z, w = _randn((1, *op.in_shape), 9), 0.1 * _randn((1, *op.in_shape), 10)
    rho = 2.0
    x, z, _, residual = admm_tv_z_step(problem, torch.zeros_like(x_true), z, w, lam=0.1, rho=rho, cg_steps=400)
    n = x_true.numel()
    basis = torch.eye(n, dtype=F64).reshape(n, *op.in_shape)
    columns = op.A_adjoint_A(basis) + rho * difference_z_adjoint(difference_z(basis))
    matrix = columns.reshape(n, n).T
    rhs = op.A_adjoint(problem.y) + rho * difference_z_adjoint(z - w)
    dense = torch.linalg.solve(matrix, rhs.reshape(-1))
    assert torch.allclose(x.reshape(-1), dense, rtol=1e-6, atol=1e-8 * float(dense.abs().max()))
    assert float(residual.max()) < 1e-9


@pytest.mark.parametrize("lam", [0.05, 0.3])
def test_admm_converges_to_the_closed_form_tv_z_minimiser_on_two_slices(lam):
    """min 1/2 ||x - y||^2 + lam ||D_z x||_1, D = 2 circular: ||D_z x||_1 = 2 |x_1 - x_0|, so in terms of the mean m
    and difference d the objective is (m - m_y)^2 + (d - d_y)^2 / 4 + 2 lam |d|: m = m_y, d = soft(d_y, 4 lam)."""
    op = _Identity((2, 3, 3))
    y = _randn((1, *op.in_shape), 11)
    problem = InverseProblem(op, y, 0.1)
    x = y.clone()
    z, w = difference_z(torch.zeros_like(y)), torch.zeros_like(y)
    for _ in range(400):
        x, z, w, _ = admm_tv_z_step(problem, x, z, w, lam=lam, rho=1.0, cg_steps=5)
    mean, d_y = (y[:, :, 0] + y[:, :, 1]) / 2, y[:, :, 1] - y[:, :, 0]
    d = torch.sign(d_y) * torch.clamp(d_y.abs() - 4 * lam, min=0)
    expected = torch.stack([mean - d / 2, mean + d / 2], dim=2)
    assert torch.allclose(x, expected, atol=1e-6), float((x - expected).abs().max())
    assert bool((d == 0).any()) or lam < 0.1              # the larger lam fuses some voxels exactly


def test_dds_data_step_with_a_slice_exact_gaussian_prior_is_the_closed_form():
    """One DDS step (sigma_max -> 0) with lam 0 and enough CG steps returns x0_hat + A^+ (y - A x0_hat), where
    x0_hat is the Gaussian prior's exact Tweedie mean on every slice."""
    size, depth = 6, 3
    g = torch.Generator().manual_seed(12)
    factor = torch.randn(size * size, size * size, generator=g, dtype=F64) / size
    gaussian = GaussianPrior(torch.zeros(1, size, size, dtype=F64), factor @ factor.T + 0.05 * torch.eye(size * size, dtype=F64))
    prior = SliceDenoiser(gaussian, chunk=2)
    # 0 and 90 degrees: row and column sums, singular values 2.4-3.5 or exactly 0, so A^+ is well defined
    op = VolumeParallelBeamCT(size, [0.0, 90.0], depth=depth).double()
    x_true = _randn((1, *op.in_shape), 13)
    problem = InverseProblem(op, op.A(x_true), 0.01)
    result = sample_dds(problem, prior, steps=1, lam=0.0, cg_steps=300, sigma_max=2.0, sigma_min=0.5,
                        generator=torch.Generator().manual_seed(14))
    x_start = 2.0 * torch.randn((1, *op.in_shape), generator=torch.Generator().manual_seed(14), dtype=F64)
    x0_hat = prior(x_start, torch.full((1,), 2.0, dtype=F64))
    n = x_true.numel()
    a_dense = op.A(torch.eye(n, dtype=F64).reshape(n, *op.in_shape)).reshape(n, -1).T
    correction = torch.linalg.pinv(a_dense, rtol=1e-8) @ (problem.y - op.A(x0_hat)).reshape(-1)
    expected = x0_hat + correction.reshape(x0_hat.shape)
    assert torch.allclose(result.x, expected, atol=1e-7), float((result.x - expected).abs().max())


# ---- slice-wise priors ---------------------------------------------------------------------------------------
def test_chunked_and_unchunked_slice_evaluation_agree():
    from invdiff.priors.unet import EDMUNet, UNetConfig

    torch.manual_seed(0)   # the network's initial weights only (the library never seeds)
    net = EDMUNet(UNetConfig(channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, embedding_dim=16,
                             groups=4)).eval()
    x = _randn((2, 1, 5, 16, 16), 15, torch.float32)
    sigma = torch.tensor([0.3, 1.5])
    with torch.no_grad():
        whole = SliceDenoiser(net, chunk=100)(x, sigma)
        for chunk in (1, 3):
            assert torch.allclose(SliceDenoiser(net, chunk=chunk)(x, sigma), whole, rtol=1e-5, atol=1e-6)
        # slice d of batch b is denoised at that batch's sigma, alone
        single = net(x[1:2, :, 3], sigma[1:2])
    assert torch.allclose(whole[1:2, :, 3], single, rtol=1e-5, atol=1e-6)


# ---- samplers end to end (tiny) --------------------------------------------------------------------------------
def _tiny_ct_problem():
    from invdiff.tasks.volume import ct_volume_task, shepp_logan_3d

    task = ct_volume_task(shepp_logan_3d(12), views=6)
    return task


@pytest.mark.parametrize("solver,kwargs", [("dds", {"steps": 6}), ("diffusion-mbir", {"steps": 6, "cg_steps": 3}),
                                           ("dds", {"steps": 6, "slice_axes": "alternate", "lam": 0.0})])
def test_diffusion_samplers_run_and_report(solver, kwargs):
    task = _tiny_ct_problem()
    image = task.images[0]
    size = 12
    gaussian = GaussianPrior(0.3 * torch.ones(1, size, size), 0.05 * torch.eye(size * size))
    result = invdiff.sample(solver, image.problem, gaussian, generator=torch.Generator().manual_seed(0), **kwargs)
    d = result.diagnostics
    assert result.x.shape == (1, 1, size, size, size) and bool(torch.isfinite(result.x).all())
    assert d["nfe"] >= kwargs["steps"] and d["slice_evaluations"] == d["nfe"] * size
    assert len(d["residual_norm"]) == kwargs["steps"] and d["peak_memory_bytes"] > 0
    assert d["residual_norm"][-1] < float(image.problem.y.norm())
    again = invdiff.sample(solver, image.problem, gaussian, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(again.x, result.x)                 # randomness only from the generator


def test_tv_3d_beats_fbp_and_the_samplers_reject_2d_problems():
    from invdiff.tasks.volume import plane_metrics

    task = _tiny_ct_problem()
    image = task.images[0]
    fbp = image.to_image(invdiff.sample("fbp", image.problem, None).x)
    tv = image.to_image(sample_tv_3d(image.problem, lam=3e-4, init="fbp").x)
    assert plane_metrics(image.target, tv)["volume_psnr"] > plane_metrics(image.target, fbp)["volume_psnr"] + 3
    flat = InverseProblem(ParallelBeamCT(8, [0.0, 90.0]), torch.zeros(1, 1, 2, 12), 0.1)
    with pytest.raises(ValueError, match="volume operator"):
        sample_diffusion_mbir(flat, GaussianPrior(torch.zeros(1, 8, 8), torch.eye(64)), steps=2)


def test_settings_know_the_volume_solvers():
    from invdiff import settings

    assert settings.effective("dds", "ct")["eta"] == 0.85
    mri = settings.effective("diffusion-mbir", "mri")
    assert (mri["lam"], mri["rho"]) == (0.005, 0.01)


# ---- tasks --------------------------------------------------------------------------------------------------
def test_mri_volume_task_normalises_and_maps_back(tmp_path):
    from invdiff.tasks.volume import mri_volume_task, write_nifti

    volume = np.zeros((4, 16, 12), dtype=np.float32)
    volume[:, 4:12, 3:9] = np.linspace(1, 2, 4)[:, None, None]
    task = mri_volume_task(volume, 2, num_coils=8, noise_fraction=1e-5, voxel_size_mm=(2.2, 2.0, 2.0))
    image = task.images[0]
    zero_filled = image.problem.operator.A_adjoint(image.problem.y)
    assert image.to_image(zero_filled).shape == (4, 16, 12)
    # CG-SENSE with no ridge on an almost noiseless volume gives it back
    cg = invdiff.sample("cg-sense", image.problem, None, lam=0.0, max_iter=300, tol=1e-10)
    error, error_zf = (np.abs(image.to_image(v) - volume).max() for v in (cg.x, zero_filled))
    assert error < 0.05 * volume.max() and error < error_zf / 4, (error, error_zf)
    path = write_nifti(tmp_path / "v.nii.gz", volume, task.info["voxel_size_mm"])
    import nibabel
    loaded = nibabel.load(str(path))
    assert loaded.shape == (12, 16, 4) and tuple(np.round(loaded.header.get_zooms(), 3)) == (2.0, 2.0, 2.2)
    assert np.allclose(np.asarray(loaded.dataobj).transpose(2, 1, 0), volume)


def test_plane_metrics_differ_by_plane_and_are_perfect_on_the_target():
    from invdiff.tasks.volume import plane_metrics, shepp_logan_3d

    volume = shepp_logan_3d(16)
    assert volume.shape == (16, 16, 16) and 0 <= volume.min() and volume.max() <= 1
    noisy = volume + 0.05 * np.random.default_rng(0).standard_normal(volume.shape).astype(np.float32) * (
        np.arange(16)[:, None, None] / 16)
    metrics = plane_metrics(volume, noisy, maxval=1.0)
    assert metrics["psnr"]["axial"] != pytest.approx(metrics["psnr"]["coronal"], abs=0.1)
    assert plane_metrics(volume, volume, maxval=1.0)["ssim"]["sagittal"] == pytest.approx(1.0)
    # all-zero target images (air) are not scored: they would give unbounded PSNR
    empty = (volume.reshape(16, -1).max(axis=1) == 0).sum()
    assert empty > 0 and metrics["images"]["axial"] == 16 - empty and np.isfinite(metrics["psnr"]["axial"])


# ---- the benchmark script ---------------------------------------------------------------------------------------
def test_volume_benchmark_writes_rows_with_plane_metrics_time_and_memory(tmp_path):
    from repo_scripts import load_script

    benchmark = load_script("benchmarks/volume3d.py", "benchmarks_volume3d")
    report = benchmark.main(["--size", "12", "--views", "6", "--volumes", "shepp-logan", "--solvers", "fbp", "dds-2d",
                             "--steps", "dds=2", "--no-isolate", "--out", str(tmp_path), "--tag", "test"])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".md"]
    rows = {row["solver"]: row for row in report["rows"]}
    assert set(rows) == {"fbp", "dds-2d"}
    assert rows["dds-2d"]["hyperparameters"]["lam"] == 0.0 and rows["dds-2d"]["nfe_per_slice"] == 2
    for row in rows.values():
        assert set(row["psnr"]) == {"axial", "coronal", "sagittal"} and row["peak_memory_bytes"] > 0
        assert row["shape"] == [12, 12, 12] and row["seconds"] >= 0


def test_fastmri_file_becomes_one_volume_task_with_its_output_mapping():
    """The CLI's --3d path: a multi-coil fastMRI file -> one volume problem -> (D, H_r, W_r) volume in file units."""
    from pathlib import Path

    from invdiff.tasks.volume import fastmri_volume_task, plane_metrics, volume_output

    path = Path(__file__).resolve().parent.parent / "data" / "brain_multislice_multicoil.h5"
    task = fastmri_volume_task(path, acceleration=4, slices="0:2")
    image = task.images[0]
    assert image.problem.operator.in_shape == (2, 2, 192, 128) and image.target.shape == (2, 96, 128)
    assert len(task.info["voxel_size_mm"]) == 3
    zero_filled = volume_output(task, invdiff.sample("zero-filled", image.problem, None).x)
    cg = volume_output(task, invdiff.sample("cg-sense", image.problem, None).x)
    assert cg.shape == (2, 96, 128)
    assert plane_metrics(image.target, cg)["volume_psnr"] > plane_metrics(image.target, zero_filled)["volume_psnr"]


def test_limited_angle_ct_volume_task_uses_a_wedge_and_keeps_the_noise_rule():
    from invdiff.operators.volume import limited_angles
    from invdiff.tasks.volume import ct_phantom_3d, ct_volume_task

    assert np.allclose(limited_angles(90, 3), [0, 30, 60])
    volume = ct_phantom_3d(12, seed=3)
    assert volume.shape == (12, 12, 12) and 0 <= volume.min() and volume.max() <= 1 and volume.std() > 0.01
    task = ct_volume_task(volume, 6, wedge_degrees=90.0, seed=1)
    operator = task.images[0].problem.operator
    assert float(operator.angles.max()) < 90 and task.info["angles"].startswith("limited angle")
    again = ct_volume_task(volume, 6, wedge_degrees=90.0, seed=1)
    assert torch.equal(again.images[0].problem.y, task.images[0].problem.y)     # the seed rule's generator
    assert not np.array_equal(ct_phantom_3d(12, seed=4), volume)


def test_dds_noisy_data_step_is_the_closed_form_of_the_paper():
    """gamma: x0_dc = (I + gamma A^T A)^-1 (x0_hat + gamma A^T y) (DDS, noisy measurements), dense check."""
    op = VolumeParallelBeamCT(6, [0.0, 50.0, 120.0], depth=2).double()
    x0_hat, y = _randn((1, *op.in_shape), 16), _randn((1, *op.out_shape), 17)
    problem = InverseProblem(op, y, 0.1)
    zeros = torch.zeros_like(x0_hat)
    x, _, _, _ = admm_tv_z_step(problem, x0_hat, zeros, zeros, lam=0.0, rho=1.0, cg_steps=300, gamma=0.3)
    n = x0_hat.numel()
    normal = op.A_adjoint_A(torch.eye(n, dtype=F64).reshape(n, *op.in_shape)).reshape(n, n).T
    expected = torch.linalg.solve(torch.eye(n, dtype=F64) + 0.3 * normal,
                                  (x0_hat + 0.3 * op.A_adjoint(y)).reshape(-1))
    assert torch.allclose(x.reshape(-1), expected, atol=1e-8)
