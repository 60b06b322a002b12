"""The training loops, the default monitor's findings, and the health criterion.

:func:`run` trains one (setup, seed) with the default monitor attached and returns its
findings, its loss curve and whether it was healthy; :func:`summarise` pools a setup's
seeds into one table row.

The monitor is ``Monitor(model, loss_fn, None, optimizer=opt, warn=False)``: no
``metrics=`` (the ``cheap`` preset; ``--preset standard`` or ``full`` tries the rules that
read the other metrics), no ``probe=`` (up to 32 samples of the first batch), default
alarm rules, in memory. It is started before the first step and called after every
``optimizer.step()`` (after the scheduler, as the hunt did) with the batch, the detached
loss and the detached outputs; with gradient clipping also the norm before clipping
(``grad_norm=``, as ``docs/monitor.md`` asks). Gradient accumulation calls it once per
optimizer step with the mean micro-batch loss and no outputs, or (``per_micro``) after
every micro-batch. A warning is a finding of severity >= ``warning``; the others are info.

Health is the false-alarm hunt's criterion, unchanged (:func:`health`): training is
healthy unless the loss is ever not finite, or the rolling median of the loss over the
last ``WINDOW`` (20) monitor steps stays >= ``FACTOR`` (1.25) times its running minimum,
with ``median - minimum >= FLOOR`` (0.05) times the initial loss (the median of the first
20 losses), for ``SUSTAIN`` (20) consecutive steps, checked from step ``SKIP`` (50) on.
The floor keeps a loss trained near zero (1e-4 doubling to 2e-4) healthy; the sustain keeps
single noisy batches healthy; a loss that climbs back and stays up is not.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

# isort: split
# (landscape and tests are first-party in the repository, third-party to ruff run elsewhere)
from landscape.findings import severity_rank
from landscape.monitor import Monitor

from .setups import Batch, Setup, Trial

WINDOW, FACTOR, SUSTAIN, SKIP, FLOOR = 20, 1.25, 20, 50, 0.05
WARNING = severity_rank("warning")


class Call(NamedTuple):
    """One monitor call: what ``mon.step`` receives."""

    step: int
    batch: Batch
    loss: torch.Tensor
    outputs: torch.Tensor | None
    grad_norm: torch.Tensor | None


def health(losses: Sequence[float], steps: Sequence[int] | None = None) -> dict[str, Any]:
    """The hunt's health criterion on a loss curve (one loss per monitor call).

    Args:
        losses: the training loss at each monitor call, in order.
        steps: their step numbers (for the message; default 0, 1, ...).

    Returns:
        ``healthy`` (bool), ``why`` (empty when healthy: the step where the rise had
        lasted ``SUSTAIN`` steps), ``worst_ratio`` (the largest rolling median over the
        running minimum from ``SKIP`` on; None for a non-finite loss).
    """
    loss = np.asarray(losses, dtype=float)
    steps = list(range(len(loss))) if steps is None else list(steps)
    if not np.all(np.isfinite(loss)):
        return {"healthy": False, "why": "non-finite loss", "worst_ratio": None}
    floor = FLOOR * float(np.median(loss[:20]))
    med = np.array([np.median(loss[max(0, i - WINDOW + 1):i + 1]) for i in range(len(loss))])
    best, run, worst = np.inf, 0, 0.0
    for i in range(len(loss)):
        if i >= SKIP:
            ratio = med[i] / best if best > 0 else np.inf
            worst = max(worst, ratio)
            run = run + 1 if (ratio >= FACTOR and med[i] - best >= floor) else 0
            if run >= SUSTAIN:
                return {"healthy": False, "worst_ratio": float(worst),
                        "why": f"rolling median {med[i]:.4g} >= {FACTOR}x running min "
                               f"{best:.4g} for {SUSTAIN} steps at step {steps[i]}"}
        best = min(best, med[i])
    return {"healthy": True, "why": "", "worst_ratio": float(worst)}


def _plain(trial: Trial) -> Iterator[Call]:
    model, opt = trial.model, trial.optimizer
    for step in range(trial.steps):
        if trial.schedule is not None:
            trial.schedule(step)
        x, y = trial.batch(step)
        model.train()
        out = model(x)
        loss = trial.loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        norm = None
        if trial.clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trial.clip)
        opt.step()
        if trial.scheduler is not None:
            trial.scheduler.step()
        yield Call(step, (x, y), loss, out, norm)


def _accumulate(trial: Trial) -> Iterator[Call]:
    model, opt, k = trial.model, trial.optimizer, trial.accumulate
    micro = 0
    for step in range(trial.steps):
        if trial.schedule is not None:
            trial.schedule(step)
        opt.zero_grad()
        total = 0.0
        for j in range(k):
            x, y = trial.batch(step)
            out = model(x)
            loss = trial.loss_fn(out, y)
            (loss / k).backward()
            total += float(loss.detach()) / k
            if trial.per_micro and j < k - 1:  # mid-accumulation: no optimizer step yet
                yield Call(micro, (x, y), loss, out, None)
                micro += 1
        opt.step()
        if trial.scheduler is not None:
            trial.scheduler.step()
        if trial.per_micro:
            yield Call(micro, (x, y), loss, out, None)
            micro += 1
        else:  # the step's mean loss; the outputs are those of one micro-batch: none
            yield Call(step, (x, y), torch.tensor(total), None, None)


def _scaled(trial: Trial) -> Iterator[Call]:
    model, opt, scaler = trial.model, trial.optimizer, trial.scaler
    trial.extra["skipped"] = 0
    for step in range(trial.steps):
        if trial.schedule is not None:
            trial.schedule(step)
        x, y = trial.batch(step)
        out = model(x)
        loss = trial.loss_fn(out, y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)  # skipped when the scaled gradients overflowed
        scaler.update()
        if scaler.get_scale() < scale:
            trial.extra["skipped"] += 1
        if trial.scheduler is not None:
            trial.scheduler.step()
        yield Call(step, (x, y), loss, out, None)


def calls(trial: Trial) -> Iterator[Call]:
    """Train ``trial``, yielding after every update (or micro-batch) what the monitor gets."""
    if trial.accumulate > 1:
        return _accumulate(trial)
    if trial.scaler is not None:
        return _scaled(trial)
    return _plain(trial)


def _default_probe_note(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("landscape: no probe= given")


@contextlib.contextmanager
def _quiet_probe_note() -> Iterator[None]:
    """Drop the monitor's note that it takes its probe from the first batch.

    That default is what this benchmark measures; the note would come once per run. Every
    other log line passes.
    """
    log = logging.getLogger("landscape")
    log.addFilter(_default_probe_note)
    try:
        yield
    finally:
        log.removeFilter(_default_probe_note)


def run(setup: Setup, seed: int, steps: int | None = None,
        preset: str | None = None) -> dict[str, Any]:
    """Train ``setup`` for ``seed`` under the default monitor.

    Args:
        setup: the setup.
        seed: its seed (initialisation and batch order).
        steps: optimizer steps (default: the setup's full size).
        preset: ``metrics=`` of the monitor (default: none, the ``cheap`` preset); a rule
            that reads a metric outside ``cheap`` is only tried on healthy runs with a
            preset that records it (``"standard"``, ``"full"``).

    Returns:
        ``setup``, ``seed``, ``steps`` (monitor calls), ``seconds`` (build and training),
        ``healthy``, ``why``, ``worst_ratio`` (:func:`health`), ``counted`` (healthy and not
        excluded by design), ``metrics`` (the monitor's), ``warnings`` (every finding of
        severity >= warning: step, rule, severity, metric, value, threshold, message),
        ``info`` (info findings per rule),
        ``loss_first`` / ``loss_last`` (median of the first 20 / last 50 losses),
        ``extra`` (the loop's counters) and ``losses``.
    """
    t0 = time.perf_counter()
    trial = setup.build(seed, steps or setup.steps)
    mon = Monitor(trial.model, trial.loss_fn, None, optimizer=trial.optimizer,
                  metrics=preset, warn=False).start()
    losses: list[float] = []
    call_steps: list[int] = []
    with _quiet_probe_note(), contextlib.closing(mon):
        for c in calls(trial):
            losses.append(float(c.loss.detach()))
            call_steps.append(c.step)
            mon.step(c.step, batch=c.batch, loss=c.loss.detach(),
                     outputs=None if c.outputs is None else c.outputs.detach(),
                     grad_norm=c.grad_norm)
    warnings = [{"step": f.step, "rule": f.rule, "severity": f.severity, "metric": f.metric,
                 "value": f.value, "threshold": f.threshold, "message": f.message}
                for f in mon.findings if severity_rank(f.severity) >= WARNING]
    info = Counter(f.rule for f in mon.findings if severity_rank(f.severity) < WARNING)
    h = health(losses, call_steps)
    return {"setup": setup.name, "seed": seed, "steps": len(losses),
            "seconds": time.perf_counter() - t0, **h,
            "counted": h["healthy"] and not setup.excluded,
            "warnings": warnings, "info": dict(sorted(info.items())),
            "loss_first": float(np.median(losses[:20])),
            "loss_last": float(np.median(losses[-50:])),
            "metrics": [m.name for m in mon.metrics],
            "extra": dict(trial.extra), "losses": losses}


def summarise(setup: Setup, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: a setup's runs pooled over seeds.

    Returns:
        ``setup``, ``what``, ``excluded``, ``seeds``, ``steps`` (monitor calls, all seeds),
        ``health`` (one letter per seed in seed order: H healthy, u not), ``healthy_runs``,
        ``counted_runs``, ``worst_ratio`` (largest over seeds; None if a loss was not
        finite), ``warnings`` (per rule, all runs), ``counted_warnings`` (per rule, on the
        counted runs), ``info`` (info findings, all runs) and ``seconds``.
    """
    runs = sorted(runs, key=lambda r: r["seed"])
    ratios = [r["worst_ratio"] for r in runs]
    return {
        "setup": setup.name, "what": setup.what, "excluded": setup.excluded,
        "seeds": len(runs), "steps": sum(r["steps"] for r in runs),
        "health": "".join("H" if r["healthy"] else "u" for r in runs),
        "healthy_runs": sum(r["healthy"] for r in runs),
        "counted_runs": sum(r["counted"] for r in runs),
        "worst_ratio": None if None in ratios else max(ratios),
        "warnings": dict(sorted(Counter(w["rule"] for r in runs for w in r["warnings"]).items())),
        "counted_warnings": dict(sorted(Counter(
            w["rule"] for r in runs if r["counted"] for w in r["warnings"]).items())),
        "info": sum(sum(r["info"].values()) for r in runs),
        "seconds": sum(r["seconds"] for r in runs),
    }
