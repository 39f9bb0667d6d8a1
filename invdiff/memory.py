"""Peak memory of a block of work: one definition for the 3-D samplers' diagnostics, ``invdiff compare``'s rows and
the benchmarks, so the numbers they report mean the same thing.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the tensors torch allocated; not the
allocator's cache). CPU: the process's peak resident size, ``VmHWM`` in ``/proc/self/status``, which Linux lets a
process reset to its current size (``5 > /proc/self/clear_refs``); so the peak of a block includes what was resident
before it (torch, the prior) but not an earlier, larger peak. Where the reset is refused (not Linux, a locked-down
``/proc``) the lifetime peak (``ru_maxrss``) is reported as an upper bound and the source says so.

    >>> with peak_memory("cpu") as record:
    ...     run_the_solver()
    >>> record["bytes"], record["source"]
"""
from __future__ import annotations

import contextlib
import resource
import sys

import torch

CUDA_SOURCE = "CUDA max_memory_allocated"
RESET_SOURCE = "peak resident size of the process during the solve (VmHWM, reset before it)"
LIFETIME_SOURCE = "peak resident size of the process so far (ru_maxrss; could not be reset: an upper bound)"


def reset_peak(device: torch.device | str) -> str:
    """Start a new peak on ``device``; returns the source description of the peak that :func:`peak_bytes` reads."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return CUDA_SOURCE
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")                      # resets VmHWM to the current resident size
        return RESET_SOURCE
    except OSError:
        return LIFETIME_SOURCE


def peak_bytes(device: torch.device | str) -> int:
    """The peak since the last :func:`reset_peak` on ``device`` (CPU: the lifetime peak where it was refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    high_water = _status_bytes("VmHWM")
    if high_water is not None:
        return high_water
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)   # bytes on macOS, kB on Linux


def resident_bytes() -> int:
    """The process's current resident size (CPU; 0 where /proc is missing): the floor of any peak after a reset."""
    return _status_bytes("VmRSS") or 0


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes; None where the file or the field is missing."""
    try:
        with open("/proc/self/status") as handle:
            lines = handle.readlines()
    except OSError:                                     # no /proc (not Linux)
        return None
    return next((int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":")), None)


@contextlib.contextmanager
def peak_memory(device: torch.device | str):
    """The peak memory of a block: yields a dict that gets ``bytes`` and ``source`` (module docstring)."""
    record: dict = {"source": reset_peak(device)}
    try:
        yield record
    finally:
        record["bytes"] = peak_bytes(device)
