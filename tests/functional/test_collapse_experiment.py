"""A small experiment (not a benchmark): training a classifier toward zero training error
drives its last-layer features toward collapse, so NC1 (Papyan et al. 2020) and VCI
(Xu & Liu 2023) decrease, recorded against training steps.

Data: five Gaussian classes in R^10 (unit noise, overlapping means), 40 samples each; model:
a tanh MLP 10 -> 64 -> 32 -> 5 trained full-batch with Adam. Features are the inputs of the
final linear layer, measured in eval mode without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from landscape.functional import neural_collapse, variability_collapse_index

RECORD_AT = (0, 10, 25, 50, 100, 200)


def _spearman(values: list[float]) -> float:
    """Rank correlation of the values with their order (no ties expected)."""
    n = len(values)
    ranks = torch.empty(n)
    ranks[torch.tensor(values).argsort()] = torch.arange(n, dtype=torch.float32)
    d = ranks - torch.arange(n, dtype=torch.float32)
    return float(1 - 6 * (d * d).sum() / (n * (n * n - 1)))


def _train_and_record() -> list[tuple[int, float, float, float]]:
    g = torch.Generator().manual_seed(0)
    n_classes, dim, per_class = 5, 10, 40
    means = torch.randn(n_classes, dim, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), dim, generator=g)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh())
    head = nn.Linear(32, n_classes)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    record = []
    for step in range(RECORD_AT[-1] + 1):
        if step in RECORD_AT:
            with torch.no_grad():
                h = body(x)
                nc = neural_collapse(h, labels, head)
                vci = variability_collapse_index(h, labels)
                accuracy = float((head(h).argmax(1) == labels).float().mean())
            record.append((step, float(nc.nc1), float(vci), accuracy))
        loss = F.cross_entropy(head(body(x)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return record


def test_nc1_and_vci_decrease_while_training_to_zero_error(record_property):
    record = _train_and_record()
    record_property("step_nc1_vci_accuracy", record)
    _, nc1s, vcis, accs = zip(*record)
    assert accs[0] < 0.5 and accs[-1] == 1.0  # zero training error reached
    assert nc1s[-1] < 0.5 * nc1s[0], record
    assert vcis[-1] < 0.5 * vcis[0], record
    assert _spearman(list(nc1s)) <= -0.9, record
    assert _spearman(list(vcis)) <= -0.9, record
