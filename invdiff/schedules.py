"""Noise schedules as pure functions returning 1-D descending sigma tensors (EDM convention).

Samplers loop over neighbouring pairs ``zip(sigmas[:-1], sigmas[1:])``; there is no stateful scheduler.
"""
from __future__ import annotations

import math

import torch


def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           *, append_zero: bool = True, dtype=torch.float64) -> torch.Tensor:
    """Karras et al. 2022, Eq. (5): ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    ramp = torch.linspace(0, 1, steps, dtype=dtype) if steps > 1 else torch.zeros(1, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def geometric(steps: int, sigma_min: float, sigma_max: float, *, append_zero: bool = False,
              dtype=torch.float64) -> torch.Tensor:
    """Log-linear spacing from ``sigma_max`` down to ``sigma_min`` (the VE-SDE / NCSN grid)."""
    if steps < 1 or not 0 < sigma_min < sigma_max:
        raise ValueError(f"need steps >= 1 and 0 < sigma_min < sigma_max, got {steps}, {sigma_min}, {sigma_max}")
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=dtype))
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def linear_beta_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4,
                               beta_end: float = 2e-2, dtype=torch.float64) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020): ``abar_t = prod_{s<=t} (1 - beta_s)``."""
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=dtype)
    return torch.cumprod(1 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """VP -> VE: ``sigma_t = sqrt((1 - abar_t) / abar_t)`` (ascending in t, as the VP grid is)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def from_alphas_cumprod(alphas_cumprod: torch.Tensor, steps: int, *, append_zero: bool = True) -> torch.Tensor:
    """``steps`` sigmas of a VP model's own timestep grid, evenly spaced in t, descending."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.to(torch.float64))
    index = torch.linspace(len(sigmas) - 1, 0, steps).round().long()
    picked = sigmas[index]
    return torch.cat([picked, picked.new_zeros(1)]) if append_zero else picked
