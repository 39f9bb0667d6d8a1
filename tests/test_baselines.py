"""Classical baselines: each solves a stated convex problem; the tests check the solution against the closed
form (Tikhonov) or against first-order optimality (any small perturbation raises the convex objective)."""
import numpy as np
import pytest
import torch

import invdiff
from invdiff.operators.matrix import MatrixOperator, to_dense
from invdiff.registry import get_sampler
from invdiff.samplers.baselines import (_gradient, _gradient_adjoint, _OrthonormalWavelet,
                                        _soft_threshold_modulus)


def _problem(channels=1, size=8, m=40, seed=0, sigma_y=0.01):
    g = torch.Generator().manual_seed(seed)
    d = channels * size * size
    op = MatrixOperator(torch.randn(m, d, generator=g, dtype=torch.float64) / d ** 0.5, (channels, size, size))
    x = torch.zeros(1, channels, size, size, dtype=torch.float64)
    x[..., 2:6, 3:7] = 1.0                                            # a piecewise-constant truth
    return invdiff.simulate(op, x, sigma_y, g), x


def _run(name, problem, **kw):
    return get_sampler(name).factory(problem, None, **kw).x


def _norm_squared(problem):
    """The ``||A||^2`` the solvers scale ``lam`` by (their power-iteration estimate, read from diagnostics)."""
    return get_sampler("tv").factory(problem, None, max_iter=0).diagnostics["operator_norm_squared"]


def test_zero_filled_is_the_adjoint():
    problem, _ = _problem()
    assert torch.allclose(_run("zero-filled", problem), problem.operator.A_adjoint(problem.y))


def test_cg_matches_tikhonov_closed_form():
    problem, _ = _problem()
    A = to_dense(problem.operator)
    lam = 0.05
    ridge = lam * _norm_squared(problem)                              # lam is relative to ||A||^2
    assert abs(ridge / (lam * torch.linalg.matrix_norm(A, 2) ** 2) - 1.01) < 1e-3
    expected = torch.linalg.solve(A.T @ A + ridge * torch.eye(A.shape[1], dtype=A.dtype), A.T @ problem.y[0])
    got = _run("cg-sense", problem, lam=lam, max_iter=200, tol=1e-12)
    assert torch.allclose(got.flatten(), expected, atol=1e-8)


def _wavelet_matrix(shape, levels):
    """The dense orthonormal wavelet matrix W (columns = transforms of basis images)."""
    transform = _OrthonormalWavelet(shape, "db4", levels)
    eye = np.eye(shape[0] * shape[1]).reshape(-1, *shape)
    return transform.forward(eye).reshape(len(eye), -1).T


def _l1_reference(A, y, W, lam):
    """min 1/2 |A W^T c - y|^2 + lam |c|_1 as a bound-constrained smooth problem in (c+, c-) >= 0 (exact)."""
    from scipy.optimize import minimize
    B = A @ W.T
    n = B.shape[1]

    def f(v):
        c = v[:n] - v[n:]
        r = B @ c - y
        g = B.T @ r
        return 0.5 * r @ r + lam * v.sum(), np.concatenate([g + lam, -g + lam])

    v = minimize(f, np.zeros(2 * n), jac=True, method="L-BFGS-B", bounds=[(0, None)] * (2 * n),
                 options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-12}).x
    return W.T @ (v[:n] - v[n:])


def _tv_value(x, lam, eps=0.0):
    g = _gradient(x)
    return lam * torch.sqrt((g ** 2).sum(dim=(1, 2)) + eps ** 2).sum()


def _tv_reference(problem, lam, eps=1e-5):
    """Smoothed TV (sqrt(|grad x|^2 + eps^2)) by L-BFGS in float64: within lam * eps * pixels of the exact value."""
    x = problem.operator.A_adjoint(problem.y).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=1500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = 0.5 * (problem.residual(x) ** 2).sum() + _tv_value(x, lam, eps)
        value.backward()
        return value

    for _ in range(2):
        opt.step(closure)
    return x.detach()


def _objective(problem, x, lam, solver):
    data = 0.5 * float((problem.residual(x) ** 2).sum())
    if solver == "tv":
        return data + float(_tv_value(x, lam))
    transform = _OrthonormalWavelet(tuple(x.shape[-2:]), "db4", 1)
    return data + lam * float(np.abs(transform.forward(x.numpy())).sum())


@pytest.mark.parametrize("solver,kw", [("l1-wavelet", {"levels": 1, "max_iter": 3000}),
                                       ("tv", {"max_iter": 1000})])
def test_solution_matches_an_independent_solver(solver, kw):
    """Same convex objective solved by FISTA/PDHG and by L-BFGS(-B): equal optimal values and points."""
    problem, _ = _problem()
    relative_lam = 0.02
    x = _run(solver, problem, lam=relative_lam, **kw)
    lam = relative_lam * _norm_squared(problem)                       # the weight in the solved objective
    if solver == "tv":
        reference = _tv_reference(problem, lam)
    else:
        A = to_dense(problem.operator).numpy()
        W = _wavelet_matrix((8, 8), 1)
        reference = torch.from_numpy(_l1_reference(A, problem.y[0].numpy(), W, lam)).reshape(x.shape)
    ours, best = _objective(problem, x, lam, solver), _objective(problem, reference, lam, solver)
    assert ours <= best * (1 + 1e-4) + 1e-9, f"{solver}: objective {ours:.8f} vs reference {best:.8f}"
    assert (x - reference).norm() / reference.norm() < 2e-2


@pytest.mark.parametrize("solver,kw", [("l1-wavelet", {"levels": 1, "max_iter": 50}), ("tv", {"max_iter": 50}),
                                       ("cg-sense", {"max_iter": 20})])
def test_solution_does_not_depend_on_the_operator_scale(solver, kw):
    """``lam`` is relative to ``||A||^2`` and ``x_0 = A^T y / ||A||^2``: A -> c A, y -> c y gives the same iterates."""
    problem, _ = _problem()
    scaled_operator = MatrixOperator(30.0 * to_dense(problem.operator), problem.operator.in_shape)
    scaled = invdiff.InverseProblem(scaled_operator, 30.0 * problem.y, 30.0 * problem.sigma_y)
    x = _run(solver, problem, lam=0.02, generator=torch.Generator().manual_seed(0), **kw)
    x_scaled = _run(solver, scaled, lam=0.02, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(x, x_scaled, rtol=1e-6, atol=1e-9)


def test_unknown_initialisation_is_refused():
    problem, _ = _problem()
    with pytest.raises(ValueError, match="init must be one of"):
        _run("tv", problem, init="median")


def test_wavelet_is_unitary():
    transform = _OrthonormalWavelet((16, 16), "db4", 2)
    x = np.random.RandomState(0).randn(3, 16, 16)
    c = transform.forward(x)
    assert np.isclose((c ** 2).sum(), (x ** 2).sum())
    assert np.allclose(transform.inverse(c, x.shape), x)


def test_complex_soft_threshold_commutes_with_phase():
    """Complex images: shrinking the modulus of (re, im) pairs commutes with a global phase rotation."""
    c = np.random.RandomState(1).randn(2, 2, 5)
    angle = 0.7
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rotate = lambda a: np.einsum("ij,bjk->bik", rot, a)  # noqa: E731
    assert np.allclose(_soft_threshold_modulus(rotate(c), 0.3, True), rotate(_soft_threshold_modulus(c, 0.3, True)))


def test_tv_gradient_adjoint_is_exact():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)
    p = torch.randn(2, 2, 2, 6, 7, generator=g, dtype=torch.float64)
    assert torch.isclose((_gradient(x) * p).sum(), (x * _gradient_adjoint(p)).sum())


def test_fbp_refuses_non_ct_operators():
    problem, _ = _problem()
    with pytest.raises(ValueError, match="needs a CT operator"):
        _run("fbp", problem)
