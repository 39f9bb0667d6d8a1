"""Sampler callbacks: each is checked on hand-made states (no sampler needed), plus one run through RED-Diff.

* TrajectoryRecorder keeps every k-th state and the last one, as detached copies;
* MetricLogger's PSNR is 10 log10(peak^2 / MSE): an error of 0.1 everywhere on a unit-peak image is 20 dB,
  and a complex (C = 2) image uses the modulus of the (real, imag) pair;
* ProgressBar writes nothing when its stream is not a terminal, and draws and closes a bar when it is;
* combine calls callbacks in order and samplers find the recorder inside it.
"""
import io
import math

import pytest
import torch

from invdiff.callbacks import MetricLogger, ProgressBar, TrajectoryRecorder, combine, psnr
from invdiff.operators.matrix import MatrixOperator
from invdiff.priors.analytic import GaussianPrior
from invdiff.problem import simulate
from invdiff.samplers._common import Callback, trajectory_of
from invdiff.samplers.reddiff import sample_reddiff


def _states(total, shape=(1, 1, 2, 2)):
    for step in range(total):
        yield step, {"x": torch.full(shape, float(step)), "sigma": torch.tensor(10.0 / (step + 1))}


def test_trajectory_recorder_every_k_and_last_as_copies():
    recorder = TrajectoryRecorder(every=3)
    for step, state in _states(8):
        recorder(step, 8, state)
        state["x"].add_(100)                        # the sampler may reuse its buffer: records must not change
    assert recorder.steps == [0, 3, 6, 7]
    assert [float(t[0, 0, 0, 0]) for t in recorder.trajectory] == [0.0, 3.0, 6.0, 7.0]
    assert isinstance(recorder, Callback)
    with pytest.raises(ValueError, match="every"):
        TrajectoryRecorder(every=0)


def test_psnr_values():
    reference = torch.ones(2, 1, 4, 4)
    assert torch.allclose(psnr(reference, reference + 0.1), torch.full((2,), 20.0, dtype=torch.float64))
    # complex: reference modulus 1 (phase pi/4), error of modulus 0.1 in every pixel -> 20 dB
    pair = torch.full((1, 2, 4, 4), 1 / math.sqrt(2))
    error = torch.zeros_like(pair)
    error[:, 1] = 0.1
    assert psnr(pair, pair + error).item() == pytest.approx(20.0)
    assert psnr(pair, pair + error, data_range=2.0).item() == pytest.approx(20 + 20 * math.log10(2))
    with pytest.raises(ValueError, match="shape"):
        psnr(reference, reference[:1])


def test_metric_logger_history():
    reference = torch.ones(1, 1, 2, 2)
    logger = MetricLogger(reference, every=2)
    for step in range(5):
        logger(step, 5, {"x": reference + 10.0 ** -(step + 1), "sigma": torch.tensor(1.0)})
    assert [h["step"] for h in logger.history] == [0, 2, 4]
    assert [round(h["psnr"][0]) for h in logger.history] == [20, 60, 100]


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal():
    quiet = io.StringIO()
    bar = ProgressBar(stream=quiet)
    for step, state in _states(4):
        bar(step, 4, state)
    assert quiet.getvalue() == "" and not bar.enabled
    terminal = _FakeTerminal()
    bar = ProgressBar(stream=terminal, description="reddiff")
    states = list(_states(4))
    for step, state in states[:2]:
        bar(step, 4, state)
    assert "reddiff" in terminal.getvalue() and bar._bar.n == 2
    for step, state in states[2:]:
        bar(step, 4, state)
    assert bar._bar is None                               # closed after the last step
    assert not ProgressBar(stream=_FakeTerminal(), disable=True).enabled


def test_combine_calls_in_order_and_exposes_the_trajectory():
    calls = []
    recorder = TrajectoryRecorder(every=1)
    both = combine(lambda s, t, st: calls.append(("a", s)), None, recorder, lambda s, t, st: calls.append(("b", s)))
    for step, state in _states(2):
        both(step, 2, state)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert trajectory_of(both) is recorder.trajectory and trajectory_of(None) is None
    with pytest.raises(ValueError, match="callables"):
        combine(3)


def test_callbacks_in_a_reddiff_run():
    """RED-Diff hands every step to the callback and returns the recorder's trajectory; the last PSNR is the
    PSNR of the result."""
    g = torch.Generator().manual_seed(0)
    prior = GaussianPrior(torch.zeros(1, 2, 2, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    op = MatrixOperator(torch.randn(3, 4, generator=g, dtype=torch.float64), (1, 2, 2))
    x = prior.sample(1, g)
    problem = simulate(op, x, 0.1, g)
    recorder, logger = TrajectoryRecorder(every=10), MetricLogger(x, every=10)
    result = sample_reddiff(problem, prior, steps=25, generator=g,
                            callback=combine(ProgressBar(stream=io.StringIO()), recorder, logger))
    assert result.trajectory is recorder.trajectory and recorder.steps == [0, 10, 20, 24]
    assert torch.equal(recorder.trajectory[-1], result.x)
    assert logger.history[-1]["psnr"][0] == pytest.approx(psnr(x, result.x).item())
