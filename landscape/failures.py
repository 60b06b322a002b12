"""What the monitor records when a metric cannot run: one ``metric_failed`` finding.

A diagnostic never stops training (docs/conventions.md, failure policy): the metric records
NaN for the step and the monitor raises one ``info`` finding per metric saying why. When the
model or the loss is already non-finite the metric is not at fault, so all metrics that fail
then share one finding that points at the ``nonfinite`` error instead of a cryptic message
from deep inside a solver.
"""

from __future__ import annotations

import math
import os
import sysconfig
import traceback
from typing import Any

import torch
from torch import nn

from landscape._errors import MemoryBudgetError, MissingInput
from landscape.batches import PAIR_KEYS, WHOLE_PAIR_KEYS
from landscape.findings import Finding

__all__ = ["failure_finding", "nonfinite_state"]


def nonfinite_state(model: nn.Module, loss: Any = None) -> str | None:
    """Say whether the model's parameters or the loss are NaN or infinite.

    Args:
        model: the monitored model.
        loss: the step's loss (a tensor or a number), or None.

    Returns:
        ``"parameters"``, ``"loss"``, or None when both are finite.
    """
    with torch.no_grad():
        if any(not bool(torch.isfinite(p).all()) for p in model.parameters()):
            return "parameters"
    if loss is not None and not math.isfinite(float(torch.as_tensor(loss).detach().sum())):
        return "loss"
    return None


_DATA = {"probe": "the probe", "batch": "the step's batch"}


def failure_finding(metric: str, step: int, err: Exception, nonfinite: str | None,
                    data: str | None = None, probe_batches: int | None = None) -> Finding:
    """The ``metric_failed`` info finding for a metric that raised ``err`` at ``step``.

    Args:
        metric: the metric's name.
        step: the training step.
        err: what the metric raised.
        nonfinite: :func:`nonfinite_state` at that step; when not None the message blames the
            non-finite parameters or loss, not the metric.
        data: the metric's data source (``"probe"``, ``"batch"``), named in the message: a
            probe of another shape or dtype than the model takes fails in torch's words.
        probe_batches: the number of batches of a probe given as a list of batches (None:
            one batch); named in the hint of a metric failing on the probe, where a list of
            dataset samples (``[dataset[i] for i in range(8)]``) failed in torch's words.

    Returns:
        The finding (value and threshold NaN).
    """
    if nonfinite is not None:
        message = (f"non-finite {nonfinite} at step {step}: metrics that cannot run on them "
                   f"(first {metric!r}) record NaN")
        hint = ("see the 'nonfinite' finding; restart from a checkpoint before the "
                "NaN/inf with a lower learning rate or gradient clipping")
    elif isinstance(err, MissingInput):
        message = f"metric {metric!r} cannot run at step {step}: {err}"
        hint = "see the message; the metric records NaN until this is fixed"
    elif isinstance(err, MemoryBudgetError):
        message = f"metric {metric!r} failed at step {step}: {_describe(err)}"
        hint = ("the metric records NaN while the measurement does not fit: give it a "
                "larger memory_budget= (bytes, '3x step', or None for no limit; "
                "landscape analyze --memory-budget) or fewer parameters, or run it on a "
                "smaller probe")
    else:
        on = f" on {_DATA[data]}" if data in _DATA else ""
        message = f"metric {metric!r} failed at step {step}{on}: {_describe(err)}"
        hint = "the metric records NaN; pass strict=True to Monitor to see the traceback"
        if data == "probe":
            pairs = ", ".join(f"{{{x}, {y}}}" for x, y in (*PAIR_KEYS, *WHOLE_PAIR_KEYS))
            hint += ("; a probe must be a batch the model takes, (inputs, targets) like "
                     "the training batches, on the model's device and dtype; a dict batch "
                     f"is read as {pairs} or the model's keyword arguments with labels "
                     "(pass probe=(x, y) for other keys)")
            if probe_batches is not None:
                hint += (f"; probe= is a list, read as {probe_batches} batches: if its items "
                         "are dataset samples, collate them into one batch first "
                         "(torch.utils.data.default_collate(samples), or your collator)")
    return Finding(step=step, rule="metric_failed", severity="info", metric=metric,
                   value=math.nan, threshold=math.nan, message=message, hint=hint)


_TORCH = os.path.dirname(torch.__file__) + os.sep
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep
_SITE = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
               for k in ("purelib", "platlib")})  # under the stdlib in some Pythons
_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _describe(err: BaseException) -> str:
    """``Type: message`` and where in the user's code it was raised.

    A bare ``assert`` has no message and a ``KeyError`` only the key: the type says what
    went wrong, and the last frame outside landscape and torch says where (a metric of the
    user's, their model's forward or loss function), Python's own library left out too.
    """
    text = str(err)
    described = f"{type(err).__name__}: {text}" if text else type(err).__name__
    frames = traceback.extract_tb(err.__traceback__) if err.__traceback__ else []
    for frame in reversed(frames):
        name = os.path.abspath(frame.filename)
        library = name.startswith((_OURS, _TORCH)) or (
            name.startswith(_STDLIB) and not name.startswith(_SITE))
        if not library:
            return f"{described} (at {os.path.basename(name)}:{frame.lineno})"
    return described
