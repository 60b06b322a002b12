"""The built-in demonstration behind ``landscape demo``.

An MLP learns a synthetic 8-class problem (Gaussian clusters, generated locally and seeded:
no downloads) with SGD + momentum under the :class:`~landscape.Monitor`. At ``spike_step``
the learning rate jumps by ``spike_factor``, past the edge of stability: the Taylor-ratio
and edge-of-stability alarms fire, then the loss blows up. Afterwards the demo evaluates a
filter-normalized 2-D loss surface around the last pre-spike weights, writes the timeline
plots, the surface contour and a self-contained HTML report next to ``run.h5``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from landscape.findings import Finding
from landscape.metrics import preset
from landscape.monitor import Monitor
from landscape.store import Run, RunWriter

__all__ = ["DemoResult", "demo_model", "run_demo", "synthetic_blobs"]


@dataclass
class DemoResult:
    """What the demo wrote and found."""

    run_path: Path
    final_loss: float
    steps: int
    spike_step: int
    findings: list[Finding]
    blowup_step: int | None
    leads: dict[str, int | None]
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


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
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, classes),
        )


def _metrics():
    return preset(
        "standard",
        logits="every(5)",
        taylor_radius="every(2)",
        spectral_alignment="every(5)",
        top_eigenvalues="every(10)",
        sharpness="every(10)",
        representation="every(20)",
        collapse="every(40)",
        hessian_trace="every(40)",
    )


def run_demo(
    out_dir: str | Path,
    *,
    steps: int = 250,
    lr: float = 0.05,
    spike_step: int = 150,
    spike_factor: float = 40.0,
    seed: int = 0,
    surface_steps: int = 21,
    blowup_factor: float = 3.0,
    progress: bool = True,
    on_finding: Callable[[Finding], None] | None = None,
) -> DemoResult:
    """Train the demo model with the monitor, then write the surface, plots and report.

    The loss "blows up" at the first step after the spike where it exceeds ``blowup_factor``
    times its pre-spike median (the demo's 8-class loss saturates near log 8, about 4x its
    pre-spike level, so the 10x criterion of the early-warning example would never trigger).
    """
    from tqdm.auto import tqdm

    from landscape import alarms

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    all_inputs, all_labels = synthetic_blobs(n=1024 + 256, seed=seed)
    inputs, labels = all_inputs[:1024], all_labels[:1024]
    probe = (all_inputs[1024:], all_labels[1024:])  # held out, same distribution
    model = demo_model(seed=seed)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = {"demo": True, "lr": lr, "spike_step": spike_step, "spike_factor": spike_factor,
              "seed": seed}
    path = out / "run.h5"
    g = torch.Generator().manual_seed(seed)
    pre_spike: dict[str, torch.Tensor] | None = None
    loss = torch.zeros(())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # findings are collected and printed by the caller
        with Monitor(model, loss_fn, str(path), optimizer=opt, metrics=_metrics(), probe=probe,
                     config=config, mode="w", on_finding=on_finding) as mon:
            for step in tqdm(range(steps), desc="training", unit="step", disable=not progress):
                if step == spike_step:
                    pre_spike = {k: v.clone() for k, v in model.state_dict().items()}
                for group in opt.param_groups:
                    group["lr"] = lr * (spike_factor if step >= spike_step else 1.0)
                idx = torch.randint(0, inputs.shape[0], (128,), generator=g)
                x, y = inputs[idx], labels[idx]
                out_logits = model(x)
                loss = loss_fn(out_logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss, outputs=out_logits)
            findings = list(mon.findings)
            timings = dict(mon.timings)
        files = _pictures(path, out, model, pre_spike, loss_fn, probe, surface_steps, progress)
    with Run.open(path) as run:
        blowup, leads = alarms.warning_leads(run, findings, after=spike_step,
                                             factor=blowup_factor)
    return DemoResult(path, float(loss.item()), steps, spike_step, findings, blowup, leads,
                      files, timings)


def _pictures(path, out, model, pre_spike, loss_fn, probe, surface_steps, progress):
    """The surface around the pre-spike weights, the timelines, the contour and the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from landscape import surface
    from landscape.plotting import surfaces as surface_plots
    from landscape.plotting import timelines
    from landscape.report import write_report

    files: list[Path] = []
    if pre_spike is not None and surface_steps > 1:
        before = demo_model()
        before.load_state_dict(pre_spike)
        with RunWriter(path) as writer:
            surface.plane(before, loss_fn, probe, steps=surface_steps, span=1.0, writer=writer,
                          name="pre_spike_plane", progress=progress)
    with Run.open(path) as run:
        for metric_name in ("loss", "sharpness", "taylor_radius", "spectral_alignment"):
            if metric_name in run.metrics():
                fig = timelines.timeline(run, metric_name, log=metric_name == "loss")
                files.append(timelines.save_figure(fig, out / f"{metric_name}.png"))
                plt.close(fig)
        if "pre_spike_plane" in run.surfaces():
            fig = surface_plots.contour(run.surface("pre_spike_plane"), filled=True)
            fig.savefig(out / "surface.png", dpi=110)
            plt.close(fig)
            files.append(out / "surface.png")
        files.append(write_report(run, out / "report.html", title="landscape demo"))
    return files
