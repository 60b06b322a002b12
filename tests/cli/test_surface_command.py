"""`landscape surface`: random/eigen planes and lines, PCA of a trajectory, interpolation."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from landscape_cli.main import cli

import landscape as ls
from tests.cli._checkpoints import train_and_save


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("surface")
    paths, ns = train_and_save(root, steps=12, every=3, wrap=False)
    return root, paths, ns


def _run(args):
    return CliRunner().invoke(cli, args)


@pytest.mark.parametrize(
    ("directions", "dims", "n_ckpt", "shape"),
    [("random", 2, 1, (5, 5)), ("random", 1, 1, (5,)), ("eigen", 2, 1, (5, 5)),
     ("pca", 2, 4, (5, 5)), ("interpolate", 1, 2, (5,))],
)
def test_surface_kinds(setup, tmp_path, directions, dims, n_ckpt, shape):
    root, paths, ns = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    ckpts = [str(p) for p in paths[-n_ckpt:]]
    result = _run(["surface", *ckpts, "--model", f"{fac}:model", "--data", f"{fac}:data",
                   "--dims", str(dims), "--steps", "5", "--directions", directions,
                   "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    name = f"{directions}-line" if dims == 1 and directions != "interpolate" else directions
    surf = ls.Run.open(out).surface(name)
    if directions == "pca":  # the origin (the last checkpoint) added where 5 steps miss it
        assert all(n in (5, 6) for n in surf.values["loss"].shape)
        assert 0.0 in surf.x.tolist() and 0.0 in surf.y.tolist()
    else:
        assert surf.values["loss"].shape == shape
    assert bool(surf.done.all())
    # the kind asked for, not a random plane under its name
    assert surf.attrs["directions"]["kind"] == {"interpolate": "interpolation"}.get(
        directions, directions)
    if directions in ("random", "eigen"):
        # the grid centre is the checkpoint itself
        model = ns["model"]()
        model.load_state_dict(torch.load(paths[-1]))
        x, y = ns["data"]()
        with torch.no_grad():
            centre = float(torch.nn.functional.cross_entropy(model(x), y))
        mid = tuple(n // 2 for n in shape)
        assert surf.values["loss"][mid] == pytest.approx(centre, rel=1e-5)
    if directions == "interpolate":
        assert np.all(np.isfinite(surf.values["loss"]))


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--directions", "interpolate"], "exactly two"), (["--directions", "pca"], "at least three")],
)
def test_surface_direction_requirements_are_one_line_errors(setup, tmp_path, args, match):
    root, paths, _ = setup
    fac = root / "factories.py"
    result = _run(["surface", str(paths[0]), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "-o", str(tmp_path / "r.h5"), "-q", *args])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0]


@pytest.mark.parametrize("span", ["nan", "inf", "NaN", "-inf", "0"])
def test_a_non_finite_or_non_positive_span_is_a_usage_error(setup, tmp_path, span):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    result = _run(["surface", str(paths[-1]), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "--steps", "3", "--span", span, "-o", str(out), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "--span" in errors[0], result.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("directions", "n_ckpt", "args", "match"),
    [
        ("interpolate", 2, ["--span", "0.1"], "--span does not apply to --directions interpolate"),
        ("interpolate", 2, ["--dims", "2"], "--dims 2 does not apply to --directions interpolate"),
        ("pca", 4, ["--span", "0.1"], "--span does not apply to --directions pca"),
        ("pca", 4, ["--dims", "1"], "--dims 1 does not apply to --directions pca"),
        ("pca", 4, ["--span", "1.0"], "--span does not apply"),  # given, even at the default
        ("eigen", 1, ["--normalization", "layer"], "--normalization applies to --directions "
                                                   "random only"),
        ("pca", 4, ["--ignore", "none"], "--ignore applies to --directions random only"),
    ],
)
def test_span_and_dims_that_do_not_apply_are_refused(setup, tmp_path, directions, n_ckpt,
                                                     args, match):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    ckpts = [str(p) for p in paths[-n_ckpt:]]
    result = _run(["surface", *ckpts, "--model", f"{fac}:model", "--data", f"{fac}:data",
                   "--steps", "3", "--directions", directions, *args, "-o", str(out), "-q"])
    assert result.exit_code == 2, result.output  # a usage error, as click's own
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error: ") \
        and match in lines[-1], lines
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(("command", "out", "match"), [
    ("surface", "newdir/", "names a directory; -o names the run file: newdir/run.h5"),
    ("surface", "plane.png", "-o names the run file (HDF5, e.g. run.h5)"),
    ("analyze", "report.html", "-o names the run file (HDF5, e.g. run.h5)"),
])
def test_a_run_file_named_as_a_directory_or_a_figure_is_refused(setup, tmp_path, monkeypatch,
                                                                command, out, match):
    """`-o newdir/` wrote a file named newdir, `-o plane.png` an HDF5 file named so."""
    root, paths, _ = setup
    fac = root / "factories.py"
    monkeypatch.chdir(tmp_path)
    result = _run([command, str(paths[-1]), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "-o", out, "-q"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("Error: ") and match in lines[-1], lines
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("directions", "n_ckpt"), [("interpolate", 2), ("pca", 4)])
def test_interpolation_and_pca_read_prefixed_checkpoints(setup, tmp_path, directions, n_ckpt):
    """A DDP checkpoint's 'module.' keys: 'checkpoints lack parameters' (random worked)."""
    root, paths, _ = setup
    fac = root / "factories.py"
    prefixed = []
    for p in paths[-n_ckpt:]:
        q = tmp_path / f"ddp-{p.name}"
        torch.save({f"module.{k}": v for k, v in torch.load(p).items()}, q)
        prefixed.append(str(q))
    values = []
    for ckpts, out in ([str(p) for p in paths[-n_ckpt:]], tmp_path / "plain.h5"), \
            (prefixed, tmp_path / "ddp.h5"):
        result = _run(["surface", *ckpts, "--model", f"{fac}:model", "--data", f"{fac}:data",
                       "--steps", "3", "--directions", directions, "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        values.append(ls.Run.open(out).surface(directions).values["loss"])
    np.testing.assert_array_equal(values[0], values[1])


@pytest.mark.parametrize(("args", "code", "match"), [
    (["--name", "a/b"], 1, "invalid surface name 'a/b'"),
    (["--name", "."], 1, "invalid surface name '.'"),
    (["--name", " "], 2, "give a name (an empty one would be the kind's)"),
    (["--steps", "100000"], 2, "100000 is not in the range"),
])
def test_a_bad_name_or_a_grid_too_large_is_one_line(setup, tmp_path, args, code, match):
    # a ValueError traceback, h5py's "name already exists", numpy's 74.5 GiB MemoryError
    root, paths, _ = setup
    fac = root / "factories.py"
    result = _run(["surface", str(paths[-1]), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "--steps", "3", "-o", str(tmp_path / "r.h5"), "-q", *args])
    assert result.exit_code == code, result.output
    assert match in result.output and "Traceback" not in result.output


def test_the_library_refuses_a_grid_it_could_not_hold():
    from landscape.surface.grid import MAX_POINTS

    model = torch.nn.Linear(2, 2)
    data = (torch.randn(4, 2), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="points is too large"):
        ls.surface.plane(model, torch.nn.functional.cross_entropy, data,
                         steps=int(MAX_POINTS ** 0.5) + 2)


def test_normalization_and_ignore_reach_the_random_directions(setup, tmp_path):
    """The reference code's --xnorm/--xignore had no counterpart on the command line."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    for name, args in (("default", []), ("layer", ["--normalization", "layer", "--ignore",
                                                    "none"])):
        result = _run(["surface", str(paths[-1]), "--model", f"{fac}:model", "--data",
                       f"{fac}:data", "--steps", "3", "--dims", "1", "--name", name, *args,
                       "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        default = run.surface("default").attrs["directions"]
        layer = run.surface("layer").attrs["directions"]
    assert (default["normalization"], default["ignore"]) == ("filter", "biasbn")
    assert (layer["normalization"], layer["ignore"]) == ("layer", "none")


def test_two_identical_checkpoints_are_no_line_to_interpolate(setup, tmp_path):
    """A zero-length segment gave a flat line, exit 0 (analyze refuses the same pair)."""
    import shutil

    root, paths, _ = setup
    copy = tmp_path / "copy.pt"
    shutil.copy(paths[1], copy)
    fac = root / "factories.py"
    result = _run(["surface", str(paths[1]), str(copy), "--model", f"{fac}:model", "--data",
                   f"{fac}:data", "--directions", "interpolate", "-o", str(tmp_path / "i.h5")])
    assert result.exit_code == 1 and "hold the same weights" in result.output


def test_a_checkpoint_with_weights_that_are_not_finite_is_said_so(setup, tmp_path):
    """'the loss on the data is nan' blamed the data."""
    import torch

    root, paths, _ = setup
    state = torch.load(paths[1], weights_only=True)
    weights = state["model"] if "model" in state else state
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = torch.full_like(weights[first], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    fac = root / "factories.py"
    result = _run(["surface", str(bad), "--model", f"{fac}:model", "--data", f"{fac}:data",
                   "--steps", "3", "-o", str(tmp_path / "n.h5")])
    assert result.exit_code == 1 and "the weights are not finite" in result.output


def test_interpolation_moves_frozen_weights_that_differ_between_the_checkpoints(tmp_path):
    """A --model factory that freezes a layer: its weights differ between the two whole
    checkpoints, and the grid must go from one to the other (alpha 0 is the first's loss;
    once only the trainable weights were kept, alpha 0 held the second's frozen layer)."""
    import torch.nn.functional as F
    from torch import nn

    fac = tmp_path / "frozen.py"
    fac.write_text("import torch\nfrom torch import nn\n\n"
                   "def model():\n    torch.manual_seed(0)\n"
                   "    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))\n"
                   "    m[0].requires_grad_(False)\n    return m\n\n"
                   "def data():\n    g = torch.Generator().manual_seed(1)\n"
                   "    x = torch.randn(32, 4, generator=g)\n"
                   "    return x, torch.randint(0, 3, (32,), generator=g)\n")
    ns: dict = {}
    exec(fac.read_text(), ns)
    nets = []
    for i in (1, 2):
        torch.manual_seed(i)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        torch.save(net.state_dict(), tmp_path / f"ckpt-{i}.pt")
        nets.append(net)
    out = tmp_path / "s.h5"
    result = _run(["surface", str(tmp_path / "ckpt-1.pt"), str(tmp_path / "ckpt-2.pt"),
                   "--model", f"{fac}:model", "--data", f"{fac}:data", "--directions",
                   "interpolate", "--steps", "5", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        surf = run.surface(run.surfaces()[0])
    x, y = ns["data"]()
    with torch.no_grad():
        losses = [float(F.cross_entropy(net(x), y)) for net in nets]
    assert surf.values["loss"][list(surf.x).index(0.0)] == pytest.approx(losses[0], rel=1e-5)
    assert surf.values["loss"][list(surf.x).index(1.0)] == pytest.approx(losses[1], rel=1e-5)


def test_replace_computes_one_surface_again_and_keeps_the_rest(setup, tmp_path):
    """--overwrite, the only way to recompute a stored surface, deleted every other surface
    and metric of the run file (surfaces audit)."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    base = ["surface", str(paths[-1]), "--model", f"{fac}:model", "--data", f"{fac}:data",
            "-o", str(out), "-q"]
    for args in (["--steps", "5"], ["--steps", "3", "--name", "keep"]):
        assert _run([*base, *args]).exit_code == 0
    with ls.RunWriter(out) as w:  # a metric of the run, which --replace must keep too
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})
        w.close(how="stopped by SIGTERM")  # and how its training ended
    refused = _run([*base, "--steps", "7"])
    assert refused.exit_code == 1 and "--replace" in refused.stderr
    again = _run([*base, "--steps", "7", "--replace"])
    assert again.exit_code == 0, again.output
    with ls.Run.open(out) as run:
        assert sorted(run.surfaces()) == ["keep", "random"]
        assert run.surface("random").values["loss"].shape == (7, 7)
        assert run.surface("keep").values["loss"].shape == (3, 3)
        assert run.series("loss", "value")[1].tolist() == [1.0]
        assert run.writer_status().reason == "stopped by SIGTERM"
    both = _run([*base, "--replace", "--overwrite"])
    assert both.exit_code == 2 and "do not go together" in both.stderr


def test_a_line_and_a_plane_of_random_directions_are_two_surfaces_by_default(setup, tmp_path):
    """The default 1-D surface took the 2-D one's name: refused, with advice (--replace)
    that deleted a plane that had taken minutes (review)."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    base = ["surface", str(paths[-1]), "--model", f"{fac}:model", "--data", f"{fac}:data",
            "--steps", "5", "-o", str(out)]
    plane = _run(base)
    assert plane.exit_code == 0 and "wrote surface 'random' (5x5 points" in plane.stdout
    line = _run([*base, "--dims", "1"])
    assert line.exit_code == 0, line.output
    assert "wrote surface 'random-line' (5 points" in line.stdout
    with ls.Run.open(out) as run:
        assert sorted(run.surfaces()) == ["random", "random-line"]
        assert run.surface("random").values["loss"].shape == (5, 5)
    other = _run([*base, "--dims", "1", "--name", "random"])  # named so on purpose
    assert other.exit_code == 1 and "--replace" in other.stderr
    assert "delete the stored surface and its points" in other.stderr


def test_a_finished_surface_run_again_says_nothing_was_computed(setup, tmp_path):
    """It printed 'wrote surface ...' though every point was read back from the file."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    args = ["surface", str(paths[-1]), "--model", f"{fac}:model", "--data", f"{fac}:data",
            "--steps", "3", "-o", str(out)]
    first = _run(args)
    assert first.exit_code == 0 and "wrote surface 'random' (3x3 points" in first.stdout
    again = _run(args)
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"surface 'random' in {out} was complete already (3x3 "
                                   "points, loss ")
    assert "nothing computed (--replace computes it again)" in again.stdout


def test_an_interpolation_runs_from_the_first_checkpoint_given_to_the_second(setup, tmp_path):
    """ckpt-late ckpt-early was put in step order without a word (alpha = 0 at the early
    one); the same file given twice said 'needs exactly two checkpoints'."""
    root, paths, ns = setup
    fac = root / "factories.py"
    common = ["--model", f"{fac}:model", "--data", f"{fac}:data", "--directions",
              "interpolate", "--steps", "3", "-q"]
    out = tmp_path / "back.h5"
    result = _run(["surface", str(paths[-1]), str(paths[0]), *common, "-o", str(out)])
    assert result.exit_code == 0, result.output
    loud = _run(["surface", str(paths[-1]), str(paths[0]), *common[:-1], "-o",
                 str(tmp_path / "loud.h5")])  # not -q: the order is said (a glob's may surprise)
    assert f"interpolating from {paths[-1]} (alpha 0) to {paths[0]} (alpha 1)" in loud.stderr
    x, y = ns["data"]()
    want = []
    for path in (paths[-1], paths[0]):
        model = ns["model"]()
        model.load_state_dict(torch.load(path))
        with torch.no_grad():
            want.append(float(torch.nn.functional.cross_entropy(model(x), y)))
    with ls.Run.open(out) as run:
        surf = run.surface("interpolate")
    got = dict(zip(surf.x.tolist(), surf.values["loss"].tolist()))
    assert got[0.0] == pytest.approx(want[0], rel=1e-5)
    assert got[1.0] == pytest.approx(want[1], rel=1e-5)
    twice = _run(["surface", str(paths[0]), str(paths[0]), *common, "-o",
                  str(tmp_path / "t.h5")])
    assert twice.exit_code == 1 and "the two given are one checkpoint" in twice.stderr


def test_a_surface_records_what_it_was_computed_from_and_info_shows_it(setup, tmp_path):
    """Only fingerprints were stored: no checkpoint, data or loss a paper's figure could cite."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "run.h5"
    for extra in ([str(paths[-1])], [str(paths[0]), str(paths[-1]), "--directions",
                                      "interpolate", "--name", "line"]):
        result = _run(["surface", *extra, "--model", f"{fac}:model", "--data", f"{fac}:data",
                       "--steps", "3", "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert run.surface("random").attrs["source"] == {
            "checkpoints": [str(paths[-1])], "model": f"{fac}:model", "data": f"{fac}:data"}
        assert run.surface("line").attrs["source"]["checkpoints"] == [str(paths[0]),
                                                                     str(paths[-1])]
    info = _run(["info", str(out)])
    assert f"      from {paths[-1]} (model {fac}:model, data {fac}:data)" in info.stdout
    report = tmp_path / "r.html"
    assert _run(["report", str(out), "-o", str(report), "-q"]).exit_code == 0
    assert f"points computed; from {paths[-1]} (model {fac}:model" in report.read_text()
