"""Sliced Wasserstein distance: the 1-D distance equals scipy's exact one (weighted, unequal sizes, p = 1), and
the sliced distance matches closed forms: SW_2 between a set and its shift by c is |c| / sqrt(d) (E[theta_i^2]
= 1/d), and between N(0, I) and N(0, 4 I) samples it approaches W_2 of the projections, |2 - 1| = 1."""
import math

import pytest
import torch
from scipy.stats import wasserstein_distance

from invdiff.metrics_distributions import sliced_wasserstein, wasserstein_1d

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("weighted", [False, True])
def test_one_dimensional_distance_is_exact(weighted):
    g = _gen(0)
    a, b = torch.randn(1, 7, generator=g, dtype=F64), 2 * torch.randn(1, 5, generator=g, dtype=F64) + 1
    wa = wb = None
    if weighted:
        wa, wb = torch.rand(7, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64)
        wa, wb = wa / wa.sum(), wb / wb.sum()
    expected = wasserstein_distance(a[0].numpy(), b[0].numpy(), None if wa is None else wa.numpy(),
                                    None if wb is None else wb.numpy())
    assert wasserstein_1d(a, b, p=1, a_weights=wa, b_weights=wb).item() == pytest.approx(expected, rel=1e-12)


def test_sliced_distance_closed_forms():
    x = torch.randn(400, 4, generator=_gen(1), dtype=F64)
    assert sliced_wasserstein(x, x).item() == 0.0
    shift = torch.tensor([3.0, 0, 0, 0], dtype=F64)
    assert sliced_wasserstein(x, x + shift, num_projections=1000, generator=_gen(2)).item() == pytest.approx(
        3 / math.sqrt(4), rel=0.05)
    wide = 2 * torch.randn(2000, 4, generator=_gen(3), dtype=F64)
    narrow = torch.randn(2000, 4, generator=_gen(4), dtype=F64)
    assert sliced_wasserstein(wide, narrow, generator=_gen(5)).item() == pytest.approx(1.0, abs=0.05)


def test_weights_equal_repeated_samples():
    """A particle of weight 2/3 is the same distribution as that particle listed twice."""
    x = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    y = torch.randn(5, 2, generator=_gen(6), dtype=F64)
    weighted = sliced_wasserstein(x, y, x_weights=torch.tensor([2.0, 1.0]), generator=_gen(7))
    repeated = sliced_wasserstein(x[[0, 0, 1]], y, generator=_gen(7))
    assert weighted.item() == pytest.approx(repeated.item(), rel=1e-12)


def test_bad_input_is_named():
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="entries"):
        sliced_wasserstein(x, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="x_weights"):
        sliced_wasserstein(x, x, x_weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(x, x, num_projections=0)
