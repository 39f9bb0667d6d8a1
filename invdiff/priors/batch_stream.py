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
building its own source from the run's spec, one torch thread each; at most ``2 x workers`` batches are in flight.
"""
from __future__ import annotations

import collections
import multiprocessing
import numpy as np
import torch

STREAMS = ("generator", "per-step")
_GOLDEN = 0x9E3779B97F4A7C15       # 2^64 / phi: consecutive steps land far apart in the seed space


def step_seed(seed: int, step: int) -> int:
    """The seed of batch ``step`` of a ``per-step`` stream (a 63-bit mix of run seed and step)."""
    return (int(seed) * _GOLDEN + int(step) * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


def draw(source, generator: torch.Generator, conditioned: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch and, for a spacing-conditioned network, each image's pixel spacing."""
    if conditioned:
        return source.batch_with_spacing(generator)
    return source.batch(generator), None


# -------------------------------------------------------------------------------- worker side (spawned)
_WORKER: dict = {}


def _worker_init(spec: str, channels: int, size: int, batch: int, conditioned: bool, seed: int) -> None:
    from invdiff.datasets.training import make_source

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
        self._pool = None
        self._pending: collections.deque = collections.deque()     # (step, AsyncResult), in step order

    def __enter__(self) -> "BatchStream":
        if self.workers:
            spec, channels, size, batch = self._spec
            context = multiprocessing.get_context("spawn")
            self._pool = context.Pool(self.workers, initializer=_worker_init,
                                      initargs=(spec, channels, size, batch, self.conditioned, self.seed))
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
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
        while len(self._pending) < 2 * self.workers:
            self._pending.append((upcoming, self._pool.apply_async(_worker_draw, (upcoming,))))
            upcoming += 1
        _, result = self._pending.popleft()
        x0, spacing = result.get()
        return torch.from_numpy(x0), None if spacing is None else torch.from_numpy(spacing)


def make_stream(state, source, workers: int = 0) -> BatchStream:
    """The stream of a :class:`~invdiff.priors.train.TrainingState`'s run."""
    config = state.config
    return BatchStream(stream=config.data_stream, source=source, seed=config.seed,
                       conditioned=state.net.config.spacing_conditioning, generator=state.data_generator,
                       workers=workers, spec=config.data, channels=config.channels, size=config.size,
                       batch=config.batch)


