"""A factories file and a few training checkpoints, shared by the CLI tests."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)

    def other_data():
        g = torch.Generator().manual_seed(2)
        return torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)

    def numpy_data():
        x, y = data()
        return x.numpy(), y.numpy()

    def flipped_numpy_data():  # negative strides, a read-only array
        x, y = numpy_data()
        y = y[::-1][::-1]
        y.flags.writeable = False
        return x[::-1], y[::-1]

    def text_labels():
        import numpy as np
        x, y = numpy_data()
        return x, np.array([str(v) for v in y])

    def loader():
        x, y = data()
        return [(x[:24], y[:24]), (x[24:], y[24:])]

    def empty():
        return []

    def zero_samples():
        x, y = data()
        return x[:0], y[:0]

    def nan_data():
        x, y = data()
        return x * float("nan"), y

    def ignore_255_data():
        x, y = data()
        y = y.clone()
        y[0] = 255
        return x, y

    def broken():
        raise RuntimeError("no GPU here")

    def weighted():
        x, y = data()
        return x, y, torch.ones(len(y))

    def other_model():
        return nn.Linear(4, 3)

    def lazy_model():
        return nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 3))

    def meta_model():
        with torch.device("meta"):
            return model()
    """
)


def train_and_save(root: Path, steps: int, every: int, wrap: bool) -> tuple[list[Path], dict]:
    """Write ``root/factories.py``; train its model with SGD for ``steps`` steps and save a
    checkpoint every ``every`` steps (``{"model": ..., "step": ...}`` when ``wrap``, else the
    bare state dict). Returns the checkpoint paths and the factories' namespace."""
    (root / "factories.py").write_text(FACTORIES)
    ns: dict = {}
    exec(FACTORIES, ns)
    model, (x, y) = ns["model"](), ns["data"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    paths = []
    for step in range(1, steps + 1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            path = root / f"ckpt-{step}.pt"
            state = model.state_dict()
            torch.save({"model": state, "step": step} if wrap else state, path)
            paths.append(path)
    return paths, ns
