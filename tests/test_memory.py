"""invdiff.memory: the peak of a block sees what the block allocated, and a reset forgets an earlier peak."""
import numpy as np
import pytest

from invdiff.memory import RESET_SOURCE, peak_bytes, peak_memory, reset_peak, resident_bytes

MB = 2 ** 20


def _touch(megabytes: int) -> int:
    block = np.ones(megabytes * MB, dtype=np.uint8)        # written, so resident
    return int(block.sum())


def test_the_peak_of_a_block_includes_its_allocations():
    with peak_memory("cpu") as record:
        before = resident_bytes()
        _touch(200)
    assert record["bytes"] >= before + 150 * MB
    assert record["source"]


def test_a_reset_forgets_an_earlier_peak():
    _touch(300)
    high = peak_bytes("cpu")
    if reset_peak("cpu") != RESET_SOURCE:
        pytest.skip("this system refuses to reset the peak resident size (the source says 'upper bound')")
    assert peak_bytes("cpu") < high - 200 * MB
    assert peak_bytes("cpu") >= resident_bytes() - 16 * MB
