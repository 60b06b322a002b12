"""Models of several inputs, batches ``((x1, x2), y)``: the curvature operators' convention
(docs/curvature.md, "Data"), now every consumer's.

The curvature operators unpacked a tuple of inputs into ``model(x1, x2)``; the sentinels,
the Taylor radius, the captured forward pass of the representation metrics, ``landscape
analyze``'s loss check and its data factories, and the surfaces did not: the default
monitor's sentinels failed at every step ("forward() missing 1 required positional
argument"), and a data factory's ``((x1, x2), y)`` was split into two batches.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from landscape_cli.commands import analyze as _analyze_command  # noqa: F401  (attaches it)
from landscape_cli.commands import surface as _surface_command  # noqa: F401
from landscape_cli.main import cli
from torch import nn

import landscape as ls
from landscape.metrics import PRESETS, preset
from landscape.monitor import Monitor

STEPS = 6


class TwoInputs(nn.Module):
    """A classifier of two inputs: an image-like part and a side vector."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(5, 8)
        self.b = nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x1) + self.b(x2)))


class Joined(nn.Module):
    """The same function of one input, ``cat(x1, x2)``: the reference."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoInputs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x[:, :5], x[:, 5:])


def _batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(12, 5, generator=g), torch.randn(12, 2, generator=g)),
             torch.randint(0, 3, (12,), generator=g)) for _ in range(STEPS)]


def _train(model, batches, metrics, joined):
    """STEPS SGD steps under a monitor of ``metrics`` (None: unmonitored, "default")."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    probe = batches[0] if not joined else (torch.cat(batches[0][0], 1), batches[0][1])
    mon = None
    if metrics == "default":
        mon = Monitor(model, F.cross_entropy, optimizer=opt, warn=False, strict=True).start()
    elif metrics is not None:
        mon = Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, probe=probe,
                      warn=False, strict=True).start()
    for step, ((x1, x2), y) in enumerate(batches):
        inputs = torch.cat([x1, x2], 1) if joined else (x1, x2)
        out = model(inputs) if joined else model(*inputs)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if mon is not None:
            mon.step(step, batch=(inputs, y), loss=loss, outputs=out)
    rows = {}
    if mon is not None:
        run = mon.run()
        series = {(m, f): np.asarray(run.series(m, f)[1]) for m in run.metrics()
                  for f in run.fields(m)}
        rows = {k: v for k, v in series.items()  # measured values (not memory peaks)
                if v.dtype.kind == "f" and k[1] != "peak_memory"}
        mon.close()
    return {k: v.clone() for k, v in model.state_dict().items()}, rows


@pytest.mark.parametrize("preset_name", ["default", "standard", "full"])
def test_every_metric_reads_a_model_of_two_inputs_as_it_reads_the_same_model_of_one(
        preset_name):
    def metrics():  # fresh metric objects for each model (they resolve its layers)
        return "default" if preset_name == "default" else preset(
            preset_name, **dict.fromkeys(PRESETS[preset_name], "every(2)"))

    batches = _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state, rows = _train(TwoInputs(), batches, metrics(), joined=False)
        _, reference = _train(Joined(), batches, metrics(), joined=True)
    unmonitored, _ = _train(TwoInputs(), batches, None, joined=False)
    assert all(torch.equal(state[k], unmonitored[k]) for k in state)  # training untouched
    assert rows.keys() == reference.keys()
    assert ("sentinels", "r_secant") in rows
    for key in rows:
        # the same function in float32, its products rounded otherwise (the joined model
        # slices its input): SLQ's last Lanczos steps amplify that rounding (its weights
        # moved 2.8e-5 on one machine), a misread input moves every value by far more
        rtol = 1e-3 if key[0] == "spectral_density" else 1e-5
        np.testing.assert_allclose(rows[key], reference[key], rtol=rtol, atol=1e-9,
                                   equal_nan=True, err_msg=str(key))
    measured = [k for k, v in rows.items() if np.isfinite(v).any()]
    assert ("sentinels", "r_secant") in measured and len(measured) > 10


def _factories(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__file__.rsplit('/tests/', 1)[0])!r})\n"
        "from tests.monitor.test_several_model_inputs import TwoInputs, Joined, _batches\n"
        "import torch\n\n"
        "def model():\n    return TwoInputs()\n\n"
        "def joined():\n    return Joined()\n\n"
        "def data():\n    return _batches()[0]\n\n"
        "def joined_data():\n    (x1, x2), y = _batches()[0]\n"
        "    return torch.cat([x1, x2], 1), y\n")
    torch.save(TwoInputs().state_dict(), tmp_path / "two-1.pt")
    torch.save(Joined().state_dict(), tmp_path / "joined-1.pt")
    return path


def test_analyze_and_surface_take_a_data_factory_of_two_inputs(tmp_path):
    fac = _factories(tmp_path)
    values = {}
    for name, model, data in (("two", "model", "data"), ("joined", "joined", "joined_data")):
        out = tmp_path / f"{name}.h5"
        common = ["--model", f"{fac}:{model}", "--data", f"{fac}:{data}", "-o", str(out), "-q"]
        analyzed = CliRunner().invoke(cli, ["analyze", str(tmp_path / f"{name}-1.pt"),
                                            "-m", "top_eigenvalues", "-k", "2", *common])
        assert analyzed.exit_code == 0, analyzed.output
        surface = CliRunner().invoke(cli, ["surface", str(tmp_path / f"{name}-1.pt"),
                                           "--steps", "3", "--dims", "1", *common])
        assert surface.exit_code == 0, surface.output
        with ls.Run.open(out) as run:
            values[name] = (run.series("top_eigenvalues", "eigenvalues")[1],
                            run.surface(run.surfaces()[0]).values["loss"])
    np.testing.assert_allclose(values["two"][0], values["joined"][0], rtol=1e-5)
    np.testing.assert_allclose(values["two"][1], values["joined"][1], rtol=1e-6)
    (x1, x2), y = _batches()[0]
    with torch.no_grad():
        centre = float(F.cross_entropy(TwoInputs()(x1, x2), y))
    assert values["two"][1][1] == pytest.approx(centre, rel=1e-6)


def test_a_surface_takes_nested_and_flat_batches_of_two_inputs_alike():
    (x1, x2), y = _batches()[0]
    nested = ls.surface.line(TwoInputs(), F.cross_entropy, ((x1, x2), y), steps=5, seed=0,
                             progress=False)
    flat = ls.surface.line(TwoInputs(), F.cross_entropy, (x1, x2, y), steps=5, seed=0,
                           progress=False)
    np.testing.assert_array_equal(nested.values["loss"], flat.values["loss"])
    assert np.isfinite(nested.values["accuracy"]).all()


class Tagger(nn.Module):
    """Token ids and a padding mask, by keyword (a tokenizer's output), one class per
    sequence: the mean of the unpadded positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(30, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1)
        return self.head(torch.tanh(pooled))


class DictFeatures(nn.Module):
    """A forward that takes one dict of features (its keys name no parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoInputs()

    def forward(self, features: dict) -> torch.Tensor:
        return self.inner(features["image"], features["side"])


def _tokens(seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(1, 30, (12, 7), generator=g)
        mask = (torch.arange(7) < torch.randint(3, 8, (12, 1), generator=g)).long()
        out.append(({"input_ids": ids, "attention_mask": mask},
                    torch.randint(0, 3, (12,), generator=g)))
    return out


def _rows_of(model, batches, metrics, call=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    mon = Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics, probe=batches[0],
                  warn=False, strict=True).start()
    for step, (inputs, y) in enumerate(batches):
        out = call(model, inputs) if call is not None else (
            model(*inputs) if isinstance(inputs, tuple) else model(**inputs))
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(inputs, y), loss=loss)
    run = mon.run()
    rows = {(m, f): np.asarray(run.series(m, f)[1]) for m in run.metrics()
            for f in run.fields(m) if f != "peak_memory"}
    mon.close()
    return {k: v for k, v in rows.items() if v.dtype.kind == "f"}


@pytest.mark.parametrize("preset_name", ["cheap", "standard"])
def test_a_dict_of_keyword_inputs_beside_the_targets_is_the_models_keywords(preset_name):
    """(tokenizer(texts), labels) batches: model(dict) failed in every metric that runs the
    model (the sentinels at every step of the default monitor)."""
    keyword = _tokens()
    positional = [((i["input_ids"], i["attention_mask"]), y) for i, y in keyword]
    metrics = preset(preset_name, **dict.fromkeys(PRESETS[preset_name], "every(2)"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = _rows_of(Tagger(), keyword, metrics)
        reference = _rows_of(Tagger(), positional,
                             preset(preset_name, **dict.fromkeys(PRESETS[preset_name],
                                                                 "every(2)")))
    assert rows.keys() == reference.keys()
    for key in rows:
        np.testing.assert_allclose(rows[key], reference[key], rtol=1e-6, equal_nan=True,
                                   err_msg=str(key))
    (inputs, y) = keyword[0]
    keyed = ls.surface.line(Tagger(), F.cross_entropy, (inputs, y), steps=3, seed=0,
                            progress=False)
    flat = ls.surface.line(Tagger(), F.cross_entropy,
                           (inputs["input_ids"], inputs["attention_mask"], y), steps=3,
                           seed=0, progress=False)
    np.testing.assert_array_equal(keyed.values["loss"], flat.values["loss"])


def test_a_dict_whose_keys_name_no_parameter_stays_one_argument():
    (x1, x2), y = _batches()[0]
    model = DictFeatures()
    rows = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = _rows_of(model, [({"image": x1, "side": x2}, y)] * 3, "cheap",
                        call=lambda m, inputs: m(inputs))
    assert np.isfinite(rows[("sentinels", "r_secant")][1:]).all()


class Pair(nn.Module):
    """A forward that takes the pair of inputs as one argument."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoInputs()

    def forward(self, pair):
        return self.inner(*pair)


class Features(nn.Module):
    """A forward of one parameter that takes a dict named after it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TwoInputs()

    def forward(self, x):
        return self.inner(x["x"][:, :5], x["x"][:, 5:])


class PassesOn(nn.Module):
    """A wrapper whose forward takes *args, **kwargs and hands them to the module it holds."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_model_call_reads_the_forward_signature():
    from landscape.batches import model_call

    t = torch.zeros(2, 5)
    assert model_call(TwoInputs(), (t, t)) == ((t, t), {})
    assert model_call(Pair(), (t, t)) == (((t, t),), {})  # one argument: the pair
    assert model_call(Features(), {"x": t}) == (({"x": t},), {})
    ids = {"input_ids": t, "attention_mask": t}
    assert model_call(Tagger(), ids) == ((), ids)
    # a wrapper of the user's own is not looked through (a forward(*xs) holding one child
    # is as likely a model of several inputs, StarInputs below): the dict is one argument
    assert model_call(PassesOn(Tagger()), ids) == ((ids,), {})


@pytest.mark.parametrize("make", [Pair, Features])
def test_a_forward_taking_its_inputs_as_one_argument_keeps_working(make):
    """((x1, x2), y) for forward(self, pair), {"x": ...} for forward(self, x): unpacking
    them everywhere broke the sentinels of both."""
    (x1, x2), y = _batches()[0]
    inputs = (x1, x2) if make is Pair else {"x": torch.cat([x1, x2], 1)}
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    metrics = preset("standard", **dict.fromkeys(PRESETS["standard"], "every(2)"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mon = Monitor(model, F.cross_entropy, optimizer=opt, metrics=metrics,
                      probe=(inputs, y), warn=False, strict=True).start()
        for step in range(3):
            loss = F.cross_entropy(model(inputs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(step, batch=(inputs, y), loss=loss)
    run = mon.run()
    assert np.isfinite(run.series("sentinels", "r_secant")[1][1:]).all()
    assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    mon.close()


class StarInputs(nn.Module):
    """A model of several inputs whose forward takes *xs, holding one child: a real model,
    not a wrapper to look through (its child takes one argument)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(7, 3)

    def forward(self, *xs):
        return self.head(torch.cat(xs, 1))


def test_a_forward_of_star_args_is_no_wrapper():
    from landscape.batches import model_call

    t1, t2 = torch.zeros(2, 5), torch.zeros(2, 2)
    assert model_call(StarInputs(), (t1, t2)) == ((t1, t2), {})


def test_a_scripted_model_keeps_its_tuple_unpacked():
    """A TorchScript module's forward has no Python signature: reading it raised."""
    from landscape.batches import model_call

    scripted = torch.jit.script(TwoInputs())
    t1, t2 = torch.zeros(2, 5), torch.zeros(2, 2)
    assert model_call(scripted, (t1, t2)) == ((t1, t2), {})
    assert model_call(scripted, {"x1": t1, "x2": t2}) == (({"x1": t1, "x2": t2},), {})


def test_a_dict_of_more_keys_than_named_goes_to_a_forward_taking_kwargs():
    from landscape.batches import model_call

    class Kw(nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            return input_ids

    keys = {"input_ids": torch.zeros(2, 3), "token_type_ids": torch.zeros(2, 3)}
    assert model_call(Kw(), keys) == ((), keys)


class KeywordOnly(nn.Module):
    """``forward(self, *, x)``: called as ``model(x=...)``; the same function as ``Joined``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Joined()

    def forward(self, *, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.inner(x) * scale


@pytest.mark.parametrize("preset_name", ["default", "standard"])
def test_a_keyword_only_forward_takes_a_tensor_batch_by_its_name(preset_name):
    """A tensor batch goes to a forward of one required keyword-only parameter by name;
    before, every forward-pass metric failed ("takes 1 positional argument")."""
    batches = [(torch.cat(x, 1), y) for x, y in _batches()]

    def train(model, call):
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        metrics = {} if preset_name == "default" else {
            "metrics": preset(preset_name, **dict.fromkeys(PRESETS[preset_name], "every(2)")),
            "probe": batches[0]}
        with Monitor(model, F.cross_entropy, optimizer=opt, warn=False, strict=True,
                     **metrics) as mon:
            for step, (x, y) in enumerate(batches):
                loss = F.cross_entropy(call(model, x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                mon.step(step, batch=(x, y), loss=loss)
            run = mon.run()
            return {(m, f): np.asarray(run.series(m, f)[1]) for m in run.metrics()
                    for f in run.fields(m) if f != "peak_memory"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        named = train(KeywordOnly(), lambda m, x: m(x=x))
        reference = train(Joined(), lambda m, x: m(x))
    assert named.keys() == reference.keys()
    for key, values in reference.items():
        if values.dtype.kind == "f":
            np.testing.assert_allclose(named[key], values, rtol=1e-5, atol=1e-9,
                                       equal_nan=True, err_msg=str(key))
    assert np.isfinite(named[("sentinels", "r_secant")][1:]).all()
