"""The prior protocol: a denoiser ``D(x, sigma) = E[x0 | x0 + sigma n = x]`` in the EDM convention.

Every sampler talks to a prior only through this protocol. Variance-preserving models (DDPM/ADM epsilon
networks) are wrapped by an adapter (``invdiff.priors.adapters``) that converts ``x_vp = x / sqrt(1 + sigma^2)``;
samplers never special-case them.

Tweedie's second moment (``tweedie_covariance``)
------------------------------------------------
For ``x = x0 + sigma n`` the posterior covariance of the clean image is the denoiser's Jacobian times sigma^2,

    Cov[x0 | x] = sigma^2 dD/dx = sigma^2 (I + sigma^2 Hess log p_sigma(x))        (second-order Tweedie identity)

(differentiate ``D = x + sigma^2 grad log p_sigma`` once more). For the exact MMSE denoiser that Jacobian is a
Hessian plus I, so symmetric, and a covariance, so PSD. Every differentiable prior gets it matrix-free from
autodiff (:class:`JacobianCovariance`); the analytic Gaussian priors override it with their closed forms.
A network's Jacobian is neither exactly symmetric nor exactly PSD, so the generic operator is
``C = sigma^2 (J + J^T) / 2`` (the nearest symmetric matrix in Frobenius norm, equal to ``sigma^2 J`` when D is a
gradient field as the identity says it is; CG and Lanczos need a symmetric operator) plus a shift that lifts
the most negative Ritz value of its Lanczos square root to zero (the PSD guard, :meth:`JacobianCovariance.sqrt`).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

# Lanczos iterations of the generic ``Cov^(1/2) v`` (the draws ``D + Cov^(1/2) xi`` of the SMC Tweedie proposal).
# Measured through the autodiff path on the d = 256 squared-exponential Gaussian prior of tests/test_smc_dimension.py,
# sigma 0.01 .. 10: relative error of the root 3-6 % at 8 steps, 0.7-1.4 % at 16, 0.1 % at 32; the SMC posterior
# variance ratio (N = 512) 0.992 at 8, 0.999 at 16 and 32 (closed form 0.999).
LANCZOS_ITERATIONS = 16


class Denoiser(nn.Module):
    """Base class of every prior.

    Subclasses implement :meth:`forward` ``(x: (B, C, H, W), sigma: (B,)) -> x0_hat (B, C, H, W)`` and set
    ``sigma_min``, ``sigma_max``, ``channels`` and ``image_size`` (``None`` for fully convolutional priors
    that run at any size). ``dtype`` is the dtype the network wants its input in; callers cast at the
    boundary: ``prior(x.to(prior.dtype), sigma.to(prior.dtype)).to(x.dtype)``.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    channels: int = 1
    image_size: tuple[int, int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.float32

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, sigma)")

    def at_spacing(self, spacing_mm: float | None) -> "Denoiser":
        """This prior at pixel spacing ``spacing_mm`` (mm per pixel; None: the prior's documented default).

        Priors that take the spacing as conditioning return a view that passes it at every call; the default
        (every prior without that conditioning) ignores it and returns ``self``.
        """
        return self

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie)."""
        sigma_b = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return (self(x, sigma) - x) / sigma_b ** 2

    def tweedie_covariance(self, x: torch.Tensor, sigma, v: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        """``Cov[x0 | x0 + sigma n = x]^power v`` with ``Cov = sigma^2 dD/dx`` (module docstring), power 1 or 1/2.

        x, v: (B, C, H, W); sigma: scalar or (B,); returns v's shape and dtype. The default differentiates the
        denoiser (:class:`JacobianCovariance`); priors with a closed form override this method. For several
        products at one ``(x, sigma)`` use :meth:`tweedie_operator`, which linearises once.
        """
        return self.tweedie_operator(x, sigma)(v, power)

    def tweedie_operator(self, x: torch.Tensor, sigma, *,
                         lanczos_iterations: int = LANCZOS_ITERATIONS) -> Callable[..., torch.Tensor]:
        """``Cov[x0 | x]`` at a fixed ``(x, sigma)`` as a callable ``(v, power=1.0) -> Cov^power v``.

        A prior that overrides :meth:`tweedie_covariance` (a closed form) gets that method bound to ``(x, sigma)``;
        every other prior a :class:`JacobianCovariance`, which runs the network forward once and reuses its
        linearisation for every product (``lanczos_iterations``: products per square root).
        """
        if type(self).tweedie_covariance is not Denoiser.tweedie_covariance:
            return functools.partial(self.tweedie_covariance, x, sigma)
        return JacobianCovariance(self, x, sigma, lanczos_iterations=lanczos_iterations)


def as_sigma_batch(sigma, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Turn a float, 0-d or (B,) sigma into a (B,) tensor on ``like``'s device and dtype."""
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(batch)
    if sigma.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(sigma.shape)}")
    return sigma


class SliceDenoiser(Denoiser):
    """Apply a 2-D prior to a volume ``(B, C, D, H, W)`` slice by slice along ``D``, ``chunk`` slices at a time.

    Each slice gets the volume's sigma; chunking bounds memory for long volumes (DiffusionMBIR / DDS style).
    """

    def __init__(self, prior: Denoiser, chunk: int = 16):
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.prior = prior
        self.chunk = chunk
        self.sigma_min, self.sigma_max = prior.sigma_min, prior.sigma_max
        self.channels, self.image_size = prior.channels, prior.image_size

    def at_spacing(self, spacing_mm: float | None) -> "SliceDenoiser":
        """The same slice-wise prior with the 2-D prior at ``spacing_mm`` (in-plane spacing); ``self`` if unchanged."""
        inner = self.prior.at_spacing(spacing_mm)
        return self if inner is self.prior else SliceDenoiser(inner, chunk=self.chunk)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"SliceDenoiser expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        b, c, d, h, w = x.shape
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        sigmas = sigma.repeat_interleave(d)
        out = torch.cat([self.prior(slices[i:i + self.chunk], sigmas[i:i + self.chunk])
                         for i in range(0, b * d, self.chunk)])
        return out.reshape(b, d, c, h, w).permute(0, 2, 1, 3, 4)


class JacobianCovariance:
    """``C = sigma^2 (J + J^T) / 2 + shift``, ``J = dD/dx`` at a fixed ``(x, sigma)``: Tweedie's ``Cov[x0 | x]``.

    x: (B, ...) images, sigma: scalar or (B,); each image is its own block (J is block diagonal over the batch),
    so every inner product below is per image. Built with one forward pass through ``torch.func.vjp``, whose
    pullback gives ``J^T u``; ``J v`` is the pullback of that (linear) pullback, so no forward pass is repeated:
    one product ``C v`` costs one backward and one double-backward pass (about 3 forward passes on a UNet,
    measured against 4 for ``torch.func.jvp`` plus a fresh vjp). The network runs in ``prior.dtype``; results come
    back in ``x.dtype``. ``products`` counts the batched products ``C v`` (Lanczos steps included).

        >>> cov = prior.tweedie_operator(x, sigma)
        >>> draw = prior(x, sigma) + cov(torch.randn_like(x), 0.5)      # ~ N(D, Cov), Lanczos square root
    """

    psd_margin = 1.0        # the shift is psd_margin times the most negative Ritz value

    def __init__(self, prior, x: torch.Tensor, sigma, *, lanczos_iterations: int = LANCZOS_ITERATIONS):
        if int(lanczos_iterations) != lanczos_iterations or lanczos_iterations < 1:
            raise ValueError(f"lanczos_iterations must be a positive integer, got {lanczos_iterations!r}")
        self.lanczos_iterations = int(lanczos_iterations)
        self.dtype = x.dtype
        network_dtype = getattr(prior, "dtype", x.dtype)
        sigma = as_sigma_batch(sigma, x.shape[0], x).detach()
        self.scale = (sigma ** 2).reshape(-1, *([1] * (x.ndim - 1)))
        self.shift = torch.zeros_like(self.scale)     # the PSD guard (set by sqrt); 0 until then
        self.rayleigh = None                          # v^T C v / |v|^2 of the last root's v (B,): for a random v,
                                                      # a one-probe estimate of tr(C) / d (Hutchinson)
        net_sigma = sigma.to(network_dtype)
        # no_grad: the transforms still differentiate in x, but no graph is kept for the network's parameters
        with torch.no_grad():
            self.mean, self._pullback = torch.func.vjp(lambda z: prior(z, net_sigma), x.detach().to(network_dtype))
            # J^T u is linear in u, so the pullback of u -> J^T u (taken at u = 0) is v -> J v
            _, self._pushforward = torch.func.vjp(self._pullback, torch.zeros_like(self.mean))
        self.products = 0

    def symmetric_jacobian(self, v: torch.Tensor) -> torch.Tensor:
        """``(J + J^T) v / 2`` in ``x.dtype`` (no sigma^2, no shift)."""
        u = v.to(self.mean.dtype)
        with torch.no_grad():
            (jt_v,) = self._pullback(u)
            (j_v,) = self._pushforward((u,))
        self.products += 1
        return ((j_v + jt_v) / 2).to(self.dtype)

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        return self.scale * self.symmetric_jacobian(v) + self.shift * v

    def __call__(self, v: torch.Tensor, power: float = 1.0) -> torch.Tensor:
        if power == 1:
            return self._apply(v)
        if power == 0.5:
            return self.sqrt(v)
        raise ValueError(f"power must be 1 (products) or 0.5 (square roots), got {power!r}")

    def sqrt(self, v: torch.Tensor) -> torch.Tensor:
        """``C^(1/2) v`` by ``lanczos_iterations`` Lanczos steps from v (full reorthogonalisation), per image.

        With ``C Q = Q T`` on the Krylov space of v (``Q e1 = v / |v|``): ``C^(1/2) v ~ |v| Q T^(1/2) e1``, exact
        once the space is invariant (a breakdown ends the recursion early for that image). PSD guard: a negative
        Ritz value theta_min means the symmetrised Jacobian is not PSD; ``shift = -theta_min`` is then added to the
        spectrum here and to every later product, so draws and products use the same PSD operator. The Ritz values
        lie inside the spectrum, so the shift is a lower bound on the one that makes C exactly PSD.
        """
        b = v.shape[0]
        dims = tuple(range(1, v.ndim))
        tiny = torch.finfo(v.dtype).tiny

        def dot(a, c):
            return (a * c).sum(dim=dims)

        norm = dot(v, v).sqrt()
        q = v / norm.clamp_min(tiny).reshape(self.scale.shape)
        basis, alphas, betas = [q], [], []
        for j in range(self.lanczos_iterations):
            w = self.scale * self.symmetric_jacobian(q)
            alphas.append(dot(q, w))
            stacked = torch.stack(basis)                                        # (j + 1, B, ...)
            for _ in range(2):                                                  # twice is enough (Kahan)
                overlaps = (stacked * w).flatten(2).sum(2)                      # (j + 1, B)
                w = w - (overlaps.reshape(*overlaps.shape, *self.scale.shape[1:]) * stacked).sum(0)
            if j == self.lanczos_iterations - 1:
                break
            beta = dot(w, w).sqrt()
            # breakdown (to the network's precision): the Krylov space of that image is invariant; its later rows
            # stay decoupled zeros
            alive = beta > 10 * torch.finfo(self.mean.dtype).eps * alphas[0].abs().clamp_min(tiny)
            betas.append(torch.where(alive, beta, torch.zeros_like(beta)))
            q = torch.where(alive.reshape(self.scale.shape), w / beta.clamp_min(tiny).reshape(self.scale.shape),
                            torch.zeros_like(w))
            basis.append(q)
        m = len(alphas)
        tridiagonal = torch.diag_embed(torch.stack(alphas, dim=1).double())
        if m > 1:
            off = torch.stack(betas, dim=1).double()
            tridiagonal = tridiagonal + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta, vectors = torch.linalg.eigh(tridiagonal)                         # (B, m), (B, m, m)
        shift = (self.psd_margin * -theta.min(dim=1).values).clamp_min(0).to(self.dtype)
        self.shift = torch.maximum(self.shift, shift.to(self.dtype).reshape(self.scale.shape))
        self.rayleigh = alphas[0] + self.shift.reshape(-1)
        root = (theta + self.shift.reshape(-1, 1).double()).clamp_min(0).sqrt()
        coefficients = (vectors * root[:, None, :]) @ vectors[:, 0, :, None]    # T^(1/2) e1: (B, m, 1)
        coefficients = (coefficients.squeeze(-1) * norm.double()[:, None]).to(v.dtype)
        return torch.einsum("jb...,bj->b...", torch.stack(basis[:m]), coefficients)
