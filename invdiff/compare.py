"""Compare solvers on identical inputs: one normalised problem per image, every solver, one table, one figure per task.

Like for like (issue 5) means every solver receives

* the *same* problem: mask, coil maps, ``y / scale`` and ``sigma_y / scale`` are built once per image and task;
  each solver gets its own copy of ``y`` (no solver can change another's input), and every row records the
  sha256 of the input it was handed (``input_sha256``: ``y``, ``sigma_y`` and the operator's buffers), so
  "identical inputs" is checked, not promised;
* the same prior (loaded once);
* for image ``i`` a fresh ``torch.Generator`` seeded ``seed * 1_000_003 + i`` (``i`` = slice index for scans),
  the rule of :func:`invdiff.reconstruct.reconstruct_scan`: a compare row reproduces
  ``invdiff reconstruct --solver NAME --seed S`` on the same slice.

Outputs in ``out_dir``, each written atomically:

* ``metrics.csv``: ``solver, task, PSNR, SSIM, NMSE, seconds, NFE, note`` (fastMRI protocol per task volume,
  :data:`invdiff.metrics.PROTOCOL`; ``seconds``: wall time of the solver calls; NFE: prior evaluations);
* ``grid-<task>.png``: target, the task's baseline (zero-filled, FBP, ...), each solver, and |error| maps on
  one shared colour scale (middle image of the task);
* ``compare.json``: the per-task inputs (scale, noise level, mask), per-row hyperparameters, network seconds,
  input hashes, seed, prior and protocol;
* ``reconstructions.npz``: targets and every reconstruction (``"<task>/<solver>"``), to rescore without rerunning.

A solver that cannot run on a task's operator raises ``ValueError`` (DDRM on multi-coil SENSE or CT, FBP on
MRI); its row reads ``n/a`` with that reason and the other solvers go on.

    >>> report = compare_scan("data/brain_t1_multicoil.h5", ["reddiff", "dps", "cg-sense"], [4, 8], "out",
    ...                       overrides={"dps": ["zeta=0.3"]}, steps=100)
    >>> report.row("reddiff", "4x").psnr

The task builders (:func:`scan_tasks`, :func:`ct_task`, :func:`inpainting_task`, :func:`superres_task`) are
shared by ``recipes/`` and ``benchmarks/run.py``, so a recipe and the benchmark pose the same problems.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import hashlib
import io
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import invdiff
from invdiff.config import hyperparameters, parse_overrides
from invdiff.io import atomic_open, atomic_write_json
from invdiff.problem import InverseProblem
from invdiff.registry import get_sampler, list_samplers
from invdiff.samplers._common import timed

log = logging.getLogger(__name__)

# The per-image seed rule of invdiff.reconstruct (seed * stride + slice index).
SEED_STRIDE = 1_000_003
CSV_COLUMNS = ("solver", "task", "PSNR", "SSIM", "NMSE", "seconds", "NFE", "note")
DEFAULT_SOLVERS = ("reddiff", "dps", "diffpir", "cg-sense", "l1-wavelet")
DEFAULT_MRI_PRIOR = "brain-mri-complex"
NOT_AVAILABLE = "n/a"

# Per task family, the settings that are not the registered defaults (recipes and benchmarks/run.py use these).
# DPS's zeta is a step length in image units (late in sampling about zeta ||A|| per step), so it is tuned per
# family, as the DPS paper does: a sweep over 4 values at 100 steps, seed 0, on a tuning image that is not a
# test image (MRI: slice 1 of brain_multislice_multicoil.h5 at 4x; CT: phantom 1 'ellipses_seed11' at 60 views;
# inpainting and SR: the multislice sample's slice 0), best PSNR; see recipes/README.md for the commands and
# numbers. RED-Diff on CT: it starts from FBP (its A^+ y default is a 500-iteration CG there, slow and
# noise-amplifying: the sampler's docstring recommends "fbp" for ill-conditioned operators), and its lam is
# tuned by the same protocol (of 1e3, 3e3, 1e4, 3e4, 1e5). lam is an absolute precision on the image while the
# data term's curvature is ||A||^2 / sigma_y^2: ~6e3 for normalised MRI (||A|| = 1, sigma_y ~ 0.0126) but ~6e5
# for this CT (||A||^2 ~ 7.5e3 at 60 views, sigma_y ~ 0.11), so the registered lam = 100 leaves CT almost
# unregularised; the tuned 1e4 is the same ratio lam sigma_y^2 / ||A||^2 ~ 0.016 as lam = 100 on MRI.
# The classical solvers' lam is relative to ||A||^2 (invdiff.samplers.baselines), and their defaults were swept on
# normalised MRI; on CT they are tuned by the same protocol (phantom 1, best summed PSNR at 30 and 60 views), and
# TV / L1-wavelet start from FBP (TV gains up to 2.5 dB over the scaled back-projection in 200 iterations).
# RED-Diff on CT also starts its sweep at sigma_max = 1 (of the prior's 80, 5, 1, 0.5; best summed PSNR at 30 and
# 60 views, prior at step ~4700): FBP is already within sigma ~0.1 of the image, and on the Karras grid from
# 80, 60 of the 100 steps sit above sigma 1, where D returns a blur that the sweep must then undo.
# SMC on images: the conditional proposal (stable at any sigma_y). Its rejuvenation moves after a resampling
# stay on: without them a 30-step inpainting run (64 px) lost 1.8 dB (20.42 -> 18.58), euler 2.9 dB.
SMC_IMAGE_SETTINGS = {"proposal": "conditional"}

TASK_SETTINGS = {
    "mri": {"dps": {"zeta": 3.0},                                    # of 0.3, 1, 3, 10
            "smc": dict(SMC_IMAGE_SETTINGS)},
    # CT smc: kappa = 100 ~ tr(A A^T) / m = 62 of the 30-view geometry, the mean eigenvalue of A A^T instead of
    # the largest (3.7e3; the explicit Euler step needs that one, the conditional proposal does not): 27.9 dB
    # against 22.4 dB at 30 steps on the thorax phantom (33.2 dB at 100, 1.0 batch passes a step). kappa = 0, the
    # paper's untempered likelihood, reaches 34.6 dB at 100 steps but needs ~580 CG calls a step (3.8 passes;
    # early steps stop at the 1000-iteration cap): `--set smc:stable_likelihood=false` when time allows.
    "ct": {"smc": dict(SMC_IMAGE_SETTINGS, stable_likelihood=100.0),
           "dps": {"zeta": 0.03},                                   # of 0.003, 0.01, 0.03, 0.1
           "reddiff": {"init": "fbp", "lam": 1e4, "sigma_max": 1.0},
           "tv": {"lam": 3e-4, "init": "fbp"},                      # of 3e-5, 1e-4, 3e-4, 1e-3, 3e-3
           "l1-wavelet": {"lam": 3e-4, "init": "fbp"},              # of 1e-5, 3e-5, 1e-4, 3e-4, 1e-3
           "cg-sense": {"lam": 1e-3}},                              # of 1e-5, 1e-4, 3e-4, 1e-3, 1e-2, 0.1
    "inpainting": {"dps": {"zeta": 3.0},                             # of 0.3, 1, 3, 10 (random and box)
                   "smc": dict(SMC_IMAGE_SETTINGS)},
    "sr": {"dps": {"zeta": 10.0}},                                   # of 1, 3, 10, 30
}


def task_settings(family: str, solvers: Sequence[str]) -> dict[str, dict]:
    """The :data:`TASK_SETTINGS` of ``family`` for the solvers in ``solvers`` (a fresh, mutable copy)."""
    if family not in TASK_SETTINGS:
        raise ValueError(f"task family must be one of {', '.join(TASK_SETTINGS)}, got {family!r}")
    return {solver: dict(values) for solver, values in TASK_SETTINGS[family].items() if solver in solvers}


# ---- tasks: what every solver is run on ------------------------------------------------------------------
@dataclass
class TaskImage:
    """One image of a task, prepared once for every solver.

    problem: the normalised problem (``y / scale``, ``sigma_y / scale``); target: (H, W) float32 in the
    original units; to_image: solver output ``x`` (1, C, H, W) in normalised units -> (H, W) image in the
    original units comparable with ``target`` (MRI: magnitude of the centre crop; CT: the real image);
    index: the image's seed index; info: scale, noise level, ... (goes to compare.json).
    """

    problem: InverseProblem
    target: np.ndarray
    to_image: Callable[[torch.Tensor], np.ndarray]
    index: int = 0
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    """A named set of images (a scan at one acceleration, CT at one number of views, ...).

    baseline: the solver shown first in the grid and run first (zero-filled for MRI, FBP for CT, ...);
    solver_overrides: per-solver hyperparameters for this task only (typed values), applied over the
    comparison-wide ones (e.g. DPS's step size tuned per task).
    """

    name: str
    images: list[TaskImage]
    baseline: str = "zero-filled"
    info: dict = field(default_factory=dict)
    solver_overrides: dict[str, dict] = field(default_factory=dict)

    @property
    def target(self) -> np.ndarray:
        """(images, H, W) float32: the reference volume the metrics are computed against."""
        return np.stack([image.target for image in self.images]).astype(np.float32)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.images[0].problem.operator.in_shape)


def magnitude_image(x: torch.Tensor, *, scale: float, crop: tuple[int, int] | None = None,
                    support: torch.Tensor | None = None) -> np.ndarray:
    """``|x| * scale`` of a (1, 2, H, W) complex image (modulus over the (real, imag) pair), zero outside
    ``support`` (the operator's image support, see :meth:`invdiff.operators.base.Operator.image_support`), optionally
    centre cropped to ``crop`` as fastMRI crops its targets: (h, w) float32."""
    from invdiff.datasets.fastmri import center_crop
    from invdiff.operators.base import zero_outside
    from invdiff.operators.fft import real_to_complex

    image = real_to_complex(zero_outside(x.detach(), support).to(torch.float32))[0] * scale
    if crop is not None:
        image = center_crop(image, crop)
    return image.abs().cpu().numpy().astype(np.float32)


def real_image(x: torch.Tensor, *, scale: float) -> np.ndarray:
    """``x * scale`` of a (1, 1, H, W) real image (CT): (H, W) float32, signs kept."""
    return (x.detach().to(torch.float32)[0, 0] * scale).cpu().numpy().astype(np.float32)


def scan_tasks(scan: str | Path, accelerations: Sequence[int], *, slices: str | None = None, device="cpu",
               center_fraction: float | None = None, mask_kind: str = "random") -> list[Task]:
    """One task per acceleration (named ``"4x"``, ...) on the chosen slices of a fastMRI scan.

    Each slice is prepared exactly as ``invdiff reconstruct`` prepares it (:mod:`invdiff.reconstruct`): the
    fastMRI mask seeded by the file name (same for every slice), ESPIRiT maps from the calibration lines,
    ``y`` and ``sigma_y`` divided by the 99.5th percentile of the zero-filled magnitude, ``sigma_y`` from the
    k-space periphery. The target is the file's reference image (``reconstruction_rss`` / ``_esc``).
    """
    from invdiff.datasets.fastmri import estimate_coil_maps, read_scan
    from invdiff.reconstruct import (MIN_CALIBRATION_LINES, NORMALISATION_PERCENTILE, ReconstructionRequest,
                                     _calibration_width, _scan_mask, build_slice_problem, parse_slices)

    device = torch.device(device)
    tasks = []
    with read_scan(scan) as opened:
        chosen = parse_slices(slices, opened.num_slices)
        if opened.target(chosen[0]) is None:
            raise ValueError(f"{scan}: the file has no reference image (reconstruction_rss / _esc); compare needs "
                             f"targets to score against (a fastMRI test-set file has none)")
        if opened.mask is not None and len(accelerations) > 1:
            raise ValueError(f"{scan}: the file carries its own mask (acceleration {opened.acceleration}); "
                             f"--accel must name one acceleration, got {list(accelerations)}")
        first = opened.kspace(chosen[0])
        recon_size = opened.recon_size
        for acceleration in accelerations:
            request = ReconstructionRequest(scan=str(scan), solver="zero-filled", out="", acceleration=acceleration,
                                            center_fraction=center_fraction, mask_kind=mask_kind)
            mask, mask_info = _scan_mask(opened, request, first.shape[-1], first.shape[-2])
            calibration = _calibration_width(mask)
            if opened.is_multicoil and calibration < MIN_CALIBRATION_LINES:
                raise ValueError(f"{scan}: the {acceleration}x mask has {calibration} contiguous centre lines; "
                                 f"ESPIRiT needs at least {MIN_CALIBRATION_LINES} (raise the centre fraction)")
            images = []
            for index in chosen:
                kspace = opened.kspace(index)
                maps = None
                if opened.is_multicoil:
                    maps = estimate_coil_maps(np.where(mask, kspace, 0), calib_width=min(24, calibration),
                                              cache_key=(str(scan), index, calibration))
                item = build_slice_problem(kspace, mask, recon_size, device=device, coil_maps=maps)
                images.append(TaskImage(item.problem, np.asarray(opened.target(index), dtype=np.float32),
                                        # SENSE images live on the coil-map support (same rule as reconstruct)
                                        functools.partial(magnitude_image, scale=item.scale, crop=recon_size,
                                                          support=item.problem.operator.image_support()),
                                        index=index, info={"scale": item.scale, "sigma_kspace": item.sigma_kspace,
                                                           "sigma_y_normalised": float(item.problem.sigma_y)}))
            info = {**mask_info, "sampled_columns": int(mask.sum()), "columns": int(mask.size),
                    "calibration_lines": calibration, "slices": list(chosen), "scan": str(scan),
                    "normalisation": f"y / p{NORMALISATION_PERCENTILE} of the zero-filled magnitude",
                    "noise_estimate": "Rayleigh median of the outer 1/16 readout rows in sampled columns"}
            tasks.append(Task(f"{acceleration}x", images, baseline="zero-filled", info=info))
    return tasks


def ct_task(images: np.ndarray, views: int, *, noise_fraction: float = 0.01, seed: int = 0, device="cpu",
            name: str | None = None) -> Task:
    """Sparse-view parallel-beam CT of ``images`` (N, H, H) on the CT prior's fixed scale, ``views`` angles in [0, 180).

    ``y = A x + sigma_y n`` with ``sigma_y = noise_fraction * RMS(A x)`` (per image; noise drawn from a generator
    seeded ``seed * 1_000_003 + i``). The CT prior is trained on the fixed scale ``(HU + 1000) / 2000`` in
    [0, 1], so the problem is *not* rescaled (scale 1; no percentile rule). Baseline: FBP (ramp filter).
    """
    from invdiff.operators.ct import ParallelBeamCT

    images = _image_stack("images", images)
    size = images.shape[-1]
    if images.shape[-2] != size:
        raise ValueError(f"CT images must be square, got {images.shape[-2:]}")
    if int(views) != views or views < 1:
        raise ValueError(f"views must be a positive integer, got {views!r}")
    device = torch.device(device)
    operator = ParallelBeamCT(size, angles=np.linspace(0.0, 180.0, int(views), endpoint=False)).to(device)
    task_images = []
    for index, image in enumerate(images):
        x = torch.from_numpy(image)[None, None].to(device)
        clean = operator.A(x)
        sigma_y = noise_fraction * float(clean.pow(2).mean().sqrt())
        if not sigma_y > 0:
            raise ValueError(f"CT image {index} projects to an all-zero sinogram; noise_fraction {noise_fraction}")
        problem = _noisy(operator, clean, sigma_y, seed, index)
        task_images.append(TaskImage(problem, image, functools.partial(real_image, scale=1.0), index=index,
                                     info={"scale": 1.0, "sigma_y": sigma_y}))
    info = {"views": int(views), "angles": "equispaced in [0, 180) degrees", "image_size": size,
            "noise": f"sigma_y = {noise_fraction} x RMS of the clean sinogram",
            "normalisation": "none: fixed CT scale (HU + 1000) / 2000 in [0, 1]"}
    return Task(name or f"ct-{int(views)}", task_images, baseline="fbp", info=info)


def inpainting_task(image: np.ndarray, mask: torch.Tensor, *, name: str, noise_fraction: float = 0.01,
                    seed: int = 0, device="cpu") -> Task:
    """Inpainting of a magnitude image (H, W) treated as a complex image with zero phase (C = 2).

    ``y = M (x + sigma n)`` (noise only where observed), ``sigma = noise_fraction * p99.5(|x|)``; the problem is
    normalised by the 99.5th percentile of ``|A^T y|`` (the observed pixels), as ``invdiff.normalisation``
    does. Baseline: zero-filled (``A^T y``, the observed pixels).
    """
    from invdiff.operators.inpainting import Inpainting

    operator = Inpainting(torch.as_tensor(mask, dtype=torch.bool), channels=2).to(torch.device(device))
    return _image_task(image, operator, name=name, noise_fraction=noise_fraction, seed=seed, reference="adjoint",
                       baseline="zero-filled", observe_masked=True,
                       info={"observed_fraction": float(operator.mask.float().mean())})


def superres_task(image: np.ndarray, factor: int, *, name: str | None = None, kernel: str = "bicubic",
                  noise_fraction: float = 0.01, seed: int = 0, device="cpu") -> Task:
    """``factor``x super-resolution of a magnitude image (H, W) as a complex image with zero phase (C = 2).

    ``y = A x + sigma n`` (anti-aliased ``kernel`` downsampling), ``sigma = noise_fraction * p99.5(|x|)``;
    normalised by the 99.5th percentile of ``|A^+ y|`` (``A^T y`` is not on the image's scale here).
    Baseline: ``pinv`` (``A^+ y``).
    """
    from invdiff.operators.superres import SuperResolution

    image = np.asarray(image, dtype=np.float32)
    operator = SuperResolution(image.shape[-2:], factor=factor, kernel=kernel, channels=2).to(torch.device(device))
    return _image_task(image, operator, name=name or f"sr-{factor}x", noise_fraction=noise_fraction, seed=seed,
                       reference="pinv", baseline="pinv", observe_masked=False,
                       info={"factor": factor, "kernel": kernel})


def _image_task(image, operator, *, name, noise_fraction, seed, reference, baseline, observe_masked, info) -> Task:
    from invdiff.normalisation import normalise

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"{name}: expected one magnitude image (H, W), got shape {image.shape}")
    device = operator.device if hasattr(operator, "device") else torch.device("cpu")
    x = torch.from_numpy(image).to(device)
    x = torch.stack([x, torch.zeros_like(x)])[None]                          # zero phase: (1, 2, H, W)
    sigma = noise_fraction * float(np.percentile(np.abs(image), 99.5))
    if not sigma > 0:
        raise ValueError(f"{name}: the image is (nearly) zero; noise_fraction {noise_fraction} gives sigma 0")
    generator = torch.Generator(device=device).manual_seed(seed * SEED_STRIDE)
    if observe_masked:
        noisy = x + sigma * torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        problem = InverseProblem(operator, operator.A(noisy), sigma)         # noise only at observed pixels
    else:
        clean = operator.A(x)
        problem = InverseProblem(operator, clean + sigma * torch.randn(clean.shape, generator=generator,
                                                                       device=device, dtype=clean.dtype), sigma)
    scaled, scale = normalise(problem, reference=reference)
    task_image = TaskImage(scaled, image, functools.partial(magnitude_image, scale=scale), index=0,
                           info={"scale": scale, "sigma_y": sigma, "sigma_y_normalised": float(scaled.sigma_y)})
    info = {**info, "image_size": list(image.shape), "noise": f"sigma = {noise_fraction} x p99.5 of the image",
            "normalisation": f"y / p99.5 of |{'A^T y' if reference == 'adjoint' else 'A^+ y'}|",
            "phase": "zero (the magnitude image as a complex image)"}
    return Task(name, [task_image], baseline=baseline, info=info)


def _noisy(operator, clean: torch.Tensor, sigma_y: float, seed: int, index: int) -> InverseProblem:
    generator = torch.Generator(device=clean.device).manual_seed(seed * SEED_STRIDE + index)
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    return InverseProblem(operator, clean + sigma_y * noise, sigma_y)


def _image_stack(name: str, images) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"{name}: expected images (N, H, W) or one image (H, W), got shape {images.shape}")
    return images


def block_average(image: np.ndarray, size: int) -> np.ndarray:
    """Downsample a square-ish (H, W) image to (size, size * W / H) by averaging ``k x k`` blocks, ``k = H / size``.

    Block averaging is the exact integral of the image over the bigger pixels (no ringing, no new values);
    ``H`` and ``W`` must be divisible by ``k``.
    """
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape[-2:]
    if size == height:
        return image
    factor = height // size if size > 0 else 0
    if factor < 1 or height % size or width % factor:
        raise ValueError(f"size {size} must divide the image height {height} (and the factor its width {width})")
    shape = image.shape[:-2] + (height // factor, factor, width // factor, factor)
    return image.reshape(shape).mean(axis=(-3, -1)).astype(np.float32)


# ---- analytic stand-in prior (smoke tests, --tiny, --quick) ----------------------------------------------
def smooth_gaussian_prior(shape: Sequence[int], *, std: float = 0.5, correlation: float = 2.0, mean: float = 0.0):
    """A stationary Gaussian field with a squared-exponential covariance: an exact, training-free prior.

    ``P(k) ∝ exp(-2 pi^2 l^2 |k|^2)`` (k in cycles per pixel, ``l = correlation`` pixels), scaled so each pixel
    has variance ``std^2`` (``mean(P) = std^2``): a smooth-image prior on the normalised scale (magnitude ~1).
    shape: (C, H, W). Exact ``D(x, sigma)`` (a Wiener filter), so the diffusion solvers run in milliseconds;
    used by ``--tiny`` recipes, tests and ``benchmarks/run.py --quick``. Not a model of any anatomy.
    """
    from invdiff.priors.analytic import StationaryGaussianPrior

    channels, height, width = (int(n) for n in shape)
    kh = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    kw = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    power = torch.exp(-2 * math.pi ** 2 * correlation ** 2 * (kh ** 2 + kw ** 2))
    power = power * (std ** 2 / power.mean())
    return StationaryGaussianPrior(torch.full((channels, height, width), float(mean), dtype=torch.float64),
                                   power.expand(channels, height, width).clone())


# ---- solvers ---------------------------------------------------------------------------------------------
@dataclass
class SolverPlan:
    """Validated solver names and their keyword arguments (typed, checked against each signature)."""

    names: list[str]
    kwargs: dict[str, dict]

    def is_diffusion(self, name: str) -> bool:
        return get_sampler(name).metadata.get("kind") != "classical"

    @property
    def needs_prior(self) -> bool:
        return any(self.is_diffusion(name) for name in self.names)


def check_solvers(names: Sequence[str]) -> list[str]:
    """Registered, distinct solver names in the given order (ValueError naming the first unknown one)."""
    names = [str(name).strip() for name in names if str(name).strip()]
    if not names:
        raise ValueError("--solvers: expected at least one solver name (see `invdiff list`), got none")
    registered = list_samplers()
    for name in names:
        if name not in registered:
            raise ValueError(f"--solvers: unknown solver {name!r}; registered: {', '.join(registered)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--solvers: {', '.join(repeated)} listed more than once")
    return names


def parse_solver_list(text: str) -> list[str]:
    """``"reddiff,dps,cg-sense"`` -> checked names."""
    return check_solvers(str(text).split(","))


def parse_accelerations(text: str) -> list[int]:
    """``"4,8"`` -> ``[4, 8]`` (positive integers)."""
    values = []
    for part in str(text).split(","):
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"--accel: expected comma-separated integers such as '4,8', got {text!r}") from None
        if value < 1:
            raise ValueError(f"--accel: accelerations must be >= 1, got {value}")
        values.append(value)
    return values


def parse_set_options(items: Sequence[str]) -> dict[str, list[str]]:
    """``["reddiff:lam=50", "dps:zeta=0.3"]`` -> ``{"reddiff": ["lam=50"], "dps": ["zeta=0.3"]}``."""
    overrides: dict[str, list[str]] = {}
    for item in items:
        solver, sep, assignment = str(item).partition(":")
        if not sep or not solver or "=" not in assignment:
            raise ValueError(f"--set {item!r}: expected SOLVER:NAME=VALUE, e.g. reddiff:lam=50")
        overrides.setdefault(solver, []).append(assignment)
    return overrides


def plan_solvers(solvers: Sequence[str], overrides: dict[str, Sequence[str]] | None = None,
                 steps: int | None = None) -> SolverPlan:
    """Check names and overrides; ``steps`` goes to every solver that has a ``steps`` hyperparameter.

    overrides: solver -> ``["NAME=VALUE", ...]`` (strings typed against the signature) or a dict of typed
    values; each solver must be among ``solvers``.
    """
    names = check_solvers(solvers)
    overrides = dict(overrides or {})
    for solver in overrides:
        if solver not in names:
            raise ValueError(f"--set {solver}:...: solver {solver!r} is not among the compared solvers "
                             f"({', '.join(names)})")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"--steps must be a positive integer, got {steps!r}")
    kwargs = {}
    for name in names:
        sampler = get_sampler(name).factory
        chosen: dict[str, Any] = {}
        if steps is not None and "steps" in hyperparameters(sampler):
            chosen["steps"] = int(steps)
        given = overrides.get(name, [])
        chosen.update(check_hyperparameters(name, given) if isinstance(given, dict)
                      else parse_overrides(sampler, list(given), name))
        kwargs[name] = chosen
    return SolverPlan(names, kwargs)


def check_hyperparameters(solver: str, values: dict) -> dict:
    """Typed overrides for ``solver``: every key must be one of its keyword-only hyperparameters."""
    schema = hyperparameters(get_sampler(solver).factory)
    for name in values:
        if name not in schema:
            raise ValueError(f"solver {solver!r} has no hyperparameter {name!r}; it takes: "
                             f"{', '.join(sorted(schema)) or 'none'}")
    return dict(values)


def apply_overrides(tasks: Sequence[Task], overrides: dict[str, Sequence[str]] | None) -> None:
    """Type ``{"reddiff": ["lam=300"]}`` against each signature and set them on every task, over the task's own
    settings (a user's ``--set`` wins over the tuned task-family defaults)."""
    for solver, items in (overrides or {}).items():
        check_solvers([solver])
        values = (check_hyperparameters(solver, items) if isinstance(items, dict)
                  else parse_overrides(get_sampler(solver).factory, list(items), solver))
        for task in tasks:
            task.solver_overrides.setdefault(solver, {}).update(values)


def resolve_prior(prior, device: torch.device, default: str = DEFAULT_MRI_PRIOR):
    """A loaded prior on ``device``: a Denoiser as given, a shipped name or an exported path, or ``default``."""
    if prior is None or isinstance(prior, (str, Path)):
        from invdiff.priors.loading import load_prior
        return load_prior(str(prior or default), device=device)
    return prior.to(device)


def check_prior_fits(prior, task: Task) -> None:
    """The prior's channels (and fixed image size, for analytic priors) must match the task's images."""
    channels, *size = task.in_shape
    prior_channels = getattr(prior, "channels", None)
    name = getattr(prior, "name", type(prior).__name__)
    if prior_channels is not None and int(prior_channels) != int(channels):
        raise ValueError(f"prior {name} has {prior_channels} channels but the {task.name} images have {channels} "
                         f"(shape {task.in_shape}); use a prior for this modality")
    prior_size = getattr(prior, "image_size", None)
    if prior_size is not None and tuple(prior_size) != tuple(size):
        raise ValueError(f"prior {name} is defined on {tuple(prior_size)} images but the {task.name} images are "
                         f"{tuple(size)}")


# ---- running ---------------------------------------------------------------------------------------------
@dataclass
class SolverRow:
    """One solver on one task: scores against the task's targets, cost, and what it was given."""

    solver: str
    task: str
    psnr: float | None = None
    ssim: float | None = None
    nmse: float | None = None
    seconds: float | None = None
    nfe: int | None = None
    network_seconds: float | None = None
    note: str = ""
    hyperparameters: dict = field(default_factory=dict)
    input_sha256: list[str] = field(default_factory=list)
    reconstruction: np.ndarray | None = field(default=None, repr=False)

    @property
    def ran(self) -> bool:
        return self.reconstruction is not None

    def csv_record(self) -> dict:
        def fmt(value, spec):
            return NOT_AVAILABLE if value is None else format(value, spec)
        return {"solver": self.solver, "task": self.task, "PSNR": fmt(self.psnr, ".4f"), "SSIM": fmt(self.ssim, ".5f"),
                "NMSE": fmt(self.nmse, ".6g"), "seconds": fmt(self.seconds, ".3f"),
                "NFE": NOT_AVAILABLE if self.nfe is None else str(self.nfe), "note": self.note}

    def json_record(self) -> dict:
        record = dataclasses.asdict(self)
        record.pop("reconstruction")
        record["hyperparameters"] = {k: _jsonable(v) for k, v in self.hyperparameters.items()}
        return record


def problem_fingerprint(problem: InverseProblem) -> str:
    """sha256 of what a solver sees: ``y``, ``sigma_y`` and every operator buffer (mask, coil maps, angles)."""
    digest = hashlib.sha256()
    tensors = [("y", problem.y), *sorted(problem.operator.named_buffers(), key=lambda item: item[0])]
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.numpy().tobytes())
    digest.update(f"sigma_y:{float(problem.sigma_y)!r}".encode())
    return digest.hexdigest()


def run_solver(task: Task, solver: str, kwargs: dict, *, prior=None, seed: int = 0, progress: bool = False,
               diffusion: bool | None = None) -> SolverRow:
    """Run ``solver`` on every image of ``task`` (own copy of y, generator ``seed * 1_000_003 + index``), score it.

    A ``ValueError`` / ``NotImplementedError`` from the solver (it cannot run on this operator) gives an
    ``n/a`` row with the reason; anything else propagates.
    """
    entry = get_sampler(solver)
    diffusion = entry.metadata.get("kind") != "classical" if diffusion is None else diffusion
    kwargs = {**kwargs, **check_hyperparameters(solver, task.solver_overrides.get(solver, {}))}
    row = SolverRow(solver, task.name, hyperparameters=kwargs)
    images, seconds, nfe, network = [], 0.0, 0, 0.0
    for image in task.images:
        source = image.problem
        problem = InverseProblem(source.operator, source.y.clone(), source.sigma_y)
        row.input_sha256.append(problem_fingerprint(problem))
        generator = torch.Generator(device=problem.y.device).manual_seed(seed * SEED_STRIDE + image.index)
        callback = None
        if progress and diffusion:
            from invdiff.callbacks import ProgressBar
            callback = ProgressBar(description=f"{solver} {task.name}")
        try:
            with timed(problem.y) as timer:
                result = entry.factory(problem, prior if diffusion else None, generator=generator, callback=callback,
                                       **kwargs)
        except (ValueError, NotImplementedError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            log.warning("%s on %s: %s %s", solver, task.name, NOT_AVAILABLE, reason)
            row.note = f"{NOT_AVAILABLE}: {reason}"
            return row
        seconds += timer.seconds
        nfe += int(result.diagnostics.get("nfe", 0))
        network += float(result.diagnostics.get("network_seconds", 0.0))
        images.append(image.to_image(result.x))
    row.reconstruction = np.stack(images).astype(np.float32)
    row.seconds, row.nfe, row.network_seconds = seconds, nfe, network
    _score(row, task.target)
    log.info("%s on %s: PSNR %s SSIM %s in %.1f s (%d NFE)", solver, task.name, _fmt(row.psnr, ".2f"),
             _fmt(row.ssim, ".4f"), seconds, nfe)
    return row


def _score(row: SolverRow, target: np.ndarray) -> None:
    if not np.isfinite(row.reconstruction).all():
        row.note = "diverged: non-finite values in the reconstruction"
        row.psnr = row.ssim = row.nmse = math.nan
        return
    from invdiff import metrics

    scores = metrics.evaluate(target, row.reconstruction)
    row.psnr, row.ssim, row.nmse = scores["psnr"], scores["ssim"], scores["nmse"]


def _fmt(value, spec: str) -> str:
    return NOT_AVAILABLE if value is None else format(value, spec)


@dataclass
class ComparisonReport:
    """All rows (tasks x solvers, baseline first per task) and the files written."""

    out_dir: Path
    rows: list[SolverRow]
    tasks: list[Task]
    metrics_csv: Path
    summary_json: Path
    figures: list[Path]

    def row(self, solver: str, task: str) -> SolverRow:
        for row in self.rows:
            if row.solver == solver and row.task == task:
                return row
        raise KeyError(f"no row for solver {solver!r} on task {task!r}")

    def table(self) -> str:
        """The metrics as a Markdown table (n/a rows keep their reason)."""
        lines = ["| task | solver | PSNR (dB) | SSIM | NMSE | seconds | NFE | note |",
                 "|---|---|---:|---:|---:|---:|---:|---|"]
        for row in self.rows:
            record = row.csv_record()
            lines.append(f"| {row.task} | {row.solver} | {_fmt(row.psnr, '.2f')} | {_fmt(row.ssim, '.4f')} | "
                         f"{_fmt(row.nmse, '.4f')} | {_fmt(row.seconds, '.1f')} | {record['NFE']} | {row.note} |")
        return "\n".join(lines)

    def summary_lines(self) -> list[str]:
        from invdiff import metrics

        return [self.table(), f"metrics protocol: {metrics.PROTOCOL}", f"wrote {self.metrics_csv}",
                f"wrote {self.summary_json}", *(f"wrote {figure}" for figure in self.figures)]


def compare_problems(tasks: Sequence[Task], solvers: Sequence[str], out_dir: str | Path, *, prior=None,
                     seed: int = 0, overrides: dict | None = None, steps: int | None = None, progress: bool = True,
                     title: str = "", info: dict | None = None, figures: bool = True) -> ComparisonReport:
    """Run every solver (each task's baseline first) on every task and write metrics.csv, the grids, compare.json.

    prior: a loaded Denoiser (diffusion solvers need one; it must fit every task's images); overrides and
    steps as in :func:`plan_solvers`; figures: write the grid PNGs (a few seconds each with matplotlib).
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("compare: no tasks to run")
    names = check_solvers(solvers)
    baselines = [task.baseline for task in tasks if task.baseline not in names]
    plan = plan_solvers(list(dict.fromkeys(baselines)) + names, overrides, steps)
    for task in tasks:
        for solver, values in task.solver_overrides.items():
            check_solvers([solver])
            check_hyperparameters(solver, values)
    diffusion_solvers = [name for name in plan.names if plan.is_diffusion(name)]
    if diffusion_solvers:
        if prior is None:
            raise ValueError(f"solvers {', '.join(diffusion_solvers)} need a prior; pass --prior")
        for task in tasks:
            check_prior_fits(prior, task)
    from invdiff import metrics

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for task in tasks:
        order = [task.baseline] + [name for name in names if name != task.baseline]
        for solver in order:
            kwargs = plan.kwargs.get(solver, {})
            rows.append(run_solver(task, solver, kwargs, prior=prior, seed=seed, progress=progress))
    total = time.perf_counter() - start
    metrics_csv = write_metrics_csv(out_dir / "metrics.csv", rows)
    written = [write_task_figure(out_dir / f"grid-{_file_safe(task.name)}.png", task, rows, title)
               for task in tasks] if figures else []
    summary = {
        "title": title, "seed": seed, "seed_rule": "generator per image: seed * 1000003 + image index",
        "solvers": plan.names, "steps": steps, "metrics_protocol": metrics.PROTOCOL,
        "prior": _prior_record(prior) if diffusion_solvers else None, "invdiff_version": invdiff.__version__,
        "torch_version": torch.__version__, "total_seconds": total,
        "tasks": {task.name: {"baseline": task.baseline, "images": len(task.images), "in_shape": list(task.in_shape),
                              **{k: _jsonable(v) for k, v in task.info.items()},
                              "per_image": [_jsonable(image.info) for image in task.images],
                              "solver_overrides": _jsonable(task.solver_overrides)} for task in tasks},
        "rows": [row.json_record() for row in rows], **(info or {}),
    }
    summary_json = atomic_write_json(out_dir / "compare.json", _jsonable(summary))
    write_reconstructions(out_dir / "reconstructions.npz", tasks, rows)
    return ComparisonReport(out_dir, rows, tasks, metrics_csv, summary_json, written)


def write_reconstructions(path: str | Path, tasks: Sequence[Task], rows: Sequence[SolverRow]) -> Path:
    """Targets and reconstructions as float32 (images, H, W) arrays keyed ``"<task>/target"``, ``"<task>/<solver>"``
    (compressed npz, atomically), so scores can be recomputed, e.g. inside a foreground mask, without rerunning."""
    arrays = {f"{task.name}/target": task.target for task in tasks}
    arrays.update({f"{row.task}/{row.solver}": row.reconstruction for row in rows if row.ran})
    with atomic_open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return Path(path)


def write_metrics_csv(path: str | Path, rows: Sequence[SolverRow]) -> Path:
    """``solver, task, PSNR, SSIM, NMSE, seconds, NFE, note``, one line per row, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.csv_record())
    with atomic_open(path, "w", newline="") as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def write_task_figure(path: str | Path, task: Task, rows: Sequence[SolverRow], title: str = "") -> Path:
    """Middle image of ``task``: target and each solver that ran (baseline first) on one grey scale, and below
    them |reconstruction - target| on one shared colour scale.

    The error scale is the 99.5th percentile of the *baseline's* error (zero-filled, FBP, A^+ y): a shared,
    robust reference, so a diverged solver saturates its own map instead of darkening every other one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from invdiff.io import atomic_path

    middle = len(task.images) // 2
    target = task.target[middle]
    ran = [row for row in rows if row.task == task.name and row.ran]
    images = [np.nan_to_num(row.reconstruction[middle], nan=0.0, posinf=0.0, neginf=0.0) for row in ran]
    vmax = float(np.percentile(target, 99.5)) or 1.0
    baseline = next((image for row, image in zip(ran, images) if row.solver == task.baseline), None)
    reference = baseline if baseline is not None else (images[0] if images else target)
    error_max = float(np.percentile(np.abs(reference - target), 99.5)) or 1.0
    columns = len(images) + 1
    fig, axes = plt.subplots(2, columns, figsize=(2.4 * columns, 5.2), squeeze=False)
    axes[0, 0].imshow(target, cmap="gray", vmin=0, vmax=vmax)
    axes[0, 0].set_title("target", fontsize=9)
    axes[1, 0].text(0.5, 0.5, f"|error| scale\n0 to {error_max:.3g}\n(p99.5 of {task.baseline})", ha="center",
                    va="center", fontsize=8, transform=axes[1, 0].transAxes)
    for column, (row, image) in enumerate(zip(ran, images), start=1):
        axes[0, column].imshow(image, cmap="gray", vmin=0, vmax=vmax)
        axes[0, column].set_title(f"{row.solver}\n{_fmt(row.psnr, '.2f')} dB, SSIM {_fmt(row.ssim, '.3f')}",
                                  fontsize=8)
        axes[1, column].imshow(np.abs(image - target), cmap="inferno", vmin=0, vmax=error_max)
    for ax in axes.flat:
        ax.set_axis_off()
    heading = f"{title} {task.name}".strip()
    if heading:
        fig.suptitle(heading, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _prior_record(prior) -> dict:
    return {"name": getattr(prior, "name", type(prior).__name__), "sha256": getattr(prior, "sha256", "") or
            getattr(prior, "metadata", {}).get("sha256", ""), "class": type(prior).__name__,
            "steps_trained": getattr(prior, "metadata", {}).get("steps")}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (Path, torch.device, torch.dtype)):
        return str(value)
    return repr(value)


# ---- scans -----------------------------------------------------------------------------------------------
def compare_scan(scan: str | Path, solvers: Sequence[str], accelerations: Sequence[int], out_dir: str | Path, *,
                 prior=None, seed: int = 0, slices: str | None = None, overrides: dict | None = None,
                 device: str = "auto", progress: bool = True, steps: int | None = None,
                 center_fraction: float | None = None, mask_kind: str = "random",
                 figures: bool = True) -> ComparisonReport:
    """Every solver on the chosen slices of a fastMRI scan at each acceleration, on identical inputs.

    solvers: registered names (zero-filled is added first as the baseline); accelerations: e.g. ``[4, 8]``
    (fastMRI masks seeded by the file name, centre fraction 0.08 at 4x and 0.04 at 8x unless given);
    prior: a loaded Denoiser, a shipped name or an exported path (default ``brain-mri-complex``; loaded
    only when a diffusion solver is listed); overrides: solver -> ``["NAME=VALUE", ...]``, applied over the
    MRI settings of :data:`TASK_SETTINGS` (DPS's tuned zeta); steps: for every solver that takes ``steps``.
    Writes metrics.csv, grid-<acc>x.png and compare.json into ``out_dir``.
    Bad input (unknown solver, bad override, no target in the file) raises ValueError before any solver runs.
    """
    from invdiff.reconstruct import resolve_device

    names = check_solvers(solvers)
    plan = plan_solvers(names, overrides, steps)              # validate before the heavy work
    accelerations = [int(a) for a in accelerations]
    if not accelerations or min(accelerations) < 1:
        raise ValueError(f"accelerations must be positive integers, got {accelerations}")
    torch_device = resolve_device(device)
    if not Path(scan).is_file():
        raise FileNotFoundError(f"{scan}: no such scan file")
    tasks = scan_tasks(scan, accelerations, slices=slices, device=torch_device, center_fraction=center_fraction,
                       mask_kind=mask_kind)
    for task in tasks:
        task.solver_overrides = task_settings("mri", plan.names)
    apply_overrides(tasks, overrides)                         # the user's --set wins over the tuned settings
    loaded = resolve_prior(prior, torch_device) if plan.needs_prior else None
    return compare_problems(tasks, plan.names, out_dir, prior=loaded, seed=seed, steps=steps,
                            progress=progress, title=Path(scan).name,
                            info={"scan": str(scan), "device": str(torch_device)}, figures=figures)


# ---- command line (mounted by invdiff.cli as `invdiff compare`) ------------------------------------------
def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``compare`` to an ``argparse`` subparsers object; its handler is :func:`run_compare` (``args.run``)."""
    p = subparsers.add_parser("compare", help="run several solvers on identical inputs of a fastMRI scan",
                              description="Run several solvers on identical inputs (mask, coil maps, "
                                          "normalisation, seed) of a fastMRI scan; write metrics.csv, "
                                          "grid-<acc>x.png and compare.json into --out.")
    p.add_argument("scan", help="fastMRI-format .h5 file with a reference image")
    p.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS),
                   help=f"comma-separated solver names (default: {','.join(DEFAULT_SOLVERS)}); zero-filled is "
                        f"always added as the baseline")
    p.add_argument("--accel", default="4", help="comma-separated accelerations, e.g. 4,8 (default: 4)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--set", action="append", default=[], metavar="SOLVER:NAME=VALUE",
                   help="hyperparameter of one solver, checked against its signature (repeatable); default: "
                        "registered defaults, DPS with its MRI-tuned zeta")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of every solver that takes `steps` (default: each solver's own default)")
    p.add_argument("--slices", default=None, help="python-style slice range, e.g. 0:4 (default: all)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (per slice: seed * 1000003 + slice)")
    p.add_argument("--prior", default=None, help=f"prior name or exported path (default: {DEFAULT_MRI_PRIOR})")
    p.add_argument("--center-fraction", type=float, default=None,
                   help="fully sampled centre fraction (default: 0.08 at 4x, 0.04 at 8x)")
    p.add_argument("--mask", default="random", choices=["random", "equispaced", "equispaced_fraction"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_compare)
    return p


def run_compare(args, stream=None) -> int:
    """The ``invdiff compare`` handler: bad input raises ValueError (the CLI turns it into exit status 2)."""
    stream = sys.stdout if stream is None else stream
    report = compare_scan(args.scan, parse_solver_list(args.solvers), parse_accelerations(args.accel), args.out,
                          prior=args.prior, seed=args.seed, slices=args.slices, overrides=parse_set_options(args.set),
                          device=args.device, progress=not args.no_progress, steps=args.steps,
                          center_fraction=args.center_fraction, mask_kind=args.mask)
    stream.write("\n".join(report.summary_lines()) + "\n")
    return 0


# ---- recipe configs ------------------------------------------------------------------------------------
def config_parser(config_type, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one ``--field`` per field of the dataclass ``config_type``.

    Types come from the defaults: bool -> ``--x / --no-x``; tuple -> comma-separated values of its first
    element's type; None -> text (or ``none``); int / float / str as they are.
    """
    parser = argparse.ArgumentParser(description=description)
    for item in dataclasses.fields(config_type):
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        flag = "--" + item.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, dest=item.name, default=default, type=_field_parser(item.name, default),
                                help=f"default: {_show(default)}")
    return parser


def _field_parser(name: str, default) -> Callable[[str], Any]:
    def parse(text: str):
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(part) for part in text.split(",") if part.strip())
        if default is None:
            return None if text.lower() == "none" else text
        return type(default)(text)

    parse.__name__ = name
    return parse


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_config(config_type, argv: Sequence[str] | None = None, description: str = ""):
    """``config_type(**parsed)``; with ``--tiny``, ``config.tiny_variant()`` (the seconds-long smoke variant)."""
    args = config_parser(config_type, description).parse_args(argv)
    config = config_type(**vars(args))
    return config.tiny_variant() if getattr(config, "tiny", False) else config


def run_recipe(config_type, run: Callable, argv: Sequence[str] | None = None, description: str = "",
               stream=None) -> "ComparisonReport":
    """A recipe's ``main``: INFO logging, the ``Config`` from the command line, ``run(config)``, the summary table
    on ``stream`` (stdout)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(parse_config(config_type, argv, description))
    (sys.stdout if stream is None else stream).write("\n".join(report.summary_lines()) + "\n")
    return report


__all__ = ["Task", "TaskImage", "SolverRow", "SolverPlan", "ComparisonReport", "compare_scan", "compare_problems",
           "scan_tasks", "ct_task", "inpainting_task", "superres_task", "block_average", "smooth_gaussian_prior",
           "run_solver", "plan_solvers", "check_solvers", "parse_solver_list", "parse_accelerations",
           "parse_set_options", "problem_fingerprint", "write_metrics_csv", "write_task_figure",
           "write_reconstructions", "add_compare_parser", "run_compare", "config_parser", "parse_config", "run_recipe",
           "CSV_COLUMNS", "SEED_STRIDE",
           "TASK_SETTINGS", "task_settings", "apply_overrides"]
