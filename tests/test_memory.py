"""invdiff.memory: the peak of a block sees what the block allocated, and a reset forgets an earlier peak.

Each check runs in a fresh interpreter: in the test process memory freed by earlier tests stays resident and is
reused, so a new block need not raise the resident size at all."""
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, numpy as np
from invdiff.memory import RESET_SOURCE, peak_bytes, peak_memory, reset_peak, resident_bytes
MB = 2 ** 20

def touch(megabytes):
    block = np.ones(megabytes * MB, dtype=np.uint8)          # written, so resident
    return int(block.sum())

with peak_memory("cpu") as record:
    before = resident_bytes()
    touch(200)
touch(300)
high = peak_bytes("cpu")
source = reset_peak("cpu")
print(json.dumps({"block": record["bytes"], "before": before, "high": high, "source": source,
                  "reset_ok": source == RESET_SOURCE, "after_reset": peak_bytes("cpu"), "resident": resident_bytes()}))
"""
MB = 2 ** 20


@pytest.fixture(scope="module")
def measured():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_peak_of_a_block_includes_its_allocations(measured):
    assert measured["block"] >= measured["before"] + 150 * MB


def test_a_reset_forgets_an_earlier_peak(measured):
    if not measured["reset_ok"]:
        pytest.skip(f"this system refuses to reset the peak resident size ({measured['source']})")
    assert measured["after_reset"] < measured["high"] - 200 * MB
    assert measured["after_reset"] >= measured["resident"] - 16 * MB
