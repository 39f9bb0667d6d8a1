"""Seeded weights for the checkpoint-layout references (shared by the tests and by the script that wrote the references).

The reference outputs in ``tests/data/checkpoint_layouts`` were computed by the original guided-diffusion and
score_sde_pytorch code with exactly these weights; the tests rebuild them from the stored key/shape listing.
"""
from __future__ import annotations

import math

import torch


def seeded_state(listing, seed: int, sigmas: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Random float32 weights for ``listing`` (``[[key, shape], ...]`` in the original state-dict order), drawn in
    that order from ``torch.Generator().manual_seed(seed)``: matrices and kernels ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), score-SDE's Fourier features ``all_modules.0.W`` ~ N(0, 16^2)
    (its ``fourier_scale``). ``sigmas`` (score-SDE's noise-level buffer) is a schedule, not a weight: it is
    taken as given. Zero-initialised output layers (as released code initialises them) would make every
    comparison trivially pass, hence random values everywhere."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in listing:
        if key == "sigmas":
            if sigmas is None or tuple(sigmas.shape) != tuple(shape):
                raise ValueError(f"'sigmas' needs the schedule of shape {tuple(shape)}")
            state[key] = sigmas.float().clone()
            continue
        noise = torch.randn(tuple(shape), generator=generator)
        if key == "all_modules.0.W" and len(shape) == 1:
            state[key] = 16 * noise
        elif len(shape) >= 2:
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            state[key] = 1 + 0.1 * noise
        else:
            state[key] = 0.1 * noise
    return state


def geometric_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> torch.Tensor:
    """score-SDE's discrete noise levels: geometric from sigma_max down to sigma_min (float64 -> float32)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_scales, dtype=torch.float64)).float()


def checksum(state: dict[str, torch.Tensor]) -> float:
    """sum |w| over the state: detects a change in torch's random stream before any output is compared."""
    return float(sum(v.double().abs().sum() for v in state.values()))
