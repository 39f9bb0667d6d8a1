"""Ready-made sampler callbacks: progress bar, trajectory recorder, PSNR logger, and ``combine``.

A callback is any callable ``callback(step, total, state)`` (the :class:`~invdiff.samplers._common.Callback`
protocol); samplers call it once per step with ``state["x"]`` the current estimate and ``state["sigma"]``.

    >>> recorder, logger = TrajectoryRecorder(every=10), MetricLogger(x_true, every=10)
    >>> result = invdiff.sample("reddiff", problem, prior, callback=combine(ProgressBar(), recorder, logger))
    >>> result.trajectory is recorder.trajectory, logger.history[-1]["psnr"]
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch

from invdiff.samplers._common import Callback

log = logging.getLogger(__name__)


def _is_due(step: int, total: int, every: int) -> bool:
    """Every ``every``-th step, and always the last one (so the final state is never missed)."""
    return step % every == 0 or step == total - 1


def _check_every(every: int) -> int:
    if int(every) != every or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    return int(every)


class ProgressBar:
    """A tqdm bar over the sampler's steps, showing sigma and, if present, the data loss.

    Off when ``disable=True`` or when the stream is not a terminal (logs and CI stay clean). One bar per
    sampler run: it closes itself after the last step and reopens on the next run.
    """

    def __init__(self, *, disable: bool = False, description: str = "sampling", stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not disable and bool(getattr(self.stream, "isatty", lambda: False)())
        self.description = description
        self._bar = None

    def __call__(self, step: int, total: int, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=self.description, file=self.stream, leave=False)
        postfix = {}
        if "sigma" in state:
            postfix["sigma"] = f"{float(state['sigma']):.3g}"
        if "loss_data" in state:
            postfix["data"] = f"{float(torch.as_tensor(state['loss_data']).mean()):.3g}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)
        if step == total - 1:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TrajectoryRecorder:
    """Keeps ``state["x"]`` (detached, cloned, on the CPU) every ``every`` steps and at the last step.

    ``trajectory``: list of tensors shaped like ``SampleResult.x``; ``steps``: their step indices. Samplers
    return this list as ``SampleResult.trajectory`` when the recorder is among their callbacks.
    """

    def __init__(self, every: int = 1, *, key: str = "x"):
        self.every = _check_every(every)
        self.key = key
        self.trajectory: list[torch.Tensor] = []
        self.steps: list[int] = []

    def __call__(self, step: int, total: int, state: dict[str, Any]) -> None:
        if _is_due(step, total, self.every):
            self.trajectory.append(state[self.key].detach().to("cpu", copy=True))
            self.steps.append(step)


def psnr(reference: torch.Tensor, estimate: torch.Tensor, *, complex_image: bool | None = None,
         data_range: float | None = None) -> torch.Tensor:
    """``10 log10(range^2 / mean |reference - estimate|^2)`` per batch element: (B,) float64.

    reference, estimate: (B, C, ...) real. For a complex image (C = 2; default: whenever C == 2) the error
    and the range use the modulus of the (real, imag) pair. ``data_range`` defaults to the largest
    magnitude of each reference image (the fastMRI convention ``gt.max()`` for magnitude images).
    """
    if reference.shape != estimate.shape:
        raise ValueError(f"psnr: reference has shape {tuple(reference.shape)} but estimate has "
                         f"{tuple(estimate.shape)}; expected equal shapes")
    reference, estimate = reference.detach().to(torch.float64), estimate.detach().to(reference.device, torch.float64)
    if complex_image is None:
        complex_image = reference.shape[1] == 2
    if complex_image:
        error2 = ((reference - estimate) ** 2).sum(dim=1)
        magnitude = reference.pow(2).sum(dim=1).sqrt()
    else:
        error2 = (reference - estimate) ** 2
        magnitude = reference.abs()
    batch = reference.shape[0]
    mse = error2.reshape(batch, -1).mean(dim=1)
    peak = (magnitude.reshape(batch, -1).amax(dim=1) if data_range is None
            else torch.full((batch,), float(data_range), dtype=torch.float64, device=reference.device))
    return 10 * torch.log10(peak ** 2 / mse.clamp_min(torch.finfo(torch.float64).tiny))


class MetricLogger:
    """PSNR of ``state["x"]`` against a reference image every ``every`` steps and at the last step.

    reference: (B, C, H, W) real, in the sampler's (normalised) units. ``history`` is a list of
    ``{"step": int, "sigma": float, "psnr": [float per batch element]}``; each entry is also logged at DEBUG.
    """

    def __init__(self, reference: torch.Tensor, every: int = 10, *, complex_image: bool | None = None,
                 data_range: float | None = None):
        self.reference = reference.detach()
        self.every = _check_every(every)
        self.complex_image = complex_image
        self.data_range = data_range
        self.history: list[dict[str, Any]] = []

    def __call__(self, step: int, total: int, state: dict[str, Any]) -> None:
        if not _is_due(step, total, self.every):
            return
        values = psnr(self.reference, state["x"], complex_image=self.complex_image, data_range=self.data_range)
        entry = {"step": step, "sigma": float(state["sigma"]) if "sigma" in state else math.nan,
                 "psnr": values.tolist()}
        self.history.append(entry)
        log.debug("step %d/%d sigma %.4g PSNR %s", step + 1, total, entry["sigma"],
                  ", ".join(f"{v:.2f}" for v in entry["psnr"]))


class _Combined:
    """Several callbacks called in order; ``callbacks`` exposes them (e.g. to find a trajectory)."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def __call__(self, step: int, total: int, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback(step, total, state)


def combine(*callbacks: Callback | None) -> Callback:
    """One callback calling each given one in order (``None`` entries are skipped)."""
    kept = [c for c in callbacks if c is not None]
    for c in kept:
        if not callable(c):
            raise ValueError(f"combine: expected callables callback(step, total, state), got {type(c).__name__}")
    return _Combined(kept)


__all__ = ["ProgressBar", "TrajectoryRecorder", "MetricLogger", "combine", "psnr"]
