"""Edge of stability: full-batch gradient descent sharpens until lambda_max reaches 2/lr.

Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks Typically Occurs
at the Edge of Stability", ICLR 2021 (arXiv:2103.00065). With a fixed learning rate lr,
the top Hessian eigenvalue (the *sharpness*) of a network trained by full-batch gradient
descent first rises (progressive sharpening) and then stops at, and hovers around, the
linear-stability limit 2/lr, while the loss keeps decreasing non-monotonically.

This script trains a two-hidden-layer tanh MLP on a synthetic regression problem
(y = sin(3 x_0) + x_1 x_2 on Gaussian inputs, generated locally: no downloads) with plain
full-batch GD and mean-squared error. The :class:`landscape.Monitor` records the loss at
every step and the ``sharpness`` metric (lambda_max by warm-started Lanczos on the full
batch, its threshold 2/lr for plain SGD, and their ratio) every few steps; the
``edge_of_stability`` rule reports the edge as an ``info`` finding when the ratio reaches 0.9
(hovering there is healthy; it warns only far past the edge, at ratio 12). Files written into
``--out``:

* ``run.h5``: the run file (``landscape report OUT/run.h5`` renders it);
* ``sharpness.png``: the ``sharpness`` timeline (lambda_max, threshold 2/lr, ratio) with
  the findings marked, drawn by :func:`landscape.plotting.timelines.timeline`;
* ``edge_of_stability.png``: loss and sharpness against the step with 2/lr dashed;
* ``summary.json``: the numbers printed at the end.

    python examples/edge_of_stability.py --out eos-out      # 800 steps, about 10 s
    python examples/edge_of_stability.py --small            # a few seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import landscape as ls
from landscape.plotting.timelines import new_figure, save_figure, timeline


def make_data(n: int, dim: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``(n, dim)`` and targets ``sin(3 x_0) + x_1 x_2`` of shape ``(n, 1)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.sin(3 * x[:, :1]) + x[:, 1:2] * x[:, 2:3]
    return x, y


def make_model(dim: int = 10, width: int = 64, seed: int = 0) -> nn.Module:
    """A tanh MLP with two hidden layers (PyTorch's default initialisation)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
    )


def plot(run: ls.Run, lr: float, path: Path) -> Path:
    """Loss (log scale) and sharpness against the step, with the limit 2/lr dashed."""
    fig = new_figure(8.0, 5.5)
    ax_loss, ax_sharp = fig.subplots(2, 1, sharex=True)
    steps, loss = run.series("loss", "value")
    ax_loss.plot(steps, loss, color="#444444", lw=1)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (MSE)")
    ax_loss.grid(True, alpha=0.3)
    s, lam = run.series("sharpness", "lambda_max")
    ax_sharp.plot(s, lam, marker=".", color="#1f77b4", label=r"sharpness $\lambda_{max}$")
    ax_sharp.axhline(2 / lr, color="#d62728", ls="--", label=f"2/lr = {2 / lr:g}")
    eos = [f.step for f in run.findings() if f.rule == "edge_of_stability"]
    if eos:
        ax_sharp.axvline(eos[0], color="#ff7f0e", lw=1, label=f"edge_of_stability @ {eos[0]}")
    ax_sharp.set_ylabel("sharpness")
    ax_sharp.set_xlabel("step (full-batch gradient descent)")
    ax_sharp.legend(loc="lower right", fontsize="small")
    ax_sharp.grid(True, alpha=0.3)
    fig.suptitle(f"Edge of stability (Cohen et al. 2021): tanh MLP, GD, lr = {lr:g}")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="eos-out", help="directory for the run and the plots")
    parser.add_argument("--small", action="store_true", help="reduced size (CI smoke test)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (0.05; small 0.1)")
    parser.add_argument("--steps", type=int, default=None, help="GD steps (800; small 120)")
    parser.add_argument("--every", type=int, default=None,
                        help="sharpness every N steps (10; small 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for models this small)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, width = (128, 32) if args.small else (512, 64)
    lr = args.lr or (0.1 if args.small else 0.05)
    steps = args.steps or (120 if args.small else 800)
    every = args.every or (8 if args.small else 10)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x, y = make_data(n, seed=args.seed)
    model = make_model(width=width, seed=args.seed)
    loss_fn = nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # plain GD: threshold 2/lr
    metrics = [ls.metrics.Loss(), ls.metrics.Sharpness(schedule=every)]
    config = {"example": "edge_of_stability", "lr": lr, "n": n, "width": width}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.InstabilityWarning)  # printed below instead
        with ls.Monitor(model, loss_fn, str(out / "run.h5"), optimizer=opt, metrics=metrics,
                        probe=(x, y), config=config, mode="w") as mon:
            for step in range(steps):
                loss = loss_fn(model(x), y)  # the full batch: gradient descent
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
            findings = list(mon.findings)

    with ls.Run.open(out / "run.h5") as run:
        s, lam = run.series("sharpness", "lambda_max")
        _, loss_values = run.series("loss", "value")
        fig = timeline(run, "sharpness")
        files = [save_figure(fig, out / "sharpness.png"),
                 plot(run, lr, out / "edge_of_stability.png")]
    tail = lam[len(lam) // 2:]  # the second half of training: hovering at 2/lr
    eos = [f for f in findings if f.rule == "edge_of_stability"]
    first = eos[0] if eos else None
    summary = {
        "lr": lr,
        "threshold": 2 / lr,
        "steps": steps,
        "sharpness_initial": float(lam[0]),
        "sharpness_max": float(np.nanmax(lam)),
        "sharpness_second_half_median": float(np.nanmedian(tail)),
        "ratio_second_half_median": float(np.nanmedian(tail) * lr / 2),
        "ratio_second_half_range": [float(np.nanmin(tail) * lr / 2),
                                    float(np.nanmax(tail) * lr / 2)],
        "loss_initial": float(loss_values[0]),
        "loss_final": float(loss_values[-1]),
        "eos_first_step": None if first is None else first.step,
        "eos_first_severity": None if first is None else first.severity,
        "findings": [f.describe() for f in eos],
        "files": [str(p) for p in [out / "run.h5", *files]],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"full-batch GD, lr = {lr:g}: stability threshold 2/lr = {2 / lr:g}")
    print("step  sharpness  ratio")
    for st, v in list(zip(s, lam))[:: max(1, len(s) // 16)]:
        print(f"{int(st):4d}  {v:9.2f}  {v * lr / 2:5.2f}")
    print(f"sharpness: {summary['sharpness_initial']:.2f} at step 0, max "
          f"{summary['sharpness_max']:.2f}, median over the second half "
          f"{summary['sharpness_second_half_median']:.2f} (ratio "
          f"{summary['ratio_second_half_median']:.2f})")
    print(f"loss: {summary['loss_initial']:.4f} -> {summary['loss_final']:.4f}")
    print("edge-of-stability findings:" if eos else "no edge-of-stability finding")
    for f in eos:
        print("  " + f.describe())
    print("wrote " + ", ".join(summary["files"]))
    return summary


if __name__ == "__main__":
    main()
