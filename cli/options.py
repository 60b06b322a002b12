"""Click options shared by the commands that load user code and checkpoints."""

from __future__ import annotations

from typing import Callable

import click

F = Callable[..., object]


def factory_options(func: F) -> F:
    """``--model``, ``--data`` and ``--loss``: what ``analyze`` and ``surface`` evaluate."""
    for option in reversed([
        click.option("--model", "model_spec", required=True,
                     help="Model factory: package.module:fn or path/to/file.py:fn (no arguments)."),
        click.option("--data", "data_spec", required=True,
                     help="Data factory returning (inputs, targets) or an iterable of batches."),
        click.option("--loss", "loss_spec", default="cross_entropy", show_default=True,
                     help="cross_entropy, mse, nll, bce_with_logits, or package.module:fn."),
    ]):
        func = option(func)
    return func


def checkpoint_options(func: F) -> F:
    """``--trust-checkpoint`` and ``--device``."""
    for option in reversed([
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow pickled objects in checkpoints (can run arbitrary code)."),
        click.option("--device", default=None, help="Device to run on, e.g. cpu or cuda:0."),
    ]):
        func = option(func)
    return func
