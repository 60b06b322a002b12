"""The monitor's representation metrics on the layers real models have (docs/metrics.md):
convolutions read channels-first, padding labels, attention's out_proj, sequences of
different lengths, parametrized weights. Each value against the same quantity computed by
hand from the layer's input (float64)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import landscape as ls
from landscape.store import Run


def _record(tmp_path, model, probe, metrics, loss_fn=F.cross_entropy):
    path = tmp_path / "run.h5"
    with ls.Monitor(model, loss_fn, path, probe=probe, metrics=metrics, strict=True,
                    warn=False) as mon:
        mon.step(0, batch=probe)
    return Run.open(path)


def _effective_rank(tokens: torch.Tensor) -> float:
    s = torch.linalg.svdvals(tokens.double())
    p = s / s.sum() + 1e-7  # RankMe's eps, as the metric
    return float(torch.exp(-(p * p.log()).sum()))


def _sign_stats(tokens: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """Minority fraction and mean |cos| against the top right singular vector."""
    v1 = torch.linalg.svd(weight.reshape(weight.shape[0], -1).double())[2][0]
    tokens = tokens.double()[tokens.norm(dim=1) > 0]  # zero inputs have no cosine
    cos = tokens @ v1 / tokens.norm(dim=1)
    positive = float((cos > 0).double().mean())
    return min(positive, 1 - positive), float(cos.abs().mean())


class _Convolutional(nn.Module):
    """A fully convolutional classifier: a 3x3 convolution, then a 1x1 one."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.head(F.relu(self.c1(x))).mean((2, 3))


def test_convolutions_read_one_token_per_pixel_and_their_patches(tmp_path):
    """A (B, C, H, W) input was flattened to rows of width W: wrong numbers when W == C
    (effective rank 7.4914 for 7.4490), a shape error otherwise."""
    model = _Convolutional()
    g = torch.Generator().manual_seed(1)
    probe = (torch.randn(12, 3, 8, 8, generator=g), torch.randint(0, 5, (12,), generator=g))
    run = _record(tmp_path, model, probe, [
        ls.metrics.Representation(layer="head"),
        ls.metrics.SpectralAlignment(layers=["head", "c1"]),
    ])
    with torch.no_grad():
        head_in = F.relu(model.c1(probe[0]))
    pixels = head_in.permute(0, 2, 3, 1).reshape(-1, 8)  # one 8-channel token per pixel
    patches = F.unfold(probe[0], 3, padding=1).transpose(1, 2).reshape(-1, 27)
    got = float(run.series("representation", "effective_rank")[1][0])
    assert abs(got - _effective_rank(pixels)) < 1e-5
    minority = run.series("spectral_alignment", "minority")[1][0]
    mean_abs = run.series("spectral_alignment", "mean_abs_cos")[1][0]
    for i, (tokens, layer) in enumerate([(pixels, model.head), (patches, model.c1)]):
        want_minority, want_mean = _sign_stats(tokens, layer.weight.detach())
        assert abs(minority[i] - want_minority) < 1e-6
        assert abs(mean_abs[i] - want_mean) < 1e-5


def test_collapse_leaves_padding_labels_out(tmp_path):
    """A token classifier with -100 padding: 'labels must be non-negative' at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(1, 20, (10, 6), generator=g), torch.randint(0, 4, (10, 6), generator=g)
    y[:5, -2:] = -100

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, 4), target.reshape(-1))

    run = _record(tmp_path, model, (x, y), [ls.metrics.Collapse()], loss_fn)
    with torch.no_grad():
        h = F.relu(model[1](model[0](x))).reshape(-1, 16)
    keep = y.reshape(-1) >= 0
    want = ls.functional.neural_collapse(h[keep], y.reshape(-1)[keep], classifier=model[3])
    assert float(run.series("collapse", "nc1")[1][0]) == float(want.nc1)


def test_spectral_alignment_skips_attention_out_proj_by_default(tmp_path):
    """nn.MultiheadAttention reads out_proj.weight itself: that column was NaN for ever."""

    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.attn(h, h, h)[0].mean(1))

    g = torch.Generator().manual_seed(3)
    probe = (torch.randn(8, 5, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
    metric = ls.metrics.SpectralAlignment()
    run = _record(tmp_path, WithAttention(), probe, [metric])
    assert metric.layers == ["inp", "head"]
    assert torch.isfinite(torch.as_tensor(run.series("spectral_alignment", "minority")[1])).all()


def test_a_layer_that_starts_at_zero_is_aligned_once_it_moves(tmp_path):
    """LoRA's B starts at zero: its NaN singular vector was kept as the next warm start,
    and every later row of every layer failed ("init must be a non-zero vector")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        model[2].weight.zero_()
    g = torch.Generator().manual_seed(3)
    probe = (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = tmp_path / "run.h5"
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, probe=probe, warn=False,
                    metrics=[ls.metrics.SpectralAlignment(schedule=1)], alarms=False) as mon:
        for step in range(3):
            opt.zero_grad()
            F.cross_entropy(model(probe[0]), probe[1]).backward()
            if step > 0:
                opt.step()  # the zero layer moves from the second step on
            mon.step(step, batch=probe)
        run = mon.run()
        _, minority = run.series("spectral_alignment", "minority")
        assert not run.findings()  # no metric failed
    assert torch.isfinite(torch.as_tensor(minority[:, 0])).all()
    assert math.isnan(minority[0, 1]) and torch.isfinite(torch.as_tensor(minority[1:, 1])).all()
    expected, _ = _sign_stats(torch.tanh(model[0](probe[0])).detach(), model[2].weight.detach())
    assert minority[-1, 1] == pytest.approx(expected, abs=1e-6)


def test_a_list_probe_of_sequences_of_different_lengths(tmp_path):
    """torch.cat of (3, 6, d) and (3, 4, d) captures failed at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16, 12), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 16))
    g = torch.Generator().manual_seed(4)

    def lm(n, t):
        ids = torch.randint(0, 16, (n, t + 1), generator=g)
        return ids[:, :-1], ids[:, 1:]

    def loss_fn(out, target):
        return F.cross_entropy(out.reshape(-1, 16), target.reshape(-1))

    probe = [lm(3, 6), lm(3, 4)]
    run = _record(tmp_path, model, probe, [ls.metrics.Representation()], loss_fn)
    with torch.no_grad():
        tokens = torch.cat([model[0](x).reshape(-1, 12) for x, _ in probe])
        tokens = F.gelu(model[1](tokens))  # the input of the last linear layer
    got = float(run.series("representation", "effective_rank")[1][0])
    assert abs(got - _effective_rank(tokens)) < 1e-5


def test_setup_does_not_run_a_spectral_norm_power_iteration(tmp_path):
    """Reading a spectral-normed weight in train mode updates its _u buffer: the metric's
    setup did that before the first step, so the monitored run differed from the plain one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 4))
    parametrizations.spectral_norm(model[2])
    u = model[2].parametrizations.weight[0]._u.clone()
    g = torch.Generator().manual_seed(5)
    probe = (torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g))
    with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", probe=probe,
                    metrics=[ls.metrics.SpectralAlignment()]):
        assert torch.equal(model[2].parametrizations.weight[0]._u, u)  # was 1.2e-3 off
    assert model.training


def test_collapse_says_when_the_last_linear_layer_is_not_the_classifier(tmp_path):
    """A head computed with F.linear (tied to the embedding): the last nn.Linear is an MLP
    layer, and the failure read 'labels must be < 12'."""

    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(30, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))

        def forward(self, x):
            return F.linear(self.mlp(self.emb(x)), self.emb.weight)

    x = torch.randint(0, 30, (16,), generator=torch.Generator().manual_seed(6))
    y = (x + 1) % 30
    with ls.Monitor(TiedHead(), F.cross_entropy, tmp_path / "run.h5", probe=(x, y),
                    metrics=[ls.metrics.Collapse()], warn=False) as mon:
        with pytest.warns(RuntimeWarning, match="it is not the classifier"):
            mon.step(0, batch=(x, y))


def test_collapse_says_when_the_probe_holds_one_class(tmp_path):
    # every index was NaN without a word (a probe from a loader sorted by class)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.full((16,), 2)
    with ls.Monitor(model, F.cross_entropy, tmp_path / "run.h5", probe=(x, y),
                    metrics=[ls.metrics.Collapse()], warn=False) as mon:
        with pytest.warns(RuntimeWarning, match="collapse needs at least two classes in the "
                                                "probe; it holds class 2 alone"):
            mon.step(0, batch=(x, y))


@pytest.mark.parametrize("case", ["past_classes", "all_ignored"])
def test_collapse_counts_classes_after_the_ignored_labels_are_left_out(tmp_path, case):
    """An ignore index past the classes leaving one class gave a silent NaN row (the class
    count was read before it was left out), and every label -100 blamed the features'
    shape (review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(16, 6)
    if case == "past_classes":
        y, loss = torch.tensor([0] * 8 + [3] * 8), lambda o, t: F.cross_entropy(
            o, t, ignore_index=3)
        said = "collapse needs at least two classes in the probe; it holds class 0 alone"
    else:
        y, loss = torch.full((16,), -100), F.cross_entropy
        said = "collapse: every label of the probe is ignored"
    with ls.Monitor(model, loss, tmp_path / "run.h5", probe=(x, y),
                    metrics=[ls.metrics.Collapse()], warn=False) as mon:
        with pytest.warns(RuntimeWarning, match=re.escape(said)):
            mon.step(0, batch=(x, y))


@pytest.mark.parametrize("targets", ["soft", "regression"])
def test_collapse_says_it_needs_class_labels_for_float_targets(tmp_path, targets):
    # mixup's soft labels were blamed on a shape ("targets do not match the penultimate
    # features"), a regression head's on a tied embedding ("it is not the classifier")
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    if targets == "soft":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        y = F.softmax(torch.randn(16, 3), -1)
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        y = torch.randn(16, 1)
    with ls.Monitor(model, F.mse_loss, tmp_path / "run.h5", probe=(x, y),
                    metrics=[ls.metrics.Collapse()], warn=False) as mon:
        with pytest.warns(RuntimeWarning, match="collapse needs integer class labels; the "
                                                "probe's targets are torch.float32"):
            mon.step(0, batch=(x, y))


@pytest.mark.parametrize("conv", [
    nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 4, padding="same"),
    nn.Conv2d(3, 4, 3, padding="same", dilation=2), nn.Conv2d(3, 4, 3, padding="valid"),
    nn.Conv2d(3, 4, 3, stride=2)])
def test_conv_patches_reproduce_the_convolution(conv):
    """padding='same' (an even kernel pads one more zero after) and 'valid' were a NaN row."""
    from landscape.metrics.representation import _conv_patches

    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        out = conv(x) - conv.bias[:, None, None]
    patches = _conv_patches(conv, x)
    flat = patches @ conv.weight.detach().reshape(4, -1).T  # (positions, out)
    want = out.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(flat, want, atol=1e-5)


def test_collapse_on_a_sequence_classifier_reading_every_position_says_what_it_counted():
    """The message was "targets do not match the penultimate features" (the healthy
    benchmark under standard, on a transformer classifying by its last position)."""

    class LastPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.emb(x))[:, -1]

    model = LastPosition()
    x, y = torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with ls.Monitor(model, F.cross_entropy, optimizer=opt, metrics=["collapse"],
                    probe=(x, y), warn=False) as mon:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(0, batch=(x, y), loss=loss)
    (finding,) = mon.findings
    assert "6 labels for 30 rows of penultimate features at layer 'head'" in finding.message


def test_a_layer_whose_units_all_died_records_rank_zero_and_rank_collapse_warns(tmp_path):
    """Every ReLU unit dead (a learning-rate spike): RankMe of the zero matrix is NaN, and a
    NaN row left the total collapse without a finding; the monitor records rank 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(2)
    probe = (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    path = tmp_path / "run.h5"
    with ls.Monitor(model, F.cross_entropy, path, probe=probe, warn=False,
                    metrics=[ls.metrics.Representation(schedule=1)]) as mon:
        for step in range(10):
            if step == 8:  # the step that kills every unit
                with torch.no_grad():
                    model[0].bias.fill_(-1e3)
            mon.step(step, batch=probe)
    with Run.open(path) as run:
        _, rank = run.series("representation", "effective_rank")
        found = [(f.step, f.rule, f.severity) for f in run.findings()]
    assert (rank[:8] > 2).all()
    assert rank[8] == 0.0 and rank[9] == 0.0
    assert (8, "rank_collapse", "warning") in found
    assert math.isnan(float(ls.functional.effective_rank(torch.zeros(4, 3)).value))


def test_a_default_layer_the_forward_never_calls_names_the_remedy(tmp_path):
    """An auxiliary head registered after the classifier is the default layer; its rows
    are NaN for the whole run, and the failure said only that it was not called
    (model-structures audit)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.aux = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    probe = (torch.randn(12, 6), torch.randint(0, 3, (12,)))
    for metric, name in ((ls.metrics.Collapse(), "Collapse"),
                         (ls.metrics.Representation(), "Representation")):
        with pytest.warns(RuntimeWarning, match=rf"'aux' was not called .*{name}\(layer=\.\.\.\)"):
            with ls.Monitor(Net(), F.cross_entropy, None, probe=probe, metrics=[metric],
                            warn=False) as mon:
                mon.step(0, batch=probe)
    named = _record(tmp_path, Net(), probe, [ls.metrics.Collapse(layer="head")])
    assert math.isfinite(float(named.series("collapse", "nc1")[1][0]))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _hidden_of(model, x, layer):
    seen = {}

    def keep(module, args, out):
        seen.setdefault("x", args[0].detach())

    handle = model.get_submodule(layer).register_forward_hook(keep)
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"]


def test_lora_layers_are_read_as_the_layer_the_model_applies(tmp_path):
    """The default layer was the head's lora_B (its input the rank-2 bottleneck), and every
    LoRA layer was measured against the frozen W0, not W0 + s B A."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_MLP(), LoraConfig(r=2, target_modules=["fc2", "head"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # adapters that trained
    x, y = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3
    run = _record(tmp_path, model, (x, y), [
        ls.metrics.Representation(), ls.metrics.Collapse(), ls.metrics.SpectralAlignment()])
    config = {m["name"]: m for m in run.config["metrics"]}
    layers = config["spectral_alignment"]["layers"]
    assert layers == ["base_model.model.fc1", "base_model.model.fc2", "base_model.model.head"]
    head = model.get_submodule("base_model.model.head")
    assert config["collapse"]["layer"] == "base_model.model.head"
    features = _hidden_of(model.eval(), x, "base_model.model.head")
    assert features.shape[1] == 12  # the head's input, not the bottleneck
    applied = head.base_layer.weight + head.get_delta_weight("default")
    torch.testing.assert_close(model(x), features @ applied.T + head.base_layer.bias)
    want = ls.functional.neural_collapse(features, y, classifier=applied.detach(),
                                         bias=head.base_layer.bias.detach())
    assert run.series("collapse", "nc4")[1][0] == pytest.approx(float(want.nc4))
    assert run.series("collapse", "nc3")[1][0] == pytest.approx(float(want.nc3), rel=1e-6)
    fc2 = model.get_submodule("base_model.model.fc2")
    _, mean_cos = _sign_stats(_hidden_of(model, x, "base_model.model.fc2"),
                              (fc2.base_layer.weight + fc2.get_delta_weight("default")).detach())
    assert run.series("spectral_alignment", "mean_abs_cos")[1][0][1] == pytest.approx(
        mean_cos, rel=1e-4)


def test_a_gpt2_conv1d_layer_is_read_in_its_transposed_layout(tmp_path):
    """transformers' Conv1D stores (in, out): the stored matrix's right singular vector
    lives in the output space (a wrong value on c_proj, an error on c_fc)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(2))
    probe = {"input_ids": ids, "labels": ids}
    layers = ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=[ls.metrics.SpectralAlignment(layers=layers)], strict=True,
                    warn=False) as mon:
        mon.step(0, batch=probe)
    got = Run.open(path).series("spectral_alignment", "mean_abs_cos")[1][0]
    model.eval()
    for i, layer in enumerate(layers):
        tokens = _hidden_of(model, ids, layer)
        tokens = tokens.reshape(-1, tokens.shape[-1])
        want = _sign_stats(tokens, model.get_submodule(layer).weight.detach().T)[1]
        assert got[i] == pytest.approx(want, rel=1e-4), layer


class _KeywordAndAlias(nn.Module):
    """A head called with a keyword argument, registered under a second name too."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 3)
        self.fc = self.classifier

    def forward(self, x):
        return self.fc(input=torch.tanh(self.body(x)))


def test_a_layer_called_with_a_keyword_and_named_by_its_alias_is_read(tmp_path):
    """The keyword-called head read 'was not called'; its alias 'fc' was 'not a submodule'."""
    model = _KeywordAndAlias()
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    run = _record(tmp_path, model, (x, y), [ls.metrics.Representation(layer="fc"),
                                            ls.metrics.SpectralAlignment(layers=["fc"])])
    features = torch.tanh(model.body(x)).detach()
    assert run.series("representation", "effective_rank")[1][0] == pytest.approx(
        _effective_rank(features), rel=1e-6)
    assert run.series("spectral_alignment", "mean_abs_cos")[1][0][0] == pytest.approx(
        _sign_stats(features, model.classifier.weight.detach())[1], rel=1e-4)


def test_lora_on_gpt2_conv1d_and_lora_bias_are_read_as_applied(tmp_path):
    """PEFT wraps GPT-2's Conv1D (fan_in_fan_out): its lora_A/lora_B were listed as
    layers and the wrapper read untransposed without its adapters; a LoRA head's adapter
    bias (lora_bias=True) was left out of NC4."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    gpt = get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
        LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    assert ls.capture.linear_layers(gpt) == ["base_model.model.lm_head"]  # as without LoRA
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(2))
    layer = "base_model.model.transformer.h.0.attn.c_attn"
    path = tmp_path / "gpt.h5"
    with ls.Monitor(gpt, None, path, closure=lambda m, b: m(**b).loss, warn=False,
                    probe={"input_ids": ids, "labels": ids}, strict=True,
                    metrics=[ls.metrics.SpectralAlignment(layers=[layer])]) as mon:
        mon.step(0)
    wrapper = gpt.get_submodule(layer)
    applied = (wrapper.base_layer.weight + wrapper.get_delta_weight("default")).detach().T
    gpt.eval()
    tokens = _hidden_of(gpt, ids, layer)
    with torch.no_grad():  # the (out, in) weight reproduces the layer
        torch.testing.assert_close(wrapper(tokens), tokens @ applied.T
                                   + wrapper.base_layer.bias, rtol=1e-5, atol=1e-6)
    tokens = tokens.reshape(-1, tokens.shape[-1])
    assert Run.open(path).series("spectral_alignment", "mean_abs_cos")[1][0][0] == \
        pytest.approx(_sign_stats(tokens, applied)[1], rel=1e-4)

    model = get_peft_model(_MLP(), LoraConfig(r=2, target_modules=["head"], lora_bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    x, y = torch.randn(64, 6, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3
    run = _record(tmp_path, model, (x, y), [ls.metrics.Collapse()])
    head = model.get_submodule("base_model.model.head")
    features = _hidden_of(model.eval(), x, "base_model.model.head")
    weight = head.base_layer.weight + head.get_delta_weight("default")
    bias = head.base_layer.bias + head.lora_B["default"].bias * head.scaling["default"]
    torch.testing.assert_close(model(x), features @ weight.T + bias)
    want = ls.functional.neural_collapse(features, y, classifier=weight.detach(),
                                         bias=bias.detach())
    assert run.series("collapse", "nc4")[1][0] == pytest.approx(float(want.nc4))


def _tail_padded(ids, rows, start):
    """An ``attention_mask`` of ``ids`` whose first ``rows`` rows are padding from ``start``."""
    mask = torch.ones_like(ids)
    mask[:rows, start:] = 0
    return mask


def _padded_gpt2():
    """A GPT-2 LM and a right-padded probe whose labels copy the ids, pad tokens included."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    ids = torch.randint(1, 50, (6, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 9, 5, 3, 7, 4]):
        mask[row, length:] = 0
        ids[row, length:] = 0  # the pad token
    return model, {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _inputs_of(model, probe, layer):
    seen = {}

    def keep(module, args, out):
        seen.setdefault("x", args[0].detach())  # (returns None: the output stays)

    handle = model.get_submodule(layer).register_forward_hook(keep)
    model.eval()
    with torch.no_grad():
        model(**dict(probe))
    handle.remove()
    return seen["x"]


def test_padding_of_a_keyword_batch_is_left_out_of_the_representation_metrics(tmp_path):
    """attention_mask 0 marks padding: effective rank, uniformity, alignment and the causal
    LM's collapse read the real tokens only (they counted every position: a 3/4-padded BERT
    probe's uniformity was -1.56 against -1.85 over its real tokens)."""
    model, probe = _padded_gpt2()
    path = tmp_path / "run.h5"
    metrics = [ls.metrics.Representation(), ls.metrics.Collapse(),
               ls.metrics.SpectralAlignment(layers=["lm_head"])]
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=metrics, strict=True, warn=False) as mon:
        mon.step(0, batch=probe)
    run = Run.open(path)
    real = probe["attention_mask"].bool()
    h = _inputs_of(model, probe, "lm_head")
    tokens = h[real]
    assert tokens.shape[0] == 40 and h.reshape(-1, 16).shape[0] == 72
    got_rank = float(run.series("representation", "effective_rank")[1][0])
    got_uniformity = float(run.series("representation", "uniformity")[1][0])
    assert got_rank == pytest.approx(float(ls.functional.effective_rank(tokens).value), rel=1e-5)
    assert got_uniformity == pytest.approx(float(ls.functional.uniformity(tokens).value),
                                           rel=1e-5)
    everything = float(ls.functional.uniformity(h.reshape(-1, 16)).value)
    assert abs(everything - got_uniformity) > 1e-3  # the padding moves it
    weight = model.lm_head.weight.detach()
    want_minority, want_cos = _sign_stats(tokens, weight)
    assert float(run.series("spectral_alignment", "mean_abs_cos")[1][0][0]) == pytest.approx(
        want_cos, rel=1e-4)
    assert float(run.series("spectral_alignment", "minority")[1][0][0]) == pytest.approx(
        want_minority, abs=1e-6)  # 19 of 40 tokens, stored as float32
    # position t predicts token t + 1; both must be real (the labels hold the pad token)
    keep = (real[:, :-1] & real[:, 1:]).reshape(-1)
    feats = h[:, :-1].reshape(-1, 16)[keep]
    labels = probe["labels"][:, 1:].reshape(-1)[keep]
    want = ls.functional.neural_collapse(feats, labels, classifier=model.lm_head)
    assert float(run.series("collapse", "nc1")[1][0]) == pytest.approx(float(want.nc1), rel=1e-5)


def test_padding_of_a_token_classifier_keyword_batch_leaves_its_labels_out_too(tmp_path):
    """A token classifier's labels, one a position, are cut with its features by the mask."""

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.hidden, self.head = nn.Embedding(20, 16), nn.Linear(16, 16), \
                nn.Linear(16, 4)

        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.head(torch.relu(self.hidden(self.embed(input_ids))))

    torch.manual_seed(0)
    model = Tagger()
    g = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(1, 20, (8, 6), generator=g), torch.randint(0, 4, (8, 6),
                                                                             generator=g)
    mask = _tail_padded(ids, 4, -3)
    probe = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def closure(m, b):
        return F.cross_entropy(m(**b).reshape(-1, 4), b["labels"].reshape(-1))

    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=closure, probe=probe,
                    metrics=[ls.metrics.Collapse()], strict=True, warn=False) as mon:
        mon.step(0, batch=probe)
    with torch.no_grad():
        h = torch.relu(model.hidden(model.embed(ids)))
    real = mask.bool()
    want = ls.functional.neural_collapse(h[real], labels[real], classifier=model.head)
    assert float(Run.open(path).series("collapse", "nc1")[1][0]) == pytest.approx(
        float(want.nc1), rel=1e-6)


def _padded_t5():
    """A T5 and a probe whose encoder inputs are padded, as long as its decoder's labels."""
    import transformers

    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 40, (5, 8), generator=g)
    labels = torch.randint(1, 40, (5, 8), generator=g)
    mask = _tail_padded(ids, 3, 5)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_an_encoder_decoders_mask_is_not_applied_to_its_decoder_positions(tmp_path):
    """T5's attention_mask marks the encoder's padding; its head reads decoder positions,
    as many as the encoder's here by chance: they all count."""
    model, probe = _padded_t5()
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=[ls.metrics.Representation(layer="lm_head")], strict=True,
                    warn=False) as mon:
        mon.step(0, batch=probe)
    seen = {}

    def keep(module, args, out):
        seen.setdefault("x", args[0].detach())

    handle = model.lm_head.register_forward_hook(keep)
    model.eval()
    with torch.no_grad():
        model(**probe)
    handle.remove()
    tokens = seen["x"].reshape(-1, 16)
    assert tokens.shape[0] == 40
    got = float(Run.open(path).series("representation", "uniformity")[1][0])
    assert got == pytest.approx(float(ls.functional.uniformity(tokens).value), rel=1e-5)


def test_a_list_probe_padded_to_different_lengths_leaves_its_padding_out(tmp_path):
    """A collator pads each batch to its own longest sequence: the captures are joined as
    rows, and the masks now are too (the padding counted: -2.78 where the real tokens
    give -3.11)."""
    model, whole = _padded_gpt2()
    short = {k: v[3:, :8] for k, v in whole.items()}  # rows of lengths 3, 7, 4
    probe = [{k: v[:3] for k, v in whole.items()}, short]
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=[ls.metrics.Representation()], strict=True, warn=False) as mon:
        mon.step(0, batch=probe[0])
    tokens = torch.cat([_inputs_of(model, b, "lm_head")[b["attention_mask"].bool()]
                        for b in probe])
    assert tokens.shape[0] == 12 + 9 + 5 + 3 + 7 + 4
    got = float(Run.open(path).series("representation", "uniformity")[1][0])
    assert got == pytest.approx(float(ls.functional.uniformity(tokens).value), rel=1e-5)


class _TextAndImage(nn.Module):
    """Token features and image patches, as many as the tokens, through one head."""

    def __init__(self):
        super().__init__()
        self.embed, self.patch, self.head = nn.Embedding(20, 8), nn.Linear(12, 8), \
            nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, pixel_values):
        patches = pixel_values.reshape(pixel_values.shape[0], 6, 12)  # 6 patches
        return self.head(self.embed(input_ids) + self.patch(patches))


def test_a_mask_beside_inputs_of_another_shape_is_not_applied_and_all_padding_fails(tmp_path):
    torch.manual_seed(0)
    model = _TextAndImage()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    mask = _tail_padded(ids, 2, 3)
    probe = {"input_ids": ids, "attention_mask": mask,
             "pixel_values": torch.randn(4, 2, 6, 6, generator=g)}

    def closure(m, b):
        return m(**b).square().mean()

    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=closure, probe=probe,
                    metrics=[ls.metrics.Representation()], strict=True, warn=False) as mon:
        mon.step(0, batch=probe)
    with torch.no_grad():
        h = model.embed(ids) + model.patch(probe["pixel_values"].reshape(4, 6, 12))
    got = float(Run.open(path).series("representation", "uniformity")[1][0])
    assert got == pytest.approx(float(ls.functional.uniformity(h.reshape(-1, 8)).value),
                                rel=1e-5)

    # without the pixels the mask applies, and a batch of padding alone is no measurement
    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids))

    empty = {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}
    with ls.Monitor(Text(), None, tmp_path / "empty.h5", closure=closure, probe=empty,
                    metrics=[ls.metrics.Representation()], warn=False) as mon:
        mon.step(0, batch=empty)
        failures = [f for f in mon.findings if f.rule == "metric_failed"]
    assert failures and "padding" in failures[0].message


def _different_lengths(whole):
    return [{k: v[:3] for k, v in whole.items()}, {k: v[3:, :8] for k, v in whole.items()}]


def test_a_causal_lms_collapse_on_a_list_probe_of_different_lengths(tmp_path):
    """It raised torch.cat's size error: each batch is shifted on its own now."""
    model, whole = _padded_gpt2()
    probe = _different_lengths(whole)
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=[ls.metrics.Collapse()], strict=True, warn=False) as mon:
        mon.step(0, batch=probe[0])
    feats, labels = [], []
    for b in probe:
        h, real = _inputs_of(model, b, "lm_head"), b["attention_mask"].bool()
        keep = real[:, :-1] & real[:, 1:]
        feats.append(h[:, :-1][keep])
        labels.append(b["labels"][:, 1:][keep])
    want = ls.functional.neural_collapse(torch.cat(feats), torch.cat(labels),
                                         classifier=model.lm_head)
    assert float(Run.open(path).series("collapse", "nc1")[1][0]) == pytest.approx(
        float(want.nc1), rel=1e-5)


def test_collators_batches_position_ids_and_flattened_heads_keep_the_mask(tmp_path):
    """A list of BatchEncoding (what DataCollatorWithPadding returns) was read as one
    (inputs, targets) batch; position_ids of (1, T) dropped the mask; a head fed
    (N * T, d) rows counted the padding of a single batch."""
    import transformers

    model, whole = _padded_gpt2()
    probe = [transformers.BatchEncoding(b) for b in _different_lengths(whole)]
    tokens = torch.cat([_inputs_of(model, b, "lm_head")[b["attention_mask"].bool()]
                        for b in probe])
    with_positions = dict(whole, position_ids=torch.arange(12)[None])

    class Flat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.head = inner, nn.Linear(16, 5)

        def forward(self, input_ids, attention_mask, labels=None):
            h = self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.head(h.reshape(-1, h.shape[-1]))

    flat = Flat(model.transformer)
    cases = [(model, probe, "lm_head", tokens),
             (model, with_positions, "lm_head",
              _inputs_of(model, whole, "lm_head")[whole["attention_mask"].bool()]),
             (flat, whole, "head",
              _inputs_of(model, whole, "lm_head")[whole["attention_mask"].bool()])]
    for i, (net, data, layer, want) in enumerate(cases):
        path = tmp_path / f"run{i}.h5"

        def closure(m, b):
            return m(**b).square().mean() if m is flat else m(**b).loss

        with ls.Monitor(net, None, path, closure=closure, probe=data, strict=True, warn=False,
                        metrics=[ls.metrics.Representation(layer=layer)]) as mon:
            mon.step(0, batch=data[0] if isinstance(data, list) else data)
        got = float(Run.open(path).series("representation", "uniformity")[1][0])
        # lm_head's input is the final layer norm's output; the flat model's head reads
        # the transformer's last hidden state, which is the same tensor
        assert got == pytest.approx(float(ls.functional.uniformity(want).value), rel=1e-5), i


def test_an_encoder_decoders_encoder_layers_read_its_mask(tmp_path):
    model, probe = _padded_t5()
    mask = probe["attention_mask"]
    layers = ["encoder.block.0.layer.1.DenseReluDense.wi",
              "decoder.block.0.layer.2.DenseReluDense.wi"]
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=[ls.metrics.SpectralAlignment(layers=layers)], strict=True,
                    warn=False) as mon:
        mon.step(0, batch=probe)
    got = Run.open(path).series("spectral_alignment", "mean_abs_cos")[1][0]
    encoder, decoder = (_inputs_of(model, probe, layer) for layer in layers)
    weights = [model.get_submodule(layer).weight.detach() for layer in layers]
    assert got[0] == pytest.approx(_sign_stats(encoder[mask.bool()], weights[0])[1], rel=1e-4)
    assert got[1] == pytest.approx(_sign_stats(decoder.reshape(-1, 16), weights[1])[1],
                                   rel=1e-4)


class _CrossReader(nn.Module):
    """Token features, and a layer reading an encoder's states of the same length."""

    def __init__(self):
        super().__init__()
        self.embed, self.cross, self.head = nn.Embedding(20, 8), nn.Linear(8, 8), \
            nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask, encoder_hidden_states):
        return self.head(self.embed(input_ids) + self.cross(encoder_hidden_states))


def test_an_encoders_states_beside_the_ids_are_not_cut_by_the_decoders_mask(tmp_path):
    torch.manual_seed(0)
    model = _CrossReader()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 20, (4, 6), generator=g)
    mask = _tail_padded(ids, 2, 4)
    states = torch.randn(4, 6, 8, generator=g)
    probe = {"input_ids": ids, "attention_mask": mask, "encoder_hidden_states": states}
    path = tmp_path / "run.h5"
    with ls.Monitor(model, None, path, closure=lambda m, b: m(**b).square().mean(),
                    probe=probe, metrics=[ls.metrics.Representation(layer="cross")],
                    strict=True, warn=False) as mon:
        mon.step(0, batch=probe)
    got = float(Run.open(path).series("representation", "uniformity")[1][0])
    assert got == pytest.approx(float(ls.functional.uniformity(states.reshape(-1, 8)).value),
                                rel=1e-5)


def test_collapse_refuses_labels_laid_out_otherwise_than_its_features(tmp_path):
    """Labels of (T, N) against features of (N, T, d): the same count, other positions."""
    model, whole = _padded_gpt2()
    ids = whole["input_ids"][:4, :6]
    probe = {"input_ids": ids, "labels": ids.T.contiguous()}
    with ls.Monitor(model, None, tmp_path / "run.h5", closure=lambda m, b: m(**b).logits.mean(),
                    probe=probe, metrics=[ls.metrics.Collapse()], warn=False) as mon:
        mon.step(0, batch=probe)
        failures = [f for f in mon.findings if f.rule == "metric_failed"]
    assert failures and "labels do not match" in failures[0].message


def test_a_wrapper_holding_an_encoder_decoder_keeps_its_mask_off_the_head(tmp_path):
    """A LightningModule-style wrapper has no config: the T5 inside it is found."""
    t5, probe = _padded_t5()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = t5

        def forward(self, **batch):
            return self.net(**batch)

    path = tmp_path / "run.h5"
    with ls.Monitor(Wrapper(), None, path, closure=lambda m, b: m(**b).loss, probe=probe,
                    metrics=[ls.metrics.Representation(layer="net.lm_head")], strict=True,
                    warn=False) as mon:
        mon.step(0, batch=probe)
    tokens = _inputs_of(t5, probe, "lm_head").reshape(-1, 16)
    got = float(Run.open(path).series("representation", "uniformity")[1][0])
    assert got == pytest.approx(float(ls.functional.uniformity(tokens).value), rel=1e-5)
