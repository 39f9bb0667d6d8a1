"""Images (CT slices, magnitude images) as simulated problems: sparse-view CT, inpainting, super-resolution.

Noise is drawn from the generator of the seed rule (:func:`invdiff.tasks.base.image_generator`), so a task is
the same problem in every entry point and every run with the same seed.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from invdiff.errors import InputError
from invdiff.problem import InverseProblem
from invdiff.tasks.base import Task, TaskImage, image_generator, magnitude_image, real_image


CT_GEOMETRIES = ("parallel", "fan", "limited")
# Degrees a full scan covers: parallel rays repeat after 180 (opposite rays see the same line integral); the
# fan-beam FBP here is the 360-degree one (a short scan would need Parker weights).
FULL_SCAN_DEGREES = {"parallel": 180.0, "fan": 360.0}
DEFAULT_LIMITED_DEGREES = 120.0


def ct_task(images: np.ndarray, views: int, *, noise_fraction: float = 0.01, seed: int = 0, device="cpu",
            name: str | None = None, geometry: str = "parallel", angle_range: float | None = None,
            spacing_mm=None) -> Task:
    """Sparse-view CT of ``images`` (N, H, H) on the CT prior's fixed scale, ``views`` equispaced angles.

    geometry: ``parallel`` (angles in [0, 180)), ``fan`` (flat-detector fan beam, magnification 2, source at twice
    the image side, angles in [0, 360)) or ``limited`` (parallel beam over a wedge [0, angle_range) only, default
    120 degrees: the missing wedge of a C-arm or a breast tomosynthesis-like scan). spacing_mm: the pixel spacing
    of the images (one value, or one per image; None: unknown), told to a resolution-aware prior. ``y = A x + sigma_y n`` with
    ``sigma_y = noise_fraction * RMS(A x)`` (per image; noise from the image's generator). The CT prior is trained
    on the fixed scale ``(HU + 1000) / 2000`` in [0, 1], so the problem is *not* rescaled (scale 1; no
    percentile rule). Baseline: FBP (ramp filter; for a limited wedge its angular weights leave the gap empty).
    """
    from invdiff.operators.ct import FanBeamCT, ParallelBeamCT

    images = image_stack("images", images)
    size = images.shape[-1]
    if images.shape[-2] != size:
        raise InputError(f"CT images must be square, got {images.shape[-2:]}")
    if isinstance(views, bool) or int(views) != views or views < 1:
        raise InputError(f"views must be a positive integer, got {views!r}")
    if geometry not in CT_GEOMETRIES:
        raise InputError(f"CT geometry: expected one of {', '.join(CT_GEOMETRIES)}, got {geometry!r}")
    if geometry == "limited":
        degrees = DEFAULT_LIMITED_DEGREES if angle_range is None else float(angle_range)
        if not 0 < degrees < 180:
            raise InputError(f"limited-angle CT: expected an angle range in (0, 180) degrees, got {angle_range!r}")
    else:
        if angle_range is not None:
            raise InputError(f"angle_range is for geometry 'limited'; {geometry} scans cover "
                             f"{FULL_SCAN_DEGREES[geometry]:.0f} degrees")
        degrees = FULL_SCAN_DEGREES[geometry]
    spacings = _per_image_spacing(spacing_mm, len(images))
    angles = np.linspace(0.0, degrees, int(views), endpoint=False)
    beam = FanBeamCT if geometry == "fan" else ParallelBeamCT
    operator = beam(size, angles=angles).to(device)
    device = torch.device(device)
    task_images = []
    for index, image in enumerate(images):
        clean = operator.A(torch.from_numpy(image)[None, None].to(device))
        sigma_y = noise_fraction * float(clean.pow(2).mean().sqrt())
        if not sigma_y > 0:
            raise InputError(f"CT image {index} projects to an all-zero sinogram; noise_fraction {noise_fraction}")
        noise = torch.randn(clean.shape, generator=image_generator(seed, index, device), device=device,
                            dtype=clean.dtype)
        problem = InverseProblem(operator, clean + sigma_y * noise, sigma_y)
        task_images.append(TaskImage(problem, image, functools.partial(real_image, scale=1.0), index=index,
                                     spacing_mm=spacings[index], info={"scale": 1.0, "sigma_y": sigma_y}))
    beam_name = {"parallel": "parallel beam", "fan": "fan beam (flat detector, magnification 2)",
                 "limited": "parallel beam, limited angle"}[geometry]
    info = {"views": int(views), "geometry": beam_name, "angles": f"equispaced in [0, {degrees:g}) degrees",
            "image_size": size, "noise": f"sigma_y = {noise_fraction} x RMS of the clean sinogram",
            "normalisation": "none: fixed CT scale (HU + 1000) / 2000 in [0, 1]"}
    default_name = {"parallel": f"ct-{int(views)}", "fan": f"ct-fan-{int(views)}",
                    "limited": f"ct-limited{degrees:g}-{int(views)}"}[geometry]
    return Task(name or default_name, "ct", task_images, baseline="fbp", info=info)


def _per_image_spacing(spacing_mm, count: int) -> list[float | None]:
    """``spacing_mm`` (None, one value or one per image) as a list of ``count`` positive floats or Nones."""
    if spacing_mm is None:
        return [None] * count
    values = [spacing_mm] * count if np.ndim(spacing_mm) == 0 else list(np.asarray(spacing_mm, dtype=float))
    if len(values) != count:
        raise InputError(f"spacing_mm: expected one value or {count} (one per image), got {len(values)}")
    for value in values:
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"spacing_mm: expected positive pixel spacings in mm, got {value!r}")
    return [float(v) for v in values]


def inpainting_task(image: np.ndarray, mask: torch.Tensor, *, name: str, noise_fraction: float = 0.01,
                    seed: int = 0, device="cpu") -> Task:
    """Inpainting of a magnitude image (H, W) treated as a complex image with zero phase (C = 2).

    ``y = M (x + sigma n)`` (noise only where observed), ``sigma = noise_fraction * p99.5(|x|)``; normalised by
    the 99.5th percentile of ``|A^T y|`` (the observed pixels). Baseline: zero-filled (the observed pixels).
    """
    from invdiff.operators.inpainting import Inpainting

    operator = Inpainting(torch.as_tensor(mask, dtype=torch.bool), channels=2).to(torch.device(device))
    return _complex_image_task(image, operator, name=name, family="inpainting", noise_fraction=noise_fraction,
                               seed=seed, reference="adjoint", baseline="zero-filled", observe_masked=True,
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
    return _complex_image_task(image, operator, name=name or f"sr-{factor}x", family="sr",
                               noise_fraction=noise_fraction, seed=seed, reference="pinv", baseline="pinv",
                               observe_masked=False, info={"factor": factor, "kernel": kernel})


def _complex_image_task(image, operator, *, name, family, noise_fraction, seed, reference, baseline, observe_masked,
                        info) -> Task:
    from invdiff.normalisation import normalise

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"{name}: expected one magnitude image (H, W), got shape {image.shape}")
    device = operator.device
    x = torch.from_numpy(image).to(device)
    x = torch.stack([x, torch.zeros_like(x)])[None]                          # zero phase: (1, 2, H, W)
    sigma = noise_fraction * float(np.percentile(np.abs(image), 99.5))
    if not sigma > 0:
        raise InputError(f"{name}: the image is (nearly) zero; noise_fraction {noise_fraction} gives sigma 0")
    generator = image_generator(seed, 0, device)
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
    return Task(name, family, [task_image], baseline=baseline, info=info)


def image_stack(name: str, images) -> np.ndarray:
    """``images`` as float32 (N, H, W); one (H, W) image becomes N = 1."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[0] == 0:
        raise InputError(f"{name}: expected images (N, H, W) or one image (H, W), got shape {images.shape}")
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
        raise InputError(f"size {size} must divide the image height {height} (and the factor its width {width})")
    shape = image.shape[:-2] + (height // factor, factor, width // factor, factor)
    return image.reshape(shape).mean(axis=(-3, -1)).astype(np.float32)


__all__ = ["ct_task", "inpainting_task", "superres_task", "image_stack", "block_average"]
