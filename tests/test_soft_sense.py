"""Soft-SENSE (Uecker et al. 2014): the two-map operator's algebra, our multi-map ESPIRiT, and CG-SENSE with two map
sets on an object that fills the phase-encoding field of view (where one map set made CG-SENSE worse than
zero-filled)."""
import numpy as np
import pytest
import torch

import test_operator_contract as contract
from invdiff import metrics, settings
from invdiff.datasets.synthetic import write_fake_fastmri
from invdiff.errors import InputError, UnsupportedOperatorError
from invdiff.operators.coil_maps import estimate_coil_map_sets, estimate_coil_maps
from invdiff.operators.soft_sense import SoftSenseMRI, combine_components
from invdiff.problem import InverseProblem
from invdiff.tasks import scan_tasks, solve

F64 = torch.float64


def textured_object(height, width):
    """Smooth texture plus a block, bright up to the column edges (max 1): an object that fills the field of view."""
    rows, cols = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    image = 0.6 + 0.25 * np.sin(2 * np.pi * (3 * rows + cols)) + 0.15 * np.cos(2 * np.pi * 5 * cols)
    image[height // 4:height // 2, width // 3:2 * width // 3] += 0.5
    return (image / image.max()).astype(np.float32)


def coil_kspace(image, num_coils=8):
    """Noiseless centred k-space (coils, H, W) of ``image`` under sigpy's birdcage maps."""
    import sigpy.mri

    maps = sigpy.mri.birdcage_maps((num_coils, *image.shape))
    coil_images = maps * image
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_images, axes=(-2, -1)), norm="ortho"),
                           axes=(-2, -1)).astype(np.complex64)


# ---- the operator: the contract tests' checks, on the registered example -----------------------------------
@pytest.mark.parametrize("check", ["test_linearity", "test_fast_normal_operator_is_a_adjoint_of_a",
                                   "test_operator_norm_of_normalised_operators", "test_batch_is_stack_of_singles",
                                   "test_A_stores_nothing_and_replace_copies"])
def test_two_map_operator_passes_the_contract_checks(check):
    getattr(contract, check)("soft_sense_mri")


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (F64, 1e-12)])
def test_two_map_operator_is_adjoint(dtype, bound):
    """|<A x, y> - <x, A^H y>| / (|A x| |y|) < bound."""
    contract.test_adjointness("soft_sense_mri", dtype, bound)


def test_two_map_operator_is_the_sum_of_two_sense_operators():
    """``A [x_1; x_2] = A_{S_1} x_1 + A_{S_2} x_2`` with SenseMRI on each map set (same mask)."""
    from invdiff.operators.mri import SenseMRI

    op = contract._example("soft_sense_mri", F64)
    x = contract._randn((2, *op.in_shape), F64, 0)
    maps = op.coil_maps
    first, second = SenseMRI(op.mask, maps[:, 0]).double(), SenseMRI(op.mask, maps[:, 1]).double()
    assert op.num_maps == 2 and op.in_shape[0] == 4
    assert torch.allclose(op.A(x), first.A(x[:, :2]) + second.A(x[:, 2:]), atol=1e-12)


def test_combined_modulus_is_the_rss_of_the_model_coil_images():
    """For per-pixel orthonormal sets, ``||S_1 x_1 + S_2 x_2||_coils = sqrt(|x_1|^2 + |x_2|^2)``: the combined image
    has exactly the modulus fastMRI's RSS target takes of the coil images, and the first component's phase. (The
    example's second set is zero on the left half; there CG keeps ``x_2 = 0``, as ``A^H`` gives it nothing.)"""
    op = contract._example("soft_sense_mri", F64)
    x = contract._randn((1, *op.in_shape), F64, 1)
    x[:, 2:] = x[:, 2:] * op.coil_maps[:, 1].abs().sum(dim=1, keepdim=True).gt(0)   # x_2 = 0 where S_2 = 0
    components = torch.complex(x[:, 0::2], x[:, 1::2])                          # (1, 2, H, W)
    coil_images = (op.coil_maps * components[:, :, None]).sum(dim=1)            # (1, C, H, W)
    combined = combine_components(x)
    modulus = combined.square().sum(dim=1).sqrt()
    assert torch.allclose(modulus, coil_images.abs().square().sum(dim=1).sqrt(), atol=1e-12)
    phase_error = torch.angle(torch.complex(combined[:, 0], combined[:, 1]) * components[:, 0].conj())
    assert phase_error.abs().max() < 1e-9


# ---- ESPIRiT with two map sets --------------------------------------------------------------------------
def test_second_map_set_has_energy_only_when_the_object_fills_the_field_of_view():
    """Columns are the phase-encoding axis: the filling object wraps across them, the margined one does not. The
    second eigenvalue passes the crop on a real part of the support only in the first case; the first set agrees
    with sigpy's one-map ESPIRiT (an independent implementation) where the eigenvalue gap is clear."""
    obj = textured_object(32, 48)
    filling = np.zeros((64, 48), dtype=np.float32)
    filling[16:48] = obj                                              # readout oversampled 2x: a margin in rows
    margined = np.zeros((64, 64), dtype=np.float32)
    margined[16:48, 8:56] = obj
    full = estimate_coil_map_sets(coil_kspace(filling), 16)
    padded = estimate_coil_map_sets(coil_kspace(margined), 16)
    assert full.maps.shape == (2, 8, 64, 48) and full.eigenvalues.shape == (2, 64, 48)
    assert full.fraction_above(1, 0.95) > 0.01, full.fraction_above(1, 0.95)
    assert padded.fraction_above(1, 0.95) < 1e-3, padded.fraction_above(1, 0.95)
    assert (full.eigenvalues[0] >= full.eigenvalues[1] - 1e-6).all()
    # the sets are orthonormal where both survive the crop: ||S(r)^H S(r) - I|| small
    both = full.maps.any(axis=1).all(axis=0)
    gram = np.einsum("mchw,nchw->hwmn", full.maps.conj(), full.maps)[both]
    assert np.abs(gram - np.eye(2)).max() < 1e-4
    sigpy_map = estimate_coil_maps(coil_kspace(margined), 16, kernel_width=padded.calibration["kernel_width"])
    inside = padded.maps[0].any(axis=0) & (np.abs(sigpy_map).sum(axis=0) > 0)
    agreement = np.abs((sigpy_map.conj() * padded.maps[0]).sum(axis=0))[inside]
    assert inside.mean() > 0.3 and agreement.mean() > 0.999, (inside.mean(), agreement.mean())


def test_map_sets_reject_an_unsampled_centre():
    kspace = coil_kspace(textured_object(16, 16))
    kspace[..., 8] = 0
    with pytest.raises(ValueError, match="centre k-space column"):
        estimate_coil_map_sets(kspace, 8)


# ---- CG-SENSE with two sets -----------------------------------------------------------------------------
def _psnr_of(image, solver, **overrides):
    solution = solve(image, solver, None, settings.effective(solver, "mri", overrides), seed=0)
    return float(metrics.evaluate(image.target[None], solution.image[None])["psnr"]), solution


@pytest.fixture(scope="module")
def filling_and_margined_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("soft_sense")
    images = {}
    for name, margin in (("filling", 0), ("margined", 8)):
        path = folder / f"{name}.h5"
        write_fake_fastmri(path, np.pad(textured_object(64, 64), ((0, 0), (margin, margin))), num_coils=8,
                           noise_level=0.0, seed=0)
        images[name] = scan_tasks(path, [2], center_fraction=0.25)[0].images[0]
    return images


def test_cg_sense_with_two_maps_beats_zero_filled_where_one_map_lost_to_it(filling_and_margined_tasks):
    image = filling_and_margined_tasks["filling"]
    zero_filled, _ = _psnr_of(image, "zero-filled")
    one_map, _ = _psnr_of(image, "cg-sense", maps=1)
    auto, solution = _psnr_of(image, "cg-sense", maps="auto")
    assert solution.result.diagnostics["maps"] == 2
    assert one_map < zero_filled - 3, (one_map, zero_filled)      # the bug: one set cannot model the wrap (24 vs 34)
    assert auto > zero_filled + 0.5, (auto, zero_filled)          # ~34 dB


def test_auto_keeps_the_one_map_result_bit_for_bit_when_one_set_explains_the_scan(filling_and_margined_tasks):
    image = filling_and_margined_tasks["margined"]
    _, auto = _psnr_of(image, "cg-sense", maps="auto")
    _, one_map = _psnr_of(image, "cg-sense", maps=1)
    assert auto.result.diagnostics["maps"] == 1 and auto.result.diagnostics["second_map_fraction"] < 0.01
    assert torch.equal(auto.result.x, one_map.result.x)


def test_maps_option_is_typed_checked_and_needs_sense_for_two():
    assert settings.parse_set(["cg-sense:maps=2"]) == {"cg-sense": {"maps": 2}}
    assert settings.parse_set(["cg-sense:maps=auto"]) == {"cg-sense": {"maps": "auto"}}
    assert settings.effective("cg-sense", "mri")["maps"] == "auto"
    from invdiff.operators.mri import CartesianMRI
    from invdiff.samplers.baselines import sample_cg_sense

    op = contract._example("cartesian_mri")
    problem = InverseProblem(op, op.A(contract._randn((1, *op.in_shape), torch.float32, 2)), 0.01)
    assert isinstance(op, CartesianMRI)
    assert sample_cg_sense(problem, maps="auto").diagnostics["maps"] == 1
    with pytest.raises(UnsupportedOperatorError, match="column mask"):
        sample_cg_sense(problem, maps=2)
    with pytest.raises(InputError, match="expected 1, 2 or auto"):
        sample_cg_sense(problem, maps=3)


# ---- the task layer's maps from few calibration lines ------------------------------------------------------
@pytest.mark.parametrize("lines", [4, 5])
def test_task_maps_from_few_lines_cover_the_object_where_the_square_region_did_not(lines):
    """With 4-5 centre lines sigpy's square region has 4-9 kernel windows and its maps cover part of the object (or
    none: the task layer then failed with "reference image is (nearly) zero"); the task layer's rectangular region
    (24 rows x the lines) covers it."""
    from invdiff.tasks.scan import MIN_SQUARE_CALIBRATION_LINES, slice_coil_maps

    assert lines < MIN_SQUARE_CALIBRATION_LINES
    image = np.zeros((64, 64), dtype=np.float32)
    image[16:48, 8:56] = textured_object(32, 48)
    mask = np.zeros(64, dtype=bool)
    mask[32 - lines // 2:32 - lines // 2 + lines] = True
    mask[::6] = True
    mask[32 - lines // 2 - 1] = mask[32 - lines // 2 + lines] = False      # exactly `lines` contiguous centre lines
    masked = np.where(mask, coil_kspace(image), 0)
    obj = image > 0

    def covered(maps):
        return float((np.abs(maps).sum(axis=0) > 0)[obj].mean())
    assert covered(slice_coil_maps(masked, lines)) > 0.97            # measured 0.98 (4 lines), 0.995 (5)
    assert covered(estimate_coil_maps(masked, lines)) < 0.95         # sigpy's square region: 0.0, 0.91


def test_safeguard_scores_a_two_map_reference_through_its_own_model(filling_and_margined_tasks):
    """The held-out check predicts k-space with the solver's own model: for two-map CG-SENSE the soft-SENSE
    operator and both components (its combined image through the one-map operator predicts far worse)."""
    from invdiff.tasks.safeguard import _model, _prediction_error, _held_out, column_mask

    image = filling_and_margined_tasks["filling"]
    problem = image.problem
    _, solution = _psnr_of(image, "cg-sense", maps="auto")
    operator, state = _model(solution, problem.operator)
    assert state.shape[1] == 4 and operator is not problem.operator              # the model: both components
    held = _held_out(image, column_mask(problem.operator), 0.2, 0)
    through_model = _prediction_error(operator, state, problem.y, problem.sigma_y, held)
    through_one_map = _prediction_error(problem.operator, solution.result.x, problem.y, problem.sigma_y, held)
    assert through_model < 0.5 * through_one_map, (through_model, through_one_map)
    _, one_map = _psnr_of(image, "cg-sense", maps=1)
    assert _model(one_map, problem.operator)[1] is one_map.result.x             # one map: the image itself
