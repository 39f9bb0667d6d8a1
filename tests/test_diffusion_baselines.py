"""DPS, DiffPIR, DDRM and the deepinv bridge, checked on tiny problems with exact Gaussian posteriors.

The math checked:

* bridge: with ``x = scale u + shift``, ``D_deepinv(u, s) = (D(scale u + shift, scale s) - shift) / scale`` is
  the MMSE denoiser of the mapped prior ``N((m - shift) / scale, S / scale^2)`` (conditional expectation
  commutes with affine maps), for every way deepinv passes sigma; its Jacobian in u equals the prior's in x;
* SVDs for DDRM: ``U^T A x = diag(s) V^T x`` and ``V V^T x = x``, ``||V^T x|| = ||x||`` for every decomposable operator;
* the updates: with a Gaussian prior every DiffPIR / DDRM step (and DPS's when nothing is observed) is
  affine-Gaussian, so the law of the output is known exactly by propagating mean and covariance; the
  samples must match it;
* samplers: same seed -> identical output; output (B, *in_shape) in y's dtype; NFE = forward calls of the
  prior = steps (DPS also backpropagates once per step); an image sees the same noise whatever its batch;
* quality: with a smooth Gaussian prior and y = A x + N(0, 0.01^2), the mean of N samples is much closer to the
  exact posterior mean than the prior mean is: ``||mean - mu_post|| <= bound ||m - mu_post||``, the bound
  stated per sampler (measured values with 256 samples and 5 seeds are in the comments).
"""
import inspect
import math

import pytest
import torch

from invdiff.callbacks import TrajectoryRecorder
from invdiff.operators.inpainting import Inpainting, random_pixel_mask
from invdiff.operators.masks import make_mask
from invdiff.operators.matrix import MatrixOperator, to_dense
from invdiff.operators.mri import CartesianMRI
from invdiff.operators.superres import SuperResolution
from invdiff.priors.analytic import GaussianPrior
from invdiff.priors.base import Denoiser
from invdiff.priors.deepinv_bridge import (DeepinvDenoiserAsPrior, PriorAsDeepinvDenoiser, as_deepinv_denoiser,
                                           as_invdiff_prior)
from invdiff.problem import InverseProblem, simulate
from invdiff.registry import example_operator, get_sampler
from invdiff.samplers.diffusion_baselines import (sample_ddrm, sample_diffpir, sample_dps,
                                                  spectral_decomposition)

F64 = torch.float64
SIGMA_Y = 0.01

# Small step counts that keep each run well under a second on one CPU core.
FAST = {"dps": (sample_dps, {"steps": 200, "zeta": 0.2}),    # zeta scaled down for a 16-pixel image
        "diffpir": (sample_diffpir, {"steps": 100}),
        "ddrm": (sample_ddrm, {"steps": 20})}


def smooth_prior(height=4, width=4, channels=1, *, length=1.5, var=0.04, mean=0.5) -> GaussianPrior:
    """``N(mean, S)``, squared-exponential covariance per channel: images around [0, 1], like the shipped priors."""
    rows, cols = torch.meshgrid(torch.arange(height, dtype=F64), torch.arange(width, dtype=F64), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], 1)
    kernel = var * torch.exp(-((points[:, None] - points[None]) ** 2).sum(-1) / (2 * length ** 2))
    kernel = kernel + 1e-3 * var * torch.eye(height * width, dtype=F64)
    return GaussianPrior(torch.full((channels, height, width), mean, dtype=F64),
                         torch.block_diag(*[kernel] * channels))


def inpainting_4x4() -> Inpainting:
    return Inpainting(random_pixel_mask((4, 4), 0.5, generator=3))


def matrix_8x16() -> MatrixOperator:
    generator = torch.Generator().manual_seed(1)
    return MatrixOperator(torch.randn(8, 16, generator=generator, dtype=F64) / 4, in_shape=(1, 4, 4))


def measured(operator, prior, seed=1) -> InverseProblem:
    generator = torch.Generator().manual_seed(seed)
    return simulate(operator, prior.sample(1, generator), SIGMA_Y, generator)


def replicated(problem: InverseProblem, n: int) -> InverseProblem:
    """The same measurement n times: a batch of n independent posterior samples."""
    return InverseProblem(problem.operator, problem.y.expand(n, *problem.y.shape[1:]).clone(), problem.sigma_y)


class CountingPrior(Denoiser):
    """Wraps a prior and counts its forward calls and the backward passes through its output."""

    def __init__(self, prior: Denoiser):
        super().__init__()
        self.prior = prior
        self.sigma_min, self.sigma_max = prior.sigma_min, prior.sigma_max
        self.channels, self.image_size = prior.channels, prior.image_size
        self.forward_calls = 0
        self.backward_calls = 0

    def _count_backward(self, grad):
        self.backward_calls += 1
        return grad

    def forward(self, x, sigma):
        self.forward_calls += 1
        out = self.prior(x, sigma)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out


# ---- the bridge ----------------------------------------------------------------------------------------------
SIGMA_FORMS = {
    "float": lambda b: 0.3,
    "0-d tensor": lambda b: torch.tensor(0.3),
    "(1,) tensor": lambda b: torch.tensor([0.3]),
    "(B,) tensor": lambda b: torch.linspace(0.1, 0.5, b),
    "(B, 1, 1, 1) tensor": lambda b: torch.linspace(0.1, 0.5, b).reshape(b, 1, 1, 1),
    "list": lambda b: [0.3] * b,
}


@pytest.mark.parametrize("form", list(SIGMA_FORMS))
@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (2.0, -1.0)])
def test_bridge_is_the_denoiser_of_the_affinely_mapped_prior(form, scale, shift):
    # x = scale u + shift with x ~ N(m, S)  <=>  u ~ N((m - shift) / scale, S / scale^2); deepinv's D(u, s) must be
    # that prior's exact denoiser at noise s, whatever form sigma arrives in.
    prior = smooth_prior()
    mapped = GaussianPrior((prior.mean - shift) / scale, prior.cov / scale ** 2)
    denoiser = as_deepinv_denoiser(prior, scale=scale, shift=shift)
    batch = 3
    u = torch.rand(batch, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    sigma = SIGMA_FORMS[form](batch)
    sigma_batch = torch.as_tensor(sigma, dtype=F64).reshape(-1).expand(batch)
    expected = mapped(u, sigma_batch)
    assert torch.allclose(denoiser(u, sigma), expected, rtol=0, atol=1e-12)
    # and it is literally (D(scale u + shift, scale s) - shift) / scale on the invdiff side
    assert torch.allclose((prior(scale * u + shift, scale * sigma_batch) - shift) / scale, expected, atol=1e-12)


def test_bridge_casts_at_the_boundary_and_passes_gradients():
    # float32 in -> float32 out (the analytic prior runs in float64); the Jacobian in u equals the invdiff prior's
    # Jacobian in x at the mapped point (the scale cancels: dD_u/du = (1/scale) dD/dx * scale).
    prior = smooth_prior()
    denoiser = as_deepinv_denoiser(prior, scale=2.0, shift=-1.0)
    u = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    out32 = denoiser(u.float(), 0.2)
    assert out32.dtype == torch.float32
    assert torch.allclose(out32.double(), denoiser(u, 0.2), atol=1e-6)
    jac_deepinv = torch.autograd.functional.jacobian(lambda v: denoiser(v, 0.2), u).reshape(16, 16)
    x = 2.0 * u - 1.0
    jac_invdiff = torch.autograd.functional.jacobian(lambda v: prior(v, torch.tensor([0.4], dtype=F64)), x)
    assert torch.allclose(jac_deepinv, jac_invdiff.reshape(16, 16), atol=1e-12)


def test_reverse_bridge_recovers_the_prior():
    # D(x, sigma) = scale d((x - shift) / scale, sigma / scale) + shift undoes the forward map exactly.
    prior = smooth_prior()
    forward = PriorAsDeepinvDenoiser(prior, scale=2.0, shift=-1.0)
    back = DeepinvDenoiserAsPrior(forward, sigma_min=prior.sigma_min, sigma_max=prior.sigma_max, channels=1,
                                  scale=2.0, shift=-1.0)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    sigma = torch.tensor([0.05, 3.0], dtype=F64)
    assert torch.allclose(back(x, sigma), prior(x, sigma), atol=1e-12)
    # the helpers unwrap instead of stacking wrappers
    assert as_invdiff_prior(forward, sigma_min=0.01, sigma_max=1.0, channels=1, scale=2.0, shift=-1.0) is prior
    assert as_deepinv_denoiser(back, scale=2.0, shift=-1.0) is forward
    with pytest.raises(ValueError, match="scale must be"):
        as_deepinv_denoiser(prior, scale=0.0)


def test_deepinv_ddrm_runs_on_the_bridged_prior():
    # deepinv's own DDRM (global RNG, so it runs inside fork_rng and leaves the caller's RNG untouched) fed the
    # Gaussian prior through the bridge: its sample mean lands near the exact posterior mean, as ours does.
    # Measured: 0.26 of the prior mean's error with 20 linear sigmas (ours: 0.28 with 20 Karras sigmas).
    import deepinv as dinv
    import numpy as np

    prior, operator = smooth_prior(), inpainting_4x4()
    problem = measured(operator, prior)
    posterior = prior.posterior(problem)
    physics = dinv.physics.Inpainting(img_size=(1, 4, 4), mask=operator.mask.to(F64),
                                      noise_model=dinv.physics.GaussianNoise(sigma=SIGMA_Y))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        samples = dinv.sampling.DDRM(as_deepinv_denoiser(prior), sigmas=np.linspace(1, 0, 20))(
            replicated(problem, 256).y, physics)
    error = (samples.mean(0) - posterior.mean).norm() / (prior.mean - posterior.mean).norm()
    assert error < 0.4, f"deepinv DDRM through the bridge: relative error {error:.3f}"


# ---- DDRM's SVDs ---------------------------------------------------------------------------------------------
def _deepinv_inpainting():
    import deepinv as dinv

    mask = random_pixel_mask((4, 4), 0.5, generator=5).to(F64)[None, None]
    return dinv.physics.Inpainting(img_size=(1, 4, 4), mask=mask), (1, 4, 4)


DECOMPOSABLE = {
    "inpainting": lambda: (example_operator("inpainting"), None),
    "cartesian_mri": lambda: (example_operator("cartesian_mri"), None),
    "super_resolution": lambda: (example_operator("super_resolution"), None),
    "matrix": lambda: (example_operator("matrix"), None),
    "deepinv Inpainting": _deepinv_inpainting,
}


@pytest.mark.parametrize("name", list(DECOMPOSABLE))
def test_spectral_decomposition_is_an_svd(name):
    # A = U diag(s) V^T  <=>  U^T (A x) = s * V^T x, with V orthogonal: V V^T x = x and ||V^T x|| = ||x||.
    operator, in_shape = DECOMPOSABLE[name]()
    shape = (2, *(in_shape or operator.in_shape))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    svd = spectral_decomposition(operator, operator.A(x), shape)
    spectral = svd.to_spectral(x)
    assert torch.allclose(svd.ut_y, svd.singular_values * spectral, atol=1e-10)
    assert torch.allclose(svd.from_spectral(spectral), x, atol=1e-10)
    assert torch.allclose(spectral.flatten(1).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-10)
    assert float(svd.singular_values.max()) > 0


@pytest.mark.parametrize("name", ["sense_mri", "parallel_beam_ct"])
def test_ddrm_refuses_operators_without_an_svd(name):
    try:
        operator = example_operator(name)
    except KeyError:
        pytest.skip(f"operator {name!r} is not registered in this checkout")
    problem = InverseProblem(operator, operator.A(torch.zeros(1, *operator.in_shape)), SIGMA_Y)
    with pytest.raises(ValueError, match=rf"DDRM needs a decomposable operator.*{type(operator).__name__}"):
        sample_ddrm(problem, smooth_prior(), steps=2)


# ---- the sampler contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAST))
def test_registered_with_a_keyword_only_signature(name):
    entry = get_sampler(name)
    assert entry.factory is FAST[name][0] and entry.metadata["kind"] == "diffusion"
    parameters = list(inspect.signature(entry.factory).parameters.values())
    assert [p.name for p in parameters[:2]] == ["problem", "prior"]
    keyword = {p.name: p for p in parameters[2:]}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
               for p in keyword.values())
    assert {"steps", "generator", "callback"} <= set(keyword)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", list(FAST))
def test_deterministic_shape_dtype_and_nfe(name, dtype):
    sampler = FAST[name][0]
    operator = inpainting_4x4()
    problem = measured(operator, smooth_prior())
    problem = InverseProblem(operator, replicated(problem, 3).y.to(dtype), SIGMA_Y)
    prior = CountingPrior(smooth_prior())
    steps = 6

    def run(seed):
        return sampler(problem, prior, steps=steps, generator=torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.x.shape == (3, 1, 4, 4) and first.x.dtype == dtype and torch.isfinite(first.x).all()
    assert first.diagnostics["nfe"] == steps == prior.forward_calls
    # DPS differentiates ||y - A D(x)|| through the network once per step; the others never backpropagate.
    assert prior.backward_calls == (steps if name == "dps" else 0)
    assert first.diagnostics.get("backward_passes", 0) == prior.backward_calls
    assert torch.equal(run(0).x, first.x)
    assert not torch.allclose(run(1).x, first.x)
    assert first.diagnostics["seconds"] >= first.diagnostics["network_seconds"] > 0


@pytest.mark.parametrize("name", list(FAST))
def test_an_image_sees_the_same_noise_whatever_its_batch(name):
    # With one generator per image, image 0 of a batch of 2 equals the same image sampled alone.
    sampler = FAST[name][0]
    prior = smooth_prior()
    problem = measured(inpainting_4x4(), prior)
    pair = sampler(replicated(problem, 2), prior, steps=5,
                   generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    alone = sampler(problem, prior, steps=5, generator=[torch.Generator().manual_seed(7)])
    assert torch.allclose(pair.x[:1], alone.x, rtol=0, atol=1e-10)
    assert not torch.allclose(pair.x[0], pair.x[1])


@pytest.mark.parametrize("name", list(FAST))
def test_callback_sees_every_step_and_the_final_reconstruction(name):
    prior = smooth_prior()
    problem = measured(inpainting_4x4(), prior)
    recorder = TrajectoryRecorder(every=1)
    result = FAST[name][0](problem, prior, steps=4, generator=torch.Generator().manual_seed(0), callback=recorder)
    assert result.trajectory is recorder.trajectory and recorder.steps == [0, 1, 2, 3]
    assert torch.equal(recorder.trajectory[-1], result.x)


# ---- the recursion itself, exactly -------------------------------------------------------------------------
# With a Gaussian prior, D(x, s) = m + G_s (x - m), G_s = S (S + s^2 I)^-1, and for DiffPIR and DDRM (and DPS when
# nothing is observed, where its guidance gradient vanishes) every step is affine-Gaussian in x:
# x' = K x + k + N(0, Q). Propagating mean and covariance exactly over the sampler's own sigmas gives the law of its
# output; 4000 samples must match it to Monte-Carlo accuracy (relative errors ~0.01-0.03 measured, while a wrong
# coefficient in any update -- sigma'/sigma for (sigma'/sigma)^2, a missing noise term, eps_hat from the
# wrong x0 -- gives 0.1 to 40). This checks the implementation of each paper's update, not just its outcome.
ZETA_DIFFPIR, ETA_DDRM, ETA_B_DDRM = 0.3, 0.85, 1.0       # the defaults, used by the samplers below


def _dense(problem):
    return to_dense(problem.operator), problem.y[0].reshape(-1).to(F64)


def _initial_law(name, problem, sigma_max):
    """Mean and covariance of x_T: N(0, sigma_max^2 I); DDRM: N(y, sigma_max^2 - sigma_y^2) on observed pixels."""
    d = 16
    if name != "ddrm":
        return torch.zeros(d, dtype=F64), sigma_max ** 2 * torch.eye(d, dtype=F64)
    observed = problem.operator.mask.reshape(-1)
    mean = torch.where(observed, problem.y[0].reshape(-1), 0.0)
    var = torch.where(observed, sigma_max ** 2 - SIGMA_Y ** 2, sigma_max ** 2)
    return mean.to(F64), torch.diag(var.to(F64))


def _affine_step(name, problem, prior, sigma, sigma_next):
    """``(K, k, Q)`` of the step ``x' = K x + k + N(0, Q)``, written from each paper's update (see the samplers)."""
    d = 16
    eye = torch.eye(d, dtype=F64)
    m = prior.mean.reshape(-1)
    gain = prior.cov @ torch.linalg.inv(prior.cov + sigma ** 2 * eye)
    offset = (eye - gain) @ m                                   # x0_hat = gain x + offset
    if name == "dps":                                            # x' = x0 + r^2 (x - x0) + sigma' sqrt(1 - r^2) z
        a, b = (sigma_next / sigma) ** 2, sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
        return (1 - a) * gain + a * eye, (1 - a) * offset, b ** 2 * eye
    if name == "diffpir":                             # x0_data = P x0 + q, x' = x0_data + a (x - x0_data) + b z
        matrix, y = _dense(problem)
        rho_t = 7.0 * SIGMA_Y ** 2 / sigma ** 2
        inverse = torch.linalg.inv(matrix.T @ matrix + rho_t * eye)
        p, q = rho_t * inverse, inverse @ matrix.T @ y
        a, b = math.sqrt(1 - ZETA_DIFFPIR) * sigma_next / sigma, math.sqrt(ZETA_DIFFPIR) * sigma_next
        return (1 - a) * p @ gain + a * eye, (1 - a) * (p @ offset + q), b ** 2 * eye
    # DDRM on inpainting (U = V = I): per pixel x' = alpha x0 + beta x + gamma y + std z, by case of p^(t)
    observed = problem.operator.mask.reshape(-1)
    y = problem.y[0].reshape(-1)
    c = math.sqrt(1 - ETA_DDRM ** 2)
    above = observed & (sigma_next >= SIGMA_Y)
    below = observed & (sigma_next < SIGMA_Y)
    ones = torch.ones(d, dtype=F64)
    alpha = torch.where(above, (1 - ETA_B_DDRM) * ones,
                        torch.where(below, 1 - c * sigma_next / SIGMA_Y, 1 - c * sigma_next / sigma))
    beta = torch.where(observed, 0.0, c * sigma_next / sigma)
    gamma = torch.where(above, ETA_B_DDRM * ones, torch.where(below, c * sigma_next / SIGMA_Y, 0.0))
    std = torch.where(above, math.sqrt(max(sigma_next ** 2 - (ETA_B_DDRM * SIGMA_Y) ** 2, 0.0)), ETA_DDRM * sigma_next)
    # torch.where with Python float scalars returns float32
    alpha, beta, gamma, std = (t.to(F64) for t in (alpha, beta, gamma, std))
    return alpha[:, None] * gain + torch.diag(beta), alpha * offset + gamma * y, torch.diag(std ** 2)


RECURSION_CASES = {("dps", "nothing observed"), ("diffpir", "nothing observed"), ("ddrm", "nothing observed"),
                   ("diffpir", "matrix"), ("ddrm", "inpainting")}


@pytest.mark.parametrize("name,operator_name", sorted(RECURSION_CASES))
def test_output_law_follows_the_papers_recursion_exactly(name, operator_name):
    prior = smooth_prior()
    if operator_name == "nothing observed":
        operator = Inpainting(torch.zeros(4, 4, dtype=torch.bool))
        problem = InverseProblem(operator, torch.zeros(1, 1, 4, 4, dtype=F64), SIGMA_Y)
    else:
        problem = measured(OPERATORS[operator_name](), prior)
    n = 4000
    result = FAST[name][0](replicated(problem, n), prior, steps=10, generator=torch.Generator().manual_seed(0))
    sigmas = result.diagnostics["sigmas"]
    mean, cov = _initial_law(name, problem, sigmas[0])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        step, shift, noise = _affine_step(name, problem, prior, sigma, sigma_next)
        mean, cov = step @ mean + shift, step @ cov @ step.T + noise
    samples = result.x.reshape(n, -1)
    mean_error = (samples.mean(0) - mean).norm() / cov.trace().sqrt()
    cov_error = (torch.cov(samples.T) - cov).norm() / cov.norm()
    assert mean_error < 0.05 and cov_error < 0.08, f"mean error {mean_error:.3f}, covariance error {cov_error:.3f}"


# ---- quality against the exact posterior ---------------------------------------------------------------------
# Bounds on ||mean of 256 samples - mu_post|| / ||m - mu_post||. Measured over seeds 0-4 (inpainting | matrix):
# DPS 0.055-0.072 | 0.051-0.071, DiffPIR 0.21-0.25 | 0.35-0.37, DDRM 0.26-0.30 | 0.39-0.41. DiffPIR and DDRM
# carry a discretisation bias at 100 / 20 steps (DDRM at 200 steps: 0.09), DPS at 200 steps much less.
QUALITY_BOUNDS = {("dps", "inpainting"): 0.12, ("dps", "matrix"): 0.12,
                  ("diffpir", "inpainting"): 0.35, ("diffpir", "matrix"): 0.5,
                  ("ddrm", "inpainting"): 0.4, ("ddrm", "matrix"): 0.5}
OPERATORS = {"inpainting": inpainting_4x4, "matrix": matrix_8x16}


@pytest.mark.parametrize("name,operator_name", list(QUALITY_BOUNDS))
def test_sample_mean_approaches_the_exact_posterior_mean(name, operator_name):
    sampler, hyper = FAST[name]
    prior = smooth_prior()
    problem = measured(OPERATORS[operator_name](), prior)
    posterior = prior.posterior(problem)
    result = sampler(replicated(problem, 256), prior, generator=torch.Generator().manual_seed(0), **hyper)
    error = (result.x.mean(0) - posterior.mean).norm() / (prior.mean - posterior.mean).norm()
    assert error < QUALITY_BOUNDS[name, operator_name], f"{name} on {operator_name}: relative error {error:.3f}"


@pytest.mark.parametrize("name", list(FAST))
def test_complex_mri_is_two_real_channels(name):
    # Single-coil Cartesian MRI on a (2, 8, 8) complex image: the same oracle, measured errors 0.04-0.24.
    sampler, hyper = FAST[name]
    prior = smooth_prior(8, 8, 2, mean=0.3)
    mask = make_mask("random", shape=(8, 8), acceleration=2, center_fraction=0.25, seed="t.h5")
    problem = measured(CartesianMRI(mask, img_size=(8, 8)), prior)
    posterior = prior.posterior(problem)
    hyper = {**hyper, "steps": min(hyper["steps"], 100), **({"zeta": 0.5} if name == "dps" else {})}
    result = sampler(replicated(problem, 64), prior, generator=torch.Generator().manual_seed(0), **hyper)
    error = (result.x.mean(0) - posterior.mean).norm() / (prior.mean - posterior.mean).norm()
    assert error < 0.35, f"{name} on complex MRI: relative error {error:.3f}"


def test_ddrm_on_super_resolution():
    # The Kronecker SVD of the bicubic x2 operator: measured error 0.08 with 128 samples.
    prior = smooth_prior(8, 8, 1)
    problem = measured(SuperResolution((8, 8), factor=2, kernel="bicubic"), prior)
    posterior = prior.posterior(problem)
    result = sample_ddrm(replicated(problem, 128), prior, steps=20, generator=torch.Generator().manual_seed(0))
    error = (result.x.mean(0) - posterior.mean).norm() / (prior.mean - posterior.mean).norm()
    assert error < 0.15, f"DDRM on super-resolution: relative error {error:.3f}"


@pytest.mark.parametrize("name", list(FAST))
def test_runs_on_a_network_prior_without_touching_its_weights(name):
    # A tiny EDM UNet (float32) on complex single-coil MRI: finite output, DPS backpropagates through the network
    # to x once per step, and no sampler leaves gradients on the network's parameters.
    from invdiff.priors.unet import EDMUNet, UNetConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = EDMUNet(UNetConfig(channels=2, base_channels=8, channel_mults=(1, 2, 2), embedding_dim=16))
    prior = CountingPrior(net)
    operator = example_operator("cartesian_mri")
    x = torch.randn(1, *operator.in_shape, generator=torch.Generator().manual_seed(0)) * 0.3
    problem = simulate(operator, x, SIGMA_Y, torch.Generator().manual_seed(1))
    result = FAST[name][0](problem, prior, steps=3, generator=torch.Generator().manual_seed(0))
    assert result.x.shape == x.shape and result.x.dtype == torch.float32 and torch.isfinite(result.x).all()
    assert prior.forward_calls == 3 and prior.backward_calls == (3 if name == "dps" else 0)
    assert all(p.grad is None for p in net.parameters())


def test_bad_hyperparameters_are_named():
    prior = smooth_prior()
    problem = measured(inpainting_4x4(), prior)
    with pytest.raises(ValueError, match="steps"):
        sample_dps(problem, prior, steps=0)
    with pytest.raises(ValueError, match="zeta"):
        sample_diffpir(problem, prior, zeta=1.5)
    with pytest.raises(ValueError, match="eta_b"):
        sample_ddrm(problem, prior, eta_b=-0.1)
    with pytest.raises(ValueError, match="sigma_min"):
        sample_ddrm(problem, prior, sigma_min=5.0, sigma_max=1.0)
