"""The CLI's default (non-quiet) paths and the user-stack bugs, each with its own test.

Every command is run here without ``-q``: the quiet flag hid the first bug below.
"""

from __future__ import annotations

import os
import shlex
import sys
import textwrap

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from landscape_cli.commands import watch as watch_cmd
from landscape_cli.main import COMMANDS, cli

import landscape as ls
from landscape.store import RunWriter
from tests.cli._checkpoints import train_and_save
from tests.cli._results import error_line


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    paths, ns = train_and_save(root, steps=30, every=10, wrap=True)
    return root, paths, ns


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _factories(root):
    fac = root / "factories.py"
    return ["--model", f"{fac}:model", "--data", f"{fac}:data"]


# ---------------------------------------------------------------- 1: analyze's default path


def test_analyze_without_quiet_prints_its_summary_and_exits_0(setup, tmp_path):
    root, paths, _ = setup
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", paths[0], paths[1], *_factories(root), "-o", out,
                      "-m", "sharpness", "--lr", "0.5"])
    assert result.exit_code == 0, result.output
    assert "writer is closed" not in result.output
    assert f"wrote {out}: 2 checkpoints, metrics sharpness" in result.stdout


# ---------------------------------------------------------------- 2: --model names the data


def test_model_factory_returning_a_tuple_is_one_line(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    for command in ("analyze", "surface"):
        result = _invoke([command, paths[0], "--model", f"{fac}:data", "--data",
                          f"{fac}:data", "-o", tmp_path / "r.h5"])
        error_line(result, "returned a tuple, not a torch.nn.Module")
        assert not (tmp_path / "r.h5").exists()


# ---------------------------------------------------------------- 4: surface on a NaN loss


def test_surface_on_a_non_finite_loss_is_one_line_and_leaves_no_file(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    result = _invoke(["surface", paths[-1], "--model", f"{fac}:model", "--data",
                      f"{fac}:nan_data", "--steps", "3", "-o", out])
    error_line(result, "not finite", no_warnings=True)
    assert not out.exists()


# ---------------------------------------------------------------- 5: steps from folder names


def test_steps_come_from_checkpoint_folders_and_rows_are_in_step_order(setup, tmp_path):
    from safetensors.torch import save_file

    root, paths, _ = setup
    files = []
    for step, path in ((40, paths[2]), (20, paths[0])):  # argument order: 40 first
        folder = tmp_path / "out" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in torch.load(path)["model"].items()}
        save_file(state, str(folder / "model.safetensors"))
        files.append(folder / "model.safetensors")
    out = tmp_path / "run.h5"
    result = _invoke(["analyze", *files, *_factories(root), "-m", "sharpness", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert list(run.steps("sharpness")) == [20, 40]
        assert run.checkpoints() == [(20, str(files[1])), (40, str(files[0]))]


def test_step_from_name_reads_checkpoint_folders_only():
    from landscape.loading import step_from_name

    assert step_from_name("out/checkpoint-40/model.safetensors") == 40
    assert step_from_name("runs/epoch=3/weights.pt") == 3
    assert step_from_name("ckpt-7.pt") == 7
    assert step_from_name("results2/model.pt") is None  # not a checkpoint folder



@pytest.mark.parametrize("name, step", [
    # a metric's value, a date or a version after the step was read as the step (CLI audit)
    ("epoch=3-step=400-val_loss=0.52.pt", 400), ("model_step10_loss1.001.pt", 10),
    ("ckpt-000500-acc93.pt", 500), ("step100_2024-05-01.pt", 100), ("ckpt_1000_v2.pt", 1000),
    ("global_step=55.pt", 55), ("iteration_30.pt", 30),
    ("model_1200.pt", 1200), ("timestep7_3.pt", 3),  # no step word: the last number
])
def test_the_step_of_a_file_name_is_the_number_after_its_step_word(name, step):
    from landscape.loading import step_from_name

    assert step_from_name(name) == step


def test_a_step_entry_held_in_a_tensor_gives_the_step(tmp_path):
    # {"step": torch.tensor(12)} was passed over for the file name's 0
    from landscape.loading import load_checkpoint

    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "step": torch.tensor(12)},
               tmp_path / "last_0.pt")
    assert load_checkpoint(tmp_path / "last_0.pt").step == 12


# ---------------------------------------------------------------- 9: no empty file left


def test_a_failed_command_removes_the_empty_run_file_it_created(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    for command in ("analyze", "surface"):
        result = _invoke([command, paths[0], "--model", f"{fac}:model", "--data",
                          f"{fac}:nan_data", "-o", out, "--steps", "3"][: None if command ==
                                                                          "surface" else -2])
        error_line(result, "not finite")
        assert not out.exists(), command


def test_a_failed_command_never_removes_a_file_that_was_there(setup, tmp_path):
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    RunWriter(out, mode="w").close()
    result = _invoke(["analyze", paths[0], "--model", f"{fac}:model", "--data",
                      f"{fac}:nan_data", "-o", out])
    error_line(result, "not finite")
    assert out.exists()


# ---------------------------------------------------------------- re-running into a run file


def test_rerunning_analyze_skips_recorded_steps_and_overwrite_starts_over(setup, tmp_path):
    root, paths, _ = setup
    out = tmp_path / "run.h5"
    args = [*_factories(root), "-m", "sharpness", "-o", out]
    assert _invoke(["analyze", paths[0], paths[1], *args, "-q"]).exit_code == 0
    again = _invoke(["analyze", *paths, *args])  # resumes: only step 30 is new
    assert again.exit_code == 0, again.output
    assert "steps 10, 20 already recorded, skipped" in again.stderr
    with ls.Run.open(out) as run:
        assert list(run.steps("sharpness")) == [10, 20, 30]
    earlier = _invoke(["analyze", paths[0], *args])  # nothing new: all skipped, exit 0
    assert earlier.exit_code == 0, earlier.output
    fresh = _invoke(["analyze", paths[1], *args, "--overwrite", "-q"])
    assert fresh.exit_code == 0, fresh.output
    with ls.Run.open(out) as run:
        assert list(run.steps("sharpness")) == [20]


def test_an_earlier_step_than_the_file_holds_says_how_to_start_over(setup, tmp_path):
    root, paths, _ = setup
    out = tmp_path / "run.h5"
    args = [*_factories(root), "-m", "sharpness", "-o", out, "-q"]
    assert _invoke(["analyze", paths[1], *args]).exit_code == 0
    result = _invoke(["analyze", paths[0], *args])
    error_line(result, "--overwrite")
    assert "mode='w'" in result.stderr


def test_surface_overwrite_starts_the_file_over(setup, tmp_path):
    root, paths, _ = setup
    out = tmp_path / "run.h5"
    args = [paths[-1], *_factories(root), "--dims", "1", "--steps", "3", "-o", out]
    assert _invoke(["surface", *args, "--name", "a", "-q"]).exit_code == 0
    result = _invoke(["surface", *args, "--name", "b", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "wrote surface 'b' (3 points, loss " in result.stdout
    with ls.Run.open(out) as run:
        assert run.surfaces() == ["b"]


# ---------------------------------------------------------------- factories import neighbours


def test_a_factory_file_imports_the_module_next_to_it(setup, tmp_path, monkeypatch):
    import sys

    root, paths, _ = setup
    project = tmp_path / "project"
    project.mkdir()
    (project / "nets_for_landscape_test.py").write_text(textwrap.dedent("""
        from torch import nn

        def build():
            return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    """))
    (project / "fac.py").write_text(textwrap.dedent(f"""
        from nets_for_landscape_test import build

        def model():
            return build()

        def data():
            import importlib.util, sys
            spec = importlib.util.spec_from_file_location("_f", {str(root / 'factories.py')!r})
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.data()
    """))
    monkeypatch.chdir(tmp_path)  # not the factory's folder
    before = list(sys.path)
    result = _invoke(["analyze", paths[0], "--model", "project/fac.py:model", "--data",
                      "project/fac.py:data", "-m", "sharpness", "-o", "run.h5", "-q"])
    assert result.exit_code == 0, result.output
    assert sys.path == before  # the folder was on sys.path only while loading
    sys.modules.pop("nets_for_landscape_test", None)


def test_a_module_factory_in_the_current_folder_imports(setup, tmp_path, monkeypatch):
    # the documented module:fn form failed for a module in the current folder ("No module
    # named ..."): a console command does not put it on sys.path, as python -m does
    import sys

    root, paths, _ = setup
    (tmp_path / "here_for_landscape_test.py").write_text(textwrap.dedent(f"""
        from torch import nn

        def model():
            return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

        def data():
            import importlib.util
            spec = importlib.util.spec_from_file_location("_f", {str(root / 'factories.py')!r})
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod.data()
    """))
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    try:
        result = _invoke(["analyze", paths[0], "--model", "here_for_landscape_test:model",
                          "--data", "here_for_landscape_test:data", "-m", "sharpness", "-o",
                          "run.h5", "-q"])
    finally:
        sys.modules.pop("here_for_landscape_test", None)
    assert result.exit_code == 0, result.output
    assert sys.path == before


# ---------------------------------------------------------------- warnings


def test_other_libraries_warnings_only_with_verbose(setup, tmp_path):
    root, paths, _ = setup
    fac = tmp_path / "noisy.py"
    fac.write_text(textwrap.dedent(f"""
        import warnings
        import torch

        exec(open({str(root / 'factories.py')!r}).read())

        def noisy_data():
            # as torch.jit.script does it: a DeprecationWarning raised inside torch
            warnings.warn_explicit("`torch.jit.script` is deprecated.", DeprecationWarning,
                                   filename=torch.__file__, lineno=1)
            warnings.warn("the user's own warning")
            return data()
    """))
    args = ["analyze", paths[0], "--model", f"{fac}:model", "--data", f"{fac}:noisy_data",
            "-m", "sharpness", "-q"]
    quiet = _invoke([*args, "-o", tmp_path / "a.h5"])
    assert quiet.exit_code == 0, quiet.output
    assert "torch.jit.script" not in quiet.stderr
    assert "warning: the user's own warning" in quiet.stderr
    verbose = _invoke([*args, "-o", tmp_path / "b.h5", "-v"])
    assert verbose.exit_code == 0, verbose.output
    assert "warning: `torch.jit.script` is deprecated." in verbose.stderr


def test_transformers_log_notices_only_with_verbose(monkeypatch):
    """transformers logs its notices on a handler of its own, not as Python warnings."""
    import logging

    import transformers  # noqa: F401  (configures its logger)
    from landscape_cli.app import _VERBOSE, one_line_warnings

    logger = logging.getLogger("transformers")
    monkeypatch.setattr(logger, "level", logging.WARNING)
    with click.Context(click.Command("x")):
        with one_line_warnings():
            assert logger.getEffectiveLevel() == logging.ERROR
    assert logger.level == logging.WARNING  # restored
    with click.Context(click.Command("x")) as ctx:
        ctx.meta[_VERBOSE] = True
        with one_line_warnings():
            assert logger.getEffectiveLevel() == logging.WARNING
    monkeypatch.delitem(sys.modules, "transformers")  # as before its first import
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    with click.Context(click.Command("x")):
        with one_line_warnings():
            assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert "TRANSFORMERS_VERBOSITY" not in os.environ


def test_a_warning_line_carries_one_prefix(capsys):
    """The library's "landscape: ..." warnings read "warning: landscape: ..." (review)."""
    import warnings

    from landscape_cli.app import one_line_warnings

    with click.Context(click.Command("x")), one_line_warnings():
        warnings.warn("landscape: non-finite parameters at step 3", RuntimeWarning,
                      stacklevel=1)
        warnings.warn("the user's own warning: landscape: kept", UserWarning, stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [
        "warning: non-finite parameters at step 3",
        "warning: the user's own warning: landscape: kept"]


def test_the_librarys_own_warnings_are_shown(setup, tmp_path):
    root, paths, _ = setup
    out = tmp_path / "run.h5"
    args = ["analyze", paths[0], *_factories(root), "-m", "sharpness", "-o", out, "-q"]
    assert _invoke(args).exit_code == 0
    again = _invoke(args)
    assert "warning: " in again.stderr and "already recorded" in again.stderr


# ---------------------------------------------------------------- plot: default set, dir/


def _small_run(path):
    with RunWriter(path, mode="w") as w:
        w.declare("loss", {"value": None})
        w.declare("sharpness", {"top": None})
        for s in range(5):
            w.append("loss", s, {"value": 1.0 / (s + 1)})
            w.append("sharpness", s, {"top": float(s)})
    return path


def test_plot_to_a_file_without_metric_writes_one_image_per_metric(tmp_path):
    run = _small_run(tmp_path / "run.h5")
    result = _invoke(["plot", run, "-o", tmp_path / "plot.png"])
    assert result.exit_code == 0, result.output
    for name in ("plot-loss.png", "plot-sharpness.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
        assert f"wrote {tmp_path / name}" in result.stdout


def test_plot_to_a_trailing_slash_is_a_directory(tmp_path):
    run = _small_run(tmp_path / "run.h5")
    result = _invoke(["plot", run, "-m", "loss", "-o", f"{tmp_path / 'figs.v2'}/"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "figs.v2" / "loss.png").is_file()


# ---------------------------------------------------------------- watch waits for the file


def test_watch_waits_for_the_file_to_appear(tmp_path, monkeypatch):
    path = tmp_path / "later.h5"
    now = [0.0]

    def sleep(s):
        now[0] += s
        if now[0] >= 3 and not path.exists():
            _small_run(path)  # the training job creates its run file

    monkeypatch.setattr(watch_cmd, "_clock", lambda: now[0])
    monkeypatch.setattr(watch_cmd, "_sleep", sleep)
    result = _invoke(["watch", path, "--interval", "1", "--timeout", "6"])
    assert result.exit_code == 0, result.output
    assert f"waiting for {path} to be created" in result.stderr
    assert "loss  step 4" in result.stdout


def test_watch_stops_waiting_at_the_timeout(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(watch_cmd, "_clock", lambda: now[0])
    monkeypatch.setattr(watch_cmd, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    result = _invoke(["watch", tmp_path / "never.h5", "--timeout", "5"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "after waiting 5s" in result.stderr


# ---------------------------------------------------------------- help: one runnable example


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_ends_with_one_runnable_example(name):
    result = _invoke(["-h"] if name is None else [name, "-h"])
    assert result.exit_code == 0, result.output
    assert "None]" not in result.output  # an unbounded range showed as [x<=None]
    lines = [ln.strip() for ln in result.output.splitlines() if ln.strip()]
    assert lines[-2] == "Example:"
    assert sum(ln == "Example:" for ln in lines) == 1
    words = shlex.split(lines[-1])
    assert words[0] == "landscape"
    command = cli.get_command(None, words[1])
    assert command is not None
    assert name is None or words[1] == name
    # the example parses: every option exists and has its values
    parent = click.Context(cli, info_name="landscape", **cli.context_settings)
    ctx = command.make_context(words[1], words[2:], parent=parent)
    assert isinstance(ctx, click.Context)


def _fresh_cli(code: str) -> str:
    """Run ``code`` in a new interpreter (no command module imported yet); its stdout.

    ``landscape_cli`` is this checkout's, as in the suite (``cli/checkout.py``): a second
    checkout run with the first one's environment tested the installed commands.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    code = "from cli.checkout import use_this_checkout\nuse_this_checkout()\n" + code
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, check=True)
    return done.stdout


def test_help_and_the_light_commands_do_not_import_torch(tmp_path):
    """Every command module was imported to print `landscape -h` (torch and matplotlib:
    seconds); the commands now load on first use."""
    from landscape.store import RunWriter

    run_file = tmp_path / "run.h5"
    with RunWriter(run_file) as w:
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": np.float64(1.0)})
    code = textwrap.dedent(f"""
        import sys
        from landscape_cli.main import cli
        for args in (["-h"], ["info", {str(run_file)!r}], ["check", {str(run_file)!r}]):
            try:
                cli.main(args, prog_name="landscape", standalone_mode=False)
            except SystemExit:
                pass
        print("torch" in sys.modules, "matplotlib" in sys.modules)
    """)
    assert _fresh_cli(code).splitlines()[-1] == "False False"


def test_the_command_list_of_help_is_that_of_the_loaded_commands():
    # the short help of an unloaded command is read from its module's source
    code = ("from landscape_cli.main import cli\n"
            "cli.main(['-h'], prog_name='landscape', standalone_mode=False, terminal_width=80)")
    unloaded = _fresh_cli(code)
    for name in COMMANDS:
        assert cli.get_command(None, name) is not None  # loads it
    loaded = CliRunner().invoke(cli, ["-h"], prog_name="landscape", terminal_width=80)
    assert loaded.exit_code == 0
    assert unloaded == loaded.output
    for name in COMMANDS:
        assert f"  {name}  " in unloaded
    # an installation without .py sources: the command is loaded for its help
    import landscape_cli.app as app

    real = app._docstring_of_command
    try:
        app._docstring_of_command = lambda module: None
        without = CliRunner().invoke(cli, ["-h"], prog_name="landscape", terminal_width=80)
    finally:
        app._docstring_of_command = real
    assert without.output == loaded.output


# ---------------------------------------------------------------- the default path of the rest


def test_surface_info_report_check_default_paths(setup, tmp_path):
    root, paths, _ = setup
    out = tmp_path / "run.h5"
    surface = _invoke(["surface", paths[-1], *_factories(root), "--steps", "3", "-o", out])
    assert surface.exit_code == 0, surface.output
    assert "wrote surface 'random' (3x3 points, loss " in surface.stdout
    assert "nan" not in surface.stdout
    assert not [ln for ln in surface.stderr.splitlines() if ln.startswith("warning:")]
    info = _invoke(["info", out])
    assert info.exit_code == 0 and "random: 3x3 grid, 9/9 points computed" in info.stdout
    report = _invoke(["report", out, "-o", tmp_path / "r.html"])
    assert report.exit_code == 0 and "wrote " in report.stdout
    check = _invoke(["check", out])
    assert check.exit_code == 0 and "0 findings" in check.stdout
    plot = _invoke(["plot", out, "-o", tmp_path / "figs"])
    assert plot.exit_code == 0 and "surface-random.png" in plot.stdout
    assert np.isfinite(ls.Run.open(out).surface("random").values["loss"]).all()


def test_rerunning_a_monitor_into_its_run_file_says_how_to_start_over(tmp_path):
    net = torch.nn.Linear(2, 1)
    path = tmp_path / "run.h5"
    for _ in range(2):  # the second run starts at step 0 again, into the same file
        with ls.Monitor(net, torch.nn.functional.mse_loss, path, metrics=["loss"]) as monitor:
            if _ == 0:
                monitor.step(0, loss=1.0)
                monitor.step(1, loss=0.5)
            else:
                with pytest.raises(ls.StepOrderError, match=r"mode='w'.*truncate_from=0"):
                    monitor.step(0, loss=1.0)


def test_bug10_a_shape_mismatch_names_the_shapes(tmp_path):
    from torch import nn

    from landscape._errors import LandscapeError
    from landscape.loading import Checkpoint, load_state_into

    saved = Checkpoint(tmp_path / "w.pt", nn.Linear(3, 2).state_dict(), 0)
    with pytest.raises(LandscapeError, match=r"weight \(2, 3\) vs model \(2, 4\)"):
        load_state_into(nn.Linear(4, 2), saved)


def test_overwrite_with_data_that_do_not_fit_leaves_the_file_as_it_was(setup, tmp_path):
    """--overwrite emptied the file before the data were tried on the first checkpoint."""
    root, paths, _ = setup
    fac = root / "factories.py"
    out = tmp_path / "r.h5"
    assert _invoke(["analyze", *paths, *_factories(root), "-m", "sharpness", "-o", out,
                    "-q"]).exit_code == 0
    result = _invoke(["analyze", paths[0], "--model", f"{fac}:model", "--data",
                      f"{fac}:nan_data", "-o", out, "--overwrite"])
    error_line(result, "not finite")
    with ls.Run.open(out) as run:
        assert [s for s, _ in run.checkpoints()] == [10, 20, 30]


def _scaled(path, factor, out, step):
    """The checkpoint at ``path`` with every weight times ``factor`` (NaN: a run that blew
    up; 1e38: logits beyond float range), saved at ``out`` as step ``step``."""
    saved = torch.load(path)
    torch.save({"model": {k: v * factor for k, v in saved["model"].items()}, "step": step}, out)
    return out


def test_a_checkpoint_of_a_run_that_blew_up_is_recorded_not_refused(setup, tmp_path):
    """A diverged checkpoint (NaN weights) among healthy ones stopped analyze for good."""
    root, paths, _ = setup
    diverged = _scaled(paths[1], float("nan"), tmp_path / "ckpt-25.pt", 25)
    out = tmp_path / "r.h5"
    result = _invoke(["analyze", paths[0], diverged, paths[2], *_factories(root),
                      "-m", "sharpness", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    assert "ckpt-25.pt: the weights are not finite (a run that blew up)" in result.stderr
    with ls.Run.open(out) as run:
        steps, ratio = run.series("sharpness", "lambda_max")
        assert steps.tolist() == [10, 25, 30]
        assert np.isfinite(ratio[[0, 2]]).all() and np.isnan(ratio[1])
        # an error finding of it: the gate fails the run (an info alone passed it)
        assert [(f.step, f.rule, f.severity) for f in run.findings()
                if f.severity == "error"] == [(25, "nonfinite", "error")]
    assert _invoke(["check", out]).exit_code == 1


def test_a_non_finite_loss_on_finite_weights_is_refused_also_when_resuming(setup, tmp_path):
    """Logits beyond float range give an infinite loss and a meaningless curvature (a fresh
    run recorded lambda_max 9.7e28); a resumed run refused it. Both refuse now."""
    root, paths, _ = setup
    huge = _scaled(paths[1], 1e38, tmp_path / "ckpt-25.pt", 25)
    out = tmp_path / "r.h5"
    fresh = _invoke(["analyze", paths[0], huge, *_factories(root), "-m", "sharpness",
                     "-o", out, "-q"])
    # the data gave a finite loss on step 10: the error says the weights overflow
    error_line(fresh, "ckpt-25.pt: the loss on the data is")
    assert "its finite weights overflow" in fresh.stderr
    assert "the checkpoints before it are stored" in fresh.stderr
    with ls.Run.open(out) as run:  # the first checkpoint is kept, resumable
        assert [s for s, _ in run.checkpoints()] == [10]
    resumed = _invoke(["analyze", paths[0], huge, *_factories(root), "-m", "sharpness",
                       "-o", out, "-q"])
    error_line(resumed, "ckpt-25.pt: the loss on the data is")


def test_a_random_surface_reads_only_its_centre(setup, tmp_path):
    """Around the last checkpoint: the others were each loaded and evaluated (and one that
    diverged stopped the command), though the grid never uses them."""
    root, paths, _ = setup
    diverged = _scaled(paths[0], float("nan"), tmp_path / "ckpt-5.pt", 5)
    out = tmp_path / "r.h5"
    result = _invoke(["surface", diverged, paths[-1], *_factories(root), "--dims", "1",
                      "--steps", "3", "-o", out, "-q"])
    assert result.exit_code == 0, result.output
    with ls.Run.open(out) as run:
        assert np.isfinite(run.surface("random-line").values["loss"]).all()


def test_a_checkpoint_recorded_under_another_step_is_refused(setup, tmp_path):
    """A file analysed when its checkpoints were numbered 0, 1, ... and resumed once they
    give a step held every checkpoint twice, under both numberings."""
    from landscape.store import RunWriter

    root, paths, _ = setup
    out = tmp_path / "r.h5"
    with RunWriter(out, mode="w", config={"analysis": {"checkpoints": [str(paths[0])]}}) as w:
        w.record_checkpoint(0, str(paths[0]))  # the numbering of the earlier analysis
    result = _invoke(["analyze", paths[0], *_factories(root), "-m", "sharpness", "-o", out])
    error_line(result, "is recorded there as step 0, and is step 10 now")


def test_a_resumed_analyze_prints_this_calls_findings_and_counts_the_earlier_ones(setup,
                                                                                  tmp_path):
    """The resumed monitor's findings start with the run's recorded ones: the summary
    printed them again as if this call had found them."""
    root, paths, _ = setup
    diverged = _scaled(paths[1], float("nan"), tmp_path / "ckpt-25.pt", 25)
    out = tmp_path / "r.h5"
    first = _invoke(["analyze", paths[0], diverged, *_factories(root), "-m", "sharpness",
                     "-o", out])
    assert first.exit_code == 0, first.output
    assert "step 25" in first.stdout and "recorded before" not in first.stdout
    again = _invoke(["analyze", paths[0], diverged, paths[2], *_factories(root),
                     "-m", "sharpness", "-o", out])
    assert again.exit_code == 0, again.output
    assert "step 25" not in again.stdout
    recorded = len(ls.Run.open(out).findings())
    assert f"recorded before (landscape check {out} lists every one)" in again.stdout
    assert recorded >= 1 and f"{recorded} finding" in again.stdout


def test_report_and_plot_of_a_run_do_not_import_torch(tmp_path):
    """The figures imported torch (and the curvature package) for the spectral density's
    smoothing alone: `plot -h` and `report` spent ~2 of their ~3 seconds importing it."""
    from landscape.store import RunWriter

    run_file = tmp_path / "run.h5"
    with RunWriter(run_file) as w:
        w.declare("loss", {"value": None})
        for s in range(3):
            w.append("loss", s, {"value": np.float64(1.0 / (s + 1))})
    code = textwrap.dedent(f"""
        import sys
        from landscape_cli.main import cli
        for args in (["report", {str(run_file)!r}, "-o", {str(tmp_path / "r.html")!r}],
                     ["plot", {str(run_file)!r}, "-o", {str(tmp_path / "p.png")!r}]):
            try:
                cli.main(args, prog_name="landscape", standalone_mode=False)
            except SystemExit:
                pass
        print("torch" in sys.modules)
    """)
    assert _fresh_cli(code).splitlines()[-1] == "False"
    assert (tmp_path / "r.html").exists() and list(tmp_path.glob("p*.png"))
