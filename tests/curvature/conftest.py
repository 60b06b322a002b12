"""One intra-op thread per test: these tests run many tiny products, where thread
start-up and contention with parallel workers cost more than they save."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
