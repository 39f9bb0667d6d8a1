"""ADS (invdiff.samplers.active): the score against a brute-force float64 computation, the first choice on a prior
whose variance sits in one Fourier column, that no unchosen line is read, determinism, pixels for inpainting."""
from __future__ import annotations

import math

import pytest
import torch

import invdiff
from invdiff.errors import InputError
from invdiff.operators.fft import fft2c, real_to_complex
from invdiff.operators.inpainting import Inpainting
from invdiff.operators.mri import CartesianMRI
from invdiff.priors.analytic import StationaryGaussianPrior
from invdiff.problem import InverseProblem
from invdiff.samplers.active import (RetrospectivePixels, mixture_entropy_scores, pairwise_squared_distances,
                                     sample_ads, selection_schedule)
from invdiff.tasks.scan import RetrospectiveAcquisition

H = W = 16
HOT = 3                                   # fft2 column index of the high-variance pair (+3 and -3)
HOT_CENTRED = {W // 2 + HOT, W // 2 - HOT}  # the same columns in centred k-space (fft2c): 11 and 5


def hot_column_prior(hot_variance: float = 100.0) -> StationaryGaussianPrior:
    """A complex stationary Gaussian field whose Fourier variance is 0.01 except on the columns +-HOT (fft2 order)."""
    power = torch.full((H, W), 0.01, dtype=torch.float64)
    power[:, HOT] = power[:, W - HOT] = hot_variance
    return StationaryGaussianPrior(torch.zeros(2, H, W), power)


def column_problem(prior, seed: int = 0, centre: int = 2):
    """Single-coil Cartesian MRI of a draw from ``prior``, ``centre`` central columns measured, a recording
    retrospective acquisition of the fully sampled k-space."""
    x = prior.sample(1, generator=torch.Generator().manual_seed(seed)).float()
    acquisition = RetrospectiveAcquisition(fft2c(real_to_complex(x)), 1.0, multicoil=False)
    mask = torch.zeros(W, dtype=torch.bool)
    mask[W // 2 - centre // 2: W // 2 - centre // 2 + centre] = True
    operator = CartesianMRI(mask, img_size=(H, W))
    return InverseProblem(operator, operator.A(x), 0.01, acquisition=acquisition), x


def brute_force_score(predictions, sigma, exponent="positive", weights=None):
    """The paper's formula with Python floats, pair by pair and line by line (float64 throughout)."""
    n, _, lines = predictions.shape
    y = predictions.double().tolist()
    w = [1.0 / n] * n if weights is None else [float(v) / float(sum(weights)) for v in weights]
    sign = 1.0 if exponent == "positive" else -1.0
    scores = []
    for line in range(lines):
        total = 0.0
        for j in range(n):
            inner = 0.0
            for i in range(n):
                d2 = sum((a[line] - b[line]) ** 2 for a, b in zip(y[i], y[j]))
                inner += n * w[i] * math.exp(sign * d2 / (2 * sigma ** 2))
            total += n * w[j] * math.log(inner)
        scores.append(sign * total)
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("exponent", ["positive", "negative"])
@pytest.mark.parametrize("weighted", [False, True])
def test_score_matches_brute_force(exponent, weighted):
    g = torch.Generator().manual_seed(0)
    predictions = torch.randn(5, 7, 6, generator=g, dtype=torch.float32)    # float32 in, float64 math
    weights = torch.rand(5, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    got = mixture_entropy_scores(pairwise_squared_distances(predictions), 2.0, exponent=exponent, weights=weights)
    expected = brute_force_score(predictions, 2.0, exponent, weights)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_uniform_weights_are_the_unweighted_score():
    predictions = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1))
    d2 = pairwise_squared_distances(predictions)
    torch.testing.assert_close(mixture_entropy_scores(d2, 1.0, weights=torch.full((4,), 0.7)),
                               mixture_entropy_scores(d2, 1.0), rtol=1e-13, atol=1e-13)


def test_score_does_not_overflow():
    """d2 / (2 sigma^2) = 5000: exp overflows even float64; logsumexp gives sum_j log(1 + e^a) = 2 (a + log1p(e^-a))."""
    predictions = torch.zeros(2, 1, 1)
    predictions[1, 0, 0] = 100.0                                             # d2 = 1e4, sigma = 1
    a = 1e4 / 2
    score = mixture_entropy_scores(pairwise_squared_distances(predictions), 1.0)
    assert torch.isfinite(score).all()
    assert score.item() == pytest.approx(2 * (a + math.log1p(math.exp(-a))), rel=1e-14)


def test_selection_schedule_spreads_choices_in_the_window():
    # the reference: 31 choices in [50, 2500) of 10,000 steps, one per selection
    schedule = selection_schedule(10_000, 31, 0.005, 0.25)
    assert len(schedule) == 31 and all(k == 1 for _, k in schedule)
    assert schedule[0][0] == 50 and schedule[-1][0] < 2500
    # more choices than window steps: top-k per selection, all choices kept
    schedule = selection_schedule(20, 11, 0.0, 0.25)
    assert [s for s, _ in schedule] == [0, 1, 2, 3, 4] and sum(k for _, k in schedule) == 11


def test_ads_picks_the_high_variance_column_first():
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    result = sample_ads(problem, prior, budget=4, particles=4, steps=20, generator=torch.Generator().manual_seed(0))
    order = result.diagnostics["acquisition_order"]
    assert order[0] in HOT_CENTRED, order
    assert set(order) == HOT_CENTRED                                          # both halves of the pair first
    first_scores = torch.tensor(result.diagnostics["scores"][0])
    cold = [c for c in range(W) if c not in HOT_CENTRED and not problem.operator.mask[c]]
    assert first_scores[order[0]] > first_scores[cold].max() + 1.0


def test_kolchinsky_tracey_option_also_finds_the_column():
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    result = sample_ads(problem, prior, budget=3, particles=4, steps=20, sigma=10.0, exponent="negative",
                        generator=torch.Generator().manual_seed(0))
    assert result.diagnostics["acquisition_order"][0] in HOT_CENTRED


def test_no_unchosen_line_is_ever_read():
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    initial = problem.operator.mask.clone()
    result = sample_ads(problem, prior, budget=9, particles=3, steps=12, generator=torch.Generator().manual_seed(2))
    order = result.diagnostics["acquisition_order"]
    requests = problem.acquisition.requests
    assert len(order) == 7 and len(set(order)) == 7
    assert len(requests) == result.diagnostics["acquisitions"] >= 1
    allowed = initial.clone()
    chosen_so_far = 0
    for request in requests:
        new = request & ~allowed
        chosen_so_far += int(new.sum())
        # every line asked for was measured before or is among the lines chosen so far, in order
        allowed[order[:chosen_so_far]] = True
        assert not (request & ~allowed).any(), (request, allowed)
    assert torch.equal(requests[-1], result.diagnostics["mask"])
    assert int(result.diagnostics["mask"].sum()) == 9
    assert torch.equal(result.diagnostics["initial_mask"], initial)
    assert torch.equal(problem.operator.mask, initial)                     # the input operator is unchanged


def test_unacquirable_lines_are_never_chosen():
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    acquirable = torch.ones(W, dtype=torch.bool)
    acquirable[sorted(HOT_CENTRED)] = False                                 # the scanner cannot reach them
    problem.acquisition.acquirable = acquirable
    result = sample_ads(problem, prior, budget=5, particles=3, steps=12, generator=torch.Generator().manual_seed(0))
    assert not set(result.diagnostics["acquisition_order"]) & HOT_CENTRED


def test_deterministic_with_a_seed():
    prior = hot_column_prior(hot_variance=1.0)                              # a weak column: choices are close
    runs = []
    for _ in range(2):
        problem, _ = column_problem(prior, seed=3)
        runs.append(sample_ads(problem, prior, budget=8, particles=4, steps=15,
                               generator=torch.Generator().manual_seed(5)))
    assert runs[0].diagnostics["acquisition_order"] == runs[1].diagnostics["acquisition_order"]
    assert torch.equal(runs[0].x, runs[1].x)
    other = sample_ads(column_problem(prior, seed=3)[0], prior, budget=8, particles=4, steps=15,
                       generator=torch.Generator().manual_seed(6))
    assert not torch.equal(other.x, runs[0].x)


def test_final_data_consistency_pastes_the_measured_lines():
    prior = hot_column_prior()
    problem, x = column_problem(prior)
    result = sample_ads(problem, prior, budget=6, particles=3, steps=10, guidance=0.0,
                        generator=torch.Generator().manual_seed(0))
    mask = result.diagnostics["mask"]
    measured = fft2c(real_to_complex(x))[..., mask]
    for particle in result.samples:
        torch.testing.assert_close(fft2c(real_to_complex(particle))[..., mask], measured, rtol=0, atol=1e-5)


def test_registered_and_reconstructs_through_invdiff_sample():
    prior = hot_column_prior()
    problem, x = column_problem(prior)
    result = invdiff.sample("ads", problem, prior, budget=8, particles=4, steps=20,
                            generator=torch.Generator().manual_seed(0))
    zero_filled = problem.operator.A_adjoint(problem.y)
    assert (result.x - x).norm() < 0.5 * (zero_filled - x).norm()          # the chosen lines carry the image
    d = result.diagnostics
    assert d["mask"].dtype == torch.bool and d["mask"].shape == (W,)
    assert d["nfe"] == 20 and d["particle_evaluations"] == 80
    assert isinstance(d["acquisition_order"], list) and all(isinstance(c, int) for c in d["acquisition_order"])


def test_without_acquisition_is_an_input_error():
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    bare = InverseProblem(problem.operator, problem.y, problem.sigma_y)
    with pytest.raises(InputError, match="no acquisition"):
        sample_ads(bare, prior, budget=4, particles=2, steps=5)


def test_pixel_selection_for_inpainting():
    """A diagonal-variance prior with one high-variance 2 x 2 patch: the first patch chosen is that one."""
    from invdiff.priors.analytic import DiagonalGaussianPrior

    var = torch.full((2, 8, 8), 0.01, dtype=torch.float64)
    var[:, 4:6, 2:4] = 25.0
    prior = DiagonalGaussianPrior(torch.zeros(2, 8, 8), var)
    x = prior.sample(1, generator=torch.Generator().manual_seed(0)).float()
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[::4, ::4] = True
    operator = Inpainting(mask, channels=2)
    acquisition = RetrospectivePixels(x)
    problem = InverseProblem(operator, operator.A(x), 0.01, acquisition=acquisition)
    result = sample_ads(problem, prior, budget=4 + 8, patch=2, particles=4, steps=12,
                        generator=torch.Generator().manual_seed(0))
    d = result.diagnostics
    assert d["acquisition_order"][0] == 2 * 4 + 1                           # patch row 2, column 1 of the 4 x 4 grid
    assert d["mask"].shape == (8, 8) and d["mask"][4:6, 2:4].all()
    for request in acquisition.requests:                                     # nothing outside the chosen patches
        assert not (request.reshape(8, 8) & ~d["mask"]).any()


@pytest.mark.parametrize("options", [{"weights": "likelihood"}, {"guidance_norm": "ensemble"},
                                     {"score_dc_iterations": 3}, {"score_lookahead": 2}])
def test_options_still_find_the_column(options):
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    result = sample_ads(problem, prior, budget=3, particles=4, steps=20, generator=torch.Generator().manual_seed(0),
                        **options)
    assert result.diagnostics["acquisition_order"][0] in HOT_CENTRED


def test_magnitude_mean_output_is_the_mean_magnitude():
    """The reference's output: |x| is the particles' mean magnitude, the phase that of their mean."""
    prior = hot_column_prior()
    problem, _ = column_problem(prior)
    result = sample_ads(problem, prior, budget=4, particles=3, steps=10, output="magnitude-mean",
                        generator=torch.Generator().manual_seed(0))
    particles = result.samples[:, 0]
    expected = torch.linalg.vector_norm(particles, dim=1).mean(0)
    torch.testing.assert_close(torch.linalg.vector_norm(result.x[0], dim=0), expected, rtol=1e-5, atol=1e-6)


def test_lookahead_carries_particles_to_samples_not_to_means():
    """score_lookahead: on a Gaussian prior the deterministic DDIM lookahead from sigma_t ends near a prior draw (its
    spread over many particles is the prior's power at every frequency, up to the first-order DDIM error), where the
    Tweedie estimate keeps only P^2 / (P + sigma_t^2) of it; and each selection costs K batched passes more."""
    from invdiff.samplers._common import NetworkCalls, call_prior
    from invdiff.samplers.active import _lookahead

    prior = hot_column_prior(hot_variance=4.0)                 # power 4 on columns +-3, 0.01 elsewhere
    sigma_t, n = 5.0, 4000
    generator = torch.Generator().manual_seed(1)
    x = prior.sample(n, generator=generator).float()
    x = x + sigma_t * torch.randn(x.shape, generator=generator)
    calls = NetworkCalls()
    x0_hat = call_prior(prior, x, torch.full((n,), sigma_t), NetworkCalls())
    ends = _lookahead(prior, x, x0_hat, sigma_t, 0.002, 100, calls)      # 24 steps: -9 % / -16 % (first order)
    assert calls.nfe == 100

    def column_power(images):                                  # per-column mean |F x|^2 (orthonormal fft2)
        k = torch.fft.fft2(torch.complex(images[:, 0].double(), images[:, 1].double()), norm="ortho")
        return k.abs().square().mean(dim=(0, 1))
    hot, cold = column_power(ends)[HOT], column_power(ends)[0]
    # a complex field with per-part power P has |F x|^2 of mean 2 P
    assert hot == pytest.approx(2 * 4.0, rel=0.05) and cold == pytest.approx(2 * 0.01, rel=0.06)
    tweedie_cold = column_power(x0_hat)[0]
    assert tweedie_cold < 0.01 * cold                           # the mean has lost the low-power detail
    problem, _ = column_problem(prior)
    plain = sample_ads(problem, prior, budget=4, particles=3, steps=10, generator=torch.Generator().manual_seed(0))
    looked = sample_ads(problem, prior, budget=4, particles=3, steps=10, score_lookahead=3,
                        generator=torch.Generator().manual_seed(0))
    selections = len(looked.diagnostics["selection_steps"])
    assert looked.diagnostics["nfe"] == plain.diagnostics["nfe"] + 3 * selections
    assert looked.diagnostics["backward_passes"] == plain.diagnostics["backward_passes"] == 10
    with pytest.raises(InputError, match="score_lookahead"):
        sample_ads(problem, prior, budget=4, particles=3, steps=10, score_lookahead=-1)
