"""Adapters that attach a :class:`landscape.Monitor` to training frameworks.

* :class:`~landscape.integrations.lightning.LandscapeCallback` — a Lightning ``Callback``
  (``pip install landscape-for-pytorch[lightning]``);
* :class:`~landscape.integrations.huggingface.LandscapeTrainerCallback` — a Hugging Face
  ``transformers.TrainerCallback`` (``pip install landscape-for-pytorch[transformers]``);
* :mod:`landscape.integrations.mirrors` — copies of every row and finding to TensorBoard,
  Weights & Biases, MLflow or a Lightning logger (``Monitor(mirrors=[...])``).

Both are small: they build the monitor when training starts (the framework's model and
its *underlying* torch optimizer, so the monitor's optimizer step hooks fire), call
:meth:`~landscape.Monitor.step` once per optimizer step with the step's loss and batch,
and close the run file when training ends or fails. See ``docs/integrations.md``.

This package imports neither Lightning nor ``transformers``; each adapter class is imported
on first access (``from landscape.integrations import LandscapeCallback``). The helpers
below are shared by both adapters.
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from landscape import distributed as _dist
from landscape._checks import callables, positive_int, run_path
from landscape._errors import StepOrderError
from landscape.batches import leading_size
from landscape.batches import to_device as move_to_device
from landscape.findings import Finding, severity_rank, user_stacklevel
from landscape.integrations.options import MONITOR_OPTIONS, MonitorOptions
from landscape.metrics import Metric
from landscape.monitor import Monitor, unwrap_optimizer
from landscape.schedules import At, Every, Never, Schedule, at, every, never
from landscape.store import Run

__all__ = [
    "LandscapeCallback",
    "LandscapeTrainerCallback",
    "MONITOR_OPTIONS",
    "MonitorOptions",
    "move_to_device",
    "reaches",
    "thin_metrics",
    "thin_schedule",
    "unwrap_optimizer",
]

_LAZY = {
    "LandscapeCallback": "landscape.integrations.lightning",
    "LandscapeTrainerCallback": "landscape.integrations.huggingface",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'landscape.integrations' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def check_monitor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` unchanged if every key is a :data:`MONITOR_OPTIONS` name, else ValueError."""
    unknown = sorted(set(options) - MONITOR_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)}; the Monitor options an adapter passes "
            f"through are {', '.join(sorted(MONITOR_OPTIONS))}"
        )
    return dict(options)


class CallbackSettings:
    """The arguments the Lightning and Hugging Face callbacks share, checked in one place."""

    def _configure(
        self,
        path: str | None,
        loss_fn: Any,
        closure: Any,
        metrics: list[Metric],
        probe: Any,
        every_n_steps: int,
        on_finding: Any,
        stop_on: str | None,
        config: dict[str, Any] | None,
        monitor_options: Mapping[str, Any],
        mirrors: Any = "auto",
    ) -> None:
        every_n_steps = positive_int("every_n_steps", every_n_steps)
        run_path(path)
        callables(loss_fn=loss_fn, closure=closure)
        if stop_on is not None:
            severity_rank(stop_on)  # ValueError naming the severities
        self.path = path
        self.loss_fn = loss_fn
        self.closure = closure
        self.metrics = thin_metrics(metrics, every_n_steps)
        self.probe = probe
        self.every_n_steps = every_n_steps
        self.on_finding = on_finding
        self.stop_on = stop_on
        self.config = dict(config or {})
        self.monitor_options = check_monitor_options(monitor_options)
        if not (mirrors == "auto" or mirrors is None or mirrors is False
                or isinstance(mirrors, (list, tuple))):
            raise ValueError(
                f"mirrors must be 'auto', None/False or a list of mirrors, got {mirrors!r}"
            )
        self.mirrors = mirrors
        self.monitor: Monitor | None = None
        self.findings: list[Finding] = []


def chosen_mirrors(setting: Any, auto: Callable[[], list[Any]]) -> list[Any]:
    """The mirrors a callback passes to its monitor.

    Args:
        setting: the callback's ``mirrors`` argument: ``"auto"`` (the framework's own
            loggers, from ``auto()``), ``None``/``False`` (none) or a list of mirrors.
        auto: builds the framework's mirrors.

    Returns:
        The mirrors.
    """
    if setting == "auto":
        return list(auto())
    if setting is None or setting is False:
        return []
    return list(setting)


def resume_options(options: dict[str, Any], path: Any, resumed_step: int) -> dict[str, Any]:
    """``options`` with ``truncate_from=resumed_step`` when a framework resumed from a checkpoint.

    A ``Trainer`` resumed from ``checkpoint-100`` continues at step 100 while the run file may
    hold rows past it (the first run went on after saving the checkpoint): they are dropped,
    as is what came after in ``/findings``. Nothing changes for a fresh start (step 0), an
    in-memory run, ``mode="w"``/``"x"`` or an explicit ``truncate_from``.

    Args:
        options: the Monitor options the user passed.
        path: the run file (``None``: in memory).
        resumed_step: the framework's restored step count (its next 0-based step).

    Returns:
        The options for :class:`~landscape.Monitor`.
    """
    out = dict(options)
    if (resumed_step > 0 and path is not None and out.get("mode", "a") == "a"
            and out.get("truncate_from") is None):
        out["truncate_from"] = int(resumed_step)
    if resumed_step > 0 and path is not None and out.get("mode") == "w" \
            and _dist.rank() == 0:  # said once per job
        warnings.warn(
            f"landscape: training resumes at step {resumed_step}, and mode='w' empties the "
            f"run file {path}: the rows before that step are lost; leave mode at its "
            "default ('a') to continue the file", RuntimeWarning, stacklevel=user_stacklevel())
    return out


def make_run_folder(path: Any) -> None:
    """Create the run file's folder, as the frameworks create their output folders.

    A run file under the ``Trainer``'s ``output_dir`` or Lightning's log folder was refused
    at the start of training when that folder did not exist yet (the framework creates it
    later, at its first save).
    """
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    except (OSError, TypeError):  # (a file in the way, no permission: the run file's own
        pass  # one-line error says what is wrong with its path)


def refuse_stale_start(monitor: Monitor, first_step: int, owner: str, path: Any,
                       fresh_note: str = "") -> None:
    """Refuse, before training moves, a run whose first step the file already holds.

    A fresh ``trainer.train()`` / ``fit()`` (step 0) into a file of an earlier run failed
    only at its first optimizer step, after the model had moved, with hooks left on it.

    Args:
        monitor: the started monitor (closed here when it refuses).
        first_step: the step the framework's training starts at (its restored step count).
        owner: the callback's name, for the message.
        path: the run file, for the message (on every rank; only rank 0 writes it).
        fresh_note: added to the message when training starts at step 0 (a resume that
            restored no checkpoint, in the framework's terms).

    Raises:
        StepOrderError: the run file already holds ``first_step`` or a later step.
    """
    last = monitor.last_step
    if last is None or first_step > last:
        return
    monitor.close()
    raise StepOrderError(
        f"{owner}: {path} already holds steps up to {last}, and this training starts at step "
        f"{first_step}: pass another path, mode='w' to start the file over, or resume from a "
        "checkpoint (the file's rows from its step on are then replaced)"
        + (fresh_note if first_step == 0 else ""))


def recorded_run(monitor: Monitor | None, closed: bool, owner: str) -> Run:
    """The run ``monitor`` recorded, while it runs and after it was ``closed``."""
    if monitor is None or monitor.writer is None:
        raise RuntimeError(f"{owner}: nothing recorded yet (training has not started)")
    if closed and monitor.writer.path is not None:
        return Run.open(monitor.writer.path)
    return monitor.run()


def thin_schedule(schedule: Schedule, n: int) -> Schedule:
    """``schedule`` restricted to steps that are multiples of ``n``.

    ``every(k, start)`` becomes ``every(lcm(k, n), start=s0)`` with ``s0`` the first common
    step (or ``never()``), ``at(...)`` keeps its multiples of ``n``; other schedules are
    wrapped. The result still prints as a schedule :func:`landscape.schedules.parse` reads,
    except for the wrapped custom schedules.
    """
    if n < 1:
        raise ValueError(f"every_n_steps must be >= 1, got {n}")
    if n == 1 or isinstance(schedule, Never):
        return schedule
    if isinstance(schedule, Every):
        k, start = schedule.n, schedule.start
        for j in range(n // math.gcd(k, n)):  # start + j*k covers every residue class reachable
            s = start + j * k
            if s % n == 0:
                return every(k * n // math.gcd(k, n), start=s)
        return never()
    if isinstance(schedule, At):
        return at(s for s in schedule.steps if s % n == 0)
    return _Thinned(schedule, n)


class _Thinned(Schedule):
    def __init__(self, inner: Schedule, n: int) -> None:
        self.inner, self.n = inner, n

    def __call__(self, step: int) -> bool:
        return step % self.n == 0 and self.inner(step)

    def describe(self) -> str:
        return f"{self.inner.describe()} on multiples of {self.n}"


def thin_metrics(metrics: Iterable[Metric], n: int) -> list[Metric]:
    """Copies of ``metrics`` whose schedules only fire on multiples of ``n``.

    Thinning the schedules (rather than calling the monitor every ``n`` steps) keeps the
    update-based metrics (``update``, ``taylor_radius``) about one optimizer step: the monitor
    snapshots the parameters only before the steps that are due. The caller's metric
    objects are not modified.
    """
    out = []
    for m in metrics:
        if n != 1:
            m = copy.copy(m)
            m.schedule = thin_schedule(m.schedule, n)
        out.append(m)
    return out


def add_samples(total: int | None, batch: Any) -> int | None:
    """``total`` plus the samples of ``batch`` (its leading size): a step's running count.

    None once a batch of unknown size was counted (``total`` None, or ``batch`` without a
    leading dimension): the step's count is then not known. A list is several batches (as
    to the monitor): their samples are summed.
    """
    if isinstance(batch, list):
        for part in batch:
            total = add_samples(total, part)
        return total
    size = leading_size(batch)
    return None if size is None or total is None else total + size


def reaches(findings: Sequence[Finding], severity: str | None) -> bool:
    """Whether any of ``findings`` is at least as severe as ``severity`` (``None``: never)."""
    if severity is None:
        return False
    rank = severity_rank(severity)
    return any(severity_rank(f.severity) >= rank for f in findings)
