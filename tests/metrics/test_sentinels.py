"""The every-step sentinels: the secant Taylor ratio against the exact JVP ratio."""

import itertools
import logging
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.batches import head
from landscape.isolation import stateless_call
from landscape.metrics import Sentinels
from landscape.metrics.sentinels import secant_ratio
from landscape.params import trainable_named_parameters
from tests import models


def _exact_and_secant(model, x, step_scale, seed=0):
    """Exact r = max spread(J p)/pi at theta, and the secant along the same step p."""
    named = trainable_named_parameters(model)
    names = list(named)
    theta = tuple(p.detach() for p in named.values())
    g = torch.Generator().manual_seed(seed)
    p = tuple(step_scale * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in theta)

    def f(*flat):
        return stateless_call(model, dict(zip(names, flat)), (x,))

    z0, jp = torch.func.jvp(f, theta, p)
    exact = float((jp.max(-1).values - jp.min(-1).values).max()) / math.pi
    z1 = f(*(t + d for t, d in zip(theta, p)))
    return exact, secant_ratio(z0, z1)


def test_secant_agrees_with_the_jvp_ratio_to_second_order():
    model = models.mlp(d_in=6, hidden=16, d_out=4, seed=1).double().eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors = []
    for scale in (1e-2, 5e-3, 2.5e-3):
        exact, secant = _exact_and_secant(model, x, scale)
        errors.append(abs(secant - exact))
        assert abs(secant - exact) <= 2 * exact**2 + 1e-12  # O(r^2)
    # halving the step divides the difference by about 4 (second order)
    assert errors[1] / errors[0] < 0.35 and errors[2] / errors[1] < 0.35


def test_secant_is_monotone_in_the_step_length_like_the_exact_ratio():
    model = models.mlp(d_in=6, hidden=16, d_out=4, seed=3).double().eval()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    scales = [0.02, 0.05, 0.1, 0.2, 0.4]
    pairs = [_exact_and_secant(model, x, s) for s in scales]
    exact = [e for e, _ in pairs]
    secant = [s for _, s in pairs]
    assert exact == sorted(exact) and secant == sorted(secant)
    assert secant[-1] > 1.0 and 0.2 < secant[-1] / exact[-1] < 5  # same scale at large r


def test_sentinels_metric_matches_the_taylor_radius_metric_on_small_steps():
    torch.manual_seed(0)
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = models.classification_data(16, seed=1)
    metrics = [Sentinels(subsample=16), ls.metrics.TaylorRadius(schedule=1, data="probe")]
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, probe=(x, y),
                    warn=False, strict=True) as mon:
        models.full_batch_steps(mon, model, opt, x, y, 4)
        run = mon.run()
    _, secant = run.series("sentinels", "r_secant")
    _, exact = run.series("taylor_radius", "r")
    assert math.isnan(secant[0])
    for s, e in zip(secant[1:], exact[1:]):
        assert abs(s - e) <= 0.05 * e + 4 * e**2
    _, gap = run.series("sentinels", "gap")
    assert list(gap[1:]) == [1.0, 1.0, 1.0]
    _, ratio = run.series("sentinels", "update_ratio")
    _, layer = run.series("sentinels", "update_layer")
    assert (ratio[1:] > 0).all() and set(layer[1:]) <= {0.0, 1.0, 2.0}


def test_a_weight_that_was_zero_has_no_update_ratio():
    """LoRA's B starts at zero: its ratio read |dB| / 1e-12 (~1e10), a spike on every
    LoRA run's first measured step."""
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        weights[-1].zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = models.classification_data(16, seed=1)
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[Sentinels()], probe=(x, y),
                    warn=False, strict=True) as mon:
        before = [w.detach().clone() for w in weights]
        models.full_batch_steps(mon, model, opt, x, y, 1)
        _, (ratio,) = mon.run().series("sentinels", "update_ratio")
    expected = max(float((w.detach() - b).norm() / b.norm()) for w, b in zip(weights, before)
                   if b.norm() > 0)
    assert ratio == pytest.approx(expected, rel=1e-5) and ratio < 1
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[Sentinels()], probe=(x, y),
                    warn=False) as mon:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            weights[0][0, 0] = float("nan")  # diverged before the step: its ratio is NaN
        opt.step()
        mon.step(0, batch=(x, y), loss=1.0)
        _, (ratio,) = mon.run().series("sentinels", "update_ratio")
    assert math.isnan(ratio)  # not another layer's finite ratio


def test_the_row_records_the_largest_learning_rate_of_the_step():
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    head_params = list(model.parameters())[-2:]
    body = list(model.parameters())[:-2]
    opt = torch.optim.SGD([{"params": body, "lr": 0.01}, {"params": head_params, "lr": 0.05}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    x, y = models.classification_data(16, seed=1)
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[Sentinels()],
                    probe=(x, y), warn=False, strict=True) as mon:
        models.full_batch_steps(mon, model, opt, x, y, 5, after_step=sched.step)
        _, lr = mon.run().series("sentinels", "lr")
    assert list(lr) == [0.05, 0.05, 0.025, 0.025, 0.0125]  # the head's group, as stepped
    from landscape.metrics.sentinels import largest_lr

    assert math.isnan(largest_lr(None))
    assert largest_lr(torch.optim.Adam(model.parameters(), lr=torch.tensor(3e-4))) \
        == pytest.approx(3e-4)
    opt.param_groups[1]["lr"] = np.float32(0.5)  # a schedule computed in numpy
    assert largest_lr(opt) == 0.5


@pytest.mark.parametrize("padding", ["none", "some", "all"])
def test_probe_loss_is_the_cross_entropy_of_the_targets_in_range(padding):
    """probe_loss reuses the rows' log-partition; it must equal F.cross_entropy over the
    targets in [0, C), with padding (-100, or an index past the classes) left out."""
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    x, y = models.classification_data(8, seed=1)
    if padding == "some":
        y = y.clone()
        y[1], y[5] = -100, 3  # ignore_index padding and an index past the 3 classes
    elif padding == "all":
        y = torch.full_like(y, -100)
    keep = (y >= 0) & (y < 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    want = []
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[Sentinels(subsample=8)],
                    probe=(x, y), warn=False, strict=True) as mon:
        for step in range(3):  # the probe's targets are read once; the loss moves
            opt.zero_grad()
            if keep.any():  # no target at all: nothing to train on
                F.cross_entropy(model(x)[keep], y[keep]).backward()
                opt.step()
            mon.step(step)
            with torch.no_grad():
                want.append(float(F.cross_entropy(model(x).double()[keep], y[keep])))
        _, got = mon.run().series("sentinels", "probe_loss")
    if padding == "all":
        assert np.isnan(got).all()
    else:
        assert len(set(want)) == 3
        assert list(got) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("targets", ["mixup", "one_hot_bf16"])
def test_probe_loss_is_the_cross_entropy_of_soft_labels(targets):
    """Class probabilities of the logits' shape (mixup, distillation) give F.cross_entropy's
    value for probability targets; they gave NaN, so taylor_forecast's 'the loss still
    falls fast' never applied to such runs."""
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    x, labels = models.classification_data(8, seed=1)
    one_hot = F.one_hot(labels, 3).double()
    if targets == "mixup":
        y = (0.7 * one_hot + 0.3 * one_hot.roll(1, 0)).float()
    else:
        y = one_hot.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    want = []
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[Sentinels(subsample=8)],
                    probe=(x, y), warn=False, strict=True) as mon:
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y.float()).backward()
            opt.step()
            mon.step(step)
            with torch.no_grad():
                want.append(float(F.cross_entropy(model(x).double(), y.double())))
        _, got = mon.run().series("sentinels", "probe_loss")
    assert len(set(want)) == 3
    assert list(got) == pytest.approx(want, rel=1e-12)


def test_probe_loss_reads_uint8_targets_and_a_probe_edited_in_place():
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    x, y = models.classification_data(8, seed=1)
    labels = y.to(torch.uint8)  # labels from a uint8 numpy array
    with ls.Monitor(model, F.cross_entropy, metrics=[Sentinels(subsample=8)],
                    probe=(x, labels), warn=False, strict=True) as mon:
        mon.step(0)
        labels.copy_((labels + 1) % 3)  # the probe's targets rewritten in place
        mon.step(1)
        _, got = mon.run().series("sentinels", "probe_loss")
    with torch.no_grad():
        z = model(x).double()
    want = [float(F.cross_entropy(z, y)), float(F.cross_entropy(z, (y + 1) % 3))]
    assert list(got) == pytest.approx(want, rel=1e-12)


def test_head_slices_nested_batches():
    batch = {"x": torch.arange(10), "y": (torch.ones(10, 2), 3)}
    out = head(batch, 4)
    assert out["x"].tolist() == [0, 1, 2, 3] and out["y"][0].shape == (4, 2) and out["y"][1] == 3


def test_subsample_must_be_positive():
    with pytest.raises(ValueError, match="subsample"):
        Sentinels(subsample=0)


# --------------------------------------------------------------------------- attention logits

VOCAB, SEQ = 11, 6


def _lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _tokens(n, seed):
    ids = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _train(model, metrics, steps=3, probe=None, lr=1e-2, **kwargs):
    """A few AdamW steps on token batches with a monitor (None: unmonitored)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    mon = None
    if metrics is not None:
        mon = ls.Monitor(model, _lm_loss, optimizer=opt, metrics=metrics,
                         probe=probe or _tokens(5, 99), warn=False, strict=True, **kwargs)
        mon.start()
    for step in range(steps):
        x, y = _tokens(8, step)
        loss = _lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, batch=(x, y), loss=loss)
    return mon


def _hand_attention_max(model, x):
    """max over blocks, heads and causal (i >= j) pairs of q_i . k_j / sqrt(d_h), from the
    qkv projections of each block (forward hooks), in float64 loops."""
    names = [f"blocks.{i}.qkv" for i in range(len(model.blocks))]
    with torch.no_grad(), ls.capture.capture(model, outputs=names) as cap:
        model.eval()
        model(x)
        model.train()
    best = -math.inf
    for name, blk in zip(names, model.blocks):
        qkv = cap.outputs[name].double()
        b, t, three_d = qkv.shape
        d = three_d // 3
        hd = d // blk.heads
        q = qkv[..., :d].reshape(b, t, blk.heads, hd).tolist()
        k = qkv[..., d : 2 * d].reshape(b, t, blk.heads, hd).tolist()
        for bb in range(b):
            for h in range(blk.heads):
                for i in range(t):
                    for j in range(i + 1):
                        z = sum(u * v for u, v in zip(q[bb][i][h], k[bb][j][h]))
                        best = max(best, z / math.sqrt(hd))
    return best


def test_attention_logit_max_matches_the_hand_computation_on_a_transformer():
    model = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=2, seq=SEQ, seed=0)
    probe = _tokens(5, 99)
    mon = _train(model, [Sentinels(subsample=3, attention_every=1)], probe=probe)
    run = mon.run()
    _, att = run.series("sentinels", "attention_logit_max")
    assert len(att) == 3 and np.isfinite(att).all() and len(set(att.tolist())) == 3
    want = _hand_attention_max(model, probe[0][:3])  # the parameters of the last row
    assert att[-1] == pytest.approx(want, rel=1e-5)
    mon.close()


def test_attention_logit_max_is_nan_without_attention_and_the_capture_is_skipped(monkeypatch):
    import landscape.metrics.sentinels as sentinels_module

    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    metric = Sentinels()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = models.classification_data(16, seed=1)
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[metric], probe=(x, y),
                    warn=False, strict=True) as mon:
        for step in range(3):
            if step == 1:  # after the first call found no attention, the mode is not built
                monkeypatch.setattr(sentinels_module, "AttentionLogits", None)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        run = mon.run()
    _, att = run.series("sentinels", "attention_logit_max")
    _, big = run.series("sentinels", "max_abs")
    assert np.isnan(att).all() and np.isfinite(big).all()


class _TupleOutput(torch.nn.Module):
    """The same model returning ``(logits, aux)``, as Hugging Face tuples or MoE models do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        logits = self.inner(x)
        return logits, {"aux": logits.square().mean()}


def test_a_tuple_output_model_gives_the_rows_of_its_logits():
    fields = ("r_secant", "max_abs", "logsumexp_max", "probe_loss", "attention_logit_max")
    rows = []
    for wrap in (False, True):
        model = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1, seq=SEQ, seed=3)
        monitored = _TupleOutput(model) if wrap else model
        loss_fn = (lambda out, y: _lm_loss(out[0], y)) if wrap else _lm_loss
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mon = ls.Monitor(monitored, loss_fn, optimizer=opt, metrics=[Sentinels()],
                         probe=_tokens(5, 99), warn=False, strict=True).start()
        for step in range(3):
            x, y = _tokens(8, step)
            loss = loss_fn(monitored(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss)
        run = mon.run()
        rows.append({f: run.series("sentinels", f)[1] for f in fields})
        mon.close()
    plain, wrapped = rows
    assert np.isfinite(plain["r_secant"][1:]).all() and np.isfinite(plain["probe_loss"]).all()
    for f in fields:
        np.testing.assert_array_equal(wrapped[f], plain[f], err_msg=f)


class _NanoGPTStyle(torch.nn.Module):
    """nanoGPT's convention: ``forward(idx, targets=None) -> (logits, loss)``, and without
    targets only the last position's logits (what generation needs)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None):
        logits = self.inner(idx)
        if targets is None:
            return logits[:, -1:], None
        return logits, _lm_loss(logits, targets)


def test_a_nanogpt_style_model_gets_its_secant_ratio_from_the_last_position():
    """Its probe targets (B, T) do not line up with the (B, 1, V) logits the sentinels see:
    those are still class logits (they were read as multi-hot labels: every row NaN)."""
    model = _NanoGPTStyle(models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1,
                                                 seq=SEQ, seed=3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    probe = _tokens(5, 99)
    mon = ls.Monitor(model, closure=lambda m, b: m(*b)[1], optimizer=opt,
                     metrics=[Sentinels()], probe=probe, warn=False, strict=True).start()
    last = []
    for step in range(4):
        x, y = _tokens(8, step)
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss)
        with torch.no_grad():
            model.eval()
            last.append(model(probe[0][:4])[0].double())  # the sentinels' 4 samples
            model.train()
    run = mon.run()
    r = run.series("sentinels", "r_secant")[1]
    expected = [float(((b - a).amax(-1) - (b - a).amin(-1)).max()) / math.pi
                for a, b in itertools.pairwise(last)]
    np.testing.assert_allclose(r[1:], expected, rtol=1e-6)
    assert np.isfinite(run.series("sentinels", "max_abs")[1]).all()
    assert np.isnan(run.series("sentinels", "probe_loss")[1]).all()  # no aligned targets


class _RaisesInEval(torch.nn.Module):
    """Attention, then an error, in eval mode (the sentinels' forward) only."""

    def __init__(self):
        super().__init__()
        self.inner = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1, seq=SEQ)

    def forward(self, x):
        out = self.inner(x)
        if not self.training:
            raise RuntimeError("eval forward failed")
        return out


def test_no_mode_is_left_installed_after_the_sentinels_forward_even_when_it_raises():
    mon = _train(models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1, seq=SEQ),
                 [Sentinels()], steps=2)
    assert torch._C._len_torch_function_stack() == 0
    mon.close()
    with pytest.raises(RuntimeError, match="eval forward failed"):
        _train(_RaisesInEval(), [Sentinels()], steps=1)
    assert torch._C._len_torch_function_stack() == 0


def test_training_with_the_attention_capture_is_bitwise_identical():
    def run(monitored):
        torch.manual_seed(5)
        model = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=2, seq=SEQ,
                                       dropout=0.2, seed=1)
        model.train()
        metrics = [Sentinels(subsample=3, attention_every=1)] if monitored else None
        mon = _train(model, metrics, steps=4)
        att = None
        if mon is not None:
            att = mon.run().series("sentinels", "attention_logit_max")[1]
            mon.close()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, torch.get_rng_state(), model.training, att

    ref_state, ref_rng, ref_mode, _ = run(False)
    state, rng, mode, att = run(True)
    assert np.isfinite(att).all()  # the capture ran at every step
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    assert torch.equal(rng, ref_rng) and mode == ref_mode


def test_attention_every_measures_every_kth_call_and_zero_never():
    rows = {}
    for every_k in (1, 2, 0, None):  # None: the default, every 10th call
        model = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1, seq=SEQ, seed=0)
        sentinels = Sentinels() if every_k is None else Sentinels(attention_every=every_k)
        mon = _train(model, [sentinels], steps=12)
        rows[every_k] = mon.run().series("sentinels", "attention_logit_max")[1]
        mon.close()
    assert np.isfinite(rows[1]).all()
    np.testing.assert_array_equal(rows[2][::2], rows[1][::2])  # the same run, every other row
    assert np.isnan(rows[2][1::2]).all() and np.isnan(rows[0]).all()
    np.testing.assert_array_equal(rows[None][::10], rows[1][::10])  # calls 0 and 10
    assert np.isnan(np.delete(rows[None], [0, 10])).all()
    with pytest.raises(ValueError, match="attention_every"):
        Sentinels(attention_every=-1)


def test_rows_keeps_as_few_samples_as_the_logit_rows_need():
    # SEQ = 6 positions per sample: 12 rows need 2 samples, so the default-style reduction
    # must record exactly what subsample=2 records (the same forward shapes, the same rows)
    def series(metric):
        model = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1, seq=SEQ, seed=0)
        mon = _train(model, [metric], steps=4)
        run = mon.run()
        out = {f: run.series("sentinels", f)[1] for f in ("r_secant", "max_abs", "probe_loss")}
        mon.close()
        return out

    reduced = series(Sentinels(subsample=4, rows=12, attention_every=1))
    two = series(Sentinels(subsample=2, rows=None, attention_every=1))
    four = series(Sentinels(subsample=4, rows=None, attention_every=1))
    for field in reduced:
        np.testing.assert_array_equal(reduced[field], two[field])
    assert not np.array_equal(reduced["probe_loss"], four["probe_loss"])
    assert np.isnan(reduced["r_secant"][0]) and np.isfinite(reduced["r_secant"][1:]).all()


def test_rows_never_thins_a_classifier_below_subsample():
    from landscape.metrics.sentinels import _samples_for_rows

    x = torch.zeros(5, 3)
    assert _samples_for_rows(torch.zeros(5, 4), x, 4, 64) == 4  # one row per sample
    assert _samples_for_rows(torch.zeros(5, 32, 4), x, 4, 64) == 2  # 32 rows per sample
    assert _samples_for_rows(torch.zeros(5, 100, 4), x, 4, 64) == 1
    assert _samples_for_rows(torch.zeros(5, 32, 4), x, 4, None) == 4
    assert _samples_for_rows(torch.zeros(160, 4), x, 4, 64) == 4  # rows not per sample
    with pytest.raises(ValueError, match="rows"):
        Sentinels(rows=0)


def test_rows_reduction_keeps_the_first_attention_measurement():
    # the first call reruns at the reduced size: that rerun is call 0, so with the default
    # attention_every=10 row 0 carries the attention logit and rows 1-3 do not
    model = models.TinyTransformer(vocab=VOCAB, d=8, heads=2, layers=1, seq=SEQ, seed=0)
    mon = _train(model, [Sentinels(subsample=4, rows=12)], steps=4)
    att = mon.run().series("sentinels", "attention_logit_max")[1]
    mon.close()
    assert np.isfinite(att[0]) and np.isnan(att[1:]).all()


# -- outputs that are not softmax logits (regression, one sigmoid logit)


def test_softmax_logits_tells_class_logits_from_other_outputs():
    from landscape.metrics.batch_parts import softmax_logits

    z = torch.randn(8, 5)
    assert softmax_logits(z, torch.randint(0, 5, (8,)))  # class indices
    assert softmax_logits(torch.randn(2, 3, 5), torch.full((2, 3), -100))  # padding
    assert softmax_logits(z, None)  # nothing says otherwise
    assert softmax_logits(z, F.softmax(torch.randn(8, 5), -1))  # soft labels (mixup)
    assert not softmax_logits(torch.randn(8, 1), torch.randint(0, 2, (8,)))  # one logit
    assert not softmax_logits(z, torch.randn(8, 5))  # regression of 5 values
    assert not softmax_logits(z, torch.rand(8, 5).round())  # multi-label BCE targets
    assert not softmax_logits(z, torch.randint(0, 2, (8, 5)))  # multi-hot indices
    # a nanoGPT-style forward without targets: the last position's logits, (B, T) targets
    assert softmax_logits(torch.randn(8, 1, 5), torch.randint(0, 5, (8, 6)))
    # ... but not per-pixel targets of a channels-first map (at any resolution: SegFormer
    # predicts at 1/4), frame labels of a Conv1d, nor two labels per sample
    assert not softmax_logits(torch.randn(4, 3, 6, 7), torch.randint(0, 3, (4, 6, 7)))
    assert not softmax_logits(torch.randn(2, 19, 8, 8), torch.randint(0, 19, (2, 32, 32)))
    assert not softmax_logits(torch.randn(4, 5, 100), torch.randint(0, 5, (4, 400)))
    assert not softmax_logits(z, torch.randint(0, 5, (8, 2)))
    assert not softmax_logits(z, torch.randn(8, 3))  # float targets of another shape
    assert not softmax_logits(torch.randn(8), torch.eye(8)[0])  # (B,) sigmoid logits
    mix = 0.37 * F.one_hot(torch.arange(8) % 5, 5) + 0.63 * F.one_hot(torch.arange(8) % 3, 5)
    assert softmax_logits(z, mix.to(torch.bfloat16))  # bf16 mixup rows miss 1 by ~2e-3
    smooth = torch.full((4, 1000), 0.1 / 1000) + 0.9 * F.one_hot(torch.arange(4), 1000)
    assert softmax_logits(torch.randn(4, 1000), smooth.to(torch.bfloat16))


class _OwnLossRegressor(torch.nn.Module):
    """A regression head that returns its loss, as Hugging Face models do given labels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(6, 1)

    def forward(self, inputs, labels=None):
        out = self.net(inputs)
        loss = None if labels is None else F.mse_loss(out.squeeze(-1), labels)
        return {"loss": loss, "logits": out}


def test_a_regression_head_that_returns_its_loss_records_probe_loss_every_step(caplog):
    model = _OwnLossRegressor()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.INFO, logger="landscape"), \
            ls.Monitor(model, optimizer=opt, warn=False, strict=True) as mon:
        for step in range(12):
            batch = {"inputs": torch.randn(16, 6, generator=g),
                     "labels": torch.randn(16, generator=g)}
            loss = model(**batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=batch, loss=loss)
        run = mon.run()
    assert np.isfinite(run.series("sentinels", "probe_loss")[1]).all()
    assert np.isnan(run.series("sentinels", "r_secant")[1]).all()
    # the line names what is not recorded; probe_loss is (it said it was not)
    said = [r.getMessage() for r in caplog.records if "are not class logits" in r.getMessage()]
    assert len(said) == 1 and "logsumexp_max are not recorded" in said[0]


class _CountingMLP(torch.nn.Module):
    """An MLP regressor that counts its forward passes."""

    def __init__(self, outputs):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, outputs))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("outputs", [1, 3])
def test_regression_outputs_record_no_logit_fields_and_run_no_forward_after_the_first(outputs):
    # the helper's false alarms: a regression head warned logit_growth at step 0
    # (softmax over one class is 1) and taylor_forecast on r_secant of raw outputs
    model = _CountingMLP(outputs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    with ls.Monitor(model, F.mse_loss, optimizer=opt, warn=False, strict=True) as mon:
        for step in range(25):
            x = torch.randn(16, 6, generator=g)
            y = 150 + 80 * torch.randn(16, outputs, generator=g)  # raw units: |output| > 100
            out = model(x)
            loss = F.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            before = model.calls
            mon.step(step, batch=(x, y), loss=loss, outputs=out.detach())
            monitor_forwards = model.calls - before
            # the first call learns the outputs' kind; no attention: no forward after it
            assert monitor_forwards == (1 if step == 0 else 0)
        run = mon.run()
        for field in ("r_secant", "max_abs", "logsumexp_max"):
            assert np.isnan(run.series("sentinels", field)[1]).all()
        assert np.isfinite(run.series("sentinels", "update_ratio")[1][1:]).all()
        assert np.isnan(run.series("logits", "max_abs")[1]).all()
        assert not [f for f in mon.findings if f.rule in ("logit_growth", "taylor_forecast")]


def test_a_single_logit_classifier_raises_no_softmax_collapse_at_the_first_step():
    model = _CountingMLP(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,)).float()
    with ls.Monitor(model, F.binary_cross_entropy_with_logits, optimizer=opt,
                    warn=False) as mon:
        for step in range(3):
            out = model(x).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(x, y), loss=loss, outputs=out.detach()[:, None])
    assert not [f for f in mon.findings if f.rule == "logit_growth"]
    assert np.isnan(mon.run().series("logits", "softmax_collapse")[1]).all()


@pytest.mark.parametrize("keys", [("features", "label"), ("inputs", "targets"),
                                  ("features", "labels")])
def test_a_model_whose_forward_takes_the_dict_batch_itself(tmp_path, keys):
    """forward(self, batch) reading batch["features"] (a LightningModule's habit): the
    sentinels called model(inputs) or model(**batch) and were NaN for the whole run. With
    the keys inputs/targets, model(inputs) came first: its IndexError (a tensor indexed
    by a key) ended the search, and torch's indexing warning reached the user. A labels
    key is the probe loss's targets (docs/integrations.md): it was NaN on every row."""
    features, label = keys

    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                           torch.nn.Linear(8, 3))

        def forward(self, batch):
            return self.net(batch[features])

    model = DictModel()
    g = torch.Generator().manual_seed(0)
    batch = {features: torch.randn(16, 6, generator=g),
             label: torch.randint(0, 3, (16,), generator=g)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    with ls.Monitor(model, None, tmp_path / "run.h5", optimizer=opt, probe=batch,
                    closure=lambda m, b: F.cross_entropy(m(b), b[label]),
                    metrics=["sentinels"], warn=False) as mon, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            loss = F.cross_entropy(model(batch), batch[label])
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=batch, loss=loss)
            (sentinels,) = [m for m in mon.metrics if m.name == "sentinels"]
            k = sentinels._samples
            with torch.no_grad():
                expected.append(float(F.cross_entropy(
                    model({features: batch[features][:k]}), batch[label][:k])))
    assert not mon.findings
    assert not caught, [str(w.message) for w in caught]
    r = mon.run().series("sentinels", "r_secant")[1]
    assert np.isnan(r[0]) and np.isfinite(r[1:]).all() and (r[1:] > 0).all()
    probe_loss = mon.run().series("sentinels", "probe_loss")[1]
    if label == "label":  # no key the docs name for targets: no probe loss
        assert np.isnan(probe_loss).all()
    else:
        np.testing.assert_allclose(probe_loss, expected, rtol=1e-6)


def test_a_models_own_type_error_is_reported_not_the_dict_fallbacks(tmp_path):
    """The model(batch) fallback's error ('must be Tensor, not dict') replaced the model's."""

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.lin(x).sum(dim="no such dim")  # the model's own TypeError

    batch = {"x": torch.randn(8, 6), "y": torch.randint(0, 3, (8,))}
    with pytest.warns(RuntimeWarning):
        with ls.Monitor(Broken(), F.cross_entropy, tmp_path / "run.h5", probe=batch,
                        metrics=["sentinels"], warn=False) as mon:
            mon.step(0, batch=batch)
    (failed,) = [f for f in mon.findings if f.rule == "metric_failed"]
    assert "not dict" not in failed.message and "sum" in failed.message


class _Tagger(torch.nn.Module):
    """A token classifier called with keyword arguments, as a Hugging Face model is."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(VOCAB, 16), torch.nn.Linear(16, 5)
        with torch.no_grad():  # the pad token's features are large: its logits move most
            self.embed.weight[0] *= 20

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.embed(input_ids))


@pytest.mark.parametrize("marked_by", ["attention_mask", "labels"])
def test_padded_positions_are_left_out_of_the_logit_rows(marked_by):
    """Padding moved most: r_secant came from a padded row on 124 of 149 steps of a
    padded token classifier's probe, 1.7x that of its real tokens."""
    model = _Tagger()
    g = torch.Generator().manual_seed(3)
    real = torch.ones(4, SEQ, dtype=torch.bool)
    real[1, 5:], real[3, 2:] = False, False  # right padding, with the pad token 0
    ids = torch.where(real, torch.randint(1, VOCAB, (4, SEQ), generator=g), 0)
    labels = torch.where(real, torch.randint(0, 5, (4, SEQ), generator=g), -100)
    probe = {"input_ids": ids, "labels": labels}
    if marked_by == "attention_mask":
        probe = {"input_ids": ids, "attention_mask": real.long(), "labels": labels}

    def loss_fn(logits, y):
        return F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1))

    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    logits = []
    with ls.Monitor(model, None, optimizer=opt, metrics=[Sentinels(subsample=4)],
                    closure=lambda m, b: loss_fn(m(b["input_ids"]), b["labels"]),
                    probe=probe, warn=False, strict=True) as mon:
        for step in range(3):
            opt.zero_grad()
            loss_fn(model(ids), labels).backward()
            opt.step()
            mon.step(step)
            with torch.no_grad():
                logits.append(model(ids).double()[real])
        run = mon.run()
    spreads = [(b - a).max(dim=-1).values - (b - a).min(dim=-1).values
               for a, b in itertools.pairwise(logits)]
    want = [float(s.max()) / np.pi for s in spreads]
    assert run.series("sentinels", "r_secant")[1][1:].tolist() == pytest.approx(want, rel=1e-12)
    assert run.series("sentinels", "max_abs")[1].tolist() == pytest.approx(
        [float(z.abs().max()) for z in logits], rel=1e-12)


def test_multi_label_targets_are_no_soft_labels_because_the_first_samples_have_one_label():
    """A BCE probe whose first samples (the sentinels' subsample) carry one label each read
    as soft labels: softmax statistics and a softmax probe_loss for BCE logits."""
    model = models.mlp(d_in=6, hidden=16, d_out=4, seed=0)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    y = torch.zeros(16, 4)
    y[torch.arange(16), torch.arange(16) % 4] = 1.0
    y[4:, 0] = 1.0  # from the fifth sample on, two labels (or one, for class 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ls.Monitor(model, F.binary_cross_entropy_with_logits, optimizer=opt,
                    metrics=[Sentinels(subsample=4)], probe=(x, y), warn=False) as mon:
        for step in range(2):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()
            mon.step(step)
        run = mon.run()
    for field in ("r_secant", "max_abs", "probe_loss"):
        assert np.isnan(run.series("sentinels", field)[1]).all(), field


class _AuxLossFirst(torch.nn.Module):
    """Returns (aux_loss, logits) without being given labels: the scalar is no loss of the
    targets."""

    def __init__(self):
        super().__init__()
        self.net = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)

    def forward(self, x):
        logits = self.net(x)
        return 1e-4 * logits.logsumexp(-1).pow(2).mean(), logits


def test_a_leading_scalar_of_a_model_called_without_labels_is_not_its_loss():
    """probe_loss recorded the auxiliary z-loss (1e-4) instead of the targets' loss."""
    model = _AuxLossFirst()
    x, y = models.classification_data(8, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ls.Monitor(model, lambda out, t: F.cross_entropy(out[1], t), optimizer=opt,
                    metrics=[Sentinels(subsample=8)], probe=(x, y), warn=False,
                    output_fn=lambda out: out[1]) as mon:
        opt.zero_grad()
        F.cross_entropy(model(x)[1], y).backward()
        opt.step()
        mon.step(0)
        with torch.no_grad():
            want = float(F.cross_entropy(model(x)[1].double(), y))
        got = mon.run().series("sentinels", "probe_loss")[1][0]
    assert got == pytest.approx(want, rel=1e-12)


def test_a_nan_update_ratio_names_no_layer():
    """update_layer read 0 where every ratio was NaN (argmax's index of a NaN): a flat line
    at layer 0 in the figures and 'last 0' in the report (report review)."""
    torch.manual_seed(0)
    model = models.mlp(d_in=6, hidden=16, d_out=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = models.classification_data(16, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=[Sentinels()],
                        probe=(x, y), warn=False) as mon:
            models.full_batch_steps(mon, model, opt, x, y, 2)
            loss = F.cross_entropy(model(x), y) * float("nan")  # the step that diverged
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(2, batch=(x, y), loss=loss)
            run = mon.run()
    _, ratio = run.series("sentinels", "update_ratio")
    _, layer = run.series("sentinels", "update_layer")
    assert math.isfinite(layer[1]) and math.isnan(ratio[2]) and math.isnan(layer[2])
