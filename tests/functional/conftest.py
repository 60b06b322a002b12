"""Run the functional tests single-threaded.

They are made of many tiny LAPACK calls (eigh/svd/qr of 5x5 matrices); with two OpenMP
threads on a shared, busy machine each such call can wait tens of milliseconds at a
thread barrier. One thread makes them microseconds. The setting is restored after each
test, so other test directories are unaffected.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
