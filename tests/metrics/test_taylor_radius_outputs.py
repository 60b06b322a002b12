"""TaylorRadius on models whose forward returns a tuple or a Hugging Face ``ModelOutput``:
the logits are read through ``landscape.capture.first_tensor``, as everywhere else
(docs/monitor.md), and the JVP differentiates the logits alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import Monitor
from landscape.capture import first_tensor
from landscape.functional import directional_logit_derivatives
from landscape.isolation import isolated
from landscape.metrics.context import StepContext
from landscape.metrics.training import radius_along
from tests import models


class _Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.wrap = wrap
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x):
        z = self.net(x)
        if self.wrap == "tuple":
            return z, z.pow(2).mean()  # (logits, aux)
        if self.wrap == "dict":
            return {"aux": z.sum(), "logits": z}
        return z


def _ctx(model):
    return StepContext.for_model(model)


def _step(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    return (tuple(p.detach() for p in params),
            tuple(0.1 * torch.randn(p.shape, generator=g) for p in params))


@pytest.mark.parametrize("wrap", ["tuple", "dict"])
def test_radius_along_reads_the_logits_of_a_tuple_or_dict_output(wrap):
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    plain, wrapped = _Net(None), _Net(wrap)
    wrapped.load_state_dict(plain.state_dict())
    at, step = _step(plain)
    want = radius_along(_ctx(plain), x, y, at, step)
    got = radius_along(_ctx(wrapped), x, y, at, step)  # was: 'tuple' object has no 'shape'
    assert float(want.r) > 0
    assert float(got.r) == pytest.approx(float(want.r), rel=1e-6)
    assert float(got.rho_a) == pytest.approx(float(want.rho_a), rel=1e-6)
    # the functional form reads the output the same way
    _, a_plain, _ = directional_logit_derivatives(plain, x, list(step))
    _, a_wrapped, _ = directional_logit_derivatives(wrapped, x, list(step))
    torch.testing.assert_close(a_wrapped, a_plain)


def test_taylor_radius_metric_on_a_tuple_output_model():
    """Also with closure= on (inputs, targets) batches: model(inputs)'s logits (it refused)."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    rows = {}
    for wrap in (None, "tuple", "closure"):
        model = _Net(None if wrap == "closure" else wrap)
        opt = torch.optim.SGD(model.parameters(), lr=0.3)

        def loss_fn(out, t):
            return F.cross_entropy(first_tensor(out), t)

        how = ({"closure": lambda m, b: loss_fn(m(b[0]), b[1])} if wrap == "closure"
               else {"loss_fn": loss_fn})
        with Monitor(model, optimizer=opt, probe=(x, y), metrics=["taylor_radius"],
                     warn=False, **how) as mon:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(0, batch=(x, y), loss=loss)
            run = mon.run()
        assert not [f for f in mon.findings if f.rule == "metric_failed"], mon.findings
        rows[wrap] = float(run.series("taylor_radius", "r")[1][0])
    assert rows[None] > 0
    assert rows["tuple"] == pytest.approx(rows[None], rel=1e-6)
    assert rows["closure"] == pytest.approx(rows[None], rel=1e-6)


class _LogitsOnly(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return self.inner(ids, use_cache=False).logits


def _lm_loss(out, labels):
    logits = first_tensor(out)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _one_lm_step(model, ids, batch, **how):
    """One SGD step on ``ids`` monitored by ``taylor_radius`` on ``batch``.

    Returns the recorded r, the parameters before the step, the step and the findings.
    """
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with Monitor(model, optimizer=opt, probe=batch, metrics=["taylor_radius"], warn=False,
                 **how) as mon:
        before = tuple(p.detach().clone() for p in model.parameters())
        loss = _lm_loss(model(ids), ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step = tuple(p.detach() - b for p, b in zip(model.parameters(), before))
        mon.step(0, batch=batch, loss=loss)
    r = float(mon.run().series("taylor_radius", "r")[1][0])
    return r, before, step, mon.findings


@pytest.mark.parametrize("keywords", [False, True], ids=["loss_fn-pair", "closure-dict"])
def test_taylor_radius_metric_on_a_hugging_face_causal_lm(keywords):
    """A ``{"input_ids", "labels"}`` pair with a loss function (was: jvp ... unsupported
    type DynamicCache); a tokenizer's dict with an attention mask and a closure, as the
    Hugging Face callback passes them (was: needs loss_fn-style batches)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    how = {"loss_fn": _lm_loss}
    if keywords:
        batch["attention_mask"] = torch.ones_like(ids)
        how = {"loss_fn": None, "closure": lambda m, b: m(**b).loss}
    got, before, step, findings = _one_lm_step(model, ids, batch, **how)
    assert not [f for f in findings if f.rule == "metric_failed"], findings
    # the same model returning its logits tensor only; a dict's labels are not read
    with isolated(model):  # eval mode, as the monitor measures
        want = radius_along(_ctx(_LogitsOnly(model)), ids, None if keywords else ids,
                            before, step)
    assert float(want.r) > 0
    assert got == pytest.approx(float(want.r), rel=1e-5)


def test_radius_along_through_reentrant_checkpointing_by_a_central_difference():
    """torch.func.jvp refuses reentrant checkpointing ("must override setup_context"): the
    logit tangent comes from a central difference of the logits instead."""
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(2))
    plain, ckpt = models.CheckpointedMLP(False), models.CheckpointedMLP(True)
    at, step = _step(plain)
    want = radius_along(_ctx(plain), x, y, at, step)
    with isolated(ckpt):
        got = radius_along(_ctx(ckpt), x, y, at, step)
    assert float(want.r) > 0
    # float32: the difference's error is about u^(2/3) (docs/curvature.md)
    assert float(got.r) == pytest.approx(float(want.r), rel=1e-3)
    assert float(got.step_norm) == float(want.step_norm)
    torch.testing.assert_close(got.spread, want.spread, rtol=1e-3, atol=1e-5)
    for p, a in zip(ckpt.parameters(), at):
        assert torch.equal(p.detach(), a)  # nothing written into the model


class _PositionalLM(nn.Module):
    """nanoGPT's convention: ``forward(idx, targets=None)``, no ``input_ids`` keyword."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 16)
        self.head = nn.Linear(16, 20)

    def forward(self, idx, targets=None):
        return self.head(torch.tanh(self.emb(idx)))


def test_taylor_radius_on_ids_and_labels_for_a_positional_forward():
    model = _PositionalLM()
    ids = torch.randint(0, 20, (4, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    # was: unexpected keyword argument 'input_ids'
    got, before, step, findings = _one_lm_step(model, ids, batch, loss_fn=_lm_loss)
    assert not findings
    with isolated(model):
        want = radius_along(_ctx(model), ids, ids, before, step)
    assert got == pytest.approx(float(want.r), rel=1e-6)


def test_the_metric_records_the_median_samples_ratio_beside_the_largest():
    # r is the max over the batch (one hard sample decides it); r_median, what the
    # taylor_ratio rule warns on, equals the functional radius at the median quantile
    from landscape.functional import taylor_radius

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    from landscape.metrics import create

    mon = Monitor(model, F.cross_entropy, optimizer=opt, warn=False,
                  metrics=[create("taylor_radius", schedule=1)]).start()
    for step in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss.detach())
    update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    run = mon.run()
    r, med = run.series("taylor_radius", "r")[1][-1], run.series("taylor_radius", "r_median")[1][-1]
    mon.close()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    want = taylor_radius(model, x, update, quantile=0.5)
    assert 0 < med < r
    assert med == pytest.approx(float(want.r), rel=1e-5)


@pytest.mark.parametrize("how", ["loss_fn", "closure"])
def test_taylor_radius_of_a_regression_head_is_not_measured(how):
    """r is a cross-entropy quantity: on a regression head's outputs it means nothing (it
    was recorded as a number, and under a closure it was refused for the wrong reason)."""
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
    y = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kwargs = ({"loss_fn": F.mse_loss} if how == "loss_fn"
              else {"closure": lambda m, b: F.mse_loss(m(b[0]), b[1])})
    with Monitor(model, optimizer=opt, probe=(x, y), metrics=["taylor_radius"], warn=False,
                 **kwargs) as mon:
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(0, batch=(x, y), loss=loss)
    assert np.isnan(mon.run().series("taylor_radius", "r")[1]).all()
    (failed,) = [f for f in mon.findings if f.rule == "metric_failed"]
    assert "not softmax logits" in failed.message


def test_taylor_radius_on_a_list_of_micro_batches_is_that_of_their_union():
    """Gradient accumulation: ``batch=[micro-batches]`` gives the radius of the one step over
    all their samples, as the concatenated batch does (it used to fail: "needs (inputs,
    targets) batches; got list")."""
    g = torch.Generator().manual_seed(3)
    micro = [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g))
             for _ in range(3)]
    whole = (torch.cat([x for x, _ in micro]), torch.cat([y for _, y in micro]))

    def record(batch):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with Monitor(model, F.cross_entropy, optimizer=opt, probe=whole, warn=False,
                     metrics=["taylor_radius"]) as mon:
            for step in range(2):
                opt.zero_grad()
                F.cross_entropy(model(whole[0]), whole[1]).backward()
                opt.step()
                mon.step(step, batch=batch, loss=1.0)
            run = mon.run()
            return {f: run.series("taylor_radius", f)[1] for f in ("r", "rho_a", "r_median")}

    listed, joined = record(micro), record(whole)
    for field, values in joined.items():
        assert np.isfinite(values).all(), field
        np.testing.assert_allclose(listed[field], values, rtol=1e-5, err_msg=field)
