"""Classical reconstructions behind the sampler signature: what a user would pick instead of a diffusion prior.

Each takes ``(problem, prior=None, *, ..., generator=None, callback=None)`` and returns a ``SampleResult`` so
recipes compare them with the diffusion samplers like for like. They are generic over invdiff operators (only
``A``, ``A_adjoint`` and, for FBP, ``fbp``), so they also run on user operators. Regularisation weights are in the
normalised image scale (the solver pipeline scales scans so the image's 99.5th-percentile magnitude is ~1) and,
for the iterative solvers, relative to ``||A||^2``: the objective is ``1/2 ||A x - y||^2 + lam ||A||^2 R(x)``, so
one ``lam`` means the same data/prior balance whether ``||A|| = 1`` (normalised MRI, inpainting) or
``||A||^2 ~ 7.5e3`` (60-view CT of a 128-pixel image), and the iterative solvers start from
``A^T y / ||A||^2`` (the back-projection brought to the image's scale; ``init="fbp"`` or ``"pinv"`` where
better). For normalised operators both are exactly the textbook form. The defaults were chosen by a sweep on slices 1-2 of ``data/brain_multislice_multicoil.h5`` at 4x (best PSNR), not on
the T1 sample that the README reports.

Complex MRI images (C = 2) are regularised as complex numbers: the wavelet and TV penalties act on the modulus
over the (real, imag) pair, so the solution does not depend on the global phase.
"""
from __future__ import annotations

import time

import numpy as np
import pywt
import torch

from invdiff.errors import InputError, UnsupportedOperatorError
from invdiff.operators.base import conjugate_gradient
from invdiff.problem import InverseProblem
from invdiff.registry import register_solver
from invdiff.samplers._common import SampleResult, initial_mean


def _done(x: torch.Tensor, start: float, **diagnostics) -> SampleResult:
    return SampleResult(x=x.detach(), diagnostics={"nfe": 0, "seconds": time.perf_counter() - start, **diagnostics})


def operator_norm_squared(operator, like: torch.Tensor, iterations: int = 30,
                          generator: torch.Generator | None = None) -> float:
    """``||A||^2`` by power iteration on ``A^T A`` (a slight over-estimate is added for safe step sizes).

    The start vector comes from ``generator``, or from a private generator seeded 0 when none is given (never
    the global RNG), so the classical solvers' step sizes and ``lam`` scaling are deterministic per problem.
    """
    if getattr(operator, "normalized", False):
        return 1.0
    if generator is None:
        generator = torch.Generator(device=like.device).manual_seed(0)
    x = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    value = 1.0
    for _ in range(iterations):
        x = operator.A_adjoint_A(x / x.norm())
        value = float(x.norm())
    return 1.01 * value


def _starting_point(problem: InverseProblem, init: str, adjoint: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """``x_0`` of an iterative solver: ``A^T y / ||A||^2`` for "adjoint" (``A^T y`` itself when ``||A|| = 1``;
    for CT the raw back-projection is ~``||A||^2`` times the image's scale and 200 iterations do not undo it),
    otherwise as :func:`invdiff.samplers._common.initial_mean`. ``adjoint``: ``A^T y``, computed once by the caller."""
    if init == "adjoint":
        return adjoint / lipschitz
    return initial_mean(problem, init, problem.y.dtype)


@register_solver("zero-filled", kind="classical")
def sample_zero_filled(problem: InverseProblem, prior=None, *, generator=None, callback=None) -> SampleResult:
    """``x = A^T y``: the zero-filled reconstruction for MRI (unitary FFT, masked), back-projection in general."""
    start = time.perf_counter()
    return _done(problem.operator.A_adjoint(problem.y), start)


@register_solver("pinv", kind="classical")
def sample_pinv(problem: InverseProblem, prior=None, *, generator=None, callback=None) -> SampleResult:
    """``x = A^+ y`` (closed form where the operator has one, else CG on the normal equations)."""
    start = time.perf_counter()
    return _done(problem.operator.A_dagger(problem.y), start)


# Soft-SENSE in "auto" mode: two map sets when the second set (after its crop) covers more than this fraction of the
# first set's support (benchmarks/results/soft_sense-2026-12-05-cpu.md: 0 on the brain sample and on a margined
# camera, several percent on the camera filling the phase-encoding field of view).
SOFT_SENSE_MIN_FRACTION = 0.01
# Eigenvalue crops of the two sets: set 1 as the task layer's one-map ESPIRiT (so the image support is the same);
# set 2 at 0.8, where the one-set model already fails (probed on the camera at 2x / 4x, a margined camera, a
# 64-px texture and the brain sample: 0.8 against 0.95 gave +4.8 dB on the texture, +-0.1 dB on the rest).
SOFT_SENSE_CROPS = (0.95, 0.8)


def _soft_sense_operator(problem: InverseProblem, maps: int | str):
    """``(SoftSenseMRI or None, record)``: the two-set operator CG-SENSE solves with, or None for the problem's own.

    ``maps``: 1 (the problem's operator), 2 (two ESPIRiT sets from the calibration lines of ``y``, Uecker et al.
    2014 soft-SENSE), or "auto" (two sets where the second set covers more than SOFT_SENSE_MIN_FRACTION of the
    first set's support).
    Needs a SENSE operator with a column mask (the calibration region is the sampled block around the centre
    column); "auto" falls back to the problem's operator otherwise, 2 raises UnsupportedOperatorError.
    """
    from invdiff.operators.coil_maps import estimate_coil_map_sets
    from invdiff.operators.fft import real_to_complex
    from invdiff.operators.mri import SenseMRI
    from invdiff.operators.soft_sense import SoftSenseMRI

    if maps not in (1, 2, "auto"):
        raise InputError(f"cg-sense: hyperparameter maps: expected 1, 2 or auto, found {maps!r}")
    if maps == 1:
        return None, {"maps": 1}
    op = problem.operator
    column_mask = isinstance(op, SenseMRI) and (op.mask.ndim == 1 or (op.mask.ndim == 3 and op.mask.shape[1] == 1))
    if not column_mask:
        if maps == 2:
            raise UnsupportedOperatorError(f"cg-sense maps=2 needs a SENSE operator with a column mask; got "
                                           f"{type(op).__name__}")
        return None, {"maps": 1}
    kspace = real_to_complex(problem.y).detach().cpu().numpy()                   # (B, C, H, W)
    sets = [estimate_coil_map_sets(k, num_maps=2, crop=SOFT_SENSE_CROPS) for k in kspace]
    fraction = max(s.fraction_above(1, SOFT_SENSE_CROPS[1]) for s in sets)         # set 2's share after its crop
    record = {"second_map_fraction": round(fraction, 4)}
    if maps == "auto" and fraction <= SOFT_SENSE_MIN_FRACTION:
        return None, {"maps": 1, **record}
    coil_maps = torch.from_numpy(np.stack([s.maps for s in sets])).to(op.coil_maps.device)
    return SoftSenseMRI(op.mask, coil_maps), {"maps": 2, **record}


@register_solver("cg-sense", kind="classical")
def sample_cg_sense(problem: InverseProblem, prior=None, *, lam: float = 1e-2, max_iter: int = 50,
                    tol: float = 1e-6, maps: int | str = 1, generator=None, callback=None) -> SampleResult:
    """Tikhonov-regularised least squares ``argmin ||A x - y||^2 + lam ||A||^2 ||x||^2`` by conjugate gradients
    (``||A||^2 = 1`` for normalised operators; see the module docstring).

    For SENSE MRI this is CG-SENSE (Pruessmann et al. 2001) with a small ridge; for other operators, CGLS.
    ``maps`` (SENSE only): 1 solves with the problem's coil maps; 2 solves soft-SENSE (Uecker et al. 2014) with two
    ESPIRiT map sets computed from the calibration lines in ``y``, ``y = M F (S_1 x_1 + S_2 x_2)``; "auto" uses two
    sets only where the second set has real energy (an object filling the phase-encoding field of view), so scans
    that one set explains get exactly the one-map result (the MRI settings' value; the signature keeps Pruessmann's
    one map). Two components are returned as one image by
    :func:`invdiff.operators.soft_sense.combine_components`: modulus ``sqrt(|x_1|^2 + |x_2|^2)`` (the RSS of the
    model's coil images, which is how the task layer's fastMRI targets are made) with the phase of ``x_1``.
    """
    start = time.perf_counter()
    soft, record = _soft_sense_operator(problem, maps)
    op = problem.operator if soft is None else soft
    adjoint = op.A_adjoint(problem.y)
    ridge = lam * operator_norm_squared(op, adjoint)
    x = conjugate_gradient(lambda v: op.A_adjoint_A(v) + ridge * v, adjoint, max_iter=max_iter, tol=tol)
    if soft is None:
        return _done(x, start, lam=lam, ridge=ridge, **record)
    from invdiff.operators.soft_sense import combine_components
    result = _done(combine_components(x), start, lam=lam, ridge=ridge, **record)
    # The one image above loses what the two components predict in k-space; who scores the solution on data (the
    # held-out check of invdiff.tasks.safeguard) needs the model itself: its operator and its state.
    result.diagnostics["model"] = (soft, x)
    return result


@register_solver("fbp", kind="classical")
def sample_fbp(problem: InverseProblem, prior=None, *, filter: str = "ramp", generator=None,  # noqa: A002
               callback=None) -> SampleResult:
    """Filtered back-projection (CT operators only)."""
    start = time.perf_counter()
    fbp = getattr(problem.operator, "fbp", None)
    if fbp is None:
        raise UnsupportedOperatorError(f"solver 'fbp' needs a CT operator with an fbp() method; got {type(problem.operator).__name__}")
    return _done(fbp(problem.y, filter=filter), start, filter=filter)


# ---- L1-wavelet: FISTA with an orthonormal wavelet -------------------------------------------------------

class _OrthonormalWavelet:
    """Orthonormal 2-D wavelet transform (periodised Daubechies) over the last two axes, via PyWavelets.

    With ``mode="periodization"`` and an orthogonal wavelet the transform is unitary, so the proximal operator of
    ``lam ||W x||_1`` is ``W^T soft(W x, lam)`` exactly.
    """

    def __init__(self, shape: tuple[int, int], wavelet: str, levels: int):
        self.shape, self.wavelet, self.levels = shape, wavelet, levels
        probe = pywt.wavedec2(np.zeros(shape), wavelet, mode="periodization", level=levels)
        _, self.slices = pywt.coeffs_to_array(probe)

    def forward(self, images: np.ndarray) -> np.ndarray:
        flat = images.reshape(-1, *self.shape)
        return np.stack([pywt.coeffs_to_array(pywt.wavedec2(im, self.wavelet, mode="periodization",
                                                             level=self.levels))[0] for im in flat])

    def inverse(self, coefficients: np.ndarray, out_shape) -> np.ndarray:
        images = [pywt.waverec2(pywt.array_to_coeffs(c, self.slices, output_format="wavedec2"), self.wavelet,
                                mode="periodization") for c in coefficients]
        return np.stack(images).reshape(out_shape)


def _soft_threshold_modulus(coefficients: np.ndarray, threshold: float, complex_pairs: bool) -> np.ndarray:
    """Soft-threshold the modulus; for complex images the (real, imag) pair (axis 1) shrinks together."""
    if complex_pairs:
        modulus = np.sqrt((coefficients ** 2).sum(axis=1, keepdims=True))
    else:
        modulus = np.abs(coefficients)
    shrink = np.maximum(1 - threshold / np.maximum(modulus, 1e-30), 0)
    return coefficients * shrink


@register_solver("l1-wavelet", kind="classical")
def sample_l1_wavelet(problem: InverseProblem, prior=None, *, lam: float = 1e-3, max_iter: int = 100,
                      wavelet: str = "db4", levels: int = 4, init: str = "adjoint", generator=None,
                      callback=None) -> SampleResult:
    """``argmin 1/2 ||A x - y||^2 + lam ||A||^2 ||W x||_1`` by FISTA (Beck & Teboulle 2009) with an orthonormal
    wavelet W, from ``init`` (see the module docstring for the ``||A||^2`` scaling).

    For complex MRI images the penalty is on the modulus of each complex wavelet coefficient (the standard
    compressed-sensing MRI baseline, as in sigpy's L1WaveletRecon).
    """
    start = time.perf_counter()
    op, y = problem.operator, problem.y
    adjoint = op.A_adjoint(y)
    lipschitz = operator_norm_squared(op, adjoint)
    x = _starting_point(problem, init, adjoint, lipschitz)
    if x.ndim != 4:
        raise UnsupportedOperatorError(f"l1-wavelet: its wavelet transform is 2-D; the image is {x.ndim - 2}-D "
                                       f"(shape {tuple(x.shape)}); use tv-3d for volumes")
    b, c, h, w = x.shape
    max_levels = pywt.dwt_max_level(min(h, w), pywt.Wavelet(wavelet).dec_len)
    transform = _OrthonormalWavelet((h, w), wavelet, max(1, min(levels, max_levels)))
    step = 1.0 / lipschitz
    complex_pairs = c == 2 and getattr(op, "complex_image", c == 2)
    z, t = x.clone(), 1.0
    for _ in range(max_iter):
        gradient_point = z - step * op.A_adjoint(op.A(z) - y)
        coefficients = transform.forward(gradient_point.detach().cpu().double().numpy())
        coefficients = coefficients.reshape(b, c, *coefficients.shape[1:])
        coefficients = _soft_threshold_modulus(coefficients, step * lam * lipschitz, complex_pairs)
        x_next = torch.from_numpy(transform.inverse(coefficients.reshape(b * c, *coefficients.shape[2:]),
                                                    (b, c, h, w))).to(x)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = x_next + ((t - 1) / t_next) * (x_next - x)
        x, t = x_next, t_next
    return _done(x, start, lam=lam, iterations=max_iter, init=init, operator_norm_squared=lipschitz)


# ---- Total variation: primal-dual (Chambolle & Pock 2011) ------------------------------------------------

def _gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences with Neumann boundary: (B, C, H, W) -> (B, 2, C, H, W)."""
    dh = torch.zeros_like(x)
    dw = torch.zeros_like(x)
    dh[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    dw[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    return torch.stack([dh, dw], dim=1)


def _gradient_adjoint(g: torch.Tensor) -> torch.Tensor:
    """The exact transpose of :func:`_gradient` (minus the divergence)."""
    dh, dw = g[:, 0], g[:, 1]
    out = torch.zeros_like(dh)
    out[..., :-1, :] -= dh[..., :-1, :]
    out[..., 1:, :] += dh[..., :-1, :]
    out[..., :, :-1] -= dw[..., :, :-1]
    out[..., :, 1:] += dw[..., :, :-1]
    return out


@register_solver("tv", kind="classical")
def sample_tv(problem: InverseProblem, prior=None, *, lam: float = 1e-2, max_iter: int = 200,
              init: str = "adjoint", generator=None, callback=None) -> SampleResult:
    """``argmin 1/2 ||A x - y||^2 + lam ||A||^2 TV(x)`` (isotropic TV; the complex pair shares one modulus), from
    ``init`` (see the module docstring for the ``||A||^2`` scaling; below ``lam`` stands for ``lam ||A||^2``).

    Condat-Vu primal-dual splitting (Condat 2013, Alg. 3.1): a gradient step on the smooth data term with
    Lipschitz constant ``L = ||A||^2`` and a dual step on TV, ``q`` constrained to ``|q| <= lam``:
        x+ = x - tau (A^T (A x - y) + grad^T q),   q+ = proj_{|.| <= lam}(q + s grad(2 x+ - x)),
    converging when ``1/tau - s ||grad||^2 >= L / 2`` with ``||grad||^2 <= 8``. Balancing the two terms
    (``s * 8 = L / 2``, ``tau = 1 / L``) converges far faster than plain PDHG on ``[A; lam grad]`` when
    ``lam`` is small.
    """
    start = time.perf_counter()
    op, y = problem.operator, problem.y
    adjoint = op.A_adjoint(y)
    lipschitz = operator_norm_squared(op, adjoint)
    x = _starting_point(problem, init, adjoint, lipschitz)
    weight = lam * lipschitz
    tau = 1.0 / lipschitz
    dual_step = lipschitz / 16
    q = torch.zeros_like(_gradient(x))
    for _ in range(max_iter):
        x_next = x - tau * (op.A_adjoint(op.A(x) - y) + _gradient_adjoint(q))
        q = q + dual_step * _gradient(2 * x_next - x)
        q = q / torch.clamp(torch.sqrt((q ** 2).sum(dim=(1, 2), keepdim=True)) / weight, min=1.0)  # |q| <= lam
        x = x_next
    return _done(x, start, lam=lam, iterations=max_iter, init=init, operator_norm_squared=lipschitz)
