"""Contract tests run over every registered operator, built-in and plugin alike.

Each operator registers a small ``example``; these tests check the algebra that samplers rely on:
linearity, adjointness |<Ax, y> - <x, A^H y>| / (|Ax| |y|), the operator norm of normalised operators,
the pseudo-inverse on the range, batch consistency, dtype and device handling, and value semantics.
"""
import pytest
import torch

import invdiff
from invdiff.operators.base import Operator

NAMES = invdiff.list_operators()


def _example(name, dtype=torch.float32):
    op = invdiff.example_operator(name)
    assert isinstance(op, Operator), f"{name}: example must be an invdiff Operator, got {type(op)}"
    return op.to(dtype)


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _inner(a, b):
    return (a * b).sum()


def test_registry_is_not_empty():
    assert len(NAMES) >= 6, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_dtype(name):
    for dtype in (torch.float32, torch.float64):
        op = _example(name, dtype)
        x = _randn((2, *op.in_shape), dtype, 0)
        y = op.A(x)
        assert y.dtype == dtype and not y.is_complex(), f"{name}: A gave {y.dtype} for {dtype} input"
        assert y.shape[0] == 2
        back = op.A_adjoint(y)
        assert back.shape == x.shape and back.dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_linearity(name):
    op = _example(name, torch.float64)
    x1, x2 = _randn((1, *op.in_shape), torch.float64, 1), _randn((1, *op.in_shape), torch.float64, 2)
    lhs = op.A(2.5 * x1 - 0.7 * x2)
    rhs = 2.5 * op.A(x1) - 0.7 * op.A(x2)
    assert (lhs - rhs).norm() / rhs.norm() < 1e-12


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("name", NAMES)
def test_adjointness(name, dtype, bound):
    op = _example(name, dtype)
    x = _randn((2, *op.in_shape), dtype, 3)
    Ax = op.A(x)
    y = _randn(Ax.shape, dtype, 4)
    error = (_inner(Ax, y) - _inner(x, op.A_adjoint(y))).abs() / (Ax.norm() * y.norm())
    assert error < bound, f"{name}: adjoint mismatch {error:.3e} in {dtype}"


@pytest.mark.parametrize("name", NAMES)
def test_operator_norm_of_normalised_operators(name):
    op = _example(name, torch.float64)
    if not op.normalized:
        pytest.skip(f"{name} is not normalised")
    x = _randn((1, *op.in_shape), torch.float64, 5)
    for _ in range(200):  # power iteration on A^H A
        x = op.A_adjoint(op.A(x))
        x = x / x.norm()
    norm_sq = op.A(x).norm() ** 2
    assert norm_sq.sqrt() <= 1 + 1e-4, f"{name}: ||A|| = {norm_sq.sqrt():.6f} > 1"


@pytest.mark.parametrize("name", NAMES)
def test_pseudo_inverse_on_range(name):
    op = _example(name, torch.float64)
    x = _randn((2, *op.in_shape), torch.float64, 6)
    y = op.A(x)
    relative = (op.A(op.A_dagger(y)) - y).norm() / y.norm()
    assert relative < 1e-4, f"{name}: A A^+ y differs from y by {relative:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_batch_is_stack_of_singles(name):
    op = _example(name, torch.float64)
    x = _randn((3, *op.in_shape), torch.float64, 7)
    batched = op.A(x)
    singles = torch.cat([op.A(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, singles, rtol=1e-10, atol=1e-12)
    y = _randn(batched.shape, torch.float64, 8)
    assert torch.allclose(op.A_adjoint(y), torch.cat([op.A_adjoint(y[i:i + 1]) for i in range(3)]),
                          rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_state_lives_in_buffers_and_moves(name):
    op = _example(name)
    stray = [k for k, v in vars(op).items() if isinstance(v, torch.Tensor)]
    assert not stray, f"{name}: tensors {stray} are plain attributes; register them as buffers so .to() moves them"
    moved = op.to("meta")
    assert all(b.device.type == "meta" for b in moved.buffers()), f"{name}: a buffer did not move"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_runs_on_cuda(name):
    op = _example(name).to("cuda")
    x = _randn((2, *op.in_shape), torch.float32, 9)
    reference = _example(name).A(x)
    assert torch.allclose(op.A(x.cuda()).cpu(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_A_stores_nothing_and_replace_copies(name):
    op = _example(name)
    before = {k: v.clone() for k, v in op.state_dict().items()}
    keys = set(vars(op))
    x = _randn((1, *op.in_shape), torch.float32, 10)
    y = op.A(x)
    op.A_adjoint(y)
    assert set(vars(op)) == keys, f"{name}: A or A_adjoint added attributes {set(vars(op)) - keys}"
    for k, v in op.state_dict().items():
        assert torch.equal(v, before[k]), f"{name}: buffer {k} changed during A"
    copy = op.replace()
    assert copy is not op and type(copy) is type(op)
    assert torch.allclose(copy.A(x), y)


@pytest.mark.parametrize("name", NAMES)
def test_deepinv_adjointness_test_passes(name):
    """deepinv's own check, ``||A - B^T||_F / ||A||_F`` by Monte Carlo (B = our A_adjoint), in float64.

    deepinv draws its probes from the global generator: seeded here, in the test, never in the library.
    """
    op = _example(name, torch.float64)
    torch.manual_seed(12)
    error = float(op.adjointness_test(u=_randn((1, *op.in_shape), torch.float64, 12), num_samples=4))
    assert abs(error) < 1e-9, f"{name}: deepinv adjointness_test = {error:.3e}"


@pytest.mark.parametrize("name", NAMES)
def test_deepinv_compute_norm_matches_our_power_iteration(name):
    """deepinv's ``compute_norm`` (power iteration through ``A_adjoint_A``) agrees with 300 plain power iterations
    on ``A^T A`` to 1 %, and stays <= 1 for operators that say they are normalised."""
    op = _example(name, torch.float64)
    x = _randn((1, *op.in_shape), torch.float64, 13)
    theirs = float(op.compute_norm(x, max_iter=300, tol=1e-9, verbose=False, squared=True))
    v = x.clone()
    for _ in range(300):
        v = op.A_adjoint(op.A(v))
        v = v / v.norm()
    ours = float(op.A(v).norm() ** 2)
    assert theirs == pytest.approx(ours, rel=1e-2), f"{name}: deepinv ||A||^2 {theirs:.6g}, ours {ours:.6g}"
    if op.normalized:
        assert theirs <= 1 + 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_fast_normal_operator_is_a_adjoint_of_a(name):
    """``A_adjoint_A`` (the closed form deepinv's solvers and ours call) equals ``A_adjoint(A(x))``."""
    op = _example(name, torch.float64)
    x = _randn((2, *op.in_shape), torch.float64, 14)
    expected = op.A_adjoint(op.A(x))
    assert torch.allclose(op.A_adjoint_A(x), expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))