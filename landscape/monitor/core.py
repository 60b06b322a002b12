"""The training-loop integration: :class:`Monitor`.

::

    with ls.Monitor(model, loss_fn, path="run.h5", optimizer=opt,
                    metrics=ls.metrics.preset("standard"), probe=(x_val, y_val)) as mon:
        for step, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            mon.step(step, batch=(x, y), loss=loss)

At each ``step`` the monitor asks every metric's schedule whether it is due (off-steps cost
that check only), builds one :class:`~landscape.metrics.StepContext` shared by the due
metrics, computes them inside :func:`landscape.isolation.isolated` and appends one row per
metric to the run file; the alarm rules (:mod:`landscape.alarms`) see each row and their
findings become ``on_finding`` calls and rows of ``/findings``, and those of severity
warning or error :class:`~landscape.InstabilityWarning` warnings (info ones a log line).

Training is never changed (docs/monitor.md): a monitored run gives bitwise the parameters of the
unmonitored run on CPU. The only state the monitor attaches to user objects are the
optimizer step hooks, which snapshot the parameters before a step only when a metric that
needs the actual update Δθ is due, and are removed by :meth:`Monitor.close`. The optional
``taylor_guard`` is the one deliberate exception: it rescales a step whose normalized size
r exceeds the target (Sao 2026's controller), and is off by default.

A metric that fails (out of memory, missing input) records a NaN row, one warning and one
``metric_failed`` info finding, and training goes on; ``strict=True`` re-raises instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from landscape import distributed as _dist
from landscape._errors import (
    InstabilityWarning,
    LandscapeError,
    MissingInput,
    NotApplicable,
    PartialRow,
    StepOrderError,
)
from landscape._interrupts import InterruptGuard
from landscape._progress import above_bars
from landscape.batches import leading_size
from landscape.failures import failure_finding, nonfinite_state
from landscape.findings import (
    RULE_FAILED,
    Finding,
    Findings,
    at_or_above,
    dedupe,
    user_stacklevel,
)
from landscape.isolation import isolated, modules_reached, parameters_of, written_in_forward
from landscape.metrics import Metric, StepContext, split_batch
from landscape.metrics.base import component_names
from landscape.metrics.batch_parts import is_batch_list
from landscape.metrics.context import NoLossFunction
from landscape.metrics.presets import MetricsLike, resolve_metrics
from landscape.monitor.adaptive import DENSE_AT, DENSE_STEPS, DenseWindow, recorded_window_end
from landscape.monitor.arguments import (
    check_metric_names,
    check_monitor_arguments,
    check_monitor_settings,
    optimizer_config,
    say_if_no_forward,
    step_arguments,
    stored_config,
    unwrap_optimizer,
)
from landscape.monitor.clock import StepClock
from landscape.monitor.probe import (
    inputs_in_models_dtype,
    restore_probe,
    store_probe,
    take_probe,
    targets_in_batch_dtype,
)
from landscape.params import (
    has_lazy_parameters,
    refuse_complex,
    stackable,
    tensor_norms,
    trainable_named_parameters,
    weights_dtype,
)
from landscape.store import Run, RunWriter
from landscape.store.writer_status import stopped_how

__all__ = ["MetricsLike", "Monitor", "close_monitors", "resolve_metrics", "unwrap_optimizer"]

_log = logging.getLogger("landscape")

_OPEN: weakref.WeakSet[Monitor] = weakref.WeakSet()  # started and not closed yet


def close_monitors(model: nn.Module | None = None, *, keep: Monitor | None = None) -> int:
    """Close the monitors this process has started and not closed: all, or ``model``'s.

    For a monitor no variable holds any more: a notebook cell that builds one, run again,
    leaves the first one open, and its optimizer hooks go on copying the weights at every
    step (the warning of :meth:`Monitor.start`). Call it before building the new monitor,
    or with ``keep=`` the new one.

    Args:
        model: close only the monitors of this model (None: every open monitor).
        keep: a monitor to leave open.

    Returns:
        How many monitors were closed.
    """
    inner = None if model is None else _dist.unwrap(model)  # the monitor keeps that one
    closing = [m for m in list(_OPEN)
               if m is not keep and (inner is None or m.model is inner)]
    for monitor in closing:
        monitor.close()
    return len(closing)


def _skipped_overflow(ctx: StepContext) -> bool:
    """Whether this call follows a GradScaler's skip: no optimizer step, an inf gradient.

    Then the metrics of the step (``update``) have nothing to measure, which is no failure
    to report, also before any optimizer step was seen.
    """
    if ctx.optimizer_stepped is not False:
        return False
    norm = float(ctx.given_grad_norm) if ctx.given_norm_stands_in() else ctx.grad_norm()
    return norm is not None and not math.isfinite(norm)


_PLURALS = ((": this metric evaluates ", ": these metrics evaluate "),
            (": this metric needs ", ": these metrics need "))
"""The reasons' own words for one metric, as several share them (:func:`_warn_failures`)."""


def _warn_failures(failures: list[Finding]) -> None:
    """Warn the step's ``metric_failed`` findings, one line for those of one reason.

    Three curvature metrics that all need a loss function, or seven probe metrics that
    all fail on a probe of the wrong shape, are one mistake: one line names them all
    (each keeps its own finding).
    """
    groups: dict[str, list[str]] = {}
    for f in failures:
        own = f"metric {f.metric!r} "
        reason = f.message.replace(own, "metric {} ", 1) if f.message.startswith(own) \
            else f.message
        groups.setdefault(reason, []).append(f.metric)
    for reason, metrics in groups.items():
        if len(metrics) == 1 or "{}" not in reason:
            message = reason.replace("{}", repr(metrics[0]), 1)
        else:
            message = reason.replace("metric {}", "metrics " + ", ".join(map(repr, metrics)),
                                     1)
            for one, several in _PLURALS:
                message = message.replace(one, several, 1)
        with above_bars():
            warnings.warn(f"landscape: {message}", RuntimeWarning, stacklevel=user_stacklevel())


_UNMEASURED_WIDTH = 16  # /metrics/unmeasured: at least S16 (the metrics' names, joined)


def _nan_row(metric: Metric) -> dict[str, Any]:
    """A row of NaN with the shapes of ``metric.fields()`` (a metric that failed)."""
    return {k: np.full(shape, np.nan) for k, shape in metric.fields().items()}


class Monitor:
    """Record diagnostics of ``model`` during training into one run file.

    Use it as a context manager (or call :meth:`start` and :meth:`close`) and call
    :meth:`step` after each optimizer step; docs/monitor.md has the whole guide.

    Args:
        model: the model being trained (a DDP wrapper is unwrapped).
        loss_fn: ``loss_fn(model(inputs), targets)``; or pass ``closure``. Without either,
            the metrics that evaluate a loss record NaN and say so once (the default
            ``cheap`` preset needs neither).
        path: the HDF5 run file (``None``: in memory, read back with :meth:`run`).
        optimizer: the optimizer, for the update Δθ, the Taylor radius and the stability
            threshold of the sharpness metric; a framework's wrapper (accelerate's
            ``AcceleratedOptimizer``, Lightning's) is unwrapped (:func:`unwrap_optimizer`).
        metrics: a preset name (``"cheap"``, ``"standard"``, ``"full"``), or a list of
            :class:`~landscape.metrics.Metric` instances and metric names (default
            ``"cheap"``); see :func:`landscape.metrics.resolve_metrics`.
        probe: a fixed batch for metrics on probe data (curvature, representations,
            sentinels). Without it the monitor keeps a copy of the first ``probe_size``
            samples of the first training batch (logged once, recorded in the run
            file's config under ``probe``).
        probe_size: how many samples of the first batch become the default probe
            (``None``: no default probe).
        adaptive: while the sentinels move (``sentinels/r_secant`` >= 0.5, or a warning
            is raised) the metrics with a ``dense_every`` (the Taylor radius every step,
            spectral alignment every 2, sharpness and top eigenvalues every 5) are also
            measured densely, for 20 steps after the last trigger; those steps get a row
            in ``/metrics/adaptive``. Training is never changed.
        output_fn: ``output_fn(output) -> logits``, reads the logits from what the model
            returns, for every metric that reads logits (the sentinels, ``logits``,
            ``taylor_radius``, the Taylor guard) and for ``step(outputs=...)``; e.g.
            ``lambda out: out[1]`` for a model returning ``(features, logits)``. By default
            :func:`landscape.capture.output_logits`: the output itself, its ``logits``
            entry or attribute, else its first tensor; none in a list of per-sample
            prediction dicts (docs/conventions.md, "Which outputs are logits").
        closure: ``closure(model, batch) -> loss`` for models whose loss is not
            ``loss_fn(model(x), y)`` (dict batches, language models).
        config: extra JSON-able run configuration stored in the file; a key the monitor
            records itself (``model``, ``optimizer``, ``probe``, ...) is kept under
            ``user_config``.
        alarms: ``True`` (default rules), ``False``, or a list of rules (landscape.alarms),
            which replaces the default rules (a warning says so when it holds none of
            them): ``landscape.alarms.with_rules([...])`` adds yours to them.
        on_finding: called with each :class:`~landscape.findings.Finding` as it is raised.
        mirrors: objects with ``on_row(name, step, row)``, ``on_finding(finding)`` and
            ``close()`` that copy every row and finding elsewhere as they are written, e.g.
            the TensorBoard, W&B and MLflow mirrors of
            :mod:`landscape.integrations.mirrors`. A mirror that raises warns once and is
            not called again; training goes on.
        strict: re-raise metric failures instead of recording them.
        warn: emit warning and error findings as :class:`~landscape.InstabilityWarning`
            (``info`` findings go to the ``landscape`` logger at INFO level; all of them are
            in :attr:`findings`, the run file and ``on_finding``).
        taylor_guard: ``None`` (off) or a target r (e.g. 1.0): rescale any optimizer step
            whose normalized size on the probe batch exceeds it. This changes training.
        mode, truncate_from, flush_every: passed to :class:`~landscape.store.RunWriter`.
        on_disk_full: ``"stop"`` (default): a disk too full for the next write stops the
            writing with one warning and training goes on; ``"raise"``: a
            :class:`~landscape.RunFileError` (:class:`~landscape.store.RunWriter`).
        distributed: under ``torch.distributed`` (``None``: when a process group of several
            ranks is initialized; ``False``: never): only rank 0 writes ``path``, curvature
            metrics are all-reduced over the ranks' probe data, and rank 0's findings are
            broadcast so every rank returns and reports the same ones (e.g. to stop
            together). Every rank must then call :meth:`step` with the same steps. With
            ``False`` each rank computes on its own (rank 0 still writes alone).
        microbatch_size: evaluate the curvature metrics' Hessian products in micro-batches
            of at most this many samples (:class:`~landscape.curvature.Hessian`): peak
            memory of one micro-batch instead of the whole batch, for more time per
            product. ``None`` (default): whole batches.
        batch_size: ``batch_size(batch) -> int | None``, the weight of a batch or
            micro-batch in the curvature metrics' mean loss, e.g. its count of target
            tokens for a token-mean loss over padded sequences (``lambda b: int((b[1] !=
            -100).sum())``); by default the leading dimension of the inputs. Needed to cut
            such a loss into micro-batches (``microbatch_size``, or the ``"auto"`` memory
            budget's plans), which is otherwise refused as not a per-sample mean.

    Raises:
        ValueError: a bad ``microbatch_size`` or ``batch_size``;
            ``taylor_guard`` without ``optimizer`` and ``probe``; or a bad ``metrics``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import landscape as ls
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> metrics = [ls.metrics.Loss(), ls.metrics.Sharpness(schedule=ls.every(2))]
        >>> with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics,
        ...                 probe=(x, y), warn=False) as mon:
        ...     for step in range(4):
        ...         loss = F.cross_entropy(model(x), y)
        ...         opt.zero_grad(); loss.backward(); opt.step()
        ...         _ = mon.step(step, batch=(x, y), loss=loss)
        ...     run = mon.run()
        >>> run.steps("sharpness").tolist()
        [0, 2]
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        path: str | os.PathLike | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        metrics: MetricsLike = None,
        probe: Any = None,
        closure: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        config: dict[str, Any] | None = None,
        alarms: bool | Sequence[Any] = True,
        on_finding: Callable[[Finding], None] | None = None,
        mirrors: Sequence[Any] = (),
        strict: bool = False,
        warn: bool = True,
        taylor_guard: float | None = None,
        mode: str = "a",
        truncate_from: int | None = None,
        flush_every: int = 256,
        on_disk_full: str = "stop",
        distributed: bool | None = None,
        microbatch_size: int | None = None,
        batch_size: Callable[[Any], int | None] | None = None,
        probe_size: int | None = 32,
        adaptive: bool = True,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        check_monitor_arguments(model, loss_fn, path, closure, on_finding, microbatch_size,
                                batch_size, probe, probe_size, output_fn)
        mirrors = check_monitor_settings(config, mirrors, truncate_from, flush_every,
                                         {"strict": strict, "warn": warn, "adaptive": adaptive})
        if taylor_guard is not None and (optimizer is None or probe is None):
            raise ValueError("taylor_guard needs optimizer= and probe=(inputs, targets)")
        if taylor_guard is not None and (isinstance(taylor_guard, bool) or not (
                isinstance(taylor_guard, (int, float)) and 0 < taylor_guard < math.inf)):
            raise ValueError(f"taylor_guard must be a positive number (a target r, e.g. 1.0) "
                             f"or None, got {taylor_guard!r}")
        if isinstance(alarms, (str, bytes)) or not (
                isinstance(alarms, bool) or hasattr(alarms, "__iter__")):
            raise ValueError(f"alarms must be True, False or a list of rules, got {alarms!r}")
        if on_disk_full not in ("stop", "raise"):
            raise ValueError(f"on_disk_full must be 'stop' or 'raise', got {on_disk_full!r}")
        if loss_fn is None and closure is None:  # the metrics that evaluate a loss say so
            loss_fn = NoLossFunction("Monitor")
        self.model = _dist.unwrap(model)  # the module inside a DDP / DataParallel wrapper
        self.loss_fn = loss_fn
        self.closure = closure
        self.output_fn = output_fn
        self.optimizer = unwrap_optimizer(optimizer)  # accelerate's, Lightning's wrappers
        self.probe = probe
        self.probe_size = probe_size
        self.metrics = resolve_metrics(metrics)
        check_metric_names(self.metrics)
        # no default probe for metrics that never read one (loss, grad_norm, ...)
        wanted = probe_size is not None and any(m.data == "probe" for m in self.metrics)
        self._probe_source = "given" if probe is not None else (
            "first_batch" if wanted else "none")
        # what a metric that reads the probe says when there is none (fixed by the arguments)
        self._no_probe_hint = "pass probe=... to Monitor"
        if probe is None and probe_size is None:
            self._no_probe_hint = ("probe_size=None turned the default probe off: pass "
                                   "probe=... to Monitor, or leave probe_size to keep the "
                                   "first training batch's samples")
        elif probe is None:
            self._no_probe_hint = ("the default probe is kept from the first batch= given to "
                                   "step(): pass batch=... to step(), or probe=... to Monitor")
        self._probe_aligned = False  # a given probe: its targets take the first batch's dtype
        self._given_probe: Any = None  # the probe as given (the casts read it, not a copy)
        self._step_lrs: list[Any] | None = None  # the groups' rates at the last hooked step
        self._weights_dtype: torch.dtype | None = None  # the weights' one floating dtype
        #: what the ``loss`` metric's finding says at a step given no loss (an integration
        #: that gathers the loss itself says where it looked)
        self.no_loss_reason = "the loss metric needs step(..., loss=loss)"
        #: whether a metric due strictly between two calls is said (once); an integration
        #: that numbers the steps itself says which schedules its steps miss, and how
        self.say_missed_schedules = True
        self.on_finding = on_finding
        self._given_mirrors = list(mirrors or ())
        self.mirrors = self._given_mirrors if _dist.rank() == 0 else []  # rank 0 mirrors
        self._broken_mirrors: set[int] = set()
        self._interrupts: InterruptGuard | None = None
        self._mirrors_closed = False
        self._nonfinite_reported = False
        self.strict = strict
        self.warn = warn
        self.taylor_guard = taylor_guard
        self.microbatch_size = None if microbatch_size is None else int(microbatch_size)
        self.batch_size = batch_size
        self._given_path, self._distributed_option = path, distributed
        self.path = path if _dist.rank() == 0 else None  # only rank 0 writes a file
        self._distributed = _dist.enabled(distributed)
        self._writer_args = {"mode": mode, "truncate_from": truncate_from,
                             "flush_every": flush_every, "on_disk_full": on_disk_full}
        self._user_config = dict(config or {})
        # a list: a generator of rules is read by the config and by the rules built at start
        self._alarm_rules = alarms if isinstance(alarms, bool) else list(alarms)
        self.findings: list[Finding] = Findings()
        # how many of them a resumed run read back from its file (they come first)
        self.findings_recorded = 0
        self.timings: dict[str, float] = {m.name: 0.0 for m in self.metrics}
        self.writer: RunWriter | None = None
        self._alarms: Any = None
        self._names: list[str] = []
        self._loss_modules: list[nn.Module] = []
        self._state: dict[Any, Any] = {}
        self._failed: set[tuple[str, str]] = set()
        self._failures_to_call: list[Finding] = []  # metric_failed findings for on_finding
        self._unmeasured_declared = False  # /metrics/unmeasured exists (a failure)
        self._update_missed = False  # step() started the monitor: no update this step
        self._hooks: list[Any] = []
        self._objects: dict[str, nn.Parameter] | None = None
        self._before: tuple[torch.Tensor, ...] | None = None
        self._sharded = False  # FSDP2 parameters (set by start())
        self._clock = StepClock()  # optimizer steps between calls, the next call's step
        self._dense = DenseWindow(adaptive)
        # set_optimizer's hint: the weights' versions after a call without a watched step
        self._idle_versions: tuple[Any, ...] | None = None
        self._with_depth = 0  # nested `with mon:` blocks: the outermost one closes
        self._first_step_seen = False  # the first step after a resume is checked once
        self._recorded_here = False  # this monitor has recorded a step (not only resumed)
        # (user metric, what) said to be written in place: .grad, parameters, update
        self._told_in_place: set[tuple[str, str]] = set()
        self._hooked_steps = 0  # the watched optimizer's steps, counted by its pre-step hook
        self._hooked_at_call = 0  # ... at the last call
        self._watch_idle = False
        self._told_unwatched = False
        self._told_trainable = False  # the trainable set changed since start(): said once
        self._previous_call: int | None = None  # this monitor's last step (not a resumed one)
        self._told_missed = False  # a schedule due between two calls: said once

    # ------------------------------------------------------------------ lifecycle

    def _join_process_group(self) -> None:
        """Read the ranks again when the monitor starts.

        A monitor built before ``init_process_group`` (in setup code) took every process
        for rank 0 of one: every rank opened the run file, and nothing was broadcast.
        """
        if _dist.rank() != 0:
            self.path, self.mirrors = None, []
        else:
            self.path, self.mirrors = self._given_path, self._given_mirrors
        self._distributed = _dist.enabled(self._distributed_option)

    def start(self) -> Monitor:
        """Open the run file, declare every metric, attach the optimizer step hooks.

        Returns:
            The monitor (a second call does nothing).

        Raises:
            RuntimeError: the monitor was closed (a monitor records one stretch of a run).
            ValueError: the model holds complex-valued parameters; under NCCL, the current
                CUDA device is not the model's (``torch.cuda.set_device`` was not called).
        """
        if self.writer is not None:
            if self.writer.closed:
                raise RuntimeError(
                    "this Monitor was closed; build a new one to go on recording (mode='a' "
                    "appends to its run file)")
            return self
        if has_lazy_parameters(self.model):  # lazy modules take their shapes in the first forward
            _log.info("landscape: the model has lazy modules without their shapes yet; the "
                      "monitor starts at its first step")
            return self
        self._join_process_group()
        if self._distributed:  # before the first collective, which would fail or hang
            _dist.check_current_device(self.model)
        # FSDP2: a forward before the start (an evaluation) leaves the root's parameters
        # unsharded; the optimizer holds the sharded ones, which the monitor must see too
        _dist.reshard(self.model)
        named = trainable_named_parameters(self.model)
        refuse_complex(named)  # before the run file is opened
        # modules the loss function or closure holds (a loss with state): kept per step
        self._loss_modules = list({id(m): m for fn in (self.loss_fn, self.closure)
                                   for m in modules_reached(fn)}.values())
        self._names = list(named)
        self._own = list(named.values())
        self._objects = dict(self.model.named_parameters())
        self._sharded = any(_dist.is_sharded(p) for p in self._objects.values())
        if self._sharded and not self._distributed and _dist.world_size() > 1:
            # every norm of a sharded parameter is an all-reduce: on the ranks that run
            # the monitor alone, they waited for the others for ever
            raise ValueError(
                "distributed=False (or landscape.distributed.local()) on an FSDP-sharded "
                "model: its parameters' norms and forward need every rank; run the monitor "
                "on all ranks together (rank 0 writes alone)")
        self._weights_dtype = weights_dtype(self._objects.values())
        if self._probe_source == "given":  # before the Taylor guard or a metric reads it
            self._given_probe = self.probe
            self.probe = inputs_in_models_dtype(self.probe, self._weights_dtype)
        # setup may read parametrized weights (a spectral_norm parametrization runs a power
        # iteration and writes its buffers when read in train mode): eval mode, RNG kept
        with isolated(self.model):
            self.metrics = [m for m in self.metrics if self._set_up(m)]
        say_if_no_forward(self.model, self.metrics, self.closure is not None)
        self.timings = {m.name: self.timings.get(m.name, 0.0) for m in self.metrics}
        # truncate_from only once every metric fits the file: a resume refused for a
        # metric's fields dropped the run's rows from that step on for nothing
        opening = {k: v for k, v in self._writer_args.items() if k != "truncate_from"}

        def open_file() -> int | None:
            writer = self.writer = RunWriter(self.path, config=self._config(), **opening)
            for m in self.metrics:
                writer.check_declaration(m.name, m.fields(), m.CONTEXT_FIELDS)
            if self._writer_args["truncate_from"] is not None:
                writer.truncate_from(self._writer_args["truncate_from"])
            for m in self.metrics:
                writer.declare(
                    m.name, m.fields(), cls=f"{type(m).__module__}.{type(m).__qualname__}",
                    params=stored_config(m), schedule=str(m.schedule),
                    context=m.CONTEXT_FIELDS,
                )
                self._declare_to_mirrors(m)
            if self.adaptive and any(m.dense_every for m in self.metrics):
                writer.declare(
                    "adaptive", {"dense": (), "extra": ()}, cls="landscape.monitor.Monitor",
                    params={"dense_at": DENSE_AT, "dense_steps": DENSE_STEPS},
                    schedule="triggered",
                )
            if self._probe_source == "first_batch" and self.probe is None:
                writer.declare(
                    "probe", {"samples": ()}, cls="landscape.monitor.Monitor",
                    params={"probe_size": self.probe_size}, schedule="first batch",
                )
            # the steps of every table (metrics no longer monitored, failures, findings,
            # checkpoints): the next step must come after every one
            return writer.last_recorded_step()

        try:
            # only rank 0 opens the file: a file it cannot open (or whose tables do not fit)
            # raises on every rank, rather than leave the others waiting in a collective
            last = _dist.together(self._distributed, "opening the run file", open_file)
            if self._distributed:  # resuming: only rank 0 has the file; agree on its steps
                last = _dist.broadcast_object(last)
            resuming = last is not None
            recorded_run = self.writer.run() if resuming else None  # (rank 0's file)
            if resuming:  # the next step must come after every recorded one
                self._clock.resume_after(last)
                self._say_resume_gap(last)
                self._say_given_probe_left_out(recorded_run, last)
                # mon.findings holds the run's findings: those recorded before come first
                recorded = recorded_run.findings()  # (the other ranks hold none)
                if self._distributed:
                    recorded = _dist.broadcast_object(recorded)
                self.findings[:0] = recorded
                self.findings_recorded = len(recorded)
            self._alarms = self._make_alarms()
            if self._alarms is not None:
                for m in self.metrics:
                    self._alarms.declare(m.name, stored_config(m))
                if resuming:  # rebuild rule state from the recorded rows
                    self._alarms.replay(recorded_run)
                    self._alarms.failures.clear()  # recorded by the session they failed in
            if resuming and self.adaptive:  # and the dense window the sentinels opened
                self._dense.until = self._recorded_window_end(recorded_run)
            self._hook_optimizer()
        except BaseException:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            raise
        # Ctrl-C / SIGTERM: flush the file first, never in the middle of a step's rows
        self._interrupts = InterruptGuard(self.flush, self._close_on_signal).install()
        _OPEN.add(self)  # before the warning, which a filter may turn into an error
        self._say_other_open_monitors()
        return self

    def _say_other_open_monitors(self) -> None:
        """Warn when another open monitor watches this model or this optimizer.

        The usual cause is a notebook cell that builds a monitor, run a second time: the
        first monitor was never closed, so its optimizer hooks still run at every step and
        keep a copy of the weights, and no variable may hold it any more. Two monitors of
        one model at once are allowed (both record, neither changes training): this is a
        warning, at the start of the second.
        """
        others = [m for m in list(_OPEN) if m is not self
                  and m.writer is not None and not m.writer.closed  # (close_writers: inert)
                  and (m.model is self.model
                       or (self.optimizer is not None and m.optimizer is self.optimizer))]
        if not others or not self._leads:
            return
        where = ", ".join(str(m.path) if m.path is not None else "in memory" for m in others)
        warnings.warn(
            f"landscape: {len(others)} other Monitor(s) of this model or optimizer are still "
            f"open ({where}): never closed, e.g. a notebook cell run again? Their optimizer "
            "hooks still run at every step and each keeps a copy of the weights. Close each "
            "(mon.close(), or `with Monitor(...) as mon:`), or call "
            "landscape.close_monitors(model, keep=mon)",
            RuntimeWarning, stacklevel=user_stacklevel())

    def _say_resume_gap(self, last: int) -> None:
        """Warn once when a resume from a checkpoint leaves steps without rows.

        ``truncate_from`` names the checkpoint's step; rows the killed process had not
        flushed before it are lost, which the steps of a metric recorded at every call
        show: the gap from the run's last row to the resumed step is wider than that
        metric's spacing.
        """
        resume = self._writer_args["truncate_from"]
        if resume is None or self.writer is None or self.writer.path is None \
                or self._analyzing:  # analyze: checkpoints, flushed each
            return
        run = self.writer.run()
        held = set(run.metrics())
        spacing = None
        for m in self.metrics:
            steps = run.steps(m.name) if m.name in held else ()
            if len(steps) >= 2:
                gap = int(steps[-1] - steps[-2])
                spacing = gap if spacing is None else min(spacing, gap)
        if spacing is not None and int(resume) - last > spacing:
            warnings.warn(
                f"landscape: {self.writer.path}: resuming at step {int(resume)} "
                f"(truncate_from), but its rows end at step {last}: steps {last + 1} to "
                f"{int(resume) - 1} were never written (the process stopped before it "
                "flushed them); call mon.flush() where the loop saves a checkpoint",
                RuntimeWarning, stacklevel=user_stacklevel())

    def _say_dropped_rows_left_empty(self, step: int) -> None:
        """Warn when the first step after a resume skips steps whose rows were dropped.

        ``truncate_from`` is the first step the resumed loop runs (a checkpoint saved after
        step s: ``s + 1``). One too small drops rows of steps the loop does not run again,
        which then have none: step 50's rows, resumed with ``truncate_from=50`` at step 51.
        """
        dropped = None if self.writer is None else self.writer.dropped_from
        if dropped is not None and step > dropped and not self._analyzing:
            empty = (f"step {dropped} has" if step - 1 == dropped
                     else f"steps {dropped} to {step - 1} have")
            warnings.warn(
                f"landscape: {self.writer.path}: truncate_from dropped the rows from step "
                f"{dropped} on, and the run goes on at step {step}: {empty} no rows now. "
                "truncate_from is the first step the resumed loop runs (a checkpoint saved "
                "after step s: truncate_from=s + 1)",
                RuntimeWarning, stacklevel=user_stacklevel())

    def flush(self) -> None:
        """Write the buffered rows to the run file now (nothing to do unless it is open).

        The integrations call it when the framework saves a checkpoint, so the rows up to
        a checkpoint are on disk before a job that resumes from it could lose them.
        """
        if self.writer is not None and not self.writer.closed:
            self.writer.flush()

    def _set_up(self, metric: Metric) -> bool:
        """``metric.setup(model)``; False (one warning) for a metric with nothing to measure.

        A metric that picks its layers by itself and finds none (``spectral_alignment`` or
        ``collapse`` of a preset on a model without ``nn.Linear``) is left out, so that a
        preset works on any model; under ``strict=True`` it raises.
        """
        try:
            metric.setup(self.model)
        except NotApplicable as err:
            if self.strict:
                raise
            if _dist.rank() == 0:  # the same model on every rank: said once per job
                warnings.warn(f"landscape: metric {metric.name!r} is left out: {err}",
                              RuntimeWarning, stacklevel=user_stacklevel())
            return False
        except Exception as err:  # a mistake to fix: its traceback names the metric
            add_note = getattr(err, "add_note", None)  # (Python 3.11+)
            if add_note is not None:
                add_note(f"in {type(metric).__name__}.setup(), the monitor's metric "
                         f"{metric.name!r}")
            raise
        return True

    def _declare_to_mirrors(self, metric: Metric) -> None:
        """Give the mirrors that take them (``declare``) the names of ``metric``'s components."""
        if not self.mirrors:
            return
        config = stored_config(metric)
        names = {field: n for field, shape in metric.fields().items()
                 if (n := component_names(config, field, tuple(shape))) is not None}
        for mirror in self.mirrors:
            if names and callable(getattr(mirror, "declare", None)):
                self._mirror_one(mirror, "declare", metric.name, names)

    def _mirror(self, method: str, *args: Any) -> None:
        """Call ``method`` on every mirror; one that raises warns once and is dropped."""
        for mirror in self.mirrors:
            self._mirror_one(mirror, method, *args)

    def _mirror_one(self, mirror: Any, method: str, *args: Any) -> None:
        """Call ``mirror.method(*args)``; a mirror that raises warns once and is dropped."""
        if id(mirror) in self._broken_mirrors:
            return
        try:
            getattr(mirror, method)(*args)
        except Exception as err:  # a mirror never stops training
            self._broken_mirrors.add(id(mirror))
            warnings.warn(
                f"landscape: mirror {type(mirror).__name__} failed in {method} and is "
                f"switched off for this run: {type(err).__name__}: {err}",
                RuntimeWarning, stacklevel=user_stacklevel(),
            )

    def _close_on_signal(self) -> None:
        """Close on a signal that ends the process (SIGTERM), saying which in the file."""
        guard = self._interrupts
        self.close(how=f"stopped by {guard.stopped_by}" if guard and guard.stopped_by else
                   "stopped by a signal")

    def close(self, how: str | None = None) -> None:
        """Remove the optimizer hooks, flush and close the run file, close the mirrors.

        Args:
            how: why training stopped when it did not finish (an exception, a signal),
                recorded in the run file (``landscape check --require-finished`` fails
                such a run); None: it finished.
        """
        _OPEN.discard(self)
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._before = None
        if self._interrupts is not None:
            self._interrupts.uninstall()
            self._interrupts = None
        if self.writer is not None:
            self.writer.close(how=how)
            if self.mirrors and not self._mirrors_closed:
                self._mirrors_closed = True
                self._mirror("close")

    def __repr__(self) -> str:
        where = "no file" if self.path is None else repr(str(self.path))
        state = ("not started" if self.writer is None
                 else "closed" if self.writer.closed else "open")
        last = self.last_step
        return (f"Monitor({where}, metrics={[m.name for m in self.metrics]}, {state}"
                + ("" if last is None else f", last step {last}") + ")")

    def __enter__(self) -> Monitor:
        self.start()
        self._with_depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._with_depth -= 1
        if self._with_depth == 0:  # a nested `with mon:` leaves it open for the outer one
            self.close(how=stopped_how(exc[1]))

    @property
    def _leads(self) -> bool:
        """Whether this process speaks for the job: it writes the file and says warnings.

        Rank 0 under ``torch.distributed`` (every rank emits the same findings), else
        every process.
        """
        return not self._distributed or _dist.rank() == 0

    @property
    def _analyzing(self) -> bool:
        """Whether ``landscape analyze`` runs the monitor (its config names the analysis).

        Its resumes start at an unfinished checkpoint, flushed one at a time: no rows are
        missing that the resume warnings would name.
        """
        return "analysis" in self._user_config

    @property
    def adaptive(self) -> bool:
        """Whether the adaptive schedules are on (the ``adaptive`` argument)."""
        return self._dense.enabled

    @property
    def last_step(self) -> int | None:
        """The last step recorded, by this monitor or the run it resumed; None before any.

        ``step()`` accepts only steps after it (:class:`~landscape.StepOrderError`).
        """
        return self._clock.last_step

    def run(self) -> Run:
        """A reader of what has been recorded, also after ``close()`` (in memory: no path).

        Returns:
            The run.

        Raises:
            RuntimeError: the monitor has not been started.
        """
        if self.writer is None:
            raise RuntimeError("the monitor has not been started")
        if self.writer.path is None:
            return self.writer.run()
        if not self.writer.closed:  # after close() the file is complete
            self.writer.flush()
        return Run.open(self.writer.path)

    def _probe_size(self) -> int | None:
        """A given probe's sample count (summed over a list of batches), else ``probe_size``."""
        if self._probe_source != "given":
            return self.probe_size
        if is_batch_list(self.probe):
            sizes = [leading_size(b) for b in self.probe]
            return None if None in sizes else sum(sizes)  # type: ignore[arg-type]
        return leading_size(self.probe)

    def _config(self) -> dict[str, Any]:
        """The run's config: what the monitor records, then the user's ``config=``.

        A key of the user's that the monitor records itself (``model``, ``optimizer``, ...:
        experiment trackers' configs often hold them) is kept under ``user_config``
        instead of replacing the monitor's record, which a resume reads.
        """
        n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        own = {
            "model": type(self.model).__name__,
            "n_parameters": n_params,
            "optimizer": optimizer_config(self.optimizer),
            "metrics": [
                {"name": m.name, "schedule": str(m.schedule), **stored_config(m)}
                for m in self.metrics
            ],
            # a given probe's own sample count; the first batch's probe: at most probe_size
            "probe": {"source": self._probe_source, "size": self._probe_size()},
            "taylor_guard": self.taylor_guard,
            # whether the rules ran online: `landscape check --stored` gates on their findings
            "alarms": ("default" if self._alarm_rules is True else "off"
                       if self._alarm_rules is False
                       else [getattr(r, "name", type(r).__name__) for r in self._alarm_rules]),
            # which output the logit metrics read: a resume without it reads another one
            "output_fn": None if self.output_fn is None else getattr(
                self.output_fn, "__qualname__", type(self.output_fn).__name__),
            "microbatch_size": self.microbatch_size,
            # the sizer by name (a function is no JSON): which weights the curvature used
            "batch_size": None if self.batch_size is None else getattr(
                self.batch_size, "__qualname__", type(self.batch_size).__name__),
            # the rows of the batch (loss, logits) are rank 0's own batch: one of how many
            "distributed": {"world_size": _dist.world_size(), "sharded": self._sharded}
            if self._distributed else None,
        }
        user = {k: v for k, v in self._user_config.items() if k not in own}
        clashing = {k: v for k, v in self._user_config.items() if k in own}
        if clashing:
            held = user.get("user_config")
            user["user_config"] = {**held, **clashing} if isinstance(held, dict) else clashing
        return {**own, **user}

    def _make_alarms(self) -> Any:
        if self._alarm_rules is False:
            return None
        from landscape._names import RENAMED_METRICS
        from landscape.alarms import RULES, OnlineAlarms
        from landscape.metrics import available

        rules = None if self._alarm_rules is True else list(self._alarm_rules)
        alarms = OnlineAlarms(rules, strict=self.strict, say=self._leads)
        if rules is not None and not any(r.name in RULES for r in alarms.rules):
            # (the command line's --rules adds to them: a list here replaces them)
            warnings.warn(
                "landscape: alarms=[...] replaces the built-in rules, and none of them is in "
                "the list (not even 'nonfinite': a NaN loss goes unreported); to add your "
                "rules to them, pass alarms=ls.alarms.with_rules([...])",
                UserWarning, stacklevel=user_stacklevel())
        known = {m.name for m in self.metrics} | set(available()) | set(RENAMED_METRICS)
        for rule in alarms.rules:  # a typo in a rule's metrics: it would never fire
            if not any(name in known for name in rule.metrics):
                warnings.warn(
                    f"landscape: alarm rule {rule.name!r} watches {', '.join(rule.metrics)}, "
                    f"which is no metric of this monitor "
                    f"({', '.join(m.name for m in self.metrics)}) nor a registered one; it "
                    "will never fire",
                    UserWarning, stacklevel=user_stacklevel())
        return alarms

    # ------------------------------------------------------------------ optimizer hooks

    def _hook_optimizer(self) -> None:
        """Hook the watched optimizer's steps (the update and its learning rates).

        An optimizer that holds none of the model's trainable parameters (another
        model's) is warned about: the update metrics would blame a skipped step.
        """
        # (DeepSpeed's ZeRO optimizers hold flat partitions of the weights, not the weights)
        if self.optimizer is not None and self._own and not type(
                self.optimizer).__module__.startswith("deepspeed"):
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            if held and not held & {id(p) for p in self._own} and self._leads:
                warnings.warn(
                    "landscape: the optimizer holds none of the model's trainable "
                    "parameters: pass the optimizer that steps this model (the update "
                    "metrics and the learning rate recorded would be another's)",
                    RuntimeWarning, stacklevel=user_stacklevel())
        if self.optimizer is not None:
            self._hooks.append(self.optimizer.register_step_pre_hook(self._pre_step))
            self._hooks.append(self.optimizer.register_step_post_hook(self._post_step))

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Watch ``optimizer`` from now on, in place of the one given before.

        For a loop that builds a new optimizer mid-run (a second stage, fine-tuning with
        other settings): the monitor's hooks sit on the old one, whose steps stop, so the
        update metrics would record NaN and the sentinels' learning rate the old one's.
        The next call measures the first step the new optimizer takes.

        Args:
            optimizer: the new optimizer (wrappers such as accelerate's are unwrapped), or
                None to watch none.
        """
        new = unwrap_optimizer(optimizer)  # a bad argument raises before the hooks go
        for h in self._hooks:
            h.remove()
        self._hooks, self._before, self._step_lrs = [], None, None
        self.optimizer = new
        self._idle_versions, self._told_unwatched = None, False
        if self.writer is not None and not self.writer.closed:  # started: hook it now
            self._hook_optimizer()  # (before the start, start() does; after close, none)

    def _say_unwatched_steps(self, watching: bool) -> None:
        """Warn once when the weights change while the watched optimizer does not step.

        The sign of a new optimizer object the monitor never saw: its hooks sit on the old
        one. Between two calls in a row with no watched step at all (a gradient-accumulation
        call, a GradScaler's skip) nothing else moves the parameters the watched optimizer
        holds, which their version counters and first values show (another optimizer of
        the loop moves its own); the monitor's own measurements restore them within its
        calls. Said by rank 0 alone under ``torch.distributed``.
        """
        since, self._hooked_at_call = self._hooked_at_call, self._hooked_steps
        if not watching or self._hooked_steps != since or self._told_unwatched:
            self._idle_versions = None
            return
        versions = self._versions()
        if self._idle_versions is not None and versions != self._idle_versions \
                and self._leads:
            self._told_unwatched = True
            warnings.warn(
                "landscape: the model's weights changed since the last call, but the "
                "optimizer the monitor watches did not step: a new optimizer? Hand it to the "
                "monitor, mon.set_optimizer(opt); until then the update metrics are NaN and "
                "the learning rate recorded is the old optimizer's", RuntimeWarning,
                stacklevel=user_stacklevel())
        self._idle_versions = None
        self._watch_idle = True  # the versions are taken when this call ends

    def _say_trainable_changed(self, modules: list[nn.Module], given_norm: bool) -> None:
        """Warn once when the model's trainable parameters are no longer those of the start.

        A head replaced, layers frozen or unfrozen, an adapter injected, weights tied: the
        monitor measures the parameter objects it started with (docs/monitor.md, "Which
        parameters"), so its gradient norm, update and Taylor rows would leave the new
        ones out and read ones that no longer train, and metrics that need the old ones
        fail. At calls that measure, over the step's list of ``modules`` (the model's, in
        ``parameters()`` order: 24 us on a 27-tensor transformer). Not for FSDP2 models,
        whose parameter objects are swapped by every forward; rank 0 says it. A gradient
        norm given to ``step`` (``given_norm``; the integrations' norm before clipping) is
        the caller's, over every trainable parameter: the warning leaves it out. Under an
        integration's callback the advice is a new run (the callback's monitor lives for
        one training run).
        """
        if self._told_trainable or self._sharded:
            return
        live = [p for p in parameters_of(modules) if p.requires_grad]
        if len(live) == len(self._own) and all(a is b for a, b in zip(live, self._own)):
            return
        self._told_trainable = True
        if not self._leads:
            return
        started = {id(p) for p in self._own}
        added = sum(id(p) not in started for p in live)
        gone = len(started - {id(p) for p in live})
        what = (f"{added} tensors added, {gone} gone" if added or gone
                else "the same tensors in another order")
        rows = "update and the curvature rows" if given_norm else \
            "grad_norm, update and the curvature rows"
        integration = self._user_config.get("integration")
        advice = ("start a new Monitor after such a change (a new run file when its "
                  "metrics' fields change" if integration is None else
                  "change it between training runs, each with its own callback and run file "
                  "(the callback's monitor lives for one run")
        warnings.warn(
            f"landscape: the model's trainable parameters changed since the monitor started "
            f"({what}: a new head, layers frozen or unfrozen, an adapter, weights tied): "
            f"it still measures the ones it started with, so {rows} leave the new ones "
            f"out and metrics that need the old ones fail; {advice}; docs/monitor.md, "
            "'Which parameters')", RuntimeWarning, stacklevel=user_stacklevel())

    def _versions(self) -> tuple[Any, ...]:
        """The state of the parameters the watched optimizer holds that no forward writes.

        Their version counters, and their first values (an optimizer that writes through
        ``p.data`` leaves the counters as they were). An embedding's ``max_norm``
        renormalises its rows in every forward, also in the loop's forward passes between
        two calls: left out.
        """
        assert self.optimizer is not None
        written = {id(t) for t in written_in_forward(list(self.model.modules()))}
        held = [p for g in self.optimizer.param_groups for p in g["params"]
                if id(p) not in written and p.numel()]
        with torch.no_grad():
            pieces = [_dist.local_tensor(p.detach()).reshape(-1)[:1].float() for p in held]
            if len({t.device for t in pieces}) > 1:  # a model split over devices
                pieces = [t.cpu() for t in pieces]
            first = torch.cat(pieces).cpu() if pieces else torch.zeros(0)
        # their bits: a NaN weight (a diverged run) is equal to itself there
        return tuple(p._version for p in held), tuple(first.view(torch.int32).tolist())

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.writer is None or self.writer.closed:  # closed under it (close_writers)
            self._before = None
            return
        self._hooked_steps += 1
        # the rate this step takes: a scheduler stepped before the next call (Lightning's)
        # will have moved on to the next step's
        # raw values (a tensor rate cloned, no host sync per step): read at a sentinels row
        self._step_lrs = [g.get("lr").clone() if isinstance(g.get("lr"), torch.Tensor)
                          else g.get("lr") for g in optimizer.param_groups]
        # the parameters before the optimizer step that comes right before the next call
        # (StepClock.optimizer_step says which steps may be that one): the update is one
        # optimizer step, never several, when calls are sparser
        may_precede_call = self._clock.optimizer_step()
        if self.taylor_guard is None and not may_precede_call:
            return  # the copy of the interval's first step stays, in case the call is early
        upcoming = self._clock.next_step()
        wanted = self.taylor_guard is not None or any(
            m.needs_update and self._dense.is_due(m, upcoming) for m in self.metrics
        )
        self._before = None
        if wanted:
            with torch.no_grad():
                # −θ: the call adds θ after the step to it in place, which leaves Δθ (bitwise
                # θ_after − θ_before) in the same memory: one copy of the parameters, not two
                self._before = tuple(torch._foreach_neg(self._own))

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.taylor_guard is None or self._before is None:
            return
        from landscape.metrics.training import radius_along

        current = self._own
        with torch.no_grad():
            before = tuple(torch._foreach_neg(self._before))  # the copy holds −θ_before
        update = tuple(p.detach() - b for p, b in zip(current, before))
        ctx = self._context(self._clock.next_step(), None, None, None)

        def radius() -> float:
            with isolated(self.model):
                inputs, targets = split_batch(self.probe)
                try:
                    return float(radius_along(ctx, inputs, targets, before, update).r)
                except MissingInput:  # not a classifier's logits: nothing to guard
                    return math.nan

        # an error on one rank raises on every rank, rather than leave them in the max
        r = _dist.together(self._distributed, "the Taylor guard's radius", radius)
        if self._distributed:  # every rank rescales by the same factor (probes may differ):
            r = _dist.max_over_ranks(r, current[0].device)  # else the copies drift apart
        if math.isfinite(r) and r > self.taylor_guard:
            scale = self.taylor_guard / r
            with torch.no_grad():
                for p, b, u in zip(current, before, update):
                    p.copy_(b + scale * u)

    # ------------------------------------------------------------------ the step

    def _context(self, step: int, batch: Any, loss: Any, outputs: Any) -> StepContext:
        return StepContext(
            step=step, model=self.model, loss_fn=self.loss_fn, closure=self.closure,
            optimizer=self.optimizer, names=self._names, batch=batch, probe=self.probe,
            loss=loss, outputs=outputs, state=self._state,
            microbatch_size=self.microbatch_size, batch_size=self.batch_size,
            parameter_objects=self._objects, loss_modules=self._loss_modules,
            no_loss_reason=self.no_loss_reason, step_lrs=self._step_lrs,
            weights_dtype=self._weights_dtype, output_fn=self.output_fn,
            no_probe_hint=self._no_probe_hint,
        )

    def step(
        self, step: int, *, batch: Any = None, loss: Any = None, outputs: Any = None,
        grad_norm: Any = None,
        samples: int | None = None,
    ) -> list[Finding]:
        """Record every metric due at ``step``; call it after ``optimizer.step()``.

        Args:
            step: the training step; it must increase from call to call.
            batch: the training batch.
            loss: its loss (a tensor or float; never recomputed).
            outputs: optionally the model's output on ``batch`` (saves a forward pass for
                logit metrics on the batch).
            grad_norm: optionally the gradient norm before clipping (what
                ``torch.nn.utils.clip_grad_norm_`` returns; a tensor or float): the
                ``grad_norm`` metric records it instead of the norm of the clipped ``.grad``.
            samples: optionally how many samples ``loss`` averages over, when ``batch`` holds
                only some of them (the last micro-batch of an accumulated step): the
                ``loss`` metric's ``samples`` (default: the leading size of ``batch``).

        Returns:
            The alarm findings raised at this step (under ``torch.distributed``, rank 0's).
            A metric that fails is recorded in ``findings`` and warned about, not
            returned: it says nothing about training.

        Raises:
            StepOrderError: ``step`` does not come after the last recorded step.
        """
        # the arguments are checked before anything is recorded
        step, grad_norm, samples = step_arguments(step, loss, grad_norm, samples)
        if self.writer is not None and self.writer.closed:
            raise RuntimeError(
                "this Monitor was closed; build a new one to go on recording (mode='a' "
                "appends to its run file)")
        started_here = self.writer is None
        if started_here:
            self.start()  # installs the interrupt guard, so the first step is covered too
            if self.writer is None:
                raise ValueError("the model's lazy modules have no shapes yet at this step: "
                                 "call mon.step after a forward pass of the model")
        guard = self._interrupts
        if guard is not None:
            guard.ensure()  # a Jupyter cell after the one that started the monitor
        # a step's rows reach the file together (an automatic flush waits for the last)
        # inside torch.inference_mode() (a logging block) nothing could be differentiated,
        # and its tensors have no version counters: leave it for the step
        with guard.deferred() if guard is not None else contextlib.nullcontext(), \
                torch.inference_mode(False), self.writer.one_step():
            # started here, the optimizer hooks missed this step's update: the metrics that
            # need it record NaN for this one step, without a failure finding
            self._update_missed = started_here
            try:
                return self._step(step, batch, loss, outputs, grad_norm, samples)
            finally:
                self._update_missed = False
                if self._watch_idle:  # after this call's own measurements
                    self._watch_idle = False
                    self._idle_versions = self._versions()

    @staticmethod
    def _agree_on_step(step: int) -> None:
        """Raise on every rank when the ranks call the step with different numbers.

        At the first call of a monitor, whatever is due (a counter resumed apart is off
        from there on): with metrics due every few steps, ranks whose numbers differ met
        other ranks' collectives (the metrics', or DDP's next all-reduce) before the
        findings' broadcast could compare them, and gloo aborted (distributed review).
        One all-reduce of two numbers, once; later steps are compared in that broadcast.
        """
        low, high = _dist.step_range(step)
        if low != high:
            raise LandscapeError(
                f"the ranks are out of step: rank {_dist.rank()} recorded step {step} while "
                f"the ranks' steps range from {low} to {high}; under torch.distributed every "
                "rank calls Monitor.step() at every step with the same step number "
                "(docs/distributed.md)")

    def _step(
        self, step: int, batch: Any, loss: Any, outputs: Any, grad_norm: float | None = None,
        samples: int | None = None,
    ) -> list[Finding]:
        last = self._clock.last_step
        if not self._first_step_seen:
            if self._distributed:  # before any collective of the step
                self._agree_on_step(step)
            self._first_step_seen = True
            self._say_dropped_rows_left_empty(step)
        if last is not None and step <= last:
            if self.path is None:
                advice = ""
            elif self._recorded_here:  # a loop (a notebook cell) run again from a step
                advice = (f" in {self.path}: go on from step {last + 1}, or record from step "
                          f"{step} again in a new Monitor with truncate_from={step}, once this "
                          "one is closed (it drops the rows from that step on; mode='w' "
                          "would start the file over, without any of its rows)")
            else:  # a new monitor into a file of an earlier run (a script run again)
                advice = (f" in {self.path} (to start the file over, pass mode='w'; to "
                          f"resume from step {step}, truncate_from={step}; either in a new "
                          "Monitor once this one is closed)")
            if self.writer is not None:
                self.writer.refused = True
            raise StepOrderError(
                f"step {step} does not come after the last recorded step {last}" + advice)
        if self._previous_call is not None and step > self._previous_call + 1:
            self._say_missed_schedules(self._previous_call, step)
        self._previous_call = step
        if self.probe is None and self._probe_source == "first_batch" and batch is not None:
            self._default_probe(batch, step)
        elif self._probe_source == "given" and not self._probe_aligned and batch is not None:
            # once, at the first batch: the targets' dtype is the loop's (a list probe's
            # batches keep theirs)
            if not is_batch_list(self._given_probe):
                self.probe = targets_in_batch_dtype(self.probe, self._given_probe, batch)
            self._probe_aligned = True
        due = [m for m in self.metrics if self._dense.is_due(m, step)]
        extra = [m for m in due if not m.schedule(step)]
        before, self._before = self._before, None
        # the hooks count optimizer steps from start(): unknown when step() started it
        watching = self.optimizer is not None and not self._update_missed
        stepped, skipped = self._clock.call(step, watching=watching)
        self._recorded_here = True
        self._say_unwatched_steps(watching)
        if skipped:  # a GradScaler skipped the step, a micro-batch in between: no update
            self._update_missed = True
        elif stepped is False and before is not None:
            # a short interval (StepClock.call): counted as not stepped, so its copy, taken
            # before an earlier step of the interval, would measure several steps as one
            before, self._update_missed = None, True
        if not due:
            return []
        ctx = self._context(step, batch, loss, outputs)
        ctx.optimizer_stepped = stepped
        ctx.given_grad_norm = grad_norm
        ctx.given_samples = samples
        if before is not None:  # −θ before the optimizer step (_pre_step)
            with torch.no_grad():
                if stackable(before):
                    ctx.before_norms = torch.stack(tensor_norms(before))  # ‖−θ‖ = ‖θ‖
                torch._foreach_add_(before, self._own)  # Δθ, bitwise θ_after − θ_before
            ctx.update = before
            ctx.rebuild_params_before(self._own, before)  # θ_after − Δθ, when read
        # one walk of the module tree per step, for isolated() and the sentinels' guard
        ctx.modules = list(self.model.modules())
        self._say_trainable_changed(ctx.modules, grad_norm is not None)
        if before is not None and written_in_forward(ctx.modules):
            # a metric's forward renormalises embedding rows in place (max_norm) until
            # isolated() writes them back: θ_after − Δθ is taken before any forward
            ctx.params_before  # noqa: B018 (the property builds it now)
        ctx.plan_captures(due)
        found: list[Finding] = []
        # distributed=False: operators built by the metrics stay on this rank's data
        scope = contextlib.nullcontext() if self._distributed else _dist.local()
        unmeasured: list[str] = []
        # the modules a loss function or closure holds (an EMA centre, a discriminator)
        # get their buffers back once a metric called either (ctx.operator, the forward)
        with scope, isolated(self.model, modules=ctx.modules), \
                contextlib.ExitStack() as ctx.loss_guard:
            for m in due:
                row, measured = self._compute(m, ctx)
                if self._sharded:  # FSDP2 keeps the root's gathered copy after a forward
                    _dist.reshard(self.model)
                row, measured = self._append(m, ctx, row, measured)
                if self.mirrors:  # the measurements, not the rows' context (the batch's size)
                    self._mirror("on_row", m.name, step, {
                        k: v for k, v in row.items() if k not in m.CONTEXT_FIELDS})
                # a metric that failed (no loss given, a missing input) wrote NaN for "not
                # measured": the rules must not read it as a NaN the training produced
                if self._alarms is not None and measured:
                    found.extend(self._alarms.observe(m.name, step, row))
                if not measured:
                    unmeasured.append(m.name)
                self._dense.observe_row(m.name, step, row)
            if self._alarms is not None:
                self._record_rule_failures()
            if unmeasured:
                self._record_unmeasured(step, unmeasured)
            if extra:
                self.writer.append("adaptive", step, {"dense": 1.0, "extra": float(len(extra))})
        if self._distributed:
            # Rank 0's alarms (which saw the rows it writes) are authoritative: every rank
            # emits rank 0's findings, so all of them can react alike, e.g. stop together.
            # Rank 0's dense window too: ranks with their own probes see different r, and
            # `due` must be the same on every rank (curvature metrics reduce over them),
            # which also makes every rank reach this broadcast.
            at, found, self._dense.until = _dist.broadcast_object(
                (step, found, self._dense.until))
            if at != step:  # the ranks' schedules differ: later collectives would mispair
                raise LandscapeError(
                    f"the ranks are out of step: rank {_dist.rank()} recorded step {step} "
                    f"while rank 0 recorded step {at}; under torch.distributed every rank "
                    "calls Monitor.step() at every step with the same step number "
                    "(docs/distributed.md)")
        self._dense.observe_findings(step, found)
        failures, self._failures_to_call = self._failures_to_call, []
        _warn_failures([f for f in failures if f.rule != RULE_FAILED])  # warned when raised
        # one finding per (step, rule), e.g. a NaN loss seen twice; every one is recorded
        # before any is said: a callback that raises to stop training, or a warning turned
        # into an error by a filter, loses none of them
        raised = [self._record_finding(f) for f in dedupe(found)]
        self.writer.step_complete()  # what raises from here on leaves the rows written
        if self.on_finding is not None:  # this rank's metric_failed findings
            for f in failures:
                self.on_finding(f)
        for f in raised:
            self._say_finding(f)
        return raised

    def _say_missed_schedules(self, previous: int, step: int) -> None:
        """Say, once, which metrics were due strictly between two calls and not measured.

        A schedule is due at exact steps: a loop that calls the monitor every n-th step
        (``if step % 10 == 9``) would otherwise never measure an ``every(10)`` metric.
        """
        if self._told_missed or not self.say_missed_schedules:
            return
        missed = []
        for m in self.metrics:
            due = None if m.schedule(step) else m.schedule.first_due(previous + 1, step - 1)
            if due is not None:
                missed.append(f"{m.name} ({m.schedule.describe()}, due at step {due})")
        if not missed:
            return
        self._told_missed = True
        if self._leads:
            warnings.warn(
                f"landscape: {', '.join(missed)} {'was' if len(missed) == 1 else 'were'} "
                f"due between this monitor's calls at steps {previous} and {step}, and not "
                "measured: a schedule is due at exact steps. Call monitor.step after every "
                "optimizer step, or give those metrics schedules that land on the steps you "
                "call (every(n, start=s); docs/monitor.md, 'Metrics and presets')", RuntimeWarning,
                stacklevel=user_stacklevel())

    def _record_unmeasured(self, step: int, names: list[str]) -> None:
        """List the metrics that failed at ``step`` in ``/metrics/unmeasured``.

        Their NaN rows are no measurement: the monitor did not feed them to the rules, and
        ``OnlineAlarms.replay`` (a resumed monitor, ``landscape check``) skips them too.
        Only a run with a failure has the table; a resumed run keeps its own.
        """
        assert self.writer is not None
        # declared without a flush (the step's rows reach the file together)
        fresh = not self._unmeasured_declared and not self.writer.declared("unmeasured")
        joined = ",".join(names)
        if not self._unmeasured_declared or len(joined.encode("utf-8")) > _UNMEASURED_WIDTH:
            # wide enough for every metric's name at once (never cut), and no wider: a
            # metric that fails at every step adds a row per step. A resumed run's table
            # may be narrower (an earlier session's metrics): declaring it wider widens it
            width = max(_UNMEASURED_WIDTH, len(joined.encode("utf-8")),
                        len(",".join(m.name for m in self.metrics).encode("utf-8")))
            self.writer.declare("unmeasured", {"metrics": f"S{width}"},
                                cls="landscape.monitor.Monitor", schedule="triggered")
        self._unmeasured_declared = True
        self.writer.append("unmeasured", step, {"metrics": joined})
        if fresh:  # the first failure's step is on disk when the step ends
            self.writer.flush_soon()

    def _recorded_window_end(self, run: Run) -> int:
        """The end of the dense window the resumed ``run``'s file had open (or -1)."""
        until = -1
        if self._leads:
            until = recorded_window_end(run)
        return _dist.broadcast_object(until) if self._distributed else until

    def _say_given_probe_left_out(self, run: Run | None, last: int) -> None:
        """Resuming, without ``probe=``, a run recorded with one: its probe metrics change data.

        The first batch's probe then replaces the one the run measured on (a sharpness of
        0.47 read 0.59 across the resume), and nothing in the file says so.
        """
        if self._probe_source == "given" or run is None or not self._leads:
            return
        if "probe" in run.metrics() and run.rows("probe"):
            return  # a session without probe= stored its default one: restored from now on
        recorded = run.config.get("probe")
        if isinstance(recorded, Mapping) and recorded.get("source") == "given" \
                and any(m.data == "probe" for m in self.metrics):
            warnings.warn(
                f"landscape: resuming a run recorded with probe= given, without one: the "
                f"probe metrics measure another probe (the first batch's) from the step "
                f"after {last} and are not comparable across it; pass the same probe= to "
                "continue their series", RuntimeWarning, stacklevel=user_stacklevel())

    def _default_probe(self, batch: Any, step: int) -> None:
        """The probe stored by the run this one resumes, or the first samples of ``batch``.

        The number of samples taken is the one row of ``/metrics/probe``. Under
        ``torch.distributed`` each rank takes its own, and rank 0's file stores none.
        """
        assert self.writer is not None
        if not self._distributed:
            restored = restore_probe(self.writer, batch)
            if restored is not None:
                self.probe = inputs_in_models_dtype(restored, self._weights_dtype)
                return
        elif self.writer.last_step("probe") is not None:  # rank 0, resuming its run
            _log.warning(
                "landscape: resuming a run under torch.distributed: every rank takes a new "
                "probe from this batch (the file holds none of the ranks' probes), so the "
                "probe metrics are not comparable across step %d; pass probe= on every "
                "rank for one series", step)
        probe, kept = take_probe(batch, self.probe_size)
        self.writer.append("probe", step, {"samples": float(kept)})
        if not self._distributed:  # rank 0's file cannot hold every rank's probe
            store_probe(self.writer, probe)  # as the batches are: a resume compares them
        # batches a wrapper casts on the way in (Fabric's bf16-true): inputs as the weights
        self.probe = inputs_in_models_dtype(probe, self._weights_dtype)

    def _compute(self, metric: Metric, ctx: StepContext) -> tuple[dict[str, Any], bool]:
        """``metric``'s row, and whether it is a measurement for the alarm rules.

        A metric that raises gives a row of NaN (with the fields it measured, for a
        :class:`~landscape._errors.PartialRow`) and one ``metric_failed`` finding; that
        row is no measurement. A step the optimizer hooks could not see (started inside
        ``step()``, a skipped step) gives NaN for the fields that need the update, without
        a finding, and counts as a row.
        """
        start = time.perf_counter()
        partial = None
        written = self._user_versions(metric, ctx)
        try:
            row = metric.compute(ctx)
            if not isinstance(row, Mapping):  # dict() of a float: "not iterable", unnamed
                raise TypeError(f"{type(metric).__name__}.compute() must return a dict "
                                f"{{field: value}}, got {type(row).__name__}")
            return dict(row), True
        except Exception as caught:  # a diagnostic never stops training unless strict
            err = caught
            if isinstance(caught, PartialRow):  # some fields measured: keep them
                partial, err = dict(caught.row), caught.error
            missed = (metric.needs_update and ctx.update is None
                      and isinstance(err, MissingInput)
                      and (self._update_missed or _skipped_overflow(ctx)))
            if self.strict and not missed:
                if partial is None:
                    raise
                raise err from None
            if not missed:
                self._record_failure(metric, ctx.step, err, ctx.loss)
            nan = _nan_row(metric)
            return (nan, missed) if partial is None else ({**nan, **partial}, True)
        finally:
            self.timings[metric.name] += time.perf_counter() - start
            if written is not None:
                self._say_written(metric, written)

    def _user_versions(self, metric: Metric, ctx: StepContext
                       ) -> dict[str, list[tuple[torch.Tensor, int]]] | None:
        """What a metric of the user's could change in place, with the tensors' versions.

        ``grads``: the training ``.grad`` (a ``.backward()`` call accumulates into it; the
        built-in metrics differentiate with ``torch.autograd.grad`` and ``torch.func``,
        which never do); ``parameters``: the weights (``ctx.parameters`` share their
        storage); ``update``: ``ctx.update``, which the metrics after it read. None for a
        built-in metric.
        """
        if type(metric).__module__.startswith("landscape."):
            return None
        return {
            "grads": [(g, g._version) for p in self._own if (g := p.grad) is not None],
            "parameters": [(p, p._version) for p in self._own],
            "update": [(u, u._version) for u in ctx.update or ()],
        }

    def _say_written(self, metric: Metric,
                     before: dict[str, list[tuple[torch.Tensor, int]]]) -> None:
        """Warn once per metric whose computation changed training's tensors in place."""
        changed = [what for what, pairs in before.items()
                   if (metric.name, what) not in self._told_in_place
                   and any(t._version != v for t, v in pairs)]
        if not changed or not self._leads:
            return
        self._told_in_place.update((metric.name, what) for what in changed)
        said = {
            "grads": "the parameters' .grad (a .backward() call?): the training gradients "
                     "changed, and an optimizer step or a gradient accumulation after this "
                     "call uses them. Differentiate with torch.autograd.grad(loss, params) "
                     "inside a metric",
            "parameters": "the model's parameters (ctx.parameters share their storage): "
                          "unless it put the values back exactly, the training changed. Read "
                          "them only; .clone() one to change it",
            "update": "ctx.update, which the metrics after it read: unless it put the values "
                      "back exactly, their rows changed; .clone() it to change it",
        }
        warnings.warn(
            f"landscape: metric {metric.name!r} wrote in place into "
            + "; and into ".join(said[what] for what in changed), RuntimeWarning,
            stacklevel=user_stacklevel())

    def _append(
        self, metric: Metric, ctx: StepContext, row: dict[str, Any], measured: bool
    ) -> tuple[dict[str, Any], bool]:
        """Write ``row``; a row that does not fit ``metric.fields()`` is the metric's failure.

        The writer checks the whole row before it keeps any of it, so a custom metric that
        returns a misspelt, missing or undeclared field, or a value of the wrong shape,
        leaves nothing behind: like a metric that raises, it records a row of NaN and one
        ``metric_failed`` finding (``strict=True`` raises), and training goes on.

        Returns:
            The row written, and ``measured`` (False for the NaN row of a failure).
        """
        assert self.writer is not None
        try:
            self.writer.append(metric.name, ctx.step, row)
            return row, measured
        except (ValueError, TypeError) as caught:  # (a StepOrderError is neither)
            err = type(caught)(f"{type(metric).__name__}.compute() returned a row that does "
                               f"not fit its fields() {list(metric.fields())}: {caught}")
        if self.strict:
            raise err
        self._record_failure(metric, ctx.step, err, ctx.loss)
        nan = _nan_row(metric)
        self.writer.append(metric.name, ctx.step, nan)
        return nan, False

    def _record_failure(
        self, metric: Metric, step: int, err: Exception, loss: Any = None
    ) -> None:
        # once per metric and kind of error: the same failure at every due step is one
        # report, another one later (out of memory after a missing input) is reported too
        key = (metric.name, type(err).__qualname__)
        if key in self._failed:
            return
        self._failed.add(key)
        bad = nonfinite_state(self.model, loss)
        if bad is not None:  # not the metric's fault: one finding for all metrics
            if self._nonfinite_reported:
                return
            self._nonfinite_reported = True
        batches = len(self.probe) if is_batch_list(self.probe) else None
        self._store_failure(failure_finding(metric.name, step, err, bad,
                                            getattr(metric, "data", None), batches))

    def _record_rule_failures(self) -> None:
        """Store the ``rule_failed`` findings of rules that raised, as a metric's failure.

        Not findings of the step: a rule's bug neither stops training (``stop_on``) nor
        opens the adaptive window; ``landscape check`` fails the run on the stored finding.
        """
        assert self._alarms is not None
        failures, self._alarms.failures = self._alarms.failures, []
        for finding in failures:
            self._store_failure(finding)

    def _store_failure(self, finding: Finding) -> None:
        """Record a failure's finding (a metric's or a rule's): kept, written, mirrored."""
        self.findings.append(finding)
        assert self.writer is not None
        self.writer.add_finding(finding)
        self._mirror("on_finding", finding)
        # on_finding sees it at the end of the step, outside the metrics' isolation (the
        # model back in its own mode), as it sees the alarm findings
        self._failures_to_call.append(finding)

    def _record_finding(self, finding: Finding) -> Finding:
        self.findings.append(finding)
        assert self.writer is not None
        self.writer.add_finding(finding)
        return finding

    def _say_finding(self, finding: Finding) -> Finding:
        """Warn or log it (rank 0), pass it to the mirrors and the ``on_finding`` callback."""
        # rank 0's findings, which every rank emits: said once, by rank 0 (torchrun would
        # print one copy per rank); each rank still returns them and calls on_finding
        say = self.warn and self._leads
        if say and at_or_above([finding], "warning"):
            with above_bars():  # a training loop's progress bar would swallow the line
                warnings.warn(InstabilityWarning(finding.describe()),
                              stacklevel=user_stacklevel())
        elif say:  # info: something moved that healthy training also moves
            _log.info("landscape: %s", finding.describe())
        self._mirror("on_finding", finding)
        if self.on_finding is not None:
            self.on_finding(finding)
        return finding
