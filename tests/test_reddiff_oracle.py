"""RED-Diff on an image-like Gaussian oracle (d = 256), float64, CPU.

Prior: a stationary squared-exponential Gaussian field on 16 x 16 (length 2 px, per-pixel variance 0.04, mean 0.5);
40 % of the pixels observed with sigma_y = 0.05; the exact posterior mean from dense algebra. Errors are in
posterior-std units, ``||mu - m_post|| / sqrt(tr C_post)`` (one exact posterior sample scores ~1).
"""
from __future__ import annotations

import math

import pytest
import torch

from invdiff.operators.inpainting import Inpainting
from invdiff.priors.analytic import StationaryGaussianPrior
from invdiff.problem import simulate
from invdiff.samplers.reddiff import sample_reddiff

F64 = torch.float64


def _case():
    k = torch.fft.fftfreq(16, dtype=F64)
    power = torch.exp(-2 * math.pi ** 2 * 4.0 * (k[:, None] ** 2 + k[None, :] ** 2))
    prior = StationaryGaussianPrior(torch.full((1, 16, 16), 0.5, dtype=F64), power * (0.04 / power.mean()))
    generator = torch.Generator().manual_seed(0)
    operator = Inpainting(torch.rand(16, 16, generator=generator) < 0.4)
    problem = simulate(operator, prior.sample(1, generator), 0.05, generator)
    post = prior.posterior(problem)
    return prior, problem, post.mean.reshape(-1), post.cov.diagonal().sum().sqrt()


def _error(result, mean, scale) -> float:
    return float((result.x.reshape(-1) - mean).norm() / scale)


def test_score_weighting_with_antithetic_pairs_reaches_the_posterior_mean():
    """weighting="score", lam 1, antithetic, 300 steps at lr 0.003: within 0.1 posterior std of the exact mean."""
    prior, problem, mean, scale = _case()
    result = sample_reddiff(problem, prior, steps=300, lr=0.003, lam=1.0, weighting="score", antithetic=True,
                            generator=torch.Generator().manual_seed(1))
    assert _error(result, mean, scale) <= 0.1
    assert result.diagnostics["nfe"] == 600 and result.diagnostics["weighting"] == "score"


def test_paper_weighting_does_not_reach_it():
    """The paper's weighting (the defaults) stays far from the posterior mean on this family: its regulariser is
    nearly isotropic (module docstring). Guards the documented limitation; if it starts to pass, update the docs."""
    prior, problem, mean, scale = _case()
    result = sample_reddiff(problem, prior, generator=torch.Generator().manual_seed(1))
    assert _error(result, mean, scale) > 0.5


def test_antithetic_pair_cancels_the_noise_of_an_affine_denoiser():
    """For a Gaussian prior D is affine, so the pair gives D(mu) exactly: two seeds end at the same mu (to Adam's
    rounding), while single draws differ."""
    prior, problem, _, _ = _case()
    runs = [sample_reddiff(problem, prior, steps=20, lr=0.01, lam=1.0, weighting="score", antithetic=anti,
                           generator=torch.Generator().manual_seed(seed)).x for anti in (True, False) for seed in (1, 2)]
    assert torch.allclose(runs[0], runs[1], atol=1e-9)
    assert not torch.allclose(runs[2], runs[3], atol=1e-3)


def test_bad_weighting_is_named():
    prior, problem, _, _ = _case()
    with pytest.raises(ValueError, match="weighting"):
        sample_reddiff(problem, prior, steps=2, weighting="inverse")
