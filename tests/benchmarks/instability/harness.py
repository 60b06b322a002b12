"""The training loop, onset / explosion detection and the per-detector statistics.

Onset and explosion are read from the training loss (the issue's definitions): the
baseline is the median loss over the 50 steps before the intervention; the onset is the
first step from the intervention on from which the loss stays >= 1.25x baseline for 3
steps, and, for a treatment run, also >= 1.25x its matched control's loss at the same
steps (:func:`onset_step`: both arms are bitwise identical until the intervention acts, so
a rise the control shares is noise, not the intervention's effect); the explosion is the
first step with loss >= 10x baseline or not finite (baseline alone). :func:`train` returns
the baseline-only onset of one run; :func:`pair_onsets` replaces it by the paired one
once both arms of a seed have run.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import torch

from . import detectors as det
from .scenarios import Scenario

ONSET, EXPLOSION, SUSTAIN = 1.25, 10.0, 3


def baseline(losses: list[float], scenario: Scenario) -> float:
    """Median training loss over the ``baseline_window`` steps before the intervention.

    Args:
        losses: the run's training loss per step.
        scenario: gives the intervention step and the window.

    Returns:
        The baseline (NaN for a run that stops before the intervention).
    """
    s0 = scenario.intervention
    if len(losses) <= s0:
        return math.nan
    return float(np.median(losses[max(0, s0 - scenario.baseline_window):s0]))


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _raised(losses: list[float], s: int, base: float,
            control: list[float] | None) -> bool:
    """Step ``s`` is above the onset level: loss >= 1.25x baseline and, with a matched
    control that has step ``s``, >= 1.25x the control's loss there; or not finite."""
    v = losses[s]
    if not _finite(v):
        return True
    if v < ONSET * base:
        return False
    if control is None or s >= len(control):
        return True
    c = control[s]
    return _finite(c) and v >= ONSET * c


def onset_step(losses: list[float], base: float, start: int,
               control: list[float] | None = None) -> int | None:
    """First step >= ``start`` from which the loss stays raised for ``SUSTAIN`` steps.

    The issue's onset is the primary condition: the loss is >= 1.25x ``base`` (or not
    finite) on ``SUSTAIN`` (3) consecutive steps, or until the run ends. With the matched
    control's losses (same seed, same initialisation and batches, bitwise identical to the
    treatment until the intervention acts), each of those steps must also be >= 1.25x the
    control's loss at the same step: the control is the run's counterfactual without the
    intervention, so a rise that the control shares (minibatch noise on a near-zero loss)
    is not the intervention's effect and is not an onset. The 1.25 factor is the same
    for both conditions: the treatment is 25 % above where it started and 25 % above
    where it would be without the intervention. A control step that is missing (the
    control ran shorter) adds no condition; a non-finite control loss is never exceeded.

    Args:
        losses: the run's training loss per step (None or NaN: not finite).
        base: the baseline loss (:func:`baseline`).
        start: the first step considered (the intervention).
        control: the matched control's losses, or None for the baseline condition alone.

    Returns:
        The onset step, or None.
    """
    for s in range(start, len(losses)):
        if all(_raised(losses, w, base, control)
               for w in range(s, min(s + SUSTAIN, len(losses)))):
            return s
    return None


def explosion_step(losses: list[float], base: float, start: int) -> int | None:
    """First step >= ``start`` with loss >= 10x ``base`` or not finite (None: never)."""
    return next((s for s in range(start, len(losses))
                 if not _finite(losses[s]) or losses[s] >= EXPLOSION * base), None)


def onset_explosion(losses: list[float], scenario: Scenario,
                    control: list[float] | None = None) -> tuple[float, int | None,
                                                                 int | None]:
    """``(baseline, onset, explosion)`` from the recorded training losses.

    baseline: :func:`baseline`. onset: :func:`onset_step` from the intervention, against
    the matched ``control``'s losses when given. explosion: :func:`explosion_step` (the
    baseline alone: a 10x loss is the intervention's effect whatever the control does).
    An onset after the explosion is moved to it (a loss that reaches 10x has passed
    1.25x). ``None``: never.
    """
    base = baseline(losses, scenario)
    if math.isnan(base):  # a run shorter than the intervention (timing runs)
        return base, None, None
    s0 = scenario.intervention
    onset = onset_step(losses, base, s0, control)
    explosion = explosion_step(losses, base, s0)
    if explosion is not None and (onset is None or onset > explosion):
        onset = explosion
    return base, onset, explosion


def pair_onsets(scenario: Scenario, runs: list[dict[str, Any]]) -> None:
    """Set each run's ``onset`` against its matched arm (same seed), in place.

    A treatment's onset is :func:`onset_explosion` with its control's losses; a control
    is its own counterfactual, so its onset is None unless its loss is not finite. Every
    run keeps the baseline-only onset as ``onset_alone``. Losses stored as None (JSON)
    count as not finite.
    """
    arms = {(r["seed"], r["treated"]): r for r in runs}
    for r in runs:
        own = [math.nan if v is None else v for v in r["losses"]]
        match = arms.get((r["seed"], False))
        ctrl = None if match is None else [math.nan if v is None else v
                                           for v in match["losses"]]
        r["onset_alone"] = onset_explosion(own, scenario)[1]
        r["onset"] = onset_explosion(own, scenario, ctrl if r["treated"] else own)[1]


def train(scenario: Scenario, seed: int, treated: bool, detector_names: list[str],
          *, tail: int = 5, steps: int | None = None) -> dict[str, Any]:
    """One run with every detector attached; stops ``tail`` steps after the explosion.

    The detectors never change training (landscape's monitor is bitwise neutral on CPU;
    the z-score and trainscope only read), so one run serves them all.
    """
    trial = scenario.build(seed, treated)
    dets = [det.make(n) for n in detector_names]
    for d in dets:
        d.attach(trial)
    model, opt = trial.model, trial.optimizer
    losses: list[float] = []
    explosion = None
    n = steps or scenario.steps
    t_train = 0.0
    for step in range(n):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = trial.lr(step)
        x, y = trial.batch(step)
        with trial.autocast():
            out = model(x)
        loss = trial.loss_fn(out, y)
        objective = trial.objective(out, y) if trial.objective else loss
        opt.zero_grad(set_to_none=True)
        if trial.loss_scale is not None:  # scaled backward, unscaled grads, no inf check
            scale = trial.loss_scale(step)
            (objective * scale).backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.div_(scale)
        else:
            objective.backward()
        value = float(loss.detach())
        t_train += time.perf_counter() - t0
        for d in dets:
            d.before_update(step, value)
        t0 = time.perf_counter()
        opt.step()
        t_train += time.perf_counter() - t0
        for d in dets:
            d.after_update(step, (x, y), loss.detach(), out.detach())
        losses.append(value)
        if explosion is None and step >= scenario.intervention:
            base = baseline(losses, scenario)
            if not math.isfinite(value) or value >= EXPLOSION * base:
                explosion = step
        if explosion is not None and step >= explosion + tail:
            break
    for d in dets:
        d.close()
    base, onset, expl = onset_explosion(losses, scenario)
    return {"scenario": scenario.name, "seed": seed, "treated": treated, "steps": len(losses),
            "baseline": base, "onset": onset, "explosion": expl, "losses": losses,
            "train_ms": 1000 * t_train / len(losses),
            "detectors": {d.name: {"alarms": d.alarms,
                                   "raw_alarms": getattr(d, "raw_alarms", None),
                                   "findings": getattr(d, "findings", None),
                                   "ms_per_step": 1000 * d.seconds / len(losses)}
                          for d in dets}}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarise(scenario: Scenario, runs: list[dict[str, Any]], detector: str,
              rule: str | None = None) -> dict[str, Any]:
    """Statistics of one detector (or one of its rules) over a scenario's runs.

    Detection: the first alarm at a step in [intervention, explosion] (the end of the run
    without one) that the matched control does not raise at the same step; trainscope's
    raw spikes count here. False alarms: alarm episodes (trainscope's raw spikes less than
    20 steps apart are one) on the controls from the end of warm-up, in warm-up (both arms),
    and between warm-up and the intervention on the treatment arm. Leads are measured
    to each run's ``onset`` and ``explosion`` as stored (after :func:`pair_onsets`, the
    onset against the matched control).
    """
    s0, warm = scenario.intervention, scenario.warmup
    treated = [r for r in runs if r["treated"]]
    controls = [r for r in runs if not r["treated"]]

    def pairs(run, raw=False):
        d = run["detectors"][detector]
        if raw and d.get("raw_alarms") is not None:  # trainscope: every spike it returned
            return sorted((s, detector) for s in d["raw_alarms"])
        return sorted((s, rl) for s, rl in d["alarms"] if rule is None or rl == rule)

    def alarms(run):
        return [s for s, _ in pairs(run)]

    detected = before_onset = 0
    lead_onset, lead_expl = [], []
    for r in treated:
        end = r["explosion"] if r["explosion"] is not None else r["steps"] - 1
        # an alarm the matched control also raises at that step is not caused by the
        # intervention (a falling-loss alarm that happens to land after it)
        ctrl = next((c for c in controls if c["seed"] == r["seed"]), None)
        in_ctrl = {tuple(p) for p in pairs(ctrl, raw=True)} if ctrl else set()
        first = next((s for s, rl in pairs(r, raw=True)
                      if s0 <= s <= end and (s, rl) not in in_ctrl), None)
        if first is None:
            continue
        detected += 1
        if r["onset"] is not None:
            lead_onset.append(r["onset"] - first)
            before_onset += first <= r["onset"]
        if r["explosion"] is not None:
            lead_expl.append(r["explosion"] - first)
    ctrl_steps = sum(r["steps"] - warm for r in controls)
    ctrl_alarms = sum(sum(1 for s in alarms(r) if s >= warm) for r in controls)
    warm_steps = warm * len(runs)
    warm_alarms = sum(sum(1 for s in alarms(r) if s < warm) for r in runs)
    pre_steps = sum(s0 - warm for r in treated)
    pre_alarms = sum(sum(1 for s in alarms(r) if warm <= s < s0) for r in treated)
    n = len(treated)
    return {
        "scenario": scenario.name, "detector": detector, "rule": rule or "any",
        "seeds": n,
        "exploded": sum(r["explosion"] is not None for r in treated),
        "detection_rate": detected / n if n else None,
        "before_onset_rate": before_onset / n if n else None,
        "median_lead_onset": _median(lead_onset),
        "median_lead_explosion": _median(lead_expl),
        "fa_per_1k_control": 1000 * ctrl_alarms / ctrl_steps if ctrl_steps else None,
        "fa_per_1k_warmup": 1000 * warm_alarms / warm_steps if warm_steps else None,
        "fa_per_1k_pre_intervention": 1000 * pre_alarms / pre_steps if pre_steps else None,
        "control_alarms": ctrl_alarms, "warmup_alarms": warm_alarms,
        # time inside the detector's calls, per step, over the training step's own time
        # (excludes work the monitor does inside optimizer.step, see ``overhead``)
        "call_ms": _median([r["detectors"][detector]["ms_per_step"] for r in runs]),
        "call_fraction": _median([r["detectors"][detector]["ms_per_step"] / r["train_ms"]
                                  for r in runs]),
    }


def overhead(scenario: Scenario, detector_names: list[str], *, steps: int = 60,
             repeats: int = 3, seed: int = 0) -> dict[str, dict[str, float]]:
    """End-to-end ms/step of the control run, plain and with each detector alone,
    interleaved (the order reverses every repeat); medians and overhead vs plain."""
    variants = ["plain", *detector_names]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            names = [] if v == "plain" else [v]
            t0 = time.perf_counter()
            train(scenario, seed, False, names, steps=steps)
            times[v].append(1000 * (time.perf_counter() - t0) / steps)
    plain = statistics.median(times["plain"])
    return {v: {"ms_per_step": statistics.median(ts),
                "overhead": statistics.median(ts) / plain - 1} for v, ts in times.items()}
