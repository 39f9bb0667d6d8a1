"""A safeguard against a prior that does not fit the scan: check a solver on k-space lines it never saw.

A diffusion prior trained on brains can make a knee, a phantom or a natural image *worse* than doing nothing, and
nothing in its output says so: it fits the measured lines either way. What it gets wrong is the lines it was not
given. So hold some out (k-space cross-validation, as self-supervised MRI work validates without ground truth):

1. split the sampled columns outside the calibration block into a held-out set H (``fraction`` of them, seeded by
   the slice index) and the rest;
2. run the solver and a reference (CG-SENSE by default: classical, no prior) on the data without H;
3. score each by its prediction error on H above the noise floor,
   ``e = (||M_H (A x - y)||^2 - n_H sigma_y^2) / ||M_H y||^2`` (``A`` with every measured column; ``y`` at H is data
   neither solver saw; ``n_H sigma_y^2`` is what even the true image leaves there, so high-frequency columns where
   signal and noise are alike do not drown the comparison);
4. if the solver predicts H no worse than ``tolerance`` times the reference's error, run it on all the data and
   return that; otherwise return the reference on all the data, and say so.

The verdict is recorded (both errors, the choice), so a user sees when the prior was overruled. Cost: one more
run of the solver on slightly less data, and two runs of the reference (seconds). It needs an operator with a
column mask (Cartesian and SENSE MRI); other operators raise :class:`InputError`.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch

from invdiff.errors import InputError
from invdiff.tasks.base import Solution, TaskImage, image_generator, solve

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """What the check found: prediction errors on the held-out lines, and which solution was returned."""

    solver: str
    reference: str
    solver_error: float
    reference_error: float
    held_out_columns: int
    chosen: str
    check_nfe: int = 0                  # network evaluations the check spent (the trial run on the reduced data)

    @property
    def kept(self) -> bool:
        """Whether the solver's own image was returned (else the reference's: the solver was overruled)."""
        return self.chosen == self.solver

    def as_record(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": "kept" if self.kept else "overruled"}


def held_out_columns(mask: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A bool column set of ``round(fraction * n)`` of the n sampled columns outside the calibration block
    (the contiguous sampled run around the centre, which ESPIRiT and the normalisation rely on)."""
    from invdiff.tasks.scan import calibration_width

    columns = mask.reshape(-1, mask.shape[-1])[0].cpu().numpy().astype(bool)
    width = len(columns)
    calibration = calibration_width(columns)
    centre = np.zeros(width, dtype=bool)
    if calibration:
        left = width // 2
        while left > 0 and columns[left - 1]:
            left -= 1
        centre[left:left + calibration] = True
    candidates = np.flatnonzero(columns & ~centre)
    count = int(round(fraction * len(candidates)))
    if count < 1:
        raise InputError(f"safeguard: the mask has {len(candidates)} sampled columns outside the calibration block; "
                         f"holding out {fraction:.0%} of them leaves none to check against (lower the acceleration)")
    order = torch.randperm(len(candidates), generator=generator)[:count].numpy()
    held = torch.zeros(width, dtype=torch.bool)
    held[torch.from_numpy(candidates[order])] = True
    return held


def _model(solution: Solution, operator) -> tuple:
    """``(operator, state)`` a solution predicts k-space with: the problem's operator and its image, or the
    solver's own model when it reports one (CG-SENSE with two ESPIRiT map sets: the soft-SENSE operator and both
    components; their one combined image through the one-map operator would overstate its error)."""
    model = solution.result.diagnostics.get("model")
    return model if model is not None else (operator, solution.result.x)


def _prediction_error(operator, x: torch.Tensor, y: torch.Tensor, sigma_y: float, held: torch.Tensor) -> float:
    """``(||M_H (A x - y)||^2 - n_H sigma_y^2) / ||M_H y||^2``, ``A`` restricted to the held-out columns."""
    on_held = operator.replace(mask=held.to(operator.mask.device))
    predicted = on_held.A(x)
    inside = held.to(y.device).expand_as(y)
    measured = torch.where(inside, y, torch.zeros((), dtype=y.dtype, device=y.device))
    noise_floor = float(inside.sum()) * float(sigma_y) ** 2
    return (float((predicted - measured).pow(2).sum()) - noise_floor) / max(float(measured.pow(2).sum()), 1e-30)


def column_mask(operator) -> torch.Tensor:
    """The one bool column mask (W,) of a Cartesian / SENSE operator (multi-slice: the same for every slice);
    :class:`InputError` for operators without one."""
    rows = getattr(operator, "mask", None)
    rows = None if rows is None else rows.reshape(-1, rows.shape[-1]).bool().cpu()
    if rows is None or not torch.all(rows == rows[0]):
        raise InputError(f"safeguard: needs an operator with one column mask (Cartesian / SENSE MRI), got "
                         f"{type(operator).__name__}")
    return rows[0]


def _held_out(image: TaskImage, mask: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    # Its own stream, apart from the solver's (seed rule + a fixed offset), so the check does not change the result.
    return held_out_columns(mask, fraction, image_generator(seed, image.index + 7_919, "cpu"))


def check_safeguard(image: TaskImage, *, seed: int = 0, fraction: float = 0.2) -> None:
    """:class:`InputError` now if :func:`safeguarded_solve` cannot check ``image`` (no column mask, or too few
    columns to hold out), so a comparison refuses before any solver runs."""
    _held_out(image, column_mask(image.problem.operator), fraction, seed)


def safeguarded_solve(image: TaskImage, solver: str, prior, hyperparameters: dict, *, seed: int = 0,
                      reference: str = "cg-sense", fraction: float = 0.2, tolerance: float = 1.0,
                      callback=None) -> tuple[Solution, Verdict]:
    """:func:`invdiff.tasks.solve` behind the held-out check of the module docstring: ``(solution, verdict)``."""
    from invdiff.settings import effective

    problem = image.problem
    operator = problem.operator
    full_mask = column_mask(operator)
    held = _held_out(image, full_mask, fraction, seed)
    kept = full_mask & ~held
    reduced_operator = operator.replace(mask=kept.to(operator.mask.device))
    y_kept = torch.where(kept.to(problem.y.device), problem.y, torch.zeros((), dtype=problem.y.dtype,
                                                                           device=problem.y.device))
    reduced = dataclasses.replace(image, problem=dataclasses.replace(problem, operator=reduced_operator, y=y_kept))
    reference_values = effective(reference, "mri")
    trial = solve(reduced, solver, prior, hyperparameters, seed=seed, callback=callback)
    baseline = solve(reduced, reference, None, reference_values, seed=seed)
    solver_error = _prediction_error(*_model(trial, operator), problem.y, problem.sigma_y, held)
    reference_error = _prediction_error(*_model(baseline, operator), problem.y, problem.sigma_y, held)
    trusted = solver_error <= tolerance * reference_error
    chosen = solver if trusted else reference
    log.info("safeguard on slice %d: %s predicts %d held-out columns with relative error %.3g, %s %.3g: %s",
             image.index, solver, int(held.sum()), solver_error, reference, reference_error,
             f"keeping {solver}" if trusted else f"{solver} overruled, returning {reference}")
    if trusted:
        solution = solve(image, solver, prior, hyperparameters, seed=seed, callback=callback)
    else:
        solution = solve(image, reference, None, reference_values, seed=seed)
    check_nfe = int(trial.result.diagnostics.get("nfe", 0))
    return solution, Verdict(solver, reference, solver_error, reference_error, int(held.sum()), chosen, check_nfe)


__all__ = ["Verdict", "held_out_columns", "column_mask", "check_safeguard", "safeguarded_solve"]
