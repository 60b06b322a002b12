"""Neural collapse in the terminal phase of training (NC1–NC4 and the VCI over epochs).

Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep
learning training", PNAS 2020 (arXiv:2008.08186): training past zero training error, the
last-layer features of each class collapse to their class mean (NC1), the class means form
a simplex equiangular tight frame (NC2), the classifier rows align with them (NC3), and the
classifier becomes the nearest-class-centre rule (NC4). Xu & Liu (ICML 2023,
arXiv:2306.03440) summarise the collapse by the variability-collapse index VCI (0 = fully
collapsed along the label-relevant directions).

A four-layer ReLU MLP classifies 6 Gaussian classes in 20 dimensions (generated locally:
no downloads) with SGD + momentum (lr 0.05) and weight decay (5e-3, which keeps the
collapse going: without it the loss vanishes and the features freeze), for 300 epochs,
nearly all of them past zero training error. The
:class:`landscape.Monitor` records, once per epoch, the training loss and the ``collapse``
metric on the whole training set (the penultimate features are the input of the last
``nn.Linear``, captured by a forward hook that exists only during the measurement).
Files written into ``--out``: ``run.h5``, ``neural_collapse.png`` (every index against the
epoch on log axes, the terminal phase shaded), ``summary.json``.

    python examples/neural_collapse.py --out nc-out      # 300 epochs, about a minute
    python examples/neural_collapse.py --small           # seconds (CI smoke test)
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
from landscape.plotting.timelines import new_figure, save_figure

FIELDS = ("nc1", "nc2_equinorm", "nc2_equiangular", "nc2_etf", "nc3", "nc4", "vci")
LABELS = {
    "nc1": r"NC1  Tr($\Sigma_W \Sigma_B^+$)/C",
    "nc2_equinorm": "NC2  equinorm (CoV of class-mean norms)",
    "nc2_equiangular": "NC2  equiangular (std of cosines)",
    "nc2_etf": "NC2  distance to the simplex ETF",
    "nc3": "NC3  classifier vs. class means (self-duality)",
    "nc4": "NC4  NCC mismatch",
    "vci": "VCI",
}


def make_data(n_per_class: int, classes: int = 6, dim: int = 20, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes around random centres (separable with a few margin violations)."""
    g = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    inputs = centres[labels] + torch.randn(len(labels), dim, generator=g)
    return inputs, labels


def make_model(dim: int = 20, width: int = 128, features: int = 32, classes: int = 6,
               seed: int = 0) -> nn.Module:
    """MLP whose last ``nn.Linear`` reads ``features``-dimensional ReLU features."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, features), nn.ReLU(), nn.Linear(features, classes),
    )


def plot(epochs: np.ndarray, table: dict[str, np.ndarray], error: np.ndarray,
         tpt: int | None, path: Path) -> Path:
    """Every collapse index on a log axis, and the training error, against the epoch."""
    fig = new_figure(9.0, 7.0)
    ax, ax_err = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for name in FIELDS:
        v = np.where(table[name] > 0, table[name], np.nan)  # NC4 = 0 cannot be drawn on log
        zeros = " (zeros not drawn)" if (table[name] == 0).any() else ""
        ax.plot(epochs, v, label=LABELS[name] + zeros, lw=1.5)
    ax.set_yscale("log")
    ax.set_ylabel("collapse index (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="lower left")
    ax_err.plot(epochs, error, color="#444444")
    ax_err.set_ylabel("training error")
    ax_err.set_xlabel("epoch")
    ax_err.grid(True, alpha=0.3)
    if tpt is not None:
        for a in (ax, ax_err):
            a.axvspan(tpt, epochs[-1], color="#2ca02c", alpha=0.08)
        ax.text(tpt, ax.get_ylim()[1], " terminal phase (zero training error)", va="top",
                fontsize="small", color="#2ca02c")
    fig.suptitle("Neural collapse (Papyan et al. 2020) and VCI (Xu & Liu 2023)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="nc-out", help="directory for the run and the plot")
    parser.add_argument("--small", action="store_true", help="reduced size (CI smoke test)")
    parser.add_argument("--epochs", type=int, default=None, help="(300; small 60)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for models this small)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    epochs = args.epochs or (60 if args.small else 300)
    n_per_class = 40 if args.small else 100
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    x, y = make_data(n_per_class, seed=args.seed)
    model = make_model(seed=args.seed)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          weight_decay=args.weight_decay)
    g = torch.Generator().manual_seed(args.seed)
    metrics = [ls.metrics.Loss(), ls.metrics.Collapse(schedule=1)]
    errors = []  # training error of the whole training set at each recorded epoch

    def train_error() -> float:
        with torch.no_grad():
            return float((model(x).argmax(1) != y).float().mean())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.InstabilityWarning)
        with ls.Monitor(model, loss_fn, str(out / "run.h5"), optimizer=opt, metrics=metrics,
                        probe=(x, y), mode="w",
                        config={"example": "neural_collapse", "epochs": epochs}) as mon:
            with torch.no_grad():
                mon.step(0, loss=float(loss_fn(model(x), y)))  # at initialisation
            errors.append(train_error())
            for epoch in range(1, epochs + 1):
                total = 0.0
                for idx in torch.randperm(len(y), generator=g).split(32):
                    loss = loss_fn(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                # one monitor step per epoch: the collapse metric runs on the probe (the
                # whole training set) with the weights at the end of the epoch
                mon.step(epoch, loss=total / len(y))
                errors.append(train_error())

    with ls.Run.open(out / "run.h5") as run:
        ep, _ = run.series("collapse", "nc1")
        table = {f: np.asarray(run.series("collapse", f)[1], dtype=np.float64) for f in FIELDS}
        _, train_loss = run.series("loss", "value")
    final_error = errors[-1]
    err = np.asarray(errors)
    zero = np.flatnonzero(err == 0)
    tpt = int(ep[zero[0]]) if len(zero) else None  # first epoch without a training mistake
    files = [out / "run.h5", plot(ep, table, err, tpt, out / "neural_collapse.png")]

    summary = {
        "epochs": epochs,
        "terminal_phase_epoch": tpt,
        "final_train_error": final_error,
        "final_train_loss": float(train_loss[-1]),
        "first": {f: float(table[f][0]) for f in FIELDS},
        "at_terminal_phase": None if tpt is None else
        {f: float(table[f][zero[0]]) for f in FIELDS},
        "last": {f: float(table[f][-1]) for f in FIELDS},
        "files": [str(p) for p in files],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = sorted({0, len(ep) - 1, *np.linspace(0, len(ep) - 1, 8).astype(int).tolist()})
    print(f"{'epoch':>5} {'train err':>9} {'loss':>8} "
          + " ".join(f"{f:>15}" for f in FIELDS))
    for i in rows:
        print(f"{int(ep[i]):5d} {err[i]:9.4f} {train_loss[i]:8.4f} "
              + " ".join(f"{table[f][i]:15.4g}" for f in FIELDS))
    print("terminal phase (zero training error) from epoch "
          + ("-" if tpt is None else str(tpt)))
    print("wrote " + ", ".join(summary["files"]))
    return summary


if __name__ == "__main__":
    main()
