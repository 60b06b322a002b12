"""Detectors behind one interface: landscape's Monitor, a plain loss z-score, trainscope.

A detector is attached to one run (``attach``), sees every step twice (``before_update``
between backward and ``optimizer.step()``, ``after_update`` after it) and reports its
alarms as ``(step, rule)`` pairs. ``seconds`` is the time spent inside its calls.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import warnings
from collections import deque
from typing import Any

from landscape.findings import severity_rank
from landscape.monitor import Monitor

try:  # the optional `bench` extra
    import trainscope
except ImportError:  # pragma: no cover - depends on the environment
    trainscope = None


def episodes(steps: list[int], rearm: int = 20) -> list[int]:
    """The steps that open an episode: an alarm counts only after ``rearm`` alarm-free steps
    (what landscape's rules and the z-score baseline do; trainscope fires on every step of
    a change, so its raw alarms are merged this way)."""
    out: list[int] = []
    last = None
    for s in sorted(steps):
        if last is None or s - last > rearm:
            out.append(s)
        last = s
    return out


class Detector:
    """Base: no alarms."""

    name = "none"

    def __init__(self) -> None:
        self.alarms: list[tuple[int, str]] = []
        self.seconds = 0.0

    def attach(self, trial: Any) -> None:
        pass

    def before_update(self, step: int, loss: float) -> None:
        pass

    def after_update(self, step: int, batch: Any, loss: Any, outputs: Any) -> None:
        pass

    def close(self) -> None:
        pass


class LandscapeMonitor(Detector):
    """``landscape.Monitor`` in memory; findings of severity >= warning, per rule.

    ``metrics=None`` and ``probe=False`` are today's defaults (``Monitor(model, loss_fn,
    optimizer=opt)``); a preset name passes that preset and the trial's probe batch.
    """

    def __init__(self, name: str = "default", metrics: Any = None, probe: bool = False):
        super().__init__()
        self.name, self.metrics, self.use_probe = name, metrics, probe

    def attach(self, trial):
        kwargs = {"probe": trial.probe} if self.use_probe else {}
        if self.metrics is not None:
            kwargs["metrics"] = self.metrics
        t = time.perf_counter()
        self.mon = Monitor(trial.model, trial.loss_fn, optimizer=trial.optimizer, warn=False,
                           **kwargs).start()
        self.seconds += time.perf_counter() - t

    def after_update(self, step, batch, loss, outputs):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mon.step(step, batch=batch, loss=loss, outputs=outputs)
        self.seconds += time.perf_counter() - t

    def close(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mon.close()
        warn = severity_rank("warning")
        self.alarms = [(f.step, f.rule) for f in self.mon.findings
                       if severity_rank(f.severity) >= warn]
        # every finding with its message, for reading a rule's behaviour off a saved run
        self.findings = [(f.step, f.rule, f.severity, f.message) for f in self.mon.findings]


class LossZScore(Detector):
    """Plain z-score of the loss over a trailing window (mean and standard deviation).

    Alarms when ``(loss - mean) / std >= z`` after ``min_history`` steps, or when the loss
    is not finite; rearms after ``rearm`` quiet steps (one alarm per episode).
    """

    name = "zscore"

    def __init__(self, window: int = 50, z: float = 4.0, min_history: int = 20, rearm: int = 20):
        super().__init__()
        self.window, self.z, self.min_history, self.rearm = window, z, min_history, rearm
        self.hist: deque[float] = deque(maxlen=window)
        self.quiet = rearm

    def before_update(self, step, loss):
        t = time.perf_counter()
        fire = not math.isfinite(loss)
        if not fire and len(self.hist) >= self.min_history:
            mean = statistics.fmean(self.hist)
            std = statistics.pstdev(self.hist, mean)
            fire = loss - mean >= self.z * max(std, 1e-12)
        if fire:
            if self.quiet >= self.rearm:
                self.alarms.append((step, "zscore"))
            self.quiet = 0
        else:
            self.quiet += 1
        if math.isfinite(loss):
            self.hist.append(loss)
        self.seconds += time.perf_counter() - t


class Trainscope(Detector):
    """trainscope's ``TrainScope`` with its default config (CUSUM change-point detector),
    ``step(loss)`` between backward and the optimizer step, as its README says. A returned
    spike is an alarm; alarms less than ``rearm`` steps apart form one episode (one alarm,
    :func:`episodes`; the raw steps are kept in ``raw_alarms``). Files go to a temporary
    directory."""

    name = "trainscope"
    rearm = 20

    def attach(self, trial):
        if trainscope is None:
            raise RuntimeError("trainscope is not installed (pip install trainscope)")
        self.tmp = tempfile.TemporaryDirectory()
        t = time.perf_counter()
        cfg = trainscope.TrainScopeConfig(run_dir=self.tmp.name)
        self.scope = trainscope.TrainScope(trial.model, trial.optimizer, config=cfg).attach()
        self.seconds += time.perf_counter() - t

    def before_update(self, step, loss):
        t = time.perf_counter()
        spike = self.scope.step(loss, batch_index=step)
        if spike:
            self.alarms.append((step, "trainscope"))
        self.seconds += time.perf_counter() - t

    def close(self):
        self.scope.detach()
        self.tmp.cleanup()
        self.raw_alarms = [s for s, _ in self.alarms]
        self.alarms = [(s, "trainscope") for s in episodes(self.raw_alarms, self.rearm)]


def available() -> dict[str, str | None]:
    """Detector name -> ``None`` if usable, else why not."""
    return {"default": None, "cheap": None, "standard": None, "full": None, "zscore": None,
            "trainscope": None if trainscope is not None else "not installed"}


def make(name: str) -> Detector:
    """A fresh detector by name: default, cheap, standard, full, zscore, trainscope."""
    if name == "default":
        return LandscapeMonitor("default")
    if name in ("cheap", "standard", "full"):
        return LandscapeMonitor(name, metrics=name, probe=name != "cheap")
    if name == "zscore":
        return LossZScore()
    if name == "trainscope":
        return Trainscope()
    raise ValueError(f"unknown detector {name!r}")
