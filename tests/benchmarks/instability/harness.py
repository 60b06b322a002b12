"""The training loop, onset / explosion detection and the per-detector statistics."""

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


def onset_explosion(losses: list[float], scenario: Scenario) -> tuple[float, int | None,
                                                                        int | None]:
    """``(baseline, onset, explosion)`` from the recorded training losses.

    baseline: median loss over the ``baseline_window`` steps before the intervention.
    onset: first step >= the intervention from which the loss stays >= 1.25x baseline for
    3 steps (or the run ends), or is not finite. explosion: first step >= the intervention
    with loss >= 10x baseline or not finite. ``None``: never.
    """
    s0 = scenario.intervention
    if len(losses) <= s0:  # a run shorter than the intervention (timing runs)
        return math.nan, None, None
    base = float(np.median(losses[max(0, s0 - scenario.baseline_window):s0]))
    onset = explosion = None
    for s in range(s0, len(losses)):
        v = losses[s]
        bad = not math.isfinite(v)
        if explosion is None and (bad or v >= EXPLOSION * base):
            explosion = s
        if onset is None:
            window = losses[s:s + SUSTAIN]
            if bad or all((not math.isfinite(w)) or w >= ONSET * base for w in window):
                onset = s
        if onset is not None and explosion is not None:
            break
    if explosion is not None and (onset is None or onset > explosion):
        onset = explosion  # a loss that reaches 10x has passed 1.25x
    return base, onset, explosion


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
            s0 = scenario.intervention
            base = float(np.median(losses[max(0, s0 - scenario.baseline_window):s0]))
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
    and between warm-up and the intervention on the treatment arm.
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
