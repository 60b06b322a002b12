"""Monitor a Lightning training run with ``LandscapeCallback``.

A small MLP learns a 4-class problem (Gaussian blobs in 20 dimensions, 10% of the labels
random) with SGD + momentum. The callback records the ``standard`` preset (loss, gradient
norm, update, sentinels every step, logits every ten; Taylor radius and spectral alignment
every 10; the representation every 50; sharpness against the momentum-SGD threshold
(2 + 2β)/η and neural collapse every 100; the Hessian spectrum and trace every 500, so at
step 0 only in this run, denser while the sentinels move: docs/monitor.md) into
``OUT/run.h5``. With ``--spike-at S`` the learning rate is multiplied by ``--spike-factor``
for 10 steps from step ``S`` (on by default in the full run), and the instability findings
raised online are printed as they reach the trainer through ``on_finding``.

    python examples/lightning_callback.py --out lightning-run     # 300 steps, ~1 min of CPU time
    python examples/lightning_callback.py --small                 # seconds (CI smoke test)
    landscape report lightning-run/run.h5 -o report.html

Needs ``pip install 'landscape-for-pytorch[lightning]'``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from landscape import InstabilityWarning, Run
from landscape.integrations import LandscapeCallback


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian blobs in 20-D, 10% of the labels replaced by random ones."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 20, generator=torch.Generator().manual_seed(123)) * 1.5
    labels = torch.randint(0, 4, (n,), generator=g)
    inputs = centers[labels] + torch.randn(n, 20, generator=g)
    flip = torch.rand(n, generator=g) < 0.1
    labels = torch.where(flip, torch.randint(0, 4, (n,), generator=g), labels)
    return inputs, labels


class Classifier(pl.LightningModule):
    def __init__(self, lr: float, spike_at: int | None, spike_factor: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        self.lr, self.spike_at, self.spike_factor = lr, spike_at, spike_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

        def factor(step: int) -> float:
            spiking = self.spike_at is not None and self.spike_at <= step < self.spike_at + 10
            return self.spike_factor if spiking else 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="lightning-run", help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--spike-at", type=int, default=None,
                        help="step of the learning-rate spike (full run default: 200)")
    parser.add_argument("--spike-factor", type=float, default=40.0)
    parser.add_argument("--small", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --small, else torch's)")
    args = parser.parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.small else None)
    if threads:
        torch.set_num_threads(threads)
    steps = args.steps or (12 if args.small else 300)
    spike_at = args.spike_at if args.spike_at is not None or args.small else 200
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.h5"

    pl.seed_everything(0, verbose=False)
    x, y = make_data(4096, seed=0)
    probe = make_data(256, seed=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True
    )

    def report(finding) -> None:
        print(f"  finding -> {finding.describe()}\n             hint: {finding.hint}")

    callback = LandscapeCallback(
        str(path), F.cross_entropy, metrics="standard", probe=probe, on_finding=report,
        # mode="w": each run of the example starts afresh; a job that resumes from
        # checkpoints leaves mode at "a", and the run file follows it
        mode="w", warn=False,
    )
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=not args.small,
        enable_model_summary=False, callbacks=[callback],
    )
    module = Classifier(args.lr, spike_at, args.spike_factor)
    print(f"training {steps} steps (learning-rate spike: "
          f"{'none' if spike_at is None else f'x{args.spike_factor:g} from step {spike_at}'})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InstabilityWarning)  # printed by on_finding instead
        trainer.fit(module, loader)

    with Run.open(path) as run:
        print(f"\n{path}: {len(run.steps('loss'))} steps recorded")
        for metric_name in run.metrics():
            steps_recorded = run.steps(metric_name)
            last = (f"last at step {int(steps_recorded[-1])}" if len(steps_recorded)
                    else "none yet")  # e.g. /metrics/adaptive when nothing was added
            print(f"  {metric_name:20s} {len(steps_recorded):4d} rows, {last}")
        _, loss = run.series("loss", "value")
        sharp_steps, sharp = run.series("sharpness", "lambda_max")
        _, threshold = run.series("sharpness", "threshold")
        print(f"final loss {loss[-1]:.4f}; sharpness {sharp[-1]:.3g} at step "
              f"{int(sharp_steps[-1])} (stability threshold (2+2β)/η = {threshold[-1]:.3g})")
        print(f"{len(run.findings())} findings; `landscape report {path}` renders them")
    return path


if __name__ == "__main__":
    main()
