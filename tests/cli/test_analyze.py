"""`landscape analyze`: checkpoints into one run; every bad input gives one line."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from landscape_cli.commands import analyze as _analyze  # noqa: F401  (attaches the command)
from landscape_cli.main import cli

import landscape as ls
from landscape.curvature import Hessian, top_eigenvalues
from tests.cli._checkpoints import train_and_save
from tests.cli._results import one_line_error


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    paths, ns = train_and_save(root, steps=30, every=10, wrap=True)
    return root, paths, ns


def _invoke(args):
    result = CliRunner().invoke(cli, args)
    return result


def _analyze_first(setup, tmp_path, *args):
    """``landscape analyze`` of the first checkpoint with the setup's factories, quiet."""
    root, paths, _ = setup
    fac = root / "factories.py"
    return _invoke(["analyze", str(paths[0]), "--model", f"{fac}:model", "--data",
                    f"{fac}:data", *args, "-o", str(tmp_path / "r.h5"), "-q"])


def test_analyze_writes_one_row_per_checkpoint_in_step_order(setup, tmp_path):
    root, paths, ns = setup
    out = tmp_path / "run.h5"
    fac = root / "factories.py"
    result = _invoke(["analyze", str(paths[2]), str(paths[0]), str(paths[1]), "--model",
                      f"{fac}:model", "--data", f"{fac}:data", "-o", str(out), "-k", "3",
                      "--lr", "0.5"])  # the default path: progress bar and summary
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 3 checkpoints, metrics ")
    # loading a checkpoint changes the weights with no step of the optimizer built for
    # the thresholds: that is no "new optimizer?" of a training loop
    assert "warning" not in result.output, result.output
    run = ls.Run.open(out)
    assert list(run.steps("top_eigenvalues")) == [10, 20, 30]
    assert [s for s, _ in run.checkpoints()] == [10, 20, 30]
    # the recorded spectrum equals a direct computation on the last checkpoint
    model = ns["model"]()
    model.load_state_dict(torch.load(paths[2])["model"])
    direct = top_eigenvalues(Hessian(model, torch.nn.functional.cross_entropy, ns["data"]()),
                             k=3, tol=1e-8)
    got = run.series("top_eigenvalues", "eigenvalues")[1][-1]
    assert np.allclose(got, direct.values.numpy(), rtol=1e-3)
    _, thr = run.series("sharpness", "threshold")
    assert np.allclose(thr, 2 / 0.5)
    # the defaults: spectral_density and hessian_trace are opt-in (their products dominate)
    assert set(run.metrics()) >= {"top_eigenvalues", "sharpness", "collapse", "representation"}
    assert not set(run.metrics()) & {"hessian_trace", "spectral_density"}


def _two_eigenvalues(setup, tmp_path, model, data):
    """``analyze`` of the second checkpoint with factories ``model`` and ``data``, and a
    3x3 surface around it (both must succeed): the top two eigenvalues recorded."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / f"{model}-{data}.h5"
    factories = ["--model", f"{fac}:{model}", "--data", f"{fac}:{data}", "-q"]
    result = _invoke(["analyze", str(paths[1]), *factories, "-m", "top_eigenvalues", "-k",
                      "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    surface = _invoke(["surface", str(paths[1]), *factories, "--steps", "3", "-o",
                       str(tmp_path / f"surface-{model}-{data}.h5")])
    assert surface.exit_code == 0, surface.output
    return ls.Run.open(out).series("top_eigenvalues", "eigenvalues")[1]


def test_a_model_of_lazy_modules_is_given_its_shapes_by_one_forward(setup, tmp_path):
    """nn.LazyLinear: analyze and surface ended in a traceback ("Attempted to use an
    uninitialized parameter"); now the same numbers as the model built with its shapes."""
    np.testing.assert_allclose(_two_eigenvalues(setup, tmp_path, "lazy_model", "data"),
                               _two_eigenvalues(setup, tmp_path, "model", "data"), rtol=1e-6)


def test_a_data_factory_of_numpy_arrays_gives_the_numbers_of_its_tensors(setup, tmp_path):
    # "this metric needs (inputs, targets) batches; got ndarray (pass batch=(x, y) ...)"
    tensors = _two_eigenvalues(setup, tmp_path, "model", "data")
    np.testing.assert_array_equal(_two_eigenvalues(setup, tmp_path, "model", "numpy_data"),
                                  tensors)
    # the samples in reverse order (negative strides, a read-only array): the same mean loss
    np.testing.assert_allclose(_two_eigenvalues(setup, tmp_path, "model", "flipped_numpy_data"),
                               tensors, rtol=1e-5)
    root, paths, _ = setup
    fac = root / "factories.py"
    words = _invoke(["analyze", str(paths[1]), "--model", f"{fac}:model", "--data",
                     f"{fac}:text_labels", "-q", "-o", str(tmp_path / "w.h5")])
    lines = [ln for ln in words.output.splitlines() if ln.strip()]
    assert words.exit_code == 1 and len(lines) == 1, words.output
    assert "a numpy array of dtype <U1, which torch cannot hold" in lines[0]


def test_appending_an_analysis_of_other_data_or_loss_is_refused(setup, tmp_path):
    """An append with another --data (or --loss) joined two series in one run, exit 0, the
    stored config naming the first call's alone (CLI audit)."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"

    def analyze(path, data, *extra):
        return _invoke(["analyze", str(path), "--model", f"{fac}:model", "--data",
                        f"{fac}:{data}", "-m", "top_eigenvalues", "-k", "1", *extra, "-o",
                        str(out), "-q"])

    assert analyze(paths[0], "data").exit_code == 0
    for data, extra in (("other_data", ()), ("data", ("--loss", "nll"))):
        result = analyze(paths[1], data, *extra)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert "holds an analysis of other data or another loss" in lines[0]
    assert analyze(paths[1], "data").exit_code == 0  # the same data: appended
    assert list(ls.Run.open(out).steps("top_eigenvalues")) == [10, 20]


def test_analyze_accepts_a_loader_and_file_name_steps(setup, tmp_path):
    root, paths, _ = setup
    plain = tmp_path / "w-7.pt"
    torch.save(torch.load(paths[0])["model"], plain)
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", str(plain), "--model", f"{fac}:model", "--data",
                      f"{fac}:loader", "-m", "hessian", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert list(ls.Run.open(out).steps("top_eigenvalues")) == [7]
    # the old metric name still works for one release, with a warning naming the new one
    assert "'hessian' is deprecated, use 'top_eigenvalues'" in result.stderr


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("missing", "no such checkpoint"),
        ("directory", "is a directory"),
        ("bad_factory_path", "not found"),
        ("bad_attr", "has no attribute"),
        ("bad_module", "cannot import"),
        ("raises", "raised RuntimeError: no GPU here"),
        ("mismatch", "does not match the model"),
        ("corrupt", "not a torch checkpoint (neither a zip archive nor a pickle)"),
        ("broken_zip", "not a readable torch checkpoint"),
        ("run_file", "is an HDF5 file (a landscape run file?)"),
        ("empty", "no batches"),
        ("zero_samples", "an empty batch (0 samples; batch 0 of 1)"),  # was "loss is nan"
        ("unknown_loss", "use one of cross_entropy, mse, nll, bce_with_logits, model (the"),
        ("nan", "not finite"),
        ("ignore_255", "an ignore_index such as 255 on unlabelled pixels? pass --loss"),
        ("pickled", "--trust-checkpoint"),
        ("model_as_data", "does --data name the model factory?"),  # was "got Sequential"
        ("three_tensors", "returned 3 tensors; a batch is (inputs, targets)"),  # "got Tensor"
        ("string_data", "returned a str ('data/train.txt'), not batches"),  # "batch=(x, y)"
        ("no_colon", "expected 'package.module:name' or 'file.py:name'"),
        ("import_raises", "failed: boom at import"),
        ("not_callable", "is not callable"),
        ("state_dict_without_model", "--model is needed for these checkpoints"),
        ("meta_model", "built its parameters on the meta device"),  # was a traceback
        ("meta_device", "device 'meta': tensors there hold no values"),  # was a traceback
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(setup, tmp_path, kind, match):
    root, paths, _ = setup
    fac = root / "factories.py"
    ckpt, model, data = str(paths[0]), f"{fac}:model", f"{fac}:data"
    if kind == "missing":
        ckpt = str(tmp_path / "nope.pt")
    elif kind == "directory":
        ckpt = str(tmp_path)
    elif kind == "bad_factory_path":
        model = f"{tmp_path / 'absent.py'}:model"
    elif kind == "bad_attr":
        model = f"{fac}:nonexistent"
    elif kind == "bad_module":
        model = "no_such_package.models:net"
    elif kind == "raises":
        data = f"{fac}:broken"
    elif kind == "mismatch":
        model = f"{fac}:other_model"
    elif kind == "corrupt":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"this is not a checkpoint")
        ckpt = str(bad)
    elif kind == "broken_zip":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"PK\x03\x04" + b"\0" * 64)
        ckpt = str(bad)
    elif kind == "run_file":
        bad = tmp_path / "run.h5"
        with ls.RunWriter(bad) as w:
            w.declare("a", {"v": None})
        ckpt = str(bad)
    elif kind in ("empty", "zero_samples"):
        data = f"{fac}:{kind}"
    elif kind == "nan":
        data = f"{fac}:nan_data"
    elif kind == "ignore_255":
        data = f"{fac}:ignore_255_data"
    elif kind == "model_as_data":
        data = f"{fac}:model"
    elif kind == "three_tensors":
        data = f"{fac}:weighted"
    elif kind == "string_data":  # was read as batches of characters: "pass batch=(x, y)"
        (tmp_path / "strings.py").write_text("def data():\n    return 'data/train.txt'\n")
        data = f"{tmp_path / 'strings.py'}:data"
    elif kind == "no_colon":
        model = "make_model"
    elif kind == "import_raises":
        (tmp_path / "boom.py").write_text("raise RuntimeError('boom at import')\n")
        model = f"{tmp_path / 'boom.py'}:model"
    elif kind == "not_callable":
        (tmp_path / "consts.py").write_text("MODEL = 3\n")
        model = f"{tmp_path / 'consts.py'}:MODEL"
    elif kind == "state_dict_without_model":  # the most common first mistake
        plain = tmp_path / "c-1.pt"
        torch.save(torch.load(paths[0])["model"], plain)
        ckpt = str(plain)
    elif kind == "meta_model":
        model = f"{fac}:meta_model"
    elif kind == "pickled":
        p = tmp_path / "pickled.pt"
        torch.save({"model": torch.load(paths[0])["model"], "note": _Opaque()}, p)
        ckpt = str(p)
    loss = ["--loss", "nosuch"] if kind == "unknown_loss" else []
    if kind == "meta_device":
        loss = ["--device", "meta"]
    given = [] if kind == "state_dict_without_model" else ["--model", model]
    result = _invoke(["analyze", ckpt, *given, "--data", data, *loss, "-o",
                      str(tmp_path / "r.h5"), "-q"])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert match in lines[0]


class _Opaque:
    pass


def test_analyze_with_micro_batches_records_the_same_spectrum(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    spectra = []
    for extra in ([], ["--microbatch-size", "7"]):
        out = tmp_path / f"run{len(extra)}.h5"
        result = _invoke(["analyze", str(paths[1]), "--model", f"{fac}:model", "--data",
                          f"{fac}:data", "-m", "top_eigenvalues", "-k", "2", "-o", str(out), "-q",
                          *extra])
        assert result.exit_code == 0, result.output
        run = ls.Run.open(out)
        spectra.append(run.series("top_eigenvalues", "eigenvalues")[1][-1])
    assert run.config["microbatch_size"] == 7
    assert np.allclose(spectra[1], spectra[0], rtol=1e-4)
    bad = _invoke(["analyze", str(paths[1]), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "--microbatch-size", "0", "-q"])
    assert bad.exit_code == 2 and "microbatch-size" in bad.output


def test_lightning_last_ckpt_beside_the_checkpoint_it_repeats_is_dropped():
    """``ckpts/*.ckpt`` from ``ModelCheckpoint(save_last=True)`` lists last.ckpt and the
    checkpoint of the same step: the copy is dropped, two real checkpoints still clash."""
    from pathlib import Path

    import pytest

    from landscape._errors import LandscapeError
    from landscape.analysis import order_checkpoints
    from landscape.loading import Checkpoint

    def ck(name, step):
        return Checkpoint(Path("ckpts") / name, {}, step)

    pairs = order_checkpoints([ck("last.ckpt", 30), ck("step=20.ckpt", 20),
                               ck("step=30.ckpt", 30)])
    assert [(s, c.path.name) for s, c in pairs] == [(20, "step=20.ckpt"), (30, "step=30.ckpt")]
    with pytest.raises(LandscapeError, match="both step 30"):
        order_checkpoints([ck("a-30.pt", 30), ck("b-30.pt", 30)])


def test_a_device_this_machine_lacks_is_one_line():
    import pytest

    from landscape._errors import LandscapeError
    from landscape.loading import prepare
    from tests import models

    for device in ("gpu", "cuda:7" if not __import__("torch").cuda.is_available() else "gpu"):
        with pytest.raises(LandscapeError, match="cannot move the model there"):
            prepare(models.mlp(), models.classification_data(), device)


def test_a_trusted_whole_model_pickle_finds_its_class_beside_the_factory(tmp_path):
    """``torch.save(model)`` pickles the class as ``fac.Net`` (the module it was imported
    as); with ``--trust-checkpoint --model fac.py:model`` the factory's folder is importable
    while the checkpoint loads, without ``PYTHONPATH=.``."""
    import subprocess
    import sys
    import textwrap

    (tmp_path / "fac.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return self.fc(x)

        def model():
            torch.manual_seed(0)
            return Net()

        def data():
            g = torch.Generator().manual_seed(1)
            return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    """))
    save = "import torch, fac; torch.save(fac.model(), 'whole-5.pt')"
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True)
    assert "fac" not in sys.modules
    fac = tmp_path / "fac.py"
    try:
        result = _invoke(["analyze", str(tmp_path / "whole-5.pt"), "--trust-checkpoint",
                          "--model", f"{fac}:model", "--data", f"{fac}:data", "-m",
                          "top_eigenvalues", "-o", str(tmp_path / "r.h5"), "-q"])
    finally:
        sys.modules.pop("fac", None)  # imported by the unpickling
    assert result.exit_code == 0, result.output
    assert list(ls.Run.open(tmp_path / "r.h5").steps("top_eigenvalues")) == [5]


def test_analyze_without_a_learning_rate_on_plain_state_dicts_warns(setup, tmp_path):
    # plain state dicts hold no optimizer state: the sharpness threshold and ratio are NaN,
    # edge_of_stability can never fire and `check` would say ok; one warning line says so
    root, paths, _ = setup
    fac = root / "factories.py"
    plain = tmp_path / "w-30.pt"
    torch.save(torch.load(paths[-1])["model"], plain)
    base = ["analyze", str(plain), "--model", f"{fac}:model", "--data", f"{fac}:data", "-q"]
    result = _invoke([*base, "-m", "sharpness", "-o", str(tmp_path / "a.h5")])
    assert result.exit_code == 0, result.output
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warned) == 1, result.stderr
    assert "learning rate was not found" in warned[0] and "--lr" in warned[0]
    assert "--momentum" in warned[0]
    _, ratio = ls.Run.open(tmp_path / "a.h5").series("sharpness", "ratio")
    assert np.isnan(ratio).all()
    # with --lr, or without the sharpness metric: no warning
    for i, extra in enumerate((["-m", "sharpness", "--lr", "0.5"], ["-m", "collapse"])):
        quiet = _invoke([*base, *extra, "-o", str(tmp_path / f"b{i}.h5")])
        assert quiet.exit_code == 0, quiet.output
        assert "learning rate was not found" not in quiet.stderr


@pytest.mark.parametrize(("args", "match"), [
    (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"), (["--momentum", "inf", "--lr", "1"],
                                                         "--momentum"),
    (["--momentum", "1.0", "--lr", "1"], "--momentum"),  # SGD momentum lies in [0, 1)
])
def test_bad_sgd_settings_are_usage_errors(setup, tmp_path, args, match):
    result = _analyze_first(setup, tmp_path, *args)
    assert result.exit_code == 2 and match in result.stderr and "Traceback" not in result.output


def test_momentum_without_lr_is_refused(setup, tmp_path):
    result = _analyze_first(setup, tmp_path, "--momentum", "0.9")
    assert result.exit_code == 2  # a usage error, like the SGD settings' ranges above
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("Usage: ")
    assert lines[-1] == "Error: --momentum needs --lr (the SGD settings go together)"


def test_adding_a_metric_to_analysed_checkpoints_keeps_every_row(setup, tmp_path):
    # the new metric has no rows, the others have them at every step: the monitor could not
    # write step 10 after step 30, and the cleanup of "an unfinished checkpoint" dropped every
    # row from step 10 on; now it is refused before anything is written
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    common = ["--model", f"{fac}:model", "--data", f"{fac}:data", "-o", str(out), "-q"]
    first = _invoke(["analyze", *map(str, paths), "-m", "sharpness", *common])
    assert first.exit_code == 0, first.output
    for chosen in (paths, paths[1:2]):
        again = _invoke(["analyze", *map(str, chosen), "-m", "hessian_trace", *common])
        assert again.exit_code == 1
        assert "does not come after step 30" in again.output
        assert "--overwrite" in again.output and "Traceback" not in again.output
        run = ls.Run.open(out)
        assert list(run.steps("sharpness")) == [10, 20, 30]
        assert [s for s, _ in run.checkpoints()] == [10, 20, 30]
        assert "hessian_trace" not in run.metrics()


def test_checkpoints_hold_their_weights_only_while_they_are_used(setup):
    """analyze held every checkpoint it was given in memory at once (20 checkpoints of
    8 MB: +182 MB before any work; +22 MB now): each is read again when computed."""
    from landscape.checkpoints.sources import open_checkpoints

    root, paths, _ = setup
    opened = open_checkpoints(paths, f"{root / 'factories.py'}:model")
    assert [c._state_dict for c in opened.checkpoints] == [None] * len(paths)  # released
    for path, ckpt in zip(paths, opened.checkpoints):
        want = torch.load(path)["model"]
        assert ckpt.state_dict.keys() == want.keys()
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in want.items())
        ckpt.release()
        assert ckpt._state_dict is None


def test_analyze_on_a_full_disk_ends_with_one_line(setup, tmp_path, monkeypatch):
    """analyze went through the monitor's 'stop' mode: it computed every checkpoint for
    nothing and exited 0 with an empty run file."""
    import shutil
    from collections import namedtuple

    root, paths, _ = setup
    fac = root / "factories.py"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(0, 0, 1024))
    result = _invoke(["analyze", *map(str, paths), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "sharpness", "-o", str(tmp_path / "r.h5"), "-q"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "too little to write more" in lines[0], result.output


def test_each_checkpoint_is_read_twice_and_the_first_loss_checked_once(setup, tmp_path,
                                                                        monkeypatch):
    """analyze read every checkpoint three times (to order them, to check that it fits the
    model, to compute) and evaluated the first one's loss twice; the fit is now checked on
    the names and shapes kept from the first reading."""
    import landscape.analysis as analysis
    import landscape.loading as loading

    root, paths, _ = setup
    fac = root / "factories.py"
    reads, checks = [], []
    real_load, real_check = torch.load, analysis.check_loss

    def counted_load(path, *args, **kwargs):
        reads.append(str(path))
        return real_load(path, *args, **kwargs)

    def counted_check(net, loss_fn, batches, ckpt, *args, **kwargs):
        checks.append(str(ckpt.path))
        return real_check(net, loss_fn, batches, ckpt, *args, **kwargs)

    monkeypatch.setattr(loading.torch, "load", counted_load)
    monkeypatch.setattr(analysis, "check_loss", counted_check)
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", *map(str, paths), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "sharpness", "--lr", "0.5", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(reads) == sorted(map(str, paths * 2))
    assert sorted(checks) == sorted(map(str, paths))
    assert list(ls.Run.open(out).steps("sharpness")) == [10, 20, 30]


def test_a_checkpoint_that_does_not_fit_is_refused_before_the_file_is_touched(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    wrong = tmp_path / "ckpt-40.pt"
    state = torch.load(paths[0])["model"]
    name = next(iter(state))
    state[name] = torch.zeros(*state[name].shape, 2)
    torch.save({"model": state, "step": 40}, wrong)
    result = _invoke(["analyze", *map(str, paths), str(wrong), "--model", f"{fac}:model",
                      "--data", f"{fac}:data", "-m", "sharpness", "-o", str(out), "-q"])
    assert result.exit_code == 1
    assert f"{wrong}: checkpoint does not match the model (shape mismatch: " in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_overwrite_never_destroys_a_file_that_is_not_a_run(setup, tmp_path):
    """`analyze c1.pt ... -o c1.pt --overwrite` replaced the checkpoint with a run file."""
    root, paths, _ = setup
    fac = root / "factories.py"
    target = tmp_path / "c1.pt"
    target.write_bytes(paths[0].read_bytes())
    result = _invoke(["analyze", str(target), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "sharpness", "-o", str(target), "--overwrite", "-q"])
    assert result.exit_code == 1
    assert f"{target}: is not a landscape run file" in result.output
    assert "Traceback" not in result.output
    assert target.read_bytes() == paths[0].read_bytes()


def test_user_code_that_calls_sys_exit_is_one_line_and_never_passes(setup, tmp_path):
    """A factory file that parses arguments at import printed its own usage and exited 2;
    one that raised SystemExit(0) ended analyze with nothing written and exit 0, and
    `check --rules` with such a function passed the gate."""
    root, paths, _ = setup
    fac = root / "factories.py"
    (tmp_path / "train.py").write_text(  # as argparse does on arguments it does not know
        "import argparse\np = argparse.ArgumentParser()\np.add_argument('--lr')\n"
        "p.parse_args(['analyze', '--model'])\n\ndef net():\n    return None\n")
    (tmp_path / "quits.py").write_text("def net():\n    raise SystemExit(0)\n")
    for model, doing in ((f"{tmp_path / 'train.py'}:net", "importing"),
                         (f"{tmp_path / 'quits.py'}:net", "calling it")):
        out = tmp_path / "r.h5"
        result = _invoke(["analyze", str(paths[0]), "--model", model, "--data",
                          f"{fac}:data", "-o", str(out), "-q"])
        assert result.exit_code == 1, result.output
        # (argparse prints its own usage first: the user's code, not ours)
        last = [ln for ln in result.output.splitlines() if ln.strip()][-1]
        assert last.startswith("Error: ") and doing in last and "sys.exit(" in last
        assert "Traceback" not in result.output and not out.exists()
    ok = _invoke(["analyze", str(paths[0]), "--model", f"{fac}:model", "--data",
                  f"{fac}:data", "-m", "sharpness", "-o", str(tmp_path / "ok.h5"), "-q"])
    assert ok.exit_code == 0, ok.output
    check = _invoke(["check", str(tmp_path / "ok.h5"), "--rules",
                     f"{tmp_path / 'quits.py'}:net"])
    assert check.exit_code == 2 and "sys.exit(0)" in check.output


def test_an_endless_data_iterator_is_read_for_a_bounded_number_of_batches():
    """analyze read an itertools.cycle(loader) into a list until the memory ran out."""
    import itertools

    from landscape.loading import MAX_DATA_BATCHES, as_batches

    batch = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.warns(UserWarning, match=f"more than {MAX_DATA_BATCHES} batches"):
        assert len(as_batches(itertools.repeat(batch))) == MAX_DATA_BATCHES
    assert len(as_batches([batch] * (MAX_DATA_BATCHES + 5))) == MAX_DATA_BATCHES + 5  # finite


def test_a_metric_named_twice_is_computed_once(setup, tmp_path):
    """-m sharpness -m sharpness (or an old name beside its new one) gave a traceback."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", str(paths[0]), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "sharpness", "-m", "sharpness", "-m", "hessian",
                      "-m", "top_eigenvalues", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert {"sharpness", "top_eigenvalues"} <= set(run.metrics())


def test_option_values_beyond_what_can_be_computed_are_one_line(setup, tmp_path):
    """--seed 1e20 and -k 10^12 gave tracebacks; -k above the number of parameters stored
    NaN eigenvalues silently; a file name that is not UTF-8 failed in the store."""
    import os

    root, paths, _ = setup
    fac = root / "factories.py"
    common = ["--model", f"{fac}:model", "--data", f"{fac}:data", "-q"]
    seed = _invoke(["analyze", str(paths[0]), *common, "--seed", "99999999999999999999",
                    "-o", str(tmp_path / "a.h5")])
    assert seed.exit_code == 2 and "--seed" in seed.output
    k = _invoke(["analyze", str(paths[0]), *common, "-k", "1000000000000",
                 "-o", str(tmp_path / "b.h5")])
    assert k.exit_code == 1 and "trainable parameters, so at most" in k.output
    assert "Traceback" not in seed.output + k.output
    odd = os.fsdecode(bytes(tmp_path) + b"/ckpt-\xff-10.pt")
    with open(odd, "wb") as fh:
        fh.write(paths[0].read_bytes())
    result = _invoke(["analyze", odd, *common, "-m", "sharpness", "-o", str(tmp_path / "c.h5")])
    assert result.exit_code == 0, result.output


def test_loss_model_with_input_target_pairs_says_what_it_needs(setup, tmp_path):
    """It failed in the model's call with the model's repr spread over many lines."""
    result = _analyze_first(setup, tmp_path, "--loss", "model")
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--loss model" in lines[0] and "needs dict batches" in lines[0]


def test_k_is_checked_only_when_the_eigenvalues_are_computed(tmp_path):
    """A 2-parameter model with -m sharpness failed on the default k=3 it does not use."""
    from landscape.analysis import analyze

    torch.manual_seed(0)
    x, y = torch.randn(8, 1), torch.randint(0, 2, (8,))
    ckpt = tmp_path / "ckpt-1.pt"
    torch.save(torch.nn.Linear(1, 2, bias=False).state_dict(), ckpt)
    analyze([ckpt], lambda: torch.nn.Linear(1, 2, bias=False), (x, y),
            torch.nn.functional.cross_entropy, tmp_path / "r.h5", metrics=["sharpness"],
            progress=False)
    with pytest.raises(ls.LandscapeError, match="k=3: the model has 2 trainable parameters"):
        analyze([ckpt], lambda: torch.nn.Linear(1, 2, bias=False), (x, y),
                torch.nn.functional.cross_entropy, tmp_path / "s.h5",
                metrics=["top_eigenvalues"], progress=False)


def test_token_options_beside_a_data_factory_are_a_usage_error(setup, tmp_path):
    # --batch-size, --batches and --seq-len shape --tokens/--text data; with --data they
    # were ignored without a word
    root, paths, _ = setup
    fac = root / "factories.py"
    for command in ("analyze", "surface"):
        result = _invoke([command, str(paths[0]), "--model", f"{fac}:model", "--data",
                          f"{fac}:data", "--batch-size", "4", "--batches", "2", "-q", "-o",
                          str(tmp_path / f"{command}.h5")])
        assert result.exit_code == 2, result.output
        assert "--batch-size, --batches: for --tokens and --text data only" in result.output
        assert not (tmp_path / f"{command}.h5").exists()
        # two kinds of data: exit 1 from the library's check, where --seq-len gave 2 (review)
        tokens = tmp_path / "ids.npy"
        np.save(tokens, np.zeros((4, 8), dtype=np.int64))
        both = _invoke([command, str(paths[0]), "--model", f"{fac}:model", "--data",
                        f"{fac}:data", "--tokens", str(tokens), "-q", "-o",
                        str(tmp_path / f"{command}.h5")])
        assert both.exit_code == 2, both.output
        assert "not --data and --tokens" in both.output


def test_the_python_analyze_checks_its_optimizer_and_says_an_unreadable_adam_state(tmp_path):
    """Untested until the coverage audit: an optimizer analyze() does not know, Adam without
    its saved moments, bad settings, and saved moments of another model (a NaN row and a
    warning, never another parameter's moments)."""
    from landscape.analysis import analyze

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))

    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loss = torch.nn.functional.cross_entropy
    ckpt = tmp_path / "ckpt-1.pt"
    torch.save(net().state_dict(), ckpt)
    for spec, match in (({"name": "lbfgs"}, "optimizer 'lbfgs': use one of sgd, adam, adamw"),
                        ({"name": "adam", "lr": 1e-3}, "needs its second moments"),
                        ({"name": "sgd", "lr": -1.0}, "optimizer 'sgd': Invalid learning rate")):
        with pytest.raises(ls.LandscapeError, match=re.escape(match)):
            analyze([ckpt], net, (x, y), loss, tmp_path / "r.h5", metrics=["sharpness"],
                    optimizer=spec, progress=False)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    adam = torch.optim.Adam(other.parameters(), lr=1e-3)
    loss(other(x), y).backward()
    adam.step()
    saved = tmp_path / "ckpt-2.pt"
    torch.save({"model": net().state_dict(), "optimizer": adam.state_dict()}, saved)
    with pytest.warns(UserWarning, match="the saved Adam state does not match the model"):
        analyze([saved], net, (x, y), loss, tmp_path / "s.h5", metrics=["sharpness"],
                progress=False)
    with ls.Run.open(tmp_path / "s.h5") as run:
        assert np.isnan(run.series("sharpness", "lambda_max")[1]).all()


def _saved_run(tmp_path, make_optimizer, name):
    """A checkpoint ``{"model", "optimizer"}`` after three steps of ``make_optimizer``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    opt = make_optimizer(net.parameters())
    for _ in range(12):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    path = tmp_path / name
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
    return path, (x, y)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_a_checkpoint_without_optimizer_state_gets_no_other_checkpoints_threshold(tmp_path):
    """Among checkpoints that saved their optimizer, a plain state dict took the previous
    (or, first, a later) checkpoint's settings and Adam moments, without a word; a corrupt
    optimizer.pt gave a threshold 6x off that way (analyze review)."""
    from landscape.analysis import analyze

    sgd = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
    first, data = _saved_run(tmp_path, sgd, "ckpt-10.pt")
    last, _ = _saved_run(tmp_path, sgd, "ckpt-30.pt")
    plain = tmp_path / "ckpt-20.pt"
    torch.save(_net().state_dict(), plain)
    for order in ([first, plain, last], [plain, last]):
        out = tmp_path / f"r{len(order)}.h5"
        with pytest.warns(UserWarning, match=r"ckpt-20\.pt: it holds no optimizer state "
                                             r"analyze can read"):
            analyze(order, _net, data, torch.nn.functional.cross_entropy, out,
                    metrics=["sharpness"], progress=False)
        with ls.Run.open(out) as run:
            steps, threshold = run.series("sharpness", "threshold")
            got = dict(zip(steps.tolist(), threshold.tolist()))
        assert math.isnan(got[20]) and got[30] == pytest.approx(3.8 / 0.05)


@pytest.mark.parametrize("make, name", [
    (lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9), "RMSprop"),
    (lambda ps: torch.optim.NAdam(ps, lr=1e-3), "NAdam"),
    (lambda ps: torch.optim.RAdam(ps, lr=1e-3), "an optimizer with betas other than Adam"),
    (lambda ps: torch.optim.Adamax(ps, lr=1e-3), "optimizer, Adamax, is"),
    (lambda ps: torch.optim.Adagrad(ps, lr=1e-3), "optimizer, Adagrad, is"),
    (lambda ps: torch.optim.Rprop(ps, lr=1e-3), "optimizer, Rprop, is"),
])
def test_optimizers_other_than_sgd_and_adam_are_named_not_misread(tmp_path, make, name):
    """RMSprop's state failed as SGD ('unexpected keyword argument eps'), NAdam's and
    RAdam's were read as Adam (thresholds 10x and 3x off), Adamax's too (a false 'does not
    match' warning; analyze review)."""
    from landscape.analysis import analyze

    path, data = _saved_run(tmp_path, make, "ckpt-12.pt")
    with pytest.warns(UserWarning) as said:
        analyze([path], _net, data, torch.nn.functional.cross_entropy, tmp_path / "r.h5",
                metrics=["sharpness"], progress=False)
    text = " ".join(str(w.message) for w in said)
    assert "is not one analyze reads: SGD, Adam, AdamW" in text
    assert name in text, text
    with ls.Run.open(tmp_path / "r.h5") as run:
        assert np.isnan(run.series("sharpness", "threshold")[1]).all()


def test_a_learning_rate_without_momentum_says_the_saved_momentum_is_left_out(tmp_path):
    """--lr alone is plain SGD: restating an SGD-with-momentum run's rate changed its
    threshold 1.9x without a word (analyze review)."""
    from landscape.analysis import analyze

    path, data = _saved_run(tmp_path, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                            "ckpt-12.pt")
    with pytest.warns(UserWarning, match="saved momentum 0.9: pass --momentum 0.9"):
        analyze([path], _net, data, torch.nn.functional.cross_entropy, tmp_path / "r.h5",
                metrics=["sharpness"], optimizer={"name": "sgd", "lr": 0.05, "momentum": None},
                progress=False)
    with ls.Run.open(tmp_path / "r.h5") as run:
        assert run.series("sharpness", "threshold")[1][0] == pytest.approx(2 / 0.05)


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(6, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_groups_listed_head_first_are_matched_by_their_states_shapes(tmp_path):
    """SGD groups [head at 0.01, body at 0.1]: the saved numbers follow the groups, not the
    model's order, so every parameter got the first group's rate and the ratio came out
    5.3x low, with a warning giving a reason that did not hold (analyze review). Every
    shape is distinct here, so the momentum buffers tell which is which."""
    from torch.func import functional_call, hessian

    from landscape.analysis import analyze

    torch.manual_seed(0)
    net = _TwoLayers()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt = torch.optim.SGD([{"params": net.l2.parameters(), "lr": 0.01},
                           {"params": net.l1.parameters(), "lr": 0.1}], momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    path = tmp_path / "ckpt-5.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # matched: no "cannot tell" warning
        analyze([path], _TwoLayers, (x, y), torch.nn.functional.cross_entropy,
                tmp_path / "r.h5", metrics=["sharpness"], progress=False)
    # truth: lambda_max of L^1/2 H L^1/2 over (2 + 2 * 0.9), L each parameter's rate
    net64 = net.double()
    names = [n for n, _ in net64.named_parameters()]
    shapes = [p.shape for _, p in net64.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net64.parameters()])

    def loss(v):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(
            v.split([s.numel() for s in shapes]), shapes))))
        return torch.nn.functional.cross_entropy(functional_call(net64, parts, (x.double(),)), y)

    rates = torch.cat([torch.full((p.numel(),), 0.1 if n.startswith("l1") else 0.01,
                                  dtype=torch.float64) for n, p in net64.named_parameters()])
    h = hessian(loss)(flat)
    scaled = rates.sqrt()[:, None] * h * rates.sqrt()[None, :]
    truth = float(torch.linalg.eigvalsh(scaled)[-1]) / 3.8
    with ls.Run.open(tmp_path / "r.h5") as run:
        ratio = float(run.series("sharpness", "ratio")[1][0])
    assert ratio == pytest.approx(truth, rel=1e-3)


@pytest.mark.parametrize("extra", [{"bias_correction": True}, {"correct_bias": True},
                                   {"amsgrad": False}])
def test_adam_kinds_that_save_no_amsgrad_are_still_read_as_adam(extra):
    """apex's and DeepSpeed's FusedAdam save bias_correction, transformers' old AdamW
    correct_bias, not amsgrad: requiring amsgrad lost their thresholds (own-diff review)."""
    from landscape.checkpoints.optim import optimizer_settings

    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2),
                           "exp_avg_sq": torch.zeros(2)}},
             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                               "weight_decay": 0.01, **extra, "params": [0]}]}
    assert optimizer_settings(state)["name"] == "adam"


@pytest.mark.parametrize("extra, name", [
    ({"bias_correction": True, "grad_averaging": True, "max_grad_norm": 1.0}, "LAMB"),
    ({"bias_correction": True, "norm_type": 2, "init_zero": False}, "NovoGrad")])
def test_lamb_and_novograd_are_not_read_as_adam(extra, name):
    """They save bias_correction beside betas, as FusedAdam does, but step otherwise: a
    layer-wise trust ratio, per-layer second moments (second review)."""
    from landscape.checkpoints.optim import optimizer_settings

    state = {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8,
                                             "weight_decay": 0.0, **extra, "params": [0]}]}
    assert optimizer_settings(state) == {"name": None, "unread": name, "state_dict": state}


def test_muon_is_not_read_as_sgd():
    """torch.optim.Muon saves momentum and nesterov as SGD does (second review)."""
    from landscape.checkpoints.optim import optimizer_settings

    if not hasattr(torch.optim, "Muon"):
        pytest.skip("this torch has no torch.optim.Muon")
    net = torch.nn.Linear(4, 3, bias=False)
    opt = torch.optim.Muon(net.parameters(), lr=0.02)
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    assert optimizer_settings(opt.state_dict())["unread"] == "Muon"


def test_a_saved_adamw_is_rebuilt_as_adamw():
    """AdamW's checkpoints were rebuilt as Adam: the threshold is the same, but the run's
    config named the wrong class (``"class": "Adam", "decoupled_weight_decay": false``)."""
    from landscape.analysis import _optimizer
    from landscape.checkpoints.optim import optimizer_settings

    model = torch.nn.Linear(3, 2)
    for cls, name in ((torch.optim.AdamW, "adamw"), (torch.optim.Adam, "adam")):
        opt = cls(model.parameters(), lr=1e-3, weight_decay=0.1)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        settings = optimizer_settings(opt.state_dict())
        assert settings["name"] == name
        rebuilt = _optimizer(model, settings)
        assert type(rebuilt) is cls and rebuilt.param_groups[0]["weight_decay"] == 0.1


def test_an_analysis_stopped_mid_checkpoint_reads_as_stopped(tmp_path):
    """Dropping the unfinished checkpoint's rows reopened the file, which cleared the
    reason the monitor had recorded: an interrupted analysis read as finished."""
    from landscape.analysis import _drop_from
    from landscape.store import RunWriter

    for trained in (False, True):  # written by an analysis, or by training first
        path = tmp_path / f"run-{trained}.h5"
        with RunWriter(path, mode="w", posthoc=not trained) as w:
            w.declare("m", {"v": None})
            for step in (10, 20, 30):
                w.append("m", step, {"v": 1.0})
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            _drop_from(path, 30)
        with ls.Run.open(path) as run:
            assert run.steps("m").tolist() == [10, 20]
            status = run.writer_status()
        if trained:  # the analysis stopped, not the training: its record stays
            assert status.state == "closed"
        else:
            assert status.state == "stopped" and "Ctrl-C" in status.reason


def test_an_analysis_into_a_crashed_training_run_leaves_it_stopped(setup, tmp_path):
    """Appending an analysis reopened the run and cleared why its training stopped: a
    crashed run then passed ``check --require-finished`` (review). Such an analysis is now
    refused (a file of its own), and the run stays as its training left it."""
    from landscape.store import RunWriter

    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    with RunWriter(out, mode="w") as w:  # the training's own run, stopped by an error
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
        w.close(how="stopped on RuntimeError: Connection closed by peer")
    result = _invoke(["analyze", str(paths[0]), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "sharpness", "-o", str(out), "-q"])
    one_line_error(result, "a training run")
    gate = _invoke(["check", str(out), "--require-finished", "-q"])
    assert gate.exit_code == 1 and "Connection closed by peer" in gate.stderr
    with ls.Run.open(out) as run:
        assert "sharpness" not in run
    alone = _analyze_first(setup, tmp_path, "-m", "sharpness")  # a run of its own
    assert alone.exit_code == 0, alone.output
    with ls.Run.open(tmp_path / "r.h5") as run:
        assert run.writer_status().state == "closed" and not run.attrs["trained"]


def test_the_memory_budget_is_half_the_free_memory_by_default(setup, tmp_path, monkeypatch):
    """Post hoc, the monitor's budget (one step, at least 256 MiB) refused the top
    eigenvalues of a 2.8M-parameter model on a machine with 23 GB free (review)."""
    from landscape.curvature import memory

    monkeypatch.setattr(memory, "free_memory", lambda device: 10 * 2**30)
    result = _analyze_first(setup, tmp_path, "-m", "top_eigenvalues", "-m", "sharpness")
    assert result.exit_code == 0, result.output
    with ls.Run.open(tmp_path / "r.h5") as run:
        for name in ("top_eigenvalues", "sharpness"):
            params = run.metric_attrs(name)["params"]
            assert params["memory_budget"] == 5 * 2**30, name
        assert np.isfinite(run.series("top_eigenvalues", "eigenvalues")[1]).all()
    monkeypatch.undo()
    assert memory.free_memory("cpu") > 0 and memory.free_memory("meta") is None
    monkeypatch.setattr(memory, "free_memory", lambda device: None)  # cannot be told (MPS)
    assert memory.posthoc_budget("cpu") is None  # then the monitor's "auto", never less
    from landscape.analysis import _memory_budget

    assert _memory_budget("free", torch.nn.Linear(2, 2)) == "auto"
    with pytest.raises(ValueError, match="or 'free', analyze's default"):
        _memory_budget("lots", torch.nn.Linear(2, 2))


def test_a_measurement_over_the_memory_budget_is_said_in_the_summary(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", *map(str, paths[:2]), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "top_eigenvalues", "-m", "collapse",
                      "--memory-budget", "1KB", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (f"note: top_eigenvalues not measured at 2 of 2 checkpoints (NaN rows; "
            f"landscape check {out} lists why)") in result.stderr
    assert "collapse not measured" not in result.stderr
    with ls.Run.open(out) as run:
        assert np.isnan(run.series("top_eigenvalues", "eigenvalues")[1]).all()
        (failed,) = [f for f in run.findings() if f.rule == "metric_failed"]
    assert "MemoryBudgetError" in failed.message and "budget of 1000 B" in failed.message
    assert "--memory-budget" in failed.hint and "a probe must be" not in failed.hint
    for bad in ("lots", "0", "-1GB", "3 parsecs", "1e400", "0.5", "0x step"):
        refused = _invoke(["analyze", str(paths[0]), "--model", f"{fac}:model", "--data",
                           f"{fac}:data", "--memory-budget", bad, "-o", str(out)])
        assert refused.exit_code == 2 and "--memory-budget" in refused.output, bad
    for given, taken in (("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("2e9", 2 * 10**9),
                         ("none", None), ("auto", "auto"), ("1.5x step", "1.5x step")):
        from landscape_cli.options import MemorySize

        assert MemorySize().convert(given, None, None) == taken


def test_an_analysis_run_again_says_nothing_new_was_computed(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    args = ["analyze", *map(str, paths[:2]), "--model", f"{fac}:model", "--data",
            f"{fac}:data", "-m", "collapse", "-o", str(out)]
    assert _invoke(args).stdout.startswith(f"wrote {out}: 2 checkpoints, metrics collapse")
    again = _invoke(args)
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"nothing new: {out} holds its 2 checkpoints already")
    more = _invoke([*args[:2], str(paths[2]), *args[2:]])
    # this command's one checkpoint, and the file's three (it said "3 checkpoints": review)
    assert more.stdout.startswith(f"wrote {out}: 1 checkpoint (3 in the file), metrics ")


def test_an_analysis_is_refused_into_the_series_of_a_training_run(setup, tmp_path):
    """``analyze``'s default ``-o run.h5`` is the callbacks' file name: its rows of a metric
    the monitor recorded joined that series (measured on other data), and ``--overwrite``,
    which a refusal advised, deleted the training record (review). Both are refused; a
    metric the training did not record may still be added."""
    from landscape.store import RunWriter

    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    with RunWriter(out, mode="w", config={"integration": "transformers"}) as w:
        w.declare("sharpness", {"lambda_max": None})
        w.append("sharpness", 0, {"lambda_max": 1.0})
    before = out.read_bytes()
    args = ["analyze", str(paths[0]), "--model", f"{fac}:model", "--data", f"{fac}:data",
            "-m", "sharpness", "-o", str(out)]
    for extra in ([], ["--overwrite"]):
        result = _invoke([*args, *extra])
        assert result.exit_code == 1, result.output  # as other refusals of analyze
        one_line_error(result, "a training run, written by the transformers callback",
                       "-o posthoc.h5")
        message = result.stderr
        assert ("join its series of sharpness" in message) == (not extra)
        assert ("delete the training run first" in message) == bool(extra)
    # a metric the training did not record: rows past its last step would block the
    # training's resume from a checkpoint (own-diff review)
    other = _invoke([*args[:-4], "-m", "hessian_trace", "-o", str(out)])
    one_line_error(other, "would then be refused", "-o posthoc.h5")
    assert out.read_bytes() == before  # untouched


def test_an_overwrite_interrupted_before_it_started_over_says_nothing_was_recorded(
        setup, tmp_path, monkeypatch):
    """`analyze --overwrite` stopped before it emptied the file said "6 checkpoints
    recorded; to continue, run the same command again without --overwrite": the earlier
    analysis, which the rerun would then have kept (review)."""
    import h5py
    from landscape_cli.commands import analyze as analyze_cmd

    out = tmp_path / "r.h5"
    assert _analyze_first(setup, tmp_path, "-m", "sharpness").exit_code == 0
    with h5py.File(out, "a") as f:  # written by an earlier command
        f.attrs["created"] = "2020-01-01T00:00:00+00:00"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(analyze_cmd, "analyze", stopped)
    result = _analyze_first(setup, tmp_path, "-m", "sharpness", "--overwrite")
    assert result.exit_code == 130
    assert (f"nothing recorded: {out} is as it was (the 1 checkpoint of an earlier "
            "analysis); to continue, run the same command again") in result.stderr
    assert "without --overwrite" not in result.stderr
    with h5py.File(out, "a") as f:  # another writer's date, without a UTC offset
        f.attrs["created"] = "2020-01-01T00:00:00"
    again = _analyze_first(setup, tmp_path, "-m", "sharpness", "--overwrite")
    assert "nothing recorded:" in again.stderr and "without --overwrite" not in again.stderr


def test_a_folder_of_plain_checkpoint_files_is_told_to_name_them(setup, tmp_path):
    """`analyze ckpts/` on ckpt-N.pt files was refused with no word of ckpts/*.pt (review)."""
    root, paths, _ = setup
    fac = root / "factories.py"
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "ckpt-10.pt").write_bytes(paths[0].read_bytes())
    result = _invoke(["analyze", str(folder), "--model", f"{fac}:model", "--data",
                      f"{fac}:data", "-m", "sharpness", "-o", str(tmp_path / "r.h5"), "-q"])
    assert result.exit_code == 1
    assert f"for the checkpoint files in it, name them: {folder}/*.pt" in result.output
    assert "Traceback" not in result.output
