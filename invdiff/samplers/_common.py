"""Pure shared pieces of the samplers: the result type, the callback protocol and small helpers with no
sampler logic (sigma batches, seeded noise, the network boundary with its NFE / time counter, timers, the
starting points ``initial_mean``).

    >>> calls = NetworkCalls()
    >>> x0_hat = call_prior(prior, x, expand_sigma(0.5, x), calls)       # calls.nfe == 1
    >>> eps = randn_like(x, generator)                                   # one Generator, or one per image
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence, runtime_checkable

import torch

from invdiff.errors import InputError, UnsupportedOperatorError
from invdiff.schedules import karras

if TYPE_CHECKING:
    from invdiff.problem import InverseProblem


@dataclass
class SampleResult:
    """What every sampler and baseline returns.

    x: the reconstruction ``(B, C, H, W)`` (the posterior mean estimate or the single sample);
    diagnostics: at least ``nfe`` (network evaluations) and ``seconds``, plus method-specific records;
    samples: optional ensemble ``(N, B, C, H, W)`` and ``weights`` ``(N, B)`` for samplers that keep one;
    trajectory: optional list of intermediate states recorded by a callback.
    """

    x: torch.Tensor
    diagnostics: dict[str, Any] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    trajectory: list | None = None


# ---- callbacks -------------------------------------------------------------------------------------------
@runtime_checkable
class Callback(Protocol):
    """Called once per sampler step: ``callback(step, total, state)``, step in ``0 .. total - 1``.

    ``state`` always holds ``"x"`` (the current estimate, the shape of ``SampleResult.x``, detached; do not
    modify it in place) and ``"sigma"`` (0-d tensor, the noise level of the step), plus method-specific
    entries (RED-Diff: ``"x0_hat"``, ``"loss_data"``, ``"loss_prior"``). Ready-made callbacks live in
    :mod:`invdiff.callbacks`.
    """

    def __call__(self, step: int, total: int, state: dict[str, Any]) -> None: ...


def notify(callback: Callback | None, step: int, total: int, state: dict[str, Any]) -> None:
    """Call ``callback`` if there is one (samplers call this once per step)."""
    if callback is not None:
        callback(step, total, state)


def trajectory_of(callback: Callback | None) -> list | None:
    """The ``trajectory`` list a recording callback kept (searched inside combined callbacks), else None."""
    if callback is None:
        return None
    recorded = getattr(callback, "trajectory", None)
    if isinstance(recorded, list):
        return recorded
    for inner in getattr(callback, "callbacks", ()):
        found = trajectory_of(inner)
        if found is not None:
            return found
    return None


# ---- sigma and noise -------------------------------------------------------------------------------------
def expand_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """A float, 0-d or (B,) sigma as a (B,) tensor on ``x``'s device and dtype, B = ``x.shape[0]``."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},) to match x of shape "
                         f"{tuple(x.shape)}; got shape {tuple(sigma.shape)}")
    return sigma


def randn_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device.

    generator: one ``torch.Generator`` for the whole batch, or a sequence of B generators, one per image, so
    that an image sees the same noise whatever batch it is in (compare solvers image by image). Noise is
    drawn on the generator's device and moved to ``x``'s.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)
    generators = list(generator)
    if len(generators) != x.shape[0]:
        raise ValueError(f"generator: got a sequence of {len(generators)} generators for a batch of "
                         f"{x.shape[0]}; expected one torch.Generator or one per batch element")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device).to(x.device)
                        for g in generators])


def first_generator(generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Generator | None:
    """The generator to use for draws shared by the whole batch (the first one of a per-image sequence)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return next(iter(generator))


# ---- the network boundary --------------------------------------------------------------------------------
@dataclass
class NetworkCalls:
    """Counts prior evaluations (``nfe``: one per batched call) and the wall time spent inside them.

    On CUDA the timer synchronises before and after each call, so ``seconds`` is the network's own time and
    ``(wall - seconds) / wall`` is the solver overhead; on CPU no synchronisation is needed.
    """

    nfe: int = 0
    seconds: float = 0.0


def _synchronise(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def call_prior(prior, x: torch.Tensor, sigma: torch.Tensor, calls: NetworkCalls | None = None) -> torch.Tensor:
    """``D(x, sigma)`` cast at the network boundary: the prior runs in ``prior.dtype``, the answer comes back
    in ``x.dtype`` (sampler state stays float32, or float64 in oracle tests).

    x: (B, C, H, W); sigma: (B,). Gradients flow through unless the caller wraps this in ``torch.no_grad()``.
    """
    network_dtype = getattr(prior, "dtype", x.dtype)
    if calls is not None:
        _synchronise(x)
        start = time.perf_counter()
    x0_hat = prior(x.to(network_dtype), sigma.to(network_dtype)).to(x.dtype)
    if calls is not None:
        _synchronise(x0_hat)
        calls.seconds += time.perf_counter() - start
        calls.nfe += 1
    return x0_hat


@dataclass
class Timer:
    """Wall-clock seconds of a ``with timed() as timer:`` block (read ``timer.seconds`` during or after)."""

    start: float = field(default_factory=time.perf_counter)
    stop: float | None = None

    @property
    def seconds(self) -> float:
        return (self.stop if self.stop is not None else time.perf_counter()) - self.start


@contextmanager
def timed(sync_like: torch.Tensor | None = None) -> Iterator[Timer]:
    """Time a block; with a CUDA tensor ``sync_like``, synchronise its device at both ends first."""
    if sync_like is not None:
        _synchronise(sync_like)
    timer = Timer()
    try:
        yield timer
    finally:
        if sync_like is not None:
            _synchronise(sync_like)
        timer.stop = time.perf_counter()


def batch_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over every axis but the first: (B, ...) -> (B,)."""
    return t.reshape(t.shape[0], -1).sum(dim=1)


# The starting points a sampler or iterative solver may begin from (RED-Diff's mu_0, the classical solvers' x_0).
INITIALISATIONS = ("pinv", "adjoint", "zeros", "fbp")


def initial_mean(problem: InverseProblem, init: str, dtype: torch.dtype) -> torch.Tensor:
    """``mu_0``: ``A^+ y`` ("pinv"), ``A^T y`` ("adjoint", zero-filled for MRI), ``fbp(y)`` ("fbp") or zeros."""
    operator, y = problem.operator, problem.y
    with torch.no_grad():
        if init == "pinv":
            mu = operator.A_dagger(y)
        elif init in ("adjoint", "zeros"):
            mu = operator.A_adjoint(y)
            mu = torch.zeros_like(mu) if init == "zeros" else mu
        elif init == "fbp":
            fbp = getattr(operator, "fbp", None)
            if fbp is None:
                raise UnsupportedOperatorError(f"init='fbp' needs an operator with an fbp() method; {type(operator).__name__} "
                                 f"has none (use 'pinv', 'adjoint' or 'zeros')")
            mu = fbp(y)
        else:
            raise ValueError(f"init must be one of {', '.join(INITIALISATIONS)}; got {init!r}")
    return mu.detach().to(dtype).clone()


def sigma_schedule(prior, steps: int, sigma_min: float | None, sigma_max: float | None,
                   like: torch.Tensor) -> torch.Tensor:
    """``steps`` Karras sigmas (rho 7) from sigma_max down to sigma_min (default: the prior's), then 0: (steps + 1,)."""
    sigma_max = float(prior.sigma_max if sigma_max is None else sigma_max)
    sigma_min = float(prior.sigma_min if sigma_min is None else sigma_min)
    if not 0 < sigma_min < sigma_max:        # user-set bounds (--set SOLVER:sigma_min=...): bad input, exit 2
        raise InputError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return karras(steps, sigma_min, sigma_max).to(device=like.device, dtype=like.dtype)
