"""The built-in demonstration behind ``landscape demo``: a warning before the loss moves.

An MLP learns a synthetic 8-class problem (Gaussian clusters, generated locally and seeded:
no downloads) with SGD + momentum under the **default** :class:`~landscape.Monitor`
(``Monitor(model, loss_fn, path, optimizer=opt)``: no ``metrics=``, no ``probe=``). From
``ramp_step`` the learning rate grows geometrically, ``ramp_factor`` times over
``ramp_steps`` steps (a mis-set schedule, a warm-up that never ends): a gradual
instability, unlike an abrupt spike where every detector fires at the same step. The
every-step sentinels see the step outgrow the weights (the ``taylor_forecast`` rule:
update-to-weight ratio, secant Taylor ratio; docs/alarms.md) while the loss is still within
its noise, then the loss rises and explodes. The demo measures the lead as the instability
suite does (tests/benchmarks/instability, docs/benchmarks.md): the loss onset is the first
step from which the loss stays >= 1.25x its baseline (the median of the 50 steps before
the ramp) for 3 steps, the explosion the first step >= 10x or not finite.

Afterwards it evaluates a filter-normalized 2-D loss surface (Li et al. 2018,
arXiv:1712.09913) around the last pre-ramp weights on held-out data, and writes the
timeline plots, the lead picture, the surface contour and a self-contained HTML report
next to ``run.h5``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from landscape._errors import LandscapeError
from landscape.alarms.leads import EXPLOSION, EarlyWarning, early_warning, rule_leads
from landscape.findings import Finding
from landscape.monitor import Monitor
from landscape.monitor.probe import PROBE_NOTE
from landscape.store import Run, RunWriter

__all__ = [
    "DemoResult",
    "demo_model",
    "ramp_lr",
    "run_demo",
    "synthetic_blobs",
]

@dataclass
class DemoResult:
    """What the demo wrote and found.

    ``spike_step`` is the first step of the learning-rate change (the ramp's start; the
    name is kept from the demo's learning-rate spike), ``blowup_step`` the explosion (10x
    the baseline or not finite) and ``leads`` each rule's lead before it in steps (``None``:
    after it). ``warning`` holds the lead of the first warning (:class:`EarlyWarning`).
    """

    run_path: Path
    final_loss: float
    steps: int
    spike_step: int
    findings: list[Finding]
    blowup_step: int | None
    leads: dict[str, int | None]
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    ramp_steps: int = 1
    ramp_factor: float = 1.0
    warning: EarlyWarning | None = None

    @property
    def ramp_step(self) -> int:
        """The first step of the learning-rate ramp (the same as ``spike_step``)."""
        return self.spike_step


def synthetic_blobs(
    n: int = 1024, dim: int = 32, classes: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random centres: inputs ``(n, dim)`` and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.6 * torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    inputs = centres[labels] + torch.randn(n, dim, generator=g)
    noisy = torch.rand(n, generator=g) < 0.1  # 10% label noise keeps the loss away from 0
    labels = torch.where(noisy, torch.randint(0, classes, (n,), generator=g), labels)
    return inputs, labels


def demo_model(dim: int = 32, hidden: int = 64, classes: int = 8, seed: int = 0) -> nn.Module:
    """A two-hidden-layer tanh MLP (about 7k parameters)."""
    # a CPU model: the CPU generator alone (torch.manual_seed would also seed, or queue a
    # seed for, every CUDA device, which the fork does not restore)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, classes),
        )


def ramp_lr(step: int, lr: float, start: int, steps: int, factor: float) -> float:
    """A geometric learning-rate ramp from ``lr`` to ``lr * factor``.

    ``lr`` before ``start``, ``lr * factor ** (k / steps)`` at ``start + k - 1`` for
    ``k = 1..steps``, ``lr * factor`` from then on. ``steps=1`` is an abrupt jump at
    ``start``.

    Args:
        step: the training step.
        lr: the learning rate before the ramp.
        start: the first step with a raised learning rate.
        steps: how many steps the ramp takes (>= 1).
        factor: the final multiple of ``lr``.

    Returns:
        The learning rate at ``step``.
    """
    k = min(max(step - start + 1, 0), steps)
    return lr * factor ** (k / steps)


def run_demo(
    out_dir: str | Path,
    *,
    steps: int = 220,
    lr: float = 0.05,
    ramp_step: int = 150,
    ramp_steps: int = 60,
    ramp_factor: float = 1000.0,
    seed: int = 0,
    surface_steps: int = 21,
    blowup_factor: float = EXPLOSION,
    progress: bool = True,
    on_finding: Callable[[Finding], None] | None = None,
    spike_step: int | None = None,
    spike_factor: float | None = None,
    threads: int | None = 1,
) -> DemoResult:
    """Train the demo model under the default monitor, then write the surface, plots, report.

    The learning rate follows :func:`ramp_lr`. ``taylor_forecast``, the demo's first
    warning, reads its first 100 rows as early training (info only), so a ramp that starts
    before step 100 is warned about later, by the rules that read the loss itself.

    Args:
        out_dir: the directory for ``run.h5``, the pictures and ``report.html``.
        steps: training steps.
        lr: the SGD (momentum 0.9) learning rate before the ramp.
        ramp_step: the first step with a raised learning rate.
        ramp_steps: how many steps the ramp takes (1: an abrupt spike).
        ramp_factor: the learning rate's final multiple.
        seed: seeds the data, the model and the batches.
        surface_steps: grid points per axis of the surface (0 or 1: no surface).
        blowup_factor: the loss's multiple of the baseline that counts as the explosion.
        progress: show progress bars.
        on_finding: called with each finding as it is raised.
        spike_step: the demo's former name of ``ramp_step``.
        spike_factor: the former learning-rate spike: ``ramp_factor`` with ``ramp_steps=1``.
        threads: torch's CPU threads while the demo runs, restored afterwards (``None``:
            unchanged). Models this small run fastest on one; on a busy 2-core machine two
            threads made each training step 100x slower (124 ms against 1.2 ms).

    Returns:
        The :class:`DemoResult`.

    Raises:
        ValueError: ``ramp_step`` is not in ``1..steps - 1`` or ``ramp_steps`` < 1.
    """
    if threads is None:
        return _run_demo(out_dir, steps, lr, ramp_step, ramp_steps, ramp_factor, seed,
                         surface_steps, blowup_factor, progress, on_finding, spike_step,
                         spike_factor)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, steps, lr, ramp_step, ramp_steps, ramp_factor, seed,
                         surface_steps, blowup_factor, progress, on_finding, spike_step,
                         spike_factor)
    finally:
        torch.set_num_threads(previous)


def _refuse_to_replace_another_run(path: Path) -> None:
    """Refuse an output directory whose ``run.h5`` is not a demo's (a run of the user's).

    Raises:
        LandscapeError: ``path`` exists and is not the run file of an earlier demo.
    """
    if not path.exists():
        return
    try:
        with Run.open(path) as run:
            if run.config.get("demo"):
                return
    except LandscapeError:
        pass
    raise LandscapeError(f"{path}: is not the run file of an earlier demo; the demo does not "
                         "replace it: give another --out")


@contextlib.contextmanager
def _quiet_probe_note() -> Iterator[None]:
    """The monitor's note that it keeps a default probe, left out: the demo's own choice.

    Only that record: the logger's other messages pass.
    """
    log = logging.getLogger("landscape")

    def not_the_probe_note(record: logging.LogRecord) -> bool:
        return record.msg != PROBE_NOTE

    log.addFilter(not_the_probe_note)
    try:
        yield
    finally:
        log.removeFilter(not_the_probe_note)


def _run_demo(out_dir, steps, lr, ramp_step, ramp_steps, ramp_factor, seed, surface_steps,
              blowup_factor, progress, on_finding, spike_step, spike_factor) -> DemoResult:
    """:func:`run_demo` with torch's threads set."""
    from landscape._progress import bar as progress_bar

    if spike_step is not None:
        ramp_step = spike_step
    if spike_factor is not None:
        ramp_factor, ramp_steps = spike_factor, 1
    if not 0 < ramp_step < steps:
        raise ValueError(f"ramp_step must be in 1..{steps - 1}, got {ramp_step}")
    if ramp_steps < 1:
        raise ValueError(f"ramp_steps must be >= 1, got {ramp_steps}")
    out = Path(out_dir)
    if not str(out_dir).strip():
        raise ValueError("out_dir: give a directory (an empty name would write into the "
                         "current one)")
    _refuse_to_replace_another_run(out / "run.h5")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    all_inputs, all_labels = synthetic_blobs(n=1024 + 256, seed=seed)
    inputs, labels = all_inputs[:1024], all_labels[:1024]
    held_out = (all_inputs[1024:], all_labels[1024:])  # for the surface only
    model = demo_model(seed=seed)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = {"demo": True, "lr": lr, "ramp_step": ramp_step, "ramp_steps": ramp_steps,
              "ramp_factor": ramp_factor, "spike_step": ramp_step, "seed": seed}
    path = out / "run.h5"
    g = torch.Generator().manual_seed(seed)
    pre_ramp: dict[str, torch.Tensor] | None = None
    losses: list[float] = []
    with warnings.catch_warnings(), _quiet_probe_note():
        warnings.simplefilter("ignore")  # findings are collected and printed by the caller
        # the default monitor: no metrics=, no probe= (it keeps part of the first batch)
        # on_disk_full="raise": a demo has no training to protect, and a disk too full for
        # its rows stops it with that reason (with "stop" it went on and then found no rows)
        with Monitor(model, loss_fn, str(path), optimizer=opt, config=config, mode="w",
                     on_finding=on_finding, on_disk_full="raise") as mon:
            for step in progress_bar(range(steps), enabled=progress, desc="training",
                                     unit="step"):
                if step == ramp_step:
                    pre_ramp = {k: v.clone() for k, v in model.state_dict().items()}
                for group in opt.param_groups:
                    group["lr"] = ramp_lr(step, lr, ramp_step, ramp_steps, ramp_factor)
                idx = torch.randint(0, inputs.shape[0], (128,), generator=g)
                x, y = inputs[idx], labels[idx]
                out_logits = model(x)
                loss = loss_fn(out_logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss, outputs=out_logits)
                losses.append(float(loss.detach()))
            findings = list(mon.findings)
            timings = dict(mon.timings)
        warning = early_warning(losses, findings, ramp_step, explosion=blowup_factor)
        files = _pictures(path, out, pre_ramp, loss_fn, held_out, surface_steps, warning,
                          progress, ramp_steps)
    leads = rule_leads(findings, ramp_step, warning.explosion)
    return DemoResult(path, losses[-1], steps, ramp_step, findings, warning.explosion, leads,
                      files, timings, ramp_steps, ramp_factor, warning)


def plot_lead(run: Run, warning: EarlyWarning, path: Path, *, change: str = "LR ramp") -> Path:
    """The lead: the loss and the sentinels, with the ramp, warning, onset and explosion.

    Two panels share the step axis: the training loss (log scale) and the sentinels the
    default rule reads (``update_ratio``, ``r_secant``). The ramp's start, the first
    warning, the onset and the explosion are marked, the warned steps before the onset
    shaded.

    Args:
        run: the demo's run.
        warning: its :class:`EarlyWarning`.
        path: the PNG to write.
        change: what started at ``warning.start`` (``"LR jump"`` for a one-step change).

    Returns:
        ``path``.
    """
    from landscape.plotting.timelines import new_figure, save_figure

    has_sentinels = "sentinels" in run.metrics()
    fig = new_figure(9.0, 6.0 if has_sentinels else 4.5)
    axes = fig.subplots(2 if has_sentinels else 1, 1, sharex=True, squeeze=False)[:, 0]
    steps, loss = run.series("loss", "value")
    finite = np.isfinite(loss)
    axes[0].plot(steps[finite], loss[finite], color="#444444", lw=1, label="training loss")
    axes[0].axhline(warning.onset_factor * warning.baseline, color="#bbbbbb", lw=1, ls="--",
                    label=f"{warning.onset_factor:g}x baseline")
    axes[0].set_ylabel("loss")
    if has_sentinels:
        s_steps, ratio = run.series("sentinels", "update_ratio")
        _, r = run.series("sentinels", "r_secant")
        axes[1].plot(s_steps, ratio, color="#1f77b4", lw=1, label="update / weight (max)")
        axes[1].plot(s_steps, r, color="#2ca02c", lw=1, label="secant Taylor ratio r")
        axes[1].set_ylabel("sentinels")
        axes[1].set_xlabel("step")
    else:
        axes[0].set_xlabel("step")
    for i, ax in enumerate(axes):
        ax.set_yscale("log")
        ax.axvline(warning.start, color="#7f7f7f", ls=":",
                   label=f"{change} at {warning.start}" if i == 0 else None)
        if warning.first_step is not None:
            ax.axvline(warning.first_step, color="#ff7f0e", lw=2, label=(
                f"first warning @ {warning.first_step} ({warning.first_rule})" if i == 0
                else None))
        if warning.onset is not None:
            ax.axvline(warning.onset, color="#9467bd", lw=1.5, ls="--", label=(
                f"loss {warning.onset_factor:g}x baseline @ {warning.onset}" if i == 0
                else None))
        if warning.explosion is not None:
            ax.axvline(warning.explosion, color="#d62728", lw=2, label=(
                f"loss {warning.explosion_factor:g}x @ {warning.explosion}" if i == 0
                else None))
        if warning.first_step is not None and warning.onset is not None \
                and warning.first_step < warning.onset:
            ax.axvspan(warning.first_step, warning.onset, color="#ff7f0e", alpha=0.12)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    axes[0].set_xlim(max(0, warning.start - 60), steps[-1])
    lead = warning.lead_to_onset
    fig.suptitle("Early warning: " + (
        f"{lead} step{'' if lead == 1 else 's'} before the loss moved" if lead is not None
        else "no lead"))
    return save_figure(fig, path)


def _pictures(path, out, pre_ramp, loss_fn, held_out, surface_steps, warning, progress,
              ramp_steps):
    """Write the surface around the pre-ramp weights, the pictures and the report."""
    from landscape import surface
    from landscape.plotting import surfaces as surface_plots
    from landscape.plotting import timelines
    from landscape.report import write_report

    files: list[Path] = []
    if pre_ramp is not None and surface_steps > 1:
        before = demo_model()
        before.load_state_dict(pre_ramp)
        with RunWriter(path) as writer:
            surface.plane(before, loss_fn, held_out, steps=surface_steps, span=1.0,
                          writer=writer, name="pre_ramp_plane", progress=progress)
    with Run.open(path) as run:
        fig = timelines.timeline(run, "loss", log=True)
        files.append(timelines.save_figure(fig, out / "loss.png"))
        files.append(plot_lead(run, warning, out / "warning.png",
                               change="LR jump" if ramp_steps == 1 else "LR ramp"))
        if "pre_ramp_plane" in run.surfaces():
            fig = surface_plots.contour(run.surface("pre_ramp_plane"), filled=True)
            files.append(timelines.save_figure(fig, out / "surface.png", dpi=110))
        files.append(write_report(run, out / "report.html", title="landscape demo"))
    return files
