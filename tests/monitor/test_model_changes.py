"""A loop that changes the model mid-run: a head replaced, layers frozen, weights tied.

The monitor measures the trainable parameters of its start (docs/monitor.md, "Which
parameters"). Such a change made some rows read parameters that no longer train, without
a word; a stale warm start failed ``top_eigenvalues`` for the rest of the run; and an
operator that no longer matched the model was blamed on the learning rates.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape.metrics import Sharpness, TopEigenvalues
from tests import models

STEPS, CHANGE = 8, 4


def _loop(model, opt, x, y, change, mon=None):
    for step in range(STEPS):
        if step == CHANGE:
            opt = change(model, opt)
            if mon is not None:
                mon.set_optimizer(opt)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, batch=(x, y), loss=loss)
    return [p.detach().clone() for p in model.parameters()]


def _new_head(model, opt):
    torch.manual_seed(1)
    model[2] = nn.Linear(8, 3)
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _frozen_first_layer(model, opt):
    model[0].requires_grad_(False)
    return opt


@pytest.mark.parametrize("change", [_new_head, _frozen_first_layer],
                         ids=["new head", "frozen layer"])
def test_a_change_of_the_trainable_parameters_is_said_once(tmp_path, change):
    x, y = models.classification_data()
    torch.manual_seed(0)
    model = models.mlp()
    plain = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, change)
    torch.manual_seed(0)
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt) as mon:
            trained = _loop(model, opt, x, y, change, mon)
    said = [str(w.message) for w in caught if "trainable parameters changed" in str(w.message)]
    assert len(said) == 1 and "start a new Monitor" in said[0]
    assert "so grad_norm, update and the curvature rows leave" in said[0]
    assert ("2 tensors added, 2 gone" in said[0]) == (change is _new_head)
    assert all(torch.equal(a, b) for a, b in zip(trained, plain))  # training as it was


def test_an_unchanged_model_is_not_warned_about(tmp_path):
    x, y = models.classification_data()
    model = models.mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*trainable parameters changed")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt) as mon:
            _loop(model, opt, x, y, lambda m, o: o, mon)


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids)))).flatten(0, 1)


def test_top_eigenvalues_starts_cold_when_its_warm_start_no_longer_fits(tmp_path):
    """Weights tied mid-run: the eigenvectors kept from before held a tensor more than the
    operator, and every later row failed ("warm_start vector 0: expected a tuple of 3
    tensors")."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (16, 6), generator=g)
    targets = torch.roll(ids, -1, 1).flatten()
    torch.manual_seed(0)
    model = _TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)

    def tie(model, opt):
        model.head.weight = model.emb.weight
        return torch.optim.SGD(model.parameters(), lr=0.3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                        probe=(ids, targets), metrics=[TopEigenvalues(k=1, schedule=1)]) as mon:
            _loop(model, opt, ids, targets, tie, mon)
        failed = [f for f in mon.findings if f.rule == "metric_failed"]
    values = ls.Run.open(tmp_path / "run.h5").series("top_eigenvalues", "eigenvalues")[1]
    assert failed == [] and torch.isfinite(torch.as_tensor(values)).all()


def test_an_operator_that_no_longer_fits_the_model_is_not_blamed_on_the_learning_rates(
        tmp_path):
    """Two groups at different rates scale the Hessian by them; a layer frozen later made
    the operator fail, and the warning said the rates could not scale it."""
    x, y = models.classification_data()
    model = models.mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                           {"params": model[2].parameters()}], lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                        probe=(x, y), metrics=[Sharpness(schedule=1)]) as mon:
            _loop(model, opt, x, y, _frozen_first_layer, mon)
    assert not any("cannot scale the Hessian" in str(w.message) for w in caught)
    failed = [f.message for f in mon.findings if f.rule == "metric_failed"]
    assert len(failed) == 1 and "matches no trainable parameter" in failed[0]


def test_under_a_callback_the_warning_names_what_its_rows_hold_and_advice_it_can_follow(tmp_path):
    """The Hugging Face callback gives the monitor the Trainer's gradient norm, which holds
    the unfrozen layers; the warning said grad_norm left them out, and advised starting a
    new Monitor, which a callback user cannot do mid-train() (integrations review)."""
    x, y = models.classification_data()
    model = models.mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", optimizer=opt,
                        config={"integration": "transformers"}) as mon:
            for step in range(3):
                if step == 1:
                    model[0].requires_grad_(True)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                norm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
                opt.step()
                mon.step(step, batch=(x, y), loss=loss, grad_norm=norm)
    (said,) = [str(w.message) for w in caught if "trainable parameters changed" in str(w.message)]
    assert "so update and the curvature rows leave" in said and "grad_norm" not in said
    assert "start a new Monitor" not in said
    assert "between training runs, each with its own callback and run file" in said
