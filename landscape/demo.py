"""The built-in demonstration run behind ``landscape demo``.

A small MLP learns a synthetic three-class problem with SGD; at ``spike_step`` the
learning rate jumps by ``spike_factor`` so that training becomes unstable. Everything
is generated locally (no downloads) and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from landscape.store import RunWriter


@dataclass
class DemoResult:
    run_path: Path
    final_loss: float
    steps: int


def synthetic_blobs(
    n: int = 512, dim: int = 16, classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around random centres: inputs ``(n, dim)`` and labels ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    inputs = centres[labels] + torch.randn(n, dim, generator=g)
    return inputs, labels


def demo_model(dim: int = 16, hidden: int = 32, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def run_demo(
    out_dir: str | Path,
    *,
    steps: int = 200,
    lr: float = 0.05,
    spike_step: int = 150,
    spike_factor: float = 40.0,
    seed: int = 0,
) -> DemoResult:
    """Train the demo model and record loss and gradient norm per step into ``run.h5``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    inputs, labels = synthetic_blobs(seed=seed)
    model = demo_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    config = {"demo": True, "lr": lr, "spike_step": spike_step, "spike_factor": spike_factor}
    path = out / "run.h5"
    with RunWriter(path, mode="w", config=config) as writer:
        writer.declare("loss", {"value": None}, cls="demo", schedule="every(1)")
        writer.declare("grad_norm", {"value": None}, cls="demo", schedule="every(1)")
        loss = torch.zeros(())
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * (spike_factor if step >= spike_step else 1.0)
            loss = loss_fn(model(inputs), labels)
            opt.zero_grad()
            loss.backward()
            grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
            opt.step()
            writer.append("loss", step, {"value": loss.item()})
            writer.append("grad_norm", step, {"value": grad_norm.item()})
    return DemoResult(path, float(loss.item()), steps)
