"""Shared settings of the adapter tests: one thread, and torch's global flags restored.

Lightning's ``Trainer(deterministic=True)`` switches on ``torch.use_deterministic_algorithms``
for the whole process; the fixture puts it back so other test directories are unaffected.
One thread makes CPU runs bitwise reproducible and fast on a shared, busy machine.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_flags():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
