"""The normalisation step of DESIGN.md: show the prior images on the scale it was trained on, and undo it.

A linear problem ``y = A x + n`` is equivalent to ``y / s = A (x / s) + n / s``, so dividing ``y`` and
``sigma_y`` by one positive scale ``s`` gives a problem in the unknown ``x / s`` with the *same* posterior up to
that change of variables; the solver runs on it and its result is multiplied back by ``s``.

The default scale is the prior's own training normalisation (:func:`reference_scale`, which training uses too):
the 99.5th percentile of the magnitude of a reference image, here ``A^T y`` (``reference="adjoint"``). For
Cartesian MRI with a unitary FFT that is the zero-filled image, which is what ``invdiff.reconstruct`` and the
fastMRI literature use; for inpainting it is the observed pixels. Where ``A^T`` does not return an image on
the image's scale (super-resolution, CT back-projection) use ``reference="pinv"`` (``A^+ y``) or
``reference="fbp"``; the CT prior is on a fixed HU scale, so CT scans are usually run with ``scale=1``.
Complex images (C = 2, real/imag) use the modulus of the pair, so the scale does not depend on the phase.

    >>> scaled, scale = normalise(problem)                # scaled.y = problem.y / scale
    >>> result = denormalise(invdiff.sample("reddiff", scaled, prior), scale)
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from invdiff.problem import InverseProblem
from invdiff.samplers._common import SampleResult

DEFAULT_PERCENTILE = 99.5
REFERENCES = ("adjoint", "pinv", "fbp")


def reference_scale(magnitude: torch.Tensor, q: float = 99.5) -> torch.Tensor:
    """``s = percentile_q(|x|)`` over the last two dims: (..., H, W) -> (...) float, floored at 1e-12.

    The single normalisation rule shared by training (each full slice is divided by it) and the solvers.
    """
    if magnitude.ndim < 2:
        raise ValueError(f"reference_scale expects (..., H, W), got shape {tuple(magnitude.shape)}")
    flat = magnitude.abs().reshape(*magnitude.shape[:-2], -1).float()
    return torch.quantile(flat, q / 100.0, dim=-1).clamp_min(1e-12)


def is_complex_image(operator, x: torch.Tensor) -> bool:
    """Whether ``x`` (B, C, ...) holds complex images as (real, imag) pairs: C == 2, unless the operator says
    otherwise with a ``complex_image`` attribute."""
    return x.ndim >= 2 and x.shape[1] == 2 and bool(getattr(operator, "complex_image", True))


def magnitude(x: torch.Tensor, *, complex_image: bool) -> torch.Tensor:
    """``|x|``: the modulus over the (real, imag) pair (B, ...) for complex images, else entrywise (B, C, ...)."""
    return x.pow(2).sum(dim=1).sqrt() if complex_image else x.abs()


def reference_image(problem: InverseProblem, reference: str = "adjoint") -> torch.Tensor:
    """The image whose magnitude sets the scale: ``A^T y``, ``A^+ y`` or the operator's ``fbp(y)``."""
    operator, y = problem.operator, problem.y
    if reference == "adjoint":
        return operator.A_adjoint(y)
    if reference == "pinv":
        return operator.A_dagger(y)
    if reference == "fbp":
        fbp = getattr(operator, "fbp", None)
        if fbp is None:
            raise ValueError(f"reference='fbp' needs an operator with an fbp() method; "
                             f"{type(operator).__name__} has none")
        return fbp(y)
    raise ValueError(f"reference must be one of {', '.join(REFERENCES)}; got {reference!r}")


def default_scale(problem: InverseProblem, *, reference: str = "adjoint",
                  percentile: float = DEFAULT_PERCENTILE) -> float:
    """``s = percentile_q |reference image|`` over every pixel of the batch (one scale per problem)."""
    with torch.no_grad():
        image = reference_image(problem, reference)
        modulus = magnitude(image, complex_image=is_complex_image(problem.operator, image))
        scale = float(reference_scale(modulus.reshape(1, -1), q=percentile))
    if not scale > 1e-12:
        raise ValueError(f"the {reference} reference image of y is (nearly) zero (its {percentile}th percentile "
                         f"magnitude is {scale:.3g}): no signal to normalise by; pass scale= explicitly")
    return scale


def normalise(problem: InverseProblem, scale: float | None = None, *, reference: str = "adjoint",
              percentile: float = DEFAULT_PERCENTILE) -> tuple[InverseProblem, float]:
    """``(InverseProblem(A, y / s, sigma_y / s), s)``; ``s`` defaults to :func:`default_scale`.

    The operator is shared, not copied. ``scale`` must be a positive finite number.
    """
    if scale is None:
        scale = default_scale(problem, reference=reference, percentile=percentile)
    scale = float(scale)
    if not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    acquisition = problem.acquisition
    if acquisition is not None:                 # more data arrive in the same, scaled units
        acquisition = functools.partial(_scaled_acquisition, acquisition, scale)
    return InverseProblem(problem.operator, problem.y / scale, float(problem.sigma_y) / scale, acquisition), scale


def _scaled_acquisition(acquisition, scale: float, mask):
    return acquisition(mask) / scale


def denormalise(result: SampleResult | torch.Tensor, scale: float) -> SampleResult | torch.Tensor:
    """Undo :func:`normalise`: multiply the reconstruction (and samples and trajectory) by ``scale``.

    A tensor comes back as ``tensor * scale``; a ``SampleResult`` comes back as a new one with ``x``,
    ``samples`` and tensor trajectory entries scaled, weights and the rest unchanged, and
    ``diagnostics["scale"] = scale``.
    """
    scale = float(scale)
    if not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if isinstance(result, torch.Tensor):
        return result * scale
    trajectory = None
    if result.trajectory is not None:
        trajectory = [s * scale if isinstance(s, torch.Tensor) else s for s in result.trajectory]
    return dataclasses.replace(result, x=result.x * scale,
                               samples=None if result.samples is None else result.samples * scale,
                               trajectory=trajectory, diagnostics={**result.diagnostics, "scale": scale})


__all__ = ["reference_scale", "normalise", "denormalise", "default_scale", "reference_image", "magnitude", "is_complex_image"]
