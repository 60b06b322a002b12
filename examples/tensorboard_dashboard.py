"""Watch a monitored run in TensorBoard, then open its HTML report.

A plain PyTorch loop trains a small MLP classifier with the ``standard`` preset; a
``TensorBoardMirror`` copies every scalar field (``landscape/<metric>/<field>``) and every
finding (text under ``landscape/findings`` and the scalar ``landscape/findings/count``) to
``OUT/tb`` while the run file ``OUT/run.h5`` is written. The learning rate is multiplied by
30 for a few steps near the end so that the alarms have something to say. Ctrl-C at any
point leaves ``run.h5`` with every completed step; rerunning continues it.

    python examples/tensorboard_dashboard.py --out tb-run     # 200 steps, ~30 s of CPU time
    tensorboard --logdir tb-run/tb                            # the dashboard
    landscape watch tb-run/run.h5                             # or the terminal view
    python examples/tensorboard_dashboard.py --small          # seconds (CI smoke test)

At the end it writes ``OUT/report.html`` (``landscape report OUT/run.h5 -o OUT/report.html``
does the same).
Needs ``pip install 'landscape-for-pytorch[tensorboard]'``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape.integrations.mirrors import TensorBoardMirror
from landscape.report import write_report


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    return x, y


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tb-run", help="output folder")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="a seconds-long smoke run")
    args = parser.parse_args(argv)
    if args.small:
        torch.set_num_threads(1)
    steps = args.steps or (12 if args.small else 200)
    spike = range(steps - 6, steps - 3)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path, logdir = out / "run.h5", out / "tb"

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = make_data(2048, seed=0)
    probe = make_data(128, seed=1)
    metrics = ls.metrics.preset("standard", collapse=None, hessian_trace=None)
    mirror = TensorBoardMirror(str(logdir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ls.InstabilityWarning)  # printed below instead
        with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=metrics,
                        probe=probe, mode="w", mirrors=[mirror]) as mon:
            for step in range(steps):
                for group in opt.param_groups:
                    group["lr"] = 1.5 if step in spike else 0.05
                idx = torch.randint(0, len(x), (64,), generator=torch.Generator().manual_seed(step))
                xb, yb = x[idx], y[idx]
                out_b = model(xb)
                loss = F.cross_entropy(out_b, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                for finding in mon.step(step, batch=(xb, yb), loss=loss, outputs=out_b):
                    print(f"  {finding.describe()}")

    report = write_report(ls.Run.open(path), out / "report.html")
    with ls.Run.open(path) as run:
        n_rows = len(run.steps("loss"))
        findings = run.findings()
    print(f"{path}: {n_rows} steps recorded, {len(findings)} findings")
    print(f"tensorboard --logdir {logdir}    # landscape/* scalars and the findings' text")
    print(f"open {report}")
    summary = {"steps": n_rows, "findings": len(findings), "tensorboard": str(logdir),
               "files": [str(path), str(report)]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
