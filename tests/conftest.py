from pathlib import Path

import pytest
import torch

import invdiff

# Tests use tiny tensors: one thread avoids oversubscription (measured ~30x slowdowns with 2 threads on a
# loaded 2-core machine) and keeps float results independent of the thread count.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# Plugins from the repository's top-level operators/ folder join the registry before collection, so the
# contract tests parametrised over list_operators() cover them with no test edits.
invdiff.load_plugins(REPO / "operators")


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def repo():
    return REPO
