import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.isolation import isolated, sdpa_math, stateless_call, stateless_closure
from tests import models
from tests.curvature._dense import dense_hessian


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        torch.get_rng_state(),
    )


def _assert_same(model, snap):
    state, modes, flags, rng = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng)


def test_isolated_restores_modes_rng_flags_and_grad_objects():
    model = models.cnn_bn()
    model.train()
    x, y = models.image_data()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    values = [g.clone() for g in grads]
    snap = _snapshot(model)
    python_rng = random.getstate()
    with isolated(model, copy_grads=True):
        assert not model.training
        torch.randn(5)  # consume RNG
        random.random()  # and Python's (a layer-drop drawn before testing self.training)
        model.fc.weight.requires_grad_(False)
        F.cross_entropy(model(x), y).backward()  # accumulates into .grad in place
    _assert_same(model, snap)
    assert random.getstate() == python_rng
    for p, g, v in zip(model.parameters(), grads, values):
        assert p.grad is g and torch.equal(g, v)


def test_isolated_restores_on_exception():
    model = models.mlp()
    model.train()
    snap = _snapshot(model)
    with pytest.raises(RuntimeError), isolated(model):
        torch.rand(3)
        raise RuntimeError("boom")
    _assert_same(model, snap)


def test_stateless_call_never_touches_batchnorm_statistics():
    model = models.cnn_bn()
    model.train()
    x, _ = models.image_data()
    snap = _snapshot(model)
    params = {n: p.detach() * 1.1 for n, p in model.named_parameters()}
    with isolated(model, eval_mode=False):  # train mode: BN batch stats, dropout draws
        out = stateless_call(model, params, (x,))
    _assert_same(model, snap)
    assert out.shape == (x.shape[0], 3)
    with pytest.raises(ValueError, match="not parameters"):
        stateless_call(model, {"nope": torch.zeros(1)}, (x,))


def test_stateless_closure_substitutes_parameters():
    model = models.mlp()
    x, y = models.classification_data()
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    loss = stateless_closure(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), zero, (x, y))
    assert torch.allclose(loss, torch.log(torch.tensor(3.0)))  # zero logits: uniform


def test_sdpa_math_allows_double_backward_through_attention():
    model = models.TinyTransformer(seed=0)
    batch = models.token_data()
    params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
    with sdpa_math():
        loss = stateless_closure(model, models.lm_loss, params, batch)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        gv = sum((g * torch.ones_like(g)).sum() for g in grads)
        hv = torch.autograd.grad(gv, list(params.values()))
    assert all(torch.isfinite(h).all() for h in hv)


class _FrozenNorm(torch.nn.Module):
    """A module whose train() keeps its BatchNorm in eval mode, and counts the calls."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.calls = []

    def train(self, mode=True):
        self.calls.append(mode)
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.bn(self.lin(x))


def test_isolated_eval_mode_sets_flags_without_calling_a_custom_train():
    model = torch.nn.Sequential(_FrozenNorm(), torch.nn.Dropout(0.5))
    model.train()
    inner = model[0]
    assert inner.training and not inner.bn.training
    inner.calls.clear()
    with isolated(model):
        assert inner.calls == []  # eval mode needs the flags only
        assert not any(m.training for m in model.modules())
    assert inner.calls == []
    assert [m.training for m in model.modules()] == [True, True, True, False, True]


def test_isolated_train_mode_honours_a_custom_train_override_and_restores_every_flag():
    model = torch.nn.Sequential(_FrozenNorm(), torch.nn.Dropout(0.5))
    model.eval()
    inner = model[0]
    inner.calls.clear()
    with isolated(model, eval_mode=False):
        assert inner.calls == [True]  # model.train() reached the override ...
        assert [m.training for m in model.modules()] == [True, True, True, False, True]
    assert inner.calls == [True, False]  # ... and model.train(False) undid it on exit
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("eval_mode", [True, False])
def test_isolated_leaves_a_merging_lora_layer_bitwise_unchanged(eval_mode):
    model = torch.nn.Sequential(models.MergingLoRA(6, 5), torch.nn.ReLU(), models.MergingLoRA(5, 3))
    model.train()
    weights = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 6)
    with isolated(model, eval_mode=eval_mode):
        inside = model(x)
    assert torch.allclose(inside, model(x))  # the same function inside and after
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert not model[0].merged and not model[2].merged and model.training


def test_isolated_sets_and_restores_flags_directly_for_plain_modules():
    model = models.cnn_bn()
    model.train()
    model.fc.eval()  # a mixed state is restored exactly, module by module
    modes = [m.training for m in model.modules()]
    with isolated(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes


def test_isolated_restores_tied_parameters_once_and_their_grad():
    lin = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), torch.nn.Linear(4, 4, bias=False))
    model[2].weight = lin.weight  # tied
    g = torch.ones(4, 4)
    lin.weight.grad = g
    with isolated(model):
        lin.weight.grad = None
        lin.weight.requires_grad_(False)
    assert lin.weight.grad is g and lin.weight.requires_grad


def test_eval_mode_false_evaluates_in_training_mode_whatever_the_models_mode():
    """``eval_mode=False`` means train mode (docs/conventions.md), also for a model left in
    eval mode after loading: a surface centre and the Hessian then use batch statistics."""
    import landscape as ls

    model = models.cnn_bn()
    model.drop.p = 0.0  # train mode's difference is then BatchNorm's batch statistics alone
    x, y = models.image_data()
    model.eval()
    with isolated(model, eval_mode=False):
        assert all(m.training for m in model.modules())
    assert not any(m.training for m in model.modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_loss = float(F.cross_entropy(
        stateless_call(model.train(), {}, (x,)), y))  # batch statistics, buffers cloned
    model.eval()
    surf = ls.surface.line(model, F.cross_entropy, (x, y), steps=3, span=0.5, eval_mode=False)
    assert float(surf.values["loss"][1]) == pytest.approx(train_loss, rel=1e-6)
    eval_h = ls.Hessian(model, F.cross_entropy, (x, y)).to_dense()
    train_h = ls.Hessian(model, F.cross_entropy, (x, y), eval_mode=False).to_dense()
    assert not torch.allclose(eval_h, train_h)
    assert not any(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_train_mode_restores_each_override_to_its_own_mode():
    """A root in eval mode holding a LoRA layer that trains: each override is called back
    with its own original mode (the root's train(False) would leave the layer merged)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), models.MergingLoRA(6, 3))
    model.eval()
    model[1].train()  # unmerged, training
    weights = [p.detach().clone() for p in model.parameters()]
    with isolated(model, eval_mode=False):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [False, False, True]
    assert not model[1].merged
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("outer", [True, False])
def test_batch_statistics_puts_only_normalisation_layers_in_train_mode(outer):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5),
                          nn.InstanceNorm1d(4, track_running_stats=True), nn.SyncBatchNorm(4),
                          nn.LayerNorm(4))
    model.train(outer)
    with isolated(model, batch_statistics=True):
        # SyncBatchNorm's train mode all-reduces over the ranks: left in eval mode; and a
        # model the user evaluates keeps its running statistics
        assert [m.training for m in model] == [False, outer, False, outer, False, False]
        assert not model.training
    assert all(m.training is outer for m in model.modules())
    with isolated(model, eval_mode=False, batch_statistics=True):  # no effect in train mode
        assert all(m.training for m in model.modules())


def test_batch_statistics_reads_the_modes_before_the_outermost_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
    model.train()
    model[2].eval()  # frozen for fine-tuning: the optimizer descends its running statistics
    with isolated(model):  # the monitor's block: everything in eval mode
        assert not any(m.training for m in model.modules())
        with isolated(model, batch_statistics=True):  # a curvature operator inside it
            assert [m.training for m in model] == [False, True, False]
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model] == [True, True, False]
    with isolated(model, batch_statistics=True):  # the outermost block is gone
        assert [m.training for m in model] == [False, True, False]


def test_a_wrappers_block_covers_the_operators_on_its_inner_module():
    """The monitor and the operators evaluate the module inside DDP / torch.compile."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    compiled = torch.compile(model)  # not compiled until called: nothing runs here
    with isolated(compiled):
        assert not model[1].training
        with isolated(model, batch_statistics=True):
            assert model[1].training
    assert model[1].training and compiled.training


@pytest.mark.parametrize("with_generator", [False, True])
def test_reading_a_loader_leaves_trainings_randomness_where_it_was(with_generator):
    """ls.Hessian on a validation DataLoader drew a seed from torch's global generator (every
    later shuffle and dropout mask changed), and one built with generator=g advanced g,
    as surface.plane did at every grid point."""
    import landscape as ls

    x, y = models.classification_data()
    g = torch.Generator().manual_seed(3) if with_generator else None
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8,
                                         shuffle=with_generator, generator=g)
    model = models.mlp()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    loader_before = None if g is None else g.get_state()
    H = ls.Hessian(model, F.cross_entropy, loader)
    ls.top_eigenvalues(H, k=1)
    ls.surface.line(model, F.cross_entropy, loader, steps=3, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    if g is not None:
        assert torch.equal(g.get_state(), loader_before)


def test_measurements_run_without_tf32_and_give_the_callers_settings_back():
    """On Ampere GPUs cuDNN uses TF32 by default (1e-3 relative, the solvers' tolerance),
    and every matmul after set_float32_matmul_precision('high') (CUDA audit): a forward
    inside a measurement sees both off, training keeps its own settings."""
    import torch.nn.functional as F

    from landscape.curvature import Hessian

    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append((torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()))
            return super().forward(x)

    model = Probe(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        op = Hessian(model, F.cross_entropy, (x, y))
        op.matvec(tuple(torch.randn_like(p) for p in model.parameters()))
        assert seen and all(s == (False, False, "highest") for s in seen)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[1])
        torch.backends.cudnn.allow_tf32 = before[0]


_PRECISION_SETUPS = {
    "defaults": "",
    "legacy flag": "torch.backends.cuda.matmul.allow_tf32 = True",
    "legacy flag, then medium": "torch.backends.cuda.matmul.allow_tf32 = True\n"
                                "torch.set_float32_matmul_precision('medium')",
    "high, then cudnn off": "torch.set_float32_matmul_precision('high')\n"
                            "torch.backends.cudnn.allow_tf32 = False",
    "new API, all backends": "torch.backends.fp32_precision = 'tf32'",
    "new API, CUDA matmul": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "new API, oneDNN bf16 on the CPU": "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'",
    "new API, oneDNN convolutions in bf16": "torch.backends.mkldnn.conv.fp32_precision = 'bf16'",
}


@pytest.mark.parametrize("setup", list(_PRECISION_SETUPS))
def test_a_monitor_runs_and_leaves_every_precision_setting_as_the_user_set_it(setup):
    """torch >= 2.9 has two ways to set float32 precision and refuses to read one back
    after they were mixed in some orders: the monitor's full-float32 block raised at
    start() for a user of the new one, and left torch's own getter raising for another
    (interactive audit). Each setup in a fresh process: the settings are global."""
    import subprocess
    import sys

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision") and "new API" in setup:
        pytest.skip("torch < 2.9 has no fp32_precision settings")  # pragma: no cover
    code = f"""
import torch, torch.nn.functional as F
import landscape as ls
from landscape.isolation import full_float32
{_PRECISION_SETUPS[setup]}

def read():
    out = []
    for get in (torch.get_float32_matmul_precision,
                lambda: torch.backends.cuda.matmul.allow_tf32,
                lambda: torch.backends.cudnn.allow_tf32,
                *[(lambda o=o: o.fp32_precision) for o in (
                    getattr(torch.backends.cuda, "matmul", None),
                    getattr(torch.backends.mkldnn, "matmul", None),
                    getattr(torch.backends.mkldnn, "conv", None))
                  if hasattr(o, "fp32_precision")]):
        try:
            out.append(repr(get()))
        except RuntimeError as err:
            out.append("raises")
    return out

before = read()
with full_float32():  # TF32 and bf16 off, whichever way torch reads them
    new = [o.fp32_precision for o in (torch.backends.cuda.matmul,
                                      getattr(torch.backends.mkldnn, "matmul", None),
                                      getattr(torch.backends.mkldnn, "conv", None))
           if hasattr(o, "fp32_precision")]
    try:
        legacy = [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32]
        inside = legacy == ["highest", False] and not {{"tf32", "bf16"}} & set(new)
    except RuntimeError:
        inside = all(v == "ieee" for v in new)
model = torch.nn.Linear(4, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with ls.Monitor(model, F.cross_entropy, None, optimizer=opt, metrics="standard",
                probe=(torch.randn(8, 4), torch.randint(0, 3, (8,)))) as mon:
    for step in range(3):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        mon.step(step, batch=(x, y), loss=loss)
assert read() == before, (before, read())
assert inside
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_recurrent_layers_on_a_gpu_are_differentiated_without_cudnn(monkeypatch):
    """cuDNN's RNN backward refuses eval mode and has no double backward (CUDA audit): the
    curvature products of an LSTM on a GPU would all fail. Checked on the CPU through the
    device test the context reads."""
    import landscape.isolation as iso
    from landscape.curvature import Hessian

    lstm = nn.Sequential(nn.LSTM(3, 4, batch_first=True))

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)

        def forward(self, x):
            seen.append(torch.backends.cudnn.enabled)
            return self.head(self.rnn(x)[0][:, -1])

    seen = []
    model = Last()
    x, y = torch.randn(5, 6, 3), torch.randint(0, 2, (5,))
    assert not iso._cuda_recurrent(lstm)  # on the CPU: nothing changes
    op = Hessian(model, F.cross_entropy, (x, y))
    v = tuple(torch.randn_like(p) for p in model.parameters())
    cpu = op.matvec(v)
    assert seen and all(seen)
    monkeypatch.setattr(iso, "_cuda_recurrent", lambda m: any(
        isinstance(k, nn.RNNBase) for k in m.modules()))
    seen.clear()
    gpu_like = Hessian(model, F.cross_entropy, (x, y)).matvec(v)  # its own forward
    assert seen and not any(seen) and torch.backends.cudnn.enabled
    assert all(torch.allclose(a, b) for a, b in zip(cpu, gpu_like))


class _SharedBlocks(nn.Module):
    """One block registered three times (weight sharing) and beside a wrapper holding it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(4, 6)
        block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.layers = nn.ModuleList([block] * 3)
        self.wrapped = nn.Sequential(block)  # as torch.compile's wrapper holds _orig_mod
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(self.wrapped(h))


def test_a_module_registered_twice_keeps_its_parameters_through_a_substitution():
    from landscape.curvature import Hessian, top_eigenvalues
    from landscape.surface import interpolate

    model = _SharedBlocks()
    objects = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    assert torch.equal(stateless_call(model, zero, x), torch.zeros(16, 3))
    assert torch.equal(stateless_closure(model, lambda m, b: m(b), zero, x), torch.zeros(16, 3))
    top = top_eigenvalues(Hessian(model, F.cross_entropy, (x, y)), k=1, tol=1e-8).values
    other = _SharedBlocks()
    with torch.no_grad():
        other.out.weight.mul_(2)
    interpolate(model, model, other, F.cross_entropy, (x, y), steps=3)
    interpolate(model, model, other, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y),
                steps=3, closure=True)
    assert all(p is objects[n] for n, p in model.named_parameters(remove_duplicate=False))
    assert all(type(p) is nn.Parameter for p in model.parameters())
    wide = _SharedBlocks().double()  # the same weights, differentiated densely
    truth = torch.linalg.eigvalsh(dense_hessian(wide, F.cross_entropy, (x.double(), y)))[-1]
    torch.testing.assert_close(top[0].double(), truth, rtol=1e-4, atol=0)


def test_a_tied_parameter_is_substituted_in_every_module_sharing_it():
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    ids = torch.tensor([0, 1, 4])
    twice = {"0.weight": 2 * emb.weight.detach()}
    want = model(ids) * 4  # both uses of the weight doubled
    torch.testing.assert_close(stateless_call(model, twice, ids), want)
    assert model[1].weight is model[0].weight and type(model[0].weight) is nn.Parameter


def test_a_parameter_another_module_holds_as_a_buffer_takes_the_substitute():
    model = nn.Module()
    model.a = nn.Linear(4, 4, bias=False)
    model.b = nn.Module()
    model.b.register_buffer("w", model.a.weight)  # the same tensor object, as a buffer
    model.forward = lambda x: model.a(x) + x @ model.b.w.T
    zero = {"a.weight": torch.zeros(4, 4)}
    assert torch.equal(stateless_call(model, zero, torch.randn(2, 4)), torch.zeros(2, 4))
    assert type(model.a.weight) is nn.Parameter and model.b.w is model.a.weight
