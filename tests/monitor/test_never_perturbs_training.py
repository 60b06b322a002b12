"""A monitored run gives bitwise the parameters, buffers and RNG stream of the unmonitored run
(CPU; dropout and BatchNorm; SGD with momentum and Adam; every preset with every metric due
often)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape.metrics import PRESETS, preset
from landscape.monitor import Monitor
from tests import models

STEPS = 6


def _steps(model, opt, mon, input_shape):
    """STEPS training steps on seeded batches of 12 inputs of ``input_shape``, 3 classes."""
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x = torch.randn(12, *input_shape, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        loss = F.cross_entropy(model(x), y)  # dropout draws from the global RNG
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, batch=(x, y), loss=loss)
    if mon is not None:
        mon.close()


def _run(opt_name: str, preset_name: str | None):
    torch.manual_seed(123)
    model = models.SmallCNN(seed=0)
    model.train()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = models.image_data(24, seed=9)
    mon = None
    if preset_name is not None:
        metrics = preset(preset_name, **dict.fromkeys(PRESETS[preset_name], "every(2)"))
        mon = Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, probe=probe,
                      strict=True, warn=False).start()
    _steps(model, opt, mon, (1, 6, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    return state, grads, torch.get_rng_state(), model.training


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("preset_name", ["cheap", "standard", "full"])
def test_monitored_run_is_bitwise_identical(opt_name, preset_name):
    ref_state, ref_grads, ref_rng, ref_mode = _run(opt_name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, grads, rng, mode = _run(opt_name, preset_name)
    assert state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), k  # parameters and BN buffers
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    assert torch.equal(rng, ref_rng)
    assert mode == ref_mode


def test_every_built_in_metric_is_in_a_preset_these_tests_run():
    """A built-in metric in no preset would escape the bitwise test above: add it to the
    ``full`` preset (or give it a test of its own here)."""
    from landscape.metrics.base import _REGISTRY

    built_in = {name for name, cls in _REGISTRY.items()
                if cls.__module__.startswith("landscape.")}
    assert built_in <= set(PRESETS["full"]), sorted(built_in - set(PRESETS["full"]))


def _adam_run(make_model, input_shape, monitor=None):
    """STEPS Adam steps on seeded batches of 12 inputs of ``input_shape`` and 3 classes.

    ``monitor(model, opt)`` builds the monitor (None: an unmonitored run). Returns the
    state dict, the RNG state and the (closed) monitor.
    """
    torch.manual_seed(123)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = None if monitor is None else monitor(model, opt).start()
    _steps(model, opt, mon, input_shape)
    return model.state_dict(), torch.get_rng_state(), mon


def test_the_default_monitor_without_metrics_or_probe_is_bitwise_identical():
    """The default: cheap preset with the sentinels, a probe copied from the first batch,
    adaptive schedules."""

    def cnn():
        return models.SmallCNN(seed=0)

    def default(model, opt):
        return Monitor(model, F.cross_entropy, optimizer=opt, warn=False, strict=True)

    ref, ref_rng, _ = _adam_run(cnn, (1, 6, 6))
    state, rng, mon = _adam_run(cnn, (1, 6, 6), default)
    assert mon.run().steps("sentinels").tolist() == list(range(STEPS))
    assert all(torch.equal(state[k], ref[k]) for k in ref) and torch.equal(rng, ref_rng)


@pytest.mark.parametrize("preset_name", [None, "standard"])
def test_a_model_whose_eval_merges_lora_weights_trains_bitwise_identically(preset_name):
    """loralib-style layers change their weight in train()/eval(); the monitor's eval-mode
    forwards must not call them (a merge and unmerge rounds the weight)."""

    def lora():
        return torch.nn.Sequential(models.MergingLoRA(6, 8), torch.nn.Tanh(),
                                   models.MergingLoRA(8, 3))

    _assert_bitwise_identical(lora, preset_name)


def _assert_bitwise_identical(make_model, preset_name):
    """Adam on inputs of 6 features, monitored by the default (None) or ``preset_name`` with
    every metric due every other step, against the unmonitored run."""

    def monitor(model, opt):
        metrics = None if preset_name is None else preset(
            preset_name, **dict.fromkeys(PRESETS[preset_name], "every(2)"))
        return Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, warn=False,
                       strict=True)

    ref, _, _ = _adam_run(make_model, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, _, _ = _adam_run(make_model, (6,), monitor)
    assert all(torch.equal(state[k], ref[k]) for k in ref)


class _MaxNormEmbedding(torch.nn.Module):
    """``nn.Embedding(max_norm=...)`` renormalises the rows it looks up in place, in any
    mode and without gradients: a forward on the probe writes the weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(30, 8, max_norm=1.0)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        ids = (x.abs() * 5).long().clamp(max=29)  # token ids from the seeded inputs
        return self.head(self.embed(ids).mean(1))


@pytest.mark.parametrize("preset_name", [None, "standard"])
def test_an_embedding_with_max_norm_trains_bitwise_identically(preset_name):
    _assert_bitwise_identical(_MaxNormEmbedding, preset_name)


class _SharedBlock(torch.nn.Module):
    """One block registered three times: weight sharing across depth (ALBERT-style)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(6, 8)
        block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
        self.layers = torch.nn.ModuleList([block] * 3)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_a_block_registered_three_times_trains_bitwise_identically():
    _assert_bitwise_identical(_SharedBlock, "full")


class _CompiledBlock(torch.nn.Module):
    """A compiled function inside the model, as ``self.block = torch.compile(...)`` gives.

    The diagnostics call it under no_grad, torch.func transforms and double backward; dynamo
    recompiled it for each, and the recompilation under a JVP (taylor_radius,
    spectral_density's products) changed the later compiled training steps by ~4e-9.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2 = (torch.nn.Linear(6, 16), torch.nn.Linear(16, 16),
                                     torch.nn.Linear(16, 3))
        self.compiled = torch.compile(self.body, dynamic=False)

    def body(self, h):
        return torch.tanh(self.l1(h))

    def forward(self, x):
        return self.l2(self.compiled(F.gelu(self.l0(x))))


def test_a_model_with_a_compiled_function_trains_bitwise_identically():
    torch._dynamo.reset()
    _assert_bitwise_identical(_CompiledBlock, "full")


def test_a_compiled_function_inside_the_model_is_measured_with_the_exact_product():
    """Eager inside the measurement: double backward works, no first-order fallback."""
    torch._dynamo.reset()
    model = _CompiledBlock()
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    model(x).sum().backward()  # compiled for training first
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the fallback's warning
        op = ls.Hessian(model, F.cross_entropy, (x, y))
        got = ls.top_eigenvalues(op, k=1, tol=1e-6).values
    assert op.backend_used != "first_order" and op.first_order_reason is None
    with ls.isolation.isolated(model):  # reference: the same function, never compiled
        model.compiled = model.body
        want = ls.top_eigenvalues(ls.Hessian(model, F.cross_entropy, (x, y)), k=1, tol=1e-6)
    assert torch.allclose(got, want.values, rtol=1e-5)


def test_isolated_works_inside_code_dynamo_compiles_and_can_leave_compiled_code_alone():
    """set_stance is a callable dynamo refuses to trace: a compiled training step that called
    the monitor raised 'Attempt to trace forbidden callable'."""
    from landscape import isolation

    torch._dynamo.reset()
    model = _CompiledBlock()
    x = torch.randn(4, 6)

    @torch.compile(backend="eager")
    def step(inputs):
        with isolation.isolated(model):
            return model(inputs).sum()

    assert torch.isfinite(step(x))
    # the opt-out: compiled parts stay compiled in measurements (flex attention's memory)
    try:
        isolation.EAGER_COMPILED = False
        with pytest.warns(RuntimeWarning, match="first-order"):
            op = ls.Hessian(model, F.cross_entropy, (x, torch.tensor([0, 1, 2, 0])))
            ls.top_eigenvalues(op, k=1, tol=1e-3)
        assert op.backend_used == "first_order"
    finally:
        isolation.EAGER_COMPILED = True


class _PerDeviceNoise(torch.nn.Module):
    """A noise layer drawing in every mode from a generator per device, kept in a dict, a
    list or a tuple."""

    def __init__(self, holder: str):
        super().__init__()
        self.lin = torch.nn.Linear(5, 3)
        gen = torch.Generator().manual_seed(5)
        self.gens = {"dict": {"cpu": gen}, "list": [gen], "tuple": (gen,)}[holder]

    def forward(self, x):
        gen = self.gens["cpu"] if isinstance(self.gens, dict) else self.gens[0]
        return self.lin(x + 0.1 * torch.randn(x.shape, generator=gen))


@pytest.mark.parametrize("holder", ["dict", "list", "tuple"])
def test_a_generator_held_in_a_container_attribute_is_restored(holder):
    """The sentinels' forward drew from it at every step: the weights moved by up to 0.03
    (dict) and 0.08 (list) after four steps, silently."""
    def run(monitored):
        torch.manual_seed(0)
        model = _PerDeviceNoise(holder)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mon = Monitor(model, F.cross_entropy, optimizer=opt, warn=False).start() \
                if monitored else None
            _steps(model, opt, mon, (5,))
        return model.lin.weight.detach().clone()

    assert torch.equal(run(False), run(True))
