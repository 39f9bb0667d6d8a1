"""What a task is, the seed rule, the output mappings, and running one solver on one image.

A :class:`TaskImage` is everything a solver needs and everything needed to score and save what it returns: the
normalised problem, the target in the original units, ``to_image`` (solver output -> image in those units), the
seed index and the pixel spacing a resolution-aware prior should be told. A :class:`Task` is a named set of
them with a task family (which row of :data:`invdiff.settings.TUNED` applies) and a baseline.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from invdiff.errors import InputError
from invdiff.problem import InverseProblem

log = logging.getLogger(__name__)

# Image i of a run with seed s gets its own generator seeded s * SEED_STRIDE + i (i = slice index for scans), so
# every solver sees the same noise for the same image whatever the batch, the slice range or the other solvers.
SEED_STRIDE = 1_000_003


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``; :class:`InputError` for CUDA without a GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine")
    return device


def image_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image ``index`` in a run seeded ``seed`` (the one seed rule of every entry point)."""
    return torch.Generator(device=device).manual_seed(int(seed) * SEED_STRIDE + int(index))


@dataclass
class TaskImage:
    """One image of a task, prepared once for every solver.

    problem: the normalised problem (``y / scale``, ``sigma_y / scale``); target: (H, W) float32 in the
    original units, or None (a fastMRI test file); to_image: solver output ``x`` (1, C, H, W) in normalised
    units -> (H, W) float32 image in the original units (MRI: magnitude of the centre crop, zero outside the
    coil support; CT: the real image); index: the seed index; spacing_mm: pixel spacing of the problem's image
    grid in mm (None: unknown, the prior's default); info: scale, noise level, ... (recorded with the outputs).
    """

    problem: InverseProblem
    target: np.ndarray | None
    to_image: Callable[[torch.Tensor], np.ndarray]
    index: int = 0
    spacing_mm: float | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    """A named set of images posed the same way (a scan at one acceleration, CT at one number of views, ...).

    family: ``mri``, ``ct``, ``inpainting`` or ``sr`` (the row of tuned settings that applies); baseline: the
    solver shown and run first (zero-filled, FBP, A^+ y); overrides: the user's per-solver values for this task,
    applied over the tuned ones.
    """

    name: str
    family: str
    images: list[TaskImage]
    baseline: str = "zero-filled"
    info: dict = field(default_factory=dict)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def target(self) -> np.ndarray:
        """(images, H, W) float32: the reference volume the metrics are computed against."""
        missing = [image.index for image in self.images if image.target is None]
        if missing:
            raise ValueError(f"task {self.name}: images {missing} have no target")
        return np.stack([image.target for image in self.images]).astype(np.float32)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.images[0].problem.operator.in_shape)

    def hyperparameters(self, solver: str, *, steps: int | None = None) -> dict[str, Any]:
        """Every value ``solver`` runs with on this task (:func:`invdiff.settings.effective`)."""
        from invdiff.settings import effective
        return effective(solver, self.family, self.overrides.get(solver), steps=steps)


# ---- output mappings ------------------------------------------------------------------------------------
def magnitude_image(x: torch.Tensor, *, scale: float, crop: tuple[int, int] | None = None,
                    support: torch.Tensor | None = None) -> np.ndarray:
    """``|x| * scale`` of a (1, 2, H, W) complex image (modulus over the (real, imag) pair), zero outside
    ``support`` (the operator's image support, :meth:`invdiff.operators.base.Operator.image_support`), optionally
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


# ---- running --------------------------------------------------------------------------------------------
@dataclass
class Solution:
    """One solver's answer on one image: the raw result (normalised units) and the image in original units."""

    result: Any
    image: np.ndarray
    input_sha256: str


def prior_at_spacing(prior, spacing_mm: float | None):
    """The prior told the pixel spacing it works at (``prior.at_spacing``); priors without the method ignore it."""
    at_spacing = getattr(prior, "at_spacing", None)
    return prior if at_spacing is None else at_spacing(spacing_mm)


def solve(image: TaskImage, solver: str, prior, hyperparameters: dict[str, Any], *, seed: int = 0,
          callback=None) -> Solution:
    """Run ``solver`` on ``image`` with exactly ``hyperparameters``: its own copy of ``y``, the generator of the
    seed rule, the prior at the image's pixel spacing (diffusion solvers) or no prior (classical ones)."""
    from invdiff.registry import get_solver, needs_prior

    problem = dataclasses.replace(image.problem, y=image.problem.y.clone())     # no solver can change the input
    fingerprint = problem_fingerprint(problem)
    generator = image_generator(seed, image.index, problem.y.device)
    chosen_prior = prior_at_spacing(prior, image.spacing_mm) if needs_prior(solver) else None
    result = get_solver(solver).factory(problem, chosen_prior, generator=generator, callback=callback,
                                        **hyperparameters)
    return Solution(result, image.to_image(result.x), fingerprint)


def problem_fingerprint(problem: InverseProblem) -> str:
    """sha256 of what a solver sees: ``y``, ``sigma_y`` and every operator buffer (mask, coil maps, angles)."""
    import hashlib

    digest = hashlib.sha256()
    tensors = [("y", problem.y), *sorted(problem.operator.named_buffers(), key=lambda item: item[0])]
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.numpy().tobytes())
    digest.update(f"sigma_y:{float(problem.sigma_y)!r}".encode())
    return digest.hexdigest()
