"""What the monitor is given: one-line errors for bad arguments, and their stored form.

A user mistake (a model that is no module, a run file given as the loss, a fractional step,
a metric named like the monitor's own tables) is refused at once with a ``TypeError`` or
``ValueError`` naming the argument, before anything is recorded (docs/monitor.md). What the
run file's config stores of the optimizer and the metrics is written here too.
"""

from __future__ import annotations

import json
import math
import operator
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from landscape._checks import callables, positive_int, run_path, shown
from landscape.batches import leading_size
from landscape.findings import user_stacklevel
from landscape.metrics import Metric
from landscape.store.format import MONITOR_TABLES, json_default, plain_name, step_value

__all__ = [
    "RESERVED_CONFIG",
    "RESERVED_TABLES",
    "check_metric_names",
    "check_monitor_arguments",
    "check_monitor_settings",
    "optimizer_config",
    "step_arguments",
    "step_index",
    "stored_config",
    "unwrap_optimizer",
]


def _jsonable(value: Any) -> Any:
    """``value`` as the run's JSON config holds it (:func:`~landscape.store.format.json_default`).

    A tensor (``lr=torch.tensor(3.3e-4)``) as its number, tuples as lists, anything else
    JSON cannot hold as its string.
    """
    try:
        return json.loads(json.dumps(value, default=json_default))
    except (TypeError, ValueError):  # (a dict with tuple keys)
        return str(value)



RESERVED_CONFIG = ("name", "schedule", "data")


def stored_config(metric: Metric) -> dict[str, Any]:
    """The metric's ``config()`` and its data source, as the run file stores them.

    Raises:
        ValueError: ``config()`` gives a key the monitor records itself (``name``,
            ``schedule``, ``data``) another value: one would overwrite the other silently.
    """
    config = metric.config()
    own = {"name": metric.name, "schedule": str(metric.schedule), "data": metric.data}
    taken = [k for k in RESERVED_CONFIG if k in config and config[k] != own[k]]
    if taken:
        raise ValueError(
            f"{type(metric).__name__}.config() uses the key {taken[0]!r}, which the monitor "
            f"records itself with another value (reserved: {', '.join(RESERVED_CONFIG)}); "
            "rename it"
        )
    return {**config, "data": metric.data}



def optimizer_config(opt: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The optimizer's class and first parameter group's settings, as the config stores them.

    With several groups, ``param_groups`` lists each one's number of parameter tensors and
    the settings in which it differs from the first (a head at another learning rate, a
    frozen backbone at 0, layer-wise decay): what the sharpness threshold depends on.
    """
    if opt is None:
        return None
    groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"}
              for g in opt.param_groups]
    config = {"class": type(opt).__name__, "param_group_0": groups[0]}
    if len(groups) > 1:
        config["param_groups"] = [
            {"params": len(g["params"]),
             **{k: v for k, v in settings.items() if groups[0].get(k) != v}}
            for g, settings in zip(opt.param_groups, groups)]
    return config



RESERVED_TABLES = MONITOR_TABLES  # tables the monitor writes itself

def check_metric_names(metrics: Sequence[Metric]) -> None:
    """Refuse empty names and the monitor's own; warn when a metric takes a registered name.

    Raises:
        ValueError: a metric has no name, a name with '/' or ',', or one of the monitor's
            own tables (``adaptive``, ``probe``, ``unmeasured``).
    """
    from landscape.metrics.base import _REGISTRY, same_definition

    for m in metrics:
        if not plain_name(m.name) or "," in m.name:
            raise ValueError(f"{type(m).__name__}.name must be a non-empty name without '/' "
                             f"or ',', not '.' or '..' (set name = ... in the class), got "
                             f"{m.name!r}")
        if m.name in RESERVED_TABLES:
            raise ValueError(f"{type(m).__name__}: the metric name {m.name!r} is reserved for "
                             f"the monitor's own /metrics/{m.name} table; choose another name")
        owner = _REGISTRY.get(m.name)
        if owner is not None and not isinstance(m, owner) and not same_definition(owner,
                                                                                  type(m)):
            warnings.warn(
                f"landscape: {type(m).__name__} is named {m.name!r}, the name of "
                f"{owner.__module__}.{owner.__qualname__}: its rows go to /metrics/{m.name} "
                f"and the alarm rules that watch {m.name!r} read them as that metric's",
                UserWarning, stacklevel=user_stacklevel())



MODEL_FREE_METRICS = frozenset({"loss", "grad_norm", "nonfinite", "update"})
"""Built-in metrics that never call the model: they read the loss, gradients and weights."""

CALL_THE_MODEL = frozenset({"sentinels", "taylor_radius"})
"""Built-in metrics that call the model themselves even under a closure (the others read
the closure's forward pass, or evaluate the closure)."""

_NO_FORWARD = (("torch.nn.modules.module", "Module"), ("lightning.pytorch.core.module",
               "LightningModule"), ("pytorch_lightning.core.module", "LightningModule"))
"""Classes whose ``forward`` is no forward of the model's: ``nn.Module``'s raises, and
Lightning's passes the call on to the next class of the model's MRO."""


def defines_forward(model: nn.Module) -> bool:
    """Whether calling ``model`` runs a forward of its own.

    A class of its MRO other than ``nn.Module`` and Lightning's ``LightningModule``
    defines ``forward`` (``class M(LightningModule, Net)`` reaches ``Net.forward``), the
    instance was given one, or its class overrides ``__call__``.
    """
    if "forward" in vars(model) or type(model).__call__ is not nn.Module.__call__:
        return True
    return any("forward" in vars(cls) and (cls.__module__, cls.__name__) not in _NO_FORWARD
               for cls in type(model).__mro__)


def say_if_no_forward(model: nn.Module, metrics: Sequence[Metric], closure: bool) -> None:
    """Warn once when ``model`` defines no ``forward`` and a built-in metric would call it.

    A ``LightningModule`` whose ``training_step`` calls ``self.net(x)`` often defines none:
    the sentinels (the early warning's secant ratio and probe loss) called it at every step
    and recorded NaN, with a raw ``NotImplementedError`` in an info finding. Under a
    ``closure`` most metrics read the closure's forward pass (its last direct submodule's
    output) or evaluate the closure; those of :data:`CALL_THE_MODEL` still call the model.
    A metric of the user's own is not judged (it says what failed when it does).
    """
    if defines_forward(model):
        return
    calling = [m.name for m in metrics
               if type(m).__module__.startswith("landscape.")
               and m.name not in MODEL_FREE_METRICS
               and (not closure or m.name in CALL_THE_MODEL)]
    if calling:
        warnings.warn(
            f"landscape: {type(model).__name__} defines no forward(), so the metrics that "
            f"call the model ({', '.join(calling)}) cannot (the sentinels' secant ratio and "
            "probe loss carry the early warning); give it one, e.g. "
            "'def forward(self, x): return self.net(x)'", RuntimeWarning,
            stacklevel=user_stacklevel())


def step_index(step: Any) -> int:
    """``step`` as an int >= 0: any integer type, or a float (of any kind) with an integer value.

    Raises:
        ValueError: anything else (``0.5``: fractional epochs are not steps; a string; a
            bool; a negative step, which no schedule is due at).
    """
    if isinstance(step, (tuple, list, Mapping)) or math.prod(getattr(step, "shape", ())) > 1:
        raise ValueError(f"step must be an integer (the optimizer step's index), got "
                         f"{shown(step, typed=True)}: the batch goes in "
                         "batch=, as in monitor.step(step, batch=(x, y), loss=loss)")
    value = step_value(step)
    if value < 0:
        raise ValueError(f"step must be >= 0 (the optimizer step's index), got {value}")
    return value


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside framework wrappers.

    Lightning's ``LightningOptimizer`` and accelerate's ``AcceleratedOptimizer`` (used by the
    Hugging Face ``Trainer``) keep the real optimizer in ``.optimizer``; step hooks registered
    on the wrapper would never fire, because the wrapper's ``step`` calls the inner
    optimizer's ``step``. Returns ``None`` for ``None``.
    """
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        is_torch = isinstance(optimizer, torch.optim.Optimizer)
        if inner is None or (is_torch and not isinstance(inner, torch.optim.Optimizer)):
            break
        optimizer = inner
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {optimizer!r}")
    return optimizer


def check_monitor_arguments(
    model: Any, loss_fn: Any, path: Any, closure: Any, on_finding: Any,
    microbatch_size: Any, batch_size: Any, probe: Any, probe_size: Any,
    output_fn: Any = None,
) -> None:
    """Refuse what ``Monitor(...)`` cannot use, with one line naming the argument.

    Raises:
        TypeError: ``model`` is no ``nn.Module``; ``path`` is no path; ``loss_fn``,
            ``closure``, ``on_finding`` or ``output_fn`` is not callable.
        ValueError: a bad ``microbatch_size``, ``batch_size`` or ``probe_size``, or a
            ``probe`` that is a loader or an iterator rather than a fixed batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__} "
                        f"{model!r}" + (" (wrap a function in an nn.Module)"
                                        if callable(model) else ""))
    run_path(path)
    callables(closure=closure, on_finding=on_finding, output_fn=output_fn)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable, got {type(loss_fn).__name__} {loss_fn!r}"
            + (" (the run file is the third argument, or path=...)"
               if isinstance(loss_fn, (str, os.PathLike)) else ""))
    if microbatch_size is not None:
        positive_int("microbatch_size", microbatch_size)  # the monitor keeps int(...)
    if batch_size is not None and not callable(batch_size):
        raise ValueError(
            f"batch_size must be a function batch -> int (e.g. a token count), got "
            f"{type(batch_size).__name__} {batch_size!r}")
    if isinstance(probe, torch.utils.data.DataLoader) or hasattr(probe, "__next__"):
        raise ValueError(
            f"probe= must be a fixed batch or a list of batches, got a "
            f"{type(probe).__name__} (every probe metric would read a different batch): "
            "pass next(iter(loader)), or list(itertools.islice(loader, n)) for n batches")
    if probe is not None and leading_size(probe) == 0:
        raise ValueError("probe= holds no samples (its tensors' first dimension is 0)")
    if probe_size is not None and (not isinstance(probe_size, int) or isinstance(
            probe_size, bool) or probe_size < 1):
        raise ValueError(f"probe_size must be an integer >= 1 or None, got {probe_size!r}")


def check_monitor_settings(
    config: Any, mirrors: Any, truncate_from: Any, flush_every: Any, flags: dict[str, Any],
) -> list[Any]:
    """Refuse ``Monitor(...)`` settings of the wrong kind, with one line naming the setting.

    Args:
        config: a mapping or None.
        mirrors: a sequence of objects with an ``on_row`` method.
        truncate_from: a step (an integer >= 0) or None.
        flush_every: an integer >= 1.
        flags: the settings that must be True or False, by name.

    Returns:
        The mirrors, as a list (a generator is read once, here).

    Raises:
        ValueError: any of them of the wrong kind (``truncate_from=2.5`` cut from step 2,
            ``strict="no"`` turned strict mode on, ``mirrors=["tensorboard"]`` failed at
            the first row).
    """
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"config must be a mapping of JSON-able settings, got "
                         f"{type(config).__name__} {config!r}")
    if isinstance(mirrors, (str, bytes)) or not (mirrors is None
                                                 or hasattr(mirrors, "__iter__")):
        raise ValueError(f"mirrors must be a list of mirror objects, got {mirrors!r}")
    mirrors = list(mirrors or ())
    for mirror in mirrors:
        if not callable(getattr(mirror, "on_row", None)):
            raise ValueError(
                f"mirrors must hold objects with on_row(name, step, row), on_finding(finding) "
                f"and close(), e.g. landscape.integrations.mirrors.TensorBoardMirror(...); "
                f"got {type(mirror).__name__} {mirror!r}")
    if truncate_from is not None:
        try:
            step_index(truncate_from)
        except ValueError:
            raise ValueError(f"truncate_from must be a step (an integer >= 0), got "
                             f"{truncate_from!r}") from None
    positive_int("flush_every", flush_every)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    return mirrors


def step_arguments(
    step: Any, loss: Any, grad_norm: Any, samples: Any
) -> tuple[int, float | None, int | None]:
    """``Monitor.step``'s arguments checked: the step, the gradient norm and the sample count.

    Raises:
        ValueError: a step that is no integer, a loss that is a string or a bool (arrays of
            any kind still read), a gradient norm that is no number, a sample count that is
            no integer >= 1.
    """
    step = step_index(step)
    if isinstance(loss, (str, bytes, bool)):
        raise ValueError(f"loss must be a tensor or a number, got {type(loss).__name__} "
                         f"{loss!r}")
    if grad_norm is not None:
        try:
            grad_norm = float(grad_norm)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"grad_norm must be a number or a one-element tensor, got "
                             f"{grad_norm!r}") from None
    if samples is not None:
        try:  # any integer type (numpy's too), not a float or a bool
            count = operator.index(samples) if not isinstance(samples, bool) else 0
        except TypeError:
            count = 0
        if count < 1:
            raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
        samples = count
    return step, grad_norm, samples
