"""An inverse problem ``y = A x + n``, ``n ~ N(0, sigma_y^2 I)`` on real tensors.

Measurement noise lives here, not in the operator: the same operator serves noisy and noiseless problems.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:                       # operators import deepinv: keep `import invdiff` light
    from invdiff.operators.base import Operator


def _batch_sum(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


@dataclass(frozen=True)
class InverseProblem:
    """``y = A x + n`` with Gaussian noise of per-entry standard deviation ``sigma_y`` (real tensors).

    ``mu_y(x) = ||A x - y||^2 / (2 sigma_y^2)`` is summed over every entry of one batch element, so the
    balance between data and prior does not depend on how many measurements there are.

    ``acquisition`` (optional) is how an active solver gets more data: ``acquisition(mask) -> y`` returns the
    measurements of ``operator.replace(mask=mask)`` in this problem's units (the same normalisation as ``y``),
    reading nothing outside ``mask``; retrospectively from a fully sampled scan
    (:class:`invdiff.tasks.scan.RetrospectiveAcquisition`), or a scanner's own. None: no more data to be had.

    >>> problem = InverseProblem(op, y, sigma_y=0.01)
    >>> problem.grad_log_likelihood(x).shape == x.shape
    True
    """

    operator: Operator
    y: torch.Tensor
    sigma_y: float
    acquisition: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if not float(self.sigma_y) > 0:
            raise ValueError(f"sigma_y must be > 0 (use a small value for noiseless data), got {self.sigma_y!r}")
        if not torch.isfinite(self.y).all():
            raise ValueError("measurements y contain NaN or Inf")

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``A x - y``."""
        return self.operator.A(x) - self.y

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """``-||A x - y||^2 / (2 sigma_y^2)`` per batch element, shape (B,) (constants dropped)."""
        return -_batch_sum(self.residual(x) ** 2) / (2 * self.sigma_y ** 2)

    def grad_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """``-A^T (A x - y) / sigma_y^2``."""
        return -self.operator.A_adjoint(self.residual(x)) / self.sigma_y ** 2

    def to(self, device) -> "InverseProblem":
        return dataclasses.replace(self, operator=self.operator.to(device), y=self.y.to(device))


def simulate(operator: Operator, x: torch.Tensor, sigma_y: float,
             generator: torch.Generator | None = None) -> InverseProblem:
    """Measure ``x`` through ``operator`` and add ``N(0, sigma_y^2)`` noise drawn from ``generator``."""
    clean = operator.A(x)
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
    return InverseProblem(operator, clean + sigma_y * noise, sigma_y)
