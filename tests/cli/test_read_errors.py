"""What every command that reads a run file does with damaged runs, bad output paths and
interruptions: one line, never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from landscape_cli.main import cli

from tests.cli._results import one_line_error


def test_an_output_path_under_a_file_is_one_line(runner, run_file, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args in (["report", str(run_file), "-o", str(afile / "x.html")],
                 ["plot", str(run_file), "-o", str(afile / "sub") + "/"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]


@pytest.mark.parametrize("damage", ["no_findings", "no_step", "fields_not_json", "no_column",
                                    "steps_backwards"])
def test_every_read_command_names_a_damaged_run_in_one_line(runner, run_file, tmp_path,
                                                            damage):
    # info, report and watch raised KeyError/JSONDecodeError tracebacks; check said
    # "cannot be read" with h5py's text; the file is now checked as it is opened
    import shutil

    import h5py

    path = tmp_path / "damaged.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "a") as f:
        if damage == "no_findings":
            del f["findings"]
        elif damage == "no_step":
            del f["metrics/loss/step"]
        elif damage == "fields_not_json":
            f["metrics/loss"].attrs["fields"] = "{not json"
        elif damage == "steps_backwards":  # overwritten bytes: info showed "steps -1..99"
            f["metrics/loss/step"][10] = -1
        else:
            del f["metrics/loss/value"]
    for args in (["check"], ["info"], ["report", "-o", str(tmp_path / "r.html")],
                 ["plot", "-o", str(tmp_path / "plots")], ["watch", "--once"]):
        result = runner.invoke(cli, [*args, str(path)])
        one_line_error(result, str(path), "damaged run file")
        assert result.exit_code == (2 if args == ["check"] else 1)


def test_ctrl_c_a_full_disk_and_a_misdeclared_rule_are_one_line(runner, run_file, tmp_path,
                                                                monkeypatch):
    # Ctrl-C outside a command's own handler was click's "Aborted!" and exit 1 (for check:
    # "a finding"); a full disk and a rule whose metrics is a string gave tracebacks
    from landscape.store import Run

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Run, "open", classmethod(interrupted))
        for args in (["check", str(run_file)], ["report", str(run_file), "-o",
                                                 str(tmp_path / "r.html")]):
            result = runner.invoke(cli, args)
            assert result.exit_code == 130, result.output
            assert result.stderr.strip() == "Error: interrupted (SIGINT)"
    if Path("/dev/full").exists():
        full = runner.invoke(cli, ["report", str(run_file), "-o", "/dev/full"])
        one_line_error(full, "No space left on device")
    rules = tmp_path / "my_rules.py"
    rules.write_text(
        "from landscape.alarms import Rule\n"
        "class StrMetrics(Rule):\n"
        "    name = 'str_metrics'\n"
        "    metrics = 'loss'\n"
        "    def evaluate(self, step, row):\n"
        "        return None\n"
        "RULES = [StrMetrics()]\n"
    )
    for args in (["check", str(run_file)], ["report", str(run_file), "-o",
                                             str(tmp_path / "r2.html")]):
        result = runner.invoke(cli, [*args, "--rules", f"{rules}:RULES"])
        one_line_error(result, "my_rules.py:RULES", "metrics")


def _with_damaged_contents(run_file, tmp_path, how):
    """A copy of ``run_file`` that is well formed but holds a value of the wrong kind."""
    import shutil

    import h5py

    path = tmp_path / f"{how}.h5"
    shutil.copy(run_file, path)
    with h5py.File(path, "a") as f:
        if how == "config":
            f.attrs["config"] = "{bad"
        elif how == "params":
            f["metrics/hessian"].attrs["params"] = "{bad"
        elif how == "severity":
            f["findings/severity"][0] = b"bogus"
        elif how == "dtype":
            fields = json.loads(f["metrics/loss"].attrs["fields"])
            fields["value"]["dtype"] = "bogus"
            f["metrics/loss"].attrs["fields"] = json.dumps(fields)
    return path


@pytest.mark.parametrize("how", ["config", "params", "severity", "dtype"])
def test_damaged_contents_are_one_line_naming_the_file_in_every_reading_command(
        runner, run_file, tmp_path, how):
    """info, report, plot and watch printed tracebacks (JSONDecodeError, a ValueError from
    the severity, a TypeError from the dtype); check gave one line."""
    path = _with_damaged_contents(run_file, tmp_path, how)
    commands = {"info": [], "report": ["-o", str(tmp_path / "r.html")],
                "plot": ["-o", str(tmp_path / "plots")], "watch": ["--once"], "check": []}
    failed = 0
    for command, extra in commands.items():
        result = runner.invoke(cli, [command, str(path), *extra])
        assert "Traceback" not in result.output and not (
            result.exception and not isinstance(result.exception, SystemExit)), (
            command, result.exception)
        if result.exit_code != 0 and not (command == "check" and result.exit_code == 1):
            one_line_error(result, path.name)
            failed += 1
    assert failed >= 2  # what reads the damaged value refuses the file, naming it


@pytest.mark.parametrize("command", ["plot", "report", "analyze", "surface"])
def test_an_empty_output_name_is_refused(runner, run_file, command, tmp_path, monkeypatch):
    """plot and report wrote into the current directory for -o ''."""
    monkeypatch.chdir(tmp_path)  # where a regression would write
    result = runner.invoke(cli, [command, str(run_file), "-o", " "])
    assert result.exit_code == 2 and "an empty name would write" in result.output



@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("option", ["--help", "--version"])
def test_the_groups_own_output_that_cannot_be_written_is_one_line(option):
    """`landscape --help > /dev/full` printed a traceback (a command's -h said one line)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "landscape_cli.main", option],
                              stdout=full, stderr=subprocess.PIPE, env=env, timeout=300)
    assert done.returncode == 1
    assert done.stderr.decode().strip() == "Error: No space left on device"


def test_a_checkpoint_given_to_a_command_that_reads_runs_is_named_as_one(runner, tmp_path):
    """``landscape info ckpt.pt`` said "not a readable HDF5 file (file signature not found)"."""
    import torch

    ckpt = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2)}, ckpt)
    for args in (["check"], ["info"], ["report", "-o", str(tmp_path / "r.html")],
                 ["plot", "-o", str(tmp_path / "plots")], ["watch", "--once"]):
        result = runner.invoke(cli, [*args, str(ckpt)])
        one_line_error(result, f"{ckpt}: a PyTorch checkpoint, not a run file",
                       "landscape analyze or surface measures checkpoints")
        assert result.exit_code == (2 if args == ["check"] else 1)


def test_a_command_other_tools_have_is_pointed_to_ours(runner):
    result = runner.invoke(cli, ["compare", "a.h5", "b.h5"])
    assert result.exit_code == 2
    assert "no command 'compare': landscape plot RUN1 RUN2" in result.output
    typo = runner.invoke(cli, ["comapre"])
    assert typo.exit_code == 2 and "No such command 'comapre'" in typo.output


def test_completing_after_a_name_other_tools_use_is_quiet(runner):
    """Shell completion after ``landscape show`` printed a UsageError traceback (review)."""
    result = runner.invoke(cli, [], prog_name="landscape", env={
        "_LANDSCAPE_COMPLETE": "bash_complete", "COMP_WORDS": "landscape show ",
        "COMP_CWORD": "2"})
    assert result.exit_code == 0 and result.exception is None, result.output
