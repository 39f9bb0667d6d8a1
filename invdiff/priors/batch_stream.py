"""Where a training run's batches come from: one seeded stream in the training process, or worker processes.

Two streams, fixed for a run (``TrainConfig.data_stream``):

- ``"generator"`` (the default, and every run before 2026-12-05): one ``torch.Generator`` draws batch after batch
  in the training process; its state is checkpointed, so a resumed run continues the same stream.
- ``"per-step"``: batch ``k`` is drawn from its own generator seeded by ``(seed, k)``. A batch is then a pure
  function of the step, so any number of worker processes can draw ahead of the optimiser in any order and the
  run stays bit-identical to one drawn in-process (``data_workers = 0``), resumed or not, with any worker count.

Workers exist for GPUs: the procedural sources cost 3 ms (``mni-brain-scales``) to 13 ms (``ct-anatomy``) of one
CPU core per 64 px image, so one process feeds a GPU 75 to 300 images a second, far below what it trains on.
They are separate processes started with ``spawn`` (never ``fork``: the parent may hold a CUDA context), each
building its own source from the run's spec, one torch thread each, ignoring Ctrl-C (the training process stops
the run and then the workers); at most ``2 x workers`` batches are in flight. A worker that dies (killed, out of
memory, its source failing to build) is an error of the run, never a silent wait.
"""
from __future__ import annotations

import collections
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
import numpy as np
import torch

STREAMS = ("generator", "per-step")
# torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so the mix lives in 32 bits: for one run
# seed, step -> seed is a bijection on [0, 2^32) (odd multiplier), so no two batches of a run share a seed.
_RUN_MULTIPLIER, _STEP_MULTIPLIER = 0x9E3779B9, 0x85EBCA6B


def step_seed(seed: int, step: int) -> int:
    """The seed of batch ``step`` of a ``per-step`` stream: distinct for every step of a run (below 2^32 steps)."""
    return (int(seed) * _RUN_MULTIPLIER + int(step) * _STEP_MULTIPLIER + 1) & 0xFFFFFFFF


def draw(source, generator: torch.Generator, conditioned: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch and, for a spacing-conditioned network, each image's pixel spacing."""
    if conditioned:
        return source.batch_with_spacing(generator)
    return source.batch(generator), None


# -------------------------------------------------------------------------------- worker side (spawned)
_WORKER: dict = {}


def _worker_init(spec: str, channels: int, size: int, batch: int, conditioned: bool, seed: int) -> None:
    from invdiff.datasets.training import make_source

    signal.signal(signal.SIGINT, signal.SIG_IGN)    # Ctrl-C reaches the whole process group; the parent handles it
    torch.set_num_threads(1)
    _WORKER.update(source=make_source(spec, channels=channels, size=size, batch=batch), conditioned=conditioned,
                   seed=seed)


def _worker_draw(step: int) -> tuple[np.ndarray, np.ndarray | None]:
    generator = torch.Generator().manual_seed(step_seed(_WORKER["seed"], step))
    x0, spacing = draw(_WORKER["source"], generator, _WORKER["conditioned"])
    # numpy, not tensors: no shared-memory file descriptors to leak between processes
    return x0.numpy(), None if spacing is None else spacing.numpy()


# ------------------------------------------------------------------------------------------ the streams
class BatchStream:
    """``next(step)`` -> ``(x0, spacing or None)`` on the CPU; a context manager that stops its workers."""

    def __init__(self, *, stream: str, source, seed: int, conditioned: bool,
                 generator: torch.Generator | None = None, workers: int = 0, spec: str | None = None,
                 channels: int | None = None, size: int | None = None, batch: int | None = None):
        if stream not in STREAMS:
            raise ValueError(f"data_stream must be one of {STREAMS}, got {stream!r}")
        if workers < 0:
            raise ValueError(f"data_workers must be >= 0, got {workers}")
        if workers and stream != "per-step":
            raise ValueError("data workers need the 'per-step' data stream (a run started on the 'generator' "
                             "stream cannot change it; start a new run folder)")
        if stream == "generator" and generator is None:
            raise ValueError("the 'generator' stream needs the run's data generator")
        self.stream, self.source, self.seed, self.conditioned = stream, source, int(seed), conditioned
        self.generator, self.workers = generator, int(workers)
        self._spec = (spec, channels, size, batch)
        self._pool: ProcessPoolExecutor | None = None
        self._pending: collections.deque = collections.deque()     # (step, Future), in step order

    def __enter__(self) -> "BatchStream":
        if self.workers:
            spec, channels, size, batch = self._spec
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_worker_init,
                                             initargs=(spec, channels, size, batch, self.conditioned, self.seed))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            # in-flight draws finish (one batch each, well under a second); queued ones are dropped
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.stream == "generator":
            return draw(self.source, self.generator, self.conditioned)
        if self._pool is None:
            return draw(self.source, torch.Generator().manual_seed(step_seed(self.seed, step)), self.conditioned)
        return self._next_from_workers(step)

    def _next_from_workers(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._pending and self._pending[0][0] != step:     # the caller jumped (not in training): start over
            self._pending.clear()
        upcoming = self._pending[-1][0] + 1 if self._pending else step
        try:
            while len(self._pending) < 2 * self.workers:
                self._pending.append((upcoming, self._pool.submit(_worker_draw, upcoming)))
                upcoming += 1
            _, future = self._pending.popleft()
            x0, spacing = future.result()
        except BrokenProcessPool as err:
            raise RuntimeError(f"a data worker of {self._spec[0]!r} died before batch {step} (killed, out of memory, or "
                               f"its source failed to build; the worker's traceback is above)") from err
        return torch.from_numpy(x0), None if spacing is None else torch.from_numpy(spacing)


def make_stream(state, source, workers: int = 0) -> BatchStream:
    """The stream of a :class:`~invdiff.priors.train.TrainingState`'s run."""
    config = state.config
    return BatchStream(stream=config.data_stream, source=source, seed=config.seed,
                       conditioned=state.net.config.spacing_conditioning, generator=state.data_generator,
                       workers=workers, spec=config.data, channels=config.channels, size=config.size,
                       batch=config.batch)


