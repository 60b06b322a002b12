"""Test-session settings shared by every test module."""

import torch

from cli.checkout import use_this_checkout

# The suite runs as `pytest -n 2` on 2 cores: one intra-op thread per worker avoids
# oversubscription (which slows small-tensor code by an order of magnitude). Results do
# not depend on it.
torch.set_num_threads(1)


# `landscape_cli` is this checkout's `cli/` folder, also where another checkout is the one
# installed (docs/architecture.md, "Writing code here").
use_this_checkout()
