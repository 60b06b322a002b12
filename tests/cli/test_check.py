"""``landscape check`` through click's CliRunner: the table, the gate, ``--json``, ``--rules``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from landscape_cli.main import cli

import landscape as ls
from landscape.findings import Finding
from landscape.store import RunWriter
from tests.cli._results import one_line_error
from tests.cli._runs import WARN, bad_inputs, damaged_run, write_run

REPO = Path(__file__).resolve().parents[2]


def test_check_table_and_exit_status_follow_fail_on(runner, run_file):
    result = runner.invoke(cli, ["check", str(run_file), "--stored"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["step", "severity", "rule", "metric", "value", "threshold",
                                "message"]
    assert lines[2].split()[:4] == ["30", "warning", "loss_spike", "loss/value"]
    assert "hint: lower lr" in lines[3]
    assert lines[4].split()[:3] == ["60", "error", "edge_of_stability"]
    assert "2 findings (1 error, 1 warning, 0 info); FAIL" in lines[-1]
    assert runner.invoke(cli, ["check", str(run_file), "--stored", "--fail-on", "error"]
                         ).exit_code == 1

    assert runner.invoke(cli, ["check", str(run_file), "--stored", "--fail-on", "info"]
                         ).exit_code == 1


def test_check_passes_below_the_threshold_and_on_a_clean_run(runner, tmp_path):
    only_warning = write_run(tmp_path / "w.h5", findings=(WARN,))
    result = runner.invoke(cli, ["check", str(only_warning), "--fail-on", "error"])
    assert result.exit_code == 0, result.output
    assert "1 finding (0 error, 1 warning, 0 info); ok (fail on error or worse)" in result.output
    clean = write_run(tmp_path / "clean.h5")
    result = runner.invoke(cli, ["check", str(clean)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"{clean}: 0 findings (0 error, 0 warning, 0 info); ok (fail on warning or worse)"
    ]


def test_check_json(runner, tmp_path):
    run = write_run(
        tmp_path / "j.h5",
        findings=(Finding(5, "nonfinite", "error", "loss/value", float("nan"), 1.0, "nan loss"),),
    )
    result = runner.invoke(cli, ["check", str(run), "--json", "--stored"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["failed"] is True and data["fail_on"] == "warning"
    assert data["counts"] == {"info": 0, "warning": 0, "error": 1}
    assert data["findings"][0]["value"] == "nan" and data["findings"][0]["threshold"] == 1.0
    assert data["findings"][0]["extra"] == {}


def test_check_json_keeps_a_findings_extra(runner, tmp_path):
    """The run file keeps a rule's details; --json dropped them."""
    extra = {"layer": "blocks.0.qkv", "steps_to_limit": 3.5, "history": [1.0, float("inf")]}
    run = write_run(tmp_path / "x.h5", findings=(
        Finding(5, "taylor_forecast", "warning", "sentinels/r_secant", 0.9, 1.0, "r rises",
                extra=extra),))
    result = runner.invoke(cli, ["check", str(run), "--json", "--stored"])
    assert json.loads(result.stdout)["findings"][0]["extra"] == {
        "layer": "blocks.0.qkv", "steps_to_limit": 3.5, "history": [1.0, "inf"]}


def test_check_recomputes_the_alarm_rules_and_deduplicates(runner, tmp_path):
    # a NaN loss at step 50 trips the nonfinite rule of landscape.alarms
    run = write_run(tmp_path / "nan.h5", nan_loss_at=50)
    stored = runner.invoke(cli, ["check", str(run), "--stored", "--json"])
    assert json.loads(stored.stdout)["findings"] == []
    recomputed = json.loads(runner.invoke(cli, ["check", str(run), "--json"]).stdout)
    rules = [(f["step"], f["rule"], f["severity"]) for f in recomputed["findings"]]
    assert (50, "nonfinite", "error") in rules
    # the same finding stored online is listed once, with the stored message
    online = Finding(50, "nonfinite", "error", "loss/value", float("nan"), 1.0, "seen online")
    both = write_run(tmp_path / "both.h5", nan_loss_at=50, findings=(online,))
    data = json.loads(runner.invoke(cli, ["check", str(both), "--json"]).stdout)
    at_50 = [f for f in data["findings"] if (f["step"], f["rule"]) == (50, "nonfinite")]
    assert len(at_50) == 1 and at_50[0]["message"] == "seen online"


def test_check_bad_inputs_and_empty_run(runner, empty_run, tmp_path):
    for path, fragment in bad_inputs(tmp_path):
        one_line_error(runner.invoke(cli, ["check", path]), fragment)
    # a run that recorded nothing passed the gate ("0 findings; ok", exit 0)
    result = runner.invoke(cli, ["check", str(empty_run)])
    # the writer's state, where the file has it, instead of a guess (review)
    one_line_error(result, "no rows recorded, nothing to check (the run is closed by its "
                   "writer)")
    assert result.exit_code == 2
    bad_choice = runner.invoke(cli, ["check", str(empty_run), "--fail-on", "fatal"])
    assert bad_choice.exit_code == 2 and "Traceback" not in bad_choice.output


def test_check_input_errors_exit_2_and_findings_exit_1(runner, run_file, tmp_path):
    # `check run.h5 --fail-on error || ...` must tell a typo from an unstable run
    for path, fragment in bad_inputs(tmp_path):
        result = runner.invoke(cli, ["check", path, "--fail-on", "error"])
        one_line_error(result, fragment)
        assert result.exit_code == 2, (path, result.output)
        as_json = runner.invoke(cli, ["check", path, "--json"])
        assert as_json.exit_code == 2 and as_json.stdout == ""
    assert runner.invoke(cli, ["check", str(run_file), "--stored", "--fail-on", "error"]
                         ).exit_code == 1
    usage = runner.invoke(cli, ["check", str(run_file), "--fail-on", "fatal"])
    assert usage.exit_code == 2
    damaged = runner.invoke(cli, ["check", str(damaged_run(run_file, tmp_path))])
    one_line_error(damaged, "damaged run file: no 'findings' table")
    assert damaged.exit_code == 2
    # a config attribute that is no JSON: info and report refused it, the gate passed it
    bad_config = shutil.copy(run_file, tmp_path / "bad-config.h5")
    with h5py.File(bad_config, "a") as f:
        f.attrs["config"] = "{not json"
    result = runner.invoke(cli, ["check", str(bad_config)])
    one_line_error(result, "its config attribute is not JSON")
    assert result.exit_code == 2
    text = runner.invoke(cli, ["check", "-h"]).output
    assert "Exit status:" in text and "1  a finding reaches --fail-on" in text
    assert "2  RUN cannot be checked" in text


_RULES_FILE = '''
from dataclasses import dataclass

from landscape.alarms import LossSpike, Rule, Trigger


@dataclass
class LossAbove(Rule):
    limit: float = 0.5
    metrics: tuple = ("loss",)
    name: str = "loss_above"

    def evaluate(self, metric, row):
        v = row.get("value")
        if v is None or not v > self.limit:
            return None
        return Trigger("warning", "value", v, self.limit, "loss above the limit", "look")


RULES = [LossAbove(), LossSpike(z=1e9)]  # the second replaces the built-in loss_spike
NOT_RULES = 42


@dataclass
class Broken(Rule):
    metrics: tuple = ("loss",)
    name: str = "broken"

    def evaluate(self, metric, row):
        return 1 / 0
'''


def test_check_rules_with_other_settings_replace_what_the_monitor_stored(runner, tmp_path):
    """--rules with a built-in rule of other settings gates on it: the monitor's stored info
    at the edge of stability no longer hides the warning that threshold=1.0 asks for."""
    rules = tmp_path / "eos_rules.py"
    rules.write_text("from landscape.alarms import EdgeOfStability\n"
                     "RULES = [EdgeOfStability(threshold=1.0)]\n")
    path = tmp_path / "eos.h5"
    with RunWriter(path, mode="w") as w:
        w.declare("sharpness", {"lambda_max": None, "threshold": None, "ratio": None})
        for step, ratio in enumerate([0.5, 1.1, 0.5, 0.5, 0.5]):
            w.append("sharpness", 10 * step, {"lambda_max": 40 * ratio, "threshold": 40.0,
                                              "ratio": ratio})
        for f in ls.check(w):  # what the monitor stored online: the default rule's info
            w.add_finding(f)
    plain = runner.invoke(cli, ["check", str(path), "--json"])
    assert plain.exit_code == 0, plain.output
    assert [(f["step"], f["severity"]) for f in json.loads(plain.stdout)["findings"]] == [
        (10, "info")]
    gated = runner.invoke(cli, ["check", str(path), "--json", "--rules", f"{rules}:RULES"])
    assert gated.exit_code == 1, gated.output
    assert [(f["step"], f["severity"]) for f in json.loads(gated.stdout)["findings"]] == [
        (10, "warning")]


def test_check_report_and_plot_evaluate_the_users_rules(runner, tmp_path):
    """A run recorded without a rule can be gated on it: --rules file.py:NAME (the command
    line never imported user code, so a custom rule could not gate a job)."""
    rules = tmp_path / "my_rules.py"
    rules.write_text(_RULES_FILE)
    run = write_run(tmp_path / "r.h5", nan_loss_at=70)  # loss exp(-s/40) > 0.5 until 27
    plain = json.loads(runner.invoke(cli, ["check", str(run), "--json"]).stdout)
    assert not [f for f in plain["findings"] if f["rule"] == "loss_above"]
    result = runner.invoke(cli, ["check", str(run), "--json", "--rules", f"{rules}:RULES"])
    assert result.exit_code == 1, result.output
    found = json.loads(result.stdout)["findings"]
    assert [f["step"] for f in found if f["rule"] == "loss_above"] == [0]  # one episode
    assert any(f["rule"] == "nonfinite" for f in found)  # the built-in rules still run
    # the same rules through report and plot
    out = runner.invoke(cli, ["report", str(run), "-o", str(tmp_path / "r.html"),
                              "--rules", f"{rules}:RULES"])
    assert out.exit_code == 0, out.output
    assert "loss_above" in (tmp_path / "r.html").read_text()
    out = runner.invoke(cli, ["plot", str(run), "-m", "loss", "-o", str(tmp_path / "l.png"),
                              "--rules", f"{rules}:LossAbove"])  # a class: its defaults
    assert out.exit_code == 0, out.output
    # one line and exit 2 for a spec that names no rules, or a rule that raises (a gate
    # must not read a crash as a finding: the traceback exited 1)
    for spec, message in [(f"{rules}:NOT_RULES", "expected a Rule"),
                          (f"{rules}:MISSING", "has no attribute"),
                          (str(tmp_path / "nowhere.py:RULES"), "not found"),
                          (f"{rules}:Broken", "'broken' raised ZeroDivisionError on metric")]:
        bad = runner.invoke(cli, ["check", str(run), "--rules", spec])
        assert bad.exit_code == 2, bad.output
        assert message in bad.output and "Traceback" not in bad.output
    # with --stored no rule is evaluated: the gate passed (exit 0) on findings it never saw
    for args in (["check"], ["report", "-o", str(tmp_path / "s.html")],
                 ["plot", "-m", "loss", "-o", str(tmp_path / "s.png")]):
        stored = runner.invoke(cli, [*args, str(run), "--stored", "--rules", f"{rules}:RULES"])
        assert stored.exit_code == 2, stored.output
        assert "--rules needs --recompute" in stored.output
    with ls.Run.open(run) as opened, pytest.raises(ValueError, match="recompute=True"):
        ls.alarms.collect_findings(opened, recompute=False, rules=[])


def test_one_rules_module_given_twice_is_a_usage_error(runner, run_file, tmp_path):
    """report gave a traceback, check called the run file unreadable."""
    rules = tmp_path / "twice.py"
    rules.write_text("from landscape.alarms import LossSpike\n"
                     "RULES = [LossSpike(name='loss_high')]\n")
    for args in (["check", str(run_file)], ["report", str(run_file), "-o",
                                             str(tmp_path / "r.html")]):
        result = runner.invoke(cli, [*args, "--rules", f"{rules}:RULES", "--rules",
                                     f"{rules}:RULES"])
        assert result.exit_code == 2, result.output
        assert "--rules" in result.stderr and "two rules are named 'loss_high'" in result.stderr
        assert "Traceback" not in result.output and "cannot be read" not in result.output


def test_a_rules_list_of_classes_names_the_item_and_a_generator_gives_its_rules(
        runner, run_file, tmp_path):
    """A list of rule classes said "got list"; a function that yields its rules was
    refused ("got generator") where the docs take a function returning them."""
    rules = tmp_path / "more_rules.py"
    rules.write_text("from landscape.alarms import LossSpike\n"
                     "CLASSES = [LossSpike]\n"
                     "def several():\n"
                     "    yield LossSpike(name='loss_high')\n"
                     "def buggy():\n"
                     "    yield 1 / 0\n")
    result = runner.invoke(cli, ["check", str(run_file), "--rules", f"{rules}:CLASSES"])
    one_line_error(result, "item 0 of the list is", "a class: list LossSpike() instead")
    from landscape.loading import load_rules

    assert [rule.name for rule in load_rules(f"{rules}:several")] == ["loss_high"]
    result = runner.invoke(cli, ["check", str(run_file), "--rules", f"{rules}:several"])
    assert result.exit_code in (0, 1) and not result.stderr, result.output
    result = runner.invoke(cli, ["check", str(run_file), "--rules", f"{rules}:buggy"])
    one_line_error(result, "more_rules.py:buggy", "raised ZeroDivisionError")  # (own-diff review)
    assert result.exit_code == 2


def test_check_does_not_pass_a_run_whose_only_surface_has_no_point(runner, tmp_path):
    """A surface job killed before its first point: check said 'ok' (exit 0)."""
    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.create_surface("random", np.linspace(-1, 1, 5), np.linspace(-1, 1, 5))
    result = runner.invoke(cli, ["check", str(path)])
    assert result.exit_code == 2 and "no rows recorded" in result.stderr
    with RunWriter(path) as w:
        w.write_surface("random", (0, 0), {"loss": 1.0})
    assert runner.invoke(cli, ["check", str(path)]).exit_code == 0


def test_check_whose_output_cannot_be_written_exits_2_not_1(run_file, tmp_path):
    """`check run.h5 > /dev/full` and `check run.h5 | true` exited 1, which for check means
    a finding reached --fail-on: a gate read an output error as an unstable run."""
    import os

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "landscape_cli.main", "check", str(run_file),
               "--fail-on", "error", "--json"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    child.stdout.close()  # the reader is gone before the first line
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 2 and "Traceback" not in stderr, stderr
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, env=env,
                                  timeout=300)
        assert done.returncode == 2
        assert done.stderr.decode().strip() == "Error: No space left on device"


def test_re_evaluating_the_rules_over_a_long_run_is_announced(runner, run_file, tmp_path,
                                                               monkeypatch):
    """check on a 1M-step run sat silent for 41 s; --stored answers at once."""
    import landscape_cli.options as options

    monkeypatch.setattr(options, "LONG_RUN_ROWS", 10)
    long = runner.invoke(cli, ["check", str(run_file)])
    assert "re-evaluating the alarm rules over" in long.stderr and "--stored" in long.stderr
    for args in (["--stored"], ["-q"], ["--json"]):
        quiet = runner.invoke(cli, ["check", str(run_file), *args])
        assert "re-evaluating" not in quiet.stderr, args
    report = runner.invoke(cli, ["report", str(run_file), "-o", str(tmp_path / "r.html")])
    assert "re-evaluating the alarm rules" in report.stderr



_KILLED_WRITER = '''
import sys, time
from landscape.store import RunWriter
w = RunWriter(sys.argv[1], mode="w")
w.declare("loss", {"value": None})
for s in range(5):
    w.append("loss", s, {"value": 1.0})
w.flush()
print("flushed", flush=True)
time.sleep(60)
'''


def test_check_tells_a_finished_run_from_a_live_or_killed_one(runner, tmp_path):
    """The rows of a run whose writer was killed half-way, or still writes, look like a
    finished run's: check said "ok" (exit 0) with nothing to tell a gate otherwise."""
    finished = write_run(tmp_path / "done.h5")
    result = runner.invoke(cli, ["check", str(finished), "--require-finished", "--json"])
    assert result.exit_code == 0 and result.stderr == "", result.output
    data = json.loads(result.stdout)
    assert data["writer"]["state"] == "closed" and data["last_step"] == 99
    assert data["recomputed"] is True and data["failed"] is False
    assert data["failed_because"] == []

    killed = tmp_path / "killed.h5"
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "flushed\n"
        live = runner.invoke(cli, ["check", str(killed), "--require-finished", "-q"])
        assert live.exit_code == 1, live.output
        assert f"is being written (pid {proc.pid} on " in live.stderr
        assert "checked up to step 4" in live.stderr
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    plain = runner.invoke(cli, ["check", str(killed)])  # no flag: the rows' verdict, said
    assert plain.exit_code == 0, plain.output
    assert "ended without closing it (killed or crashed)" in plain.stderr
    gated = runner.invoke(cli, ["check", str(killed), "--require-finished", "--json"])
    assert gated.exit_code == 1, gated.output
    data = json.loads(gated.stdout)
    assert data["failed"] is True and data["counts"]["warning"] == 0
    assert data["failed_because"] == [  # a gate's log says why without re-deriving it
        "not finished (--require-finished): the run is not closed: its writer (pid "
        f"{proc.pid} on {socket.gethostname()}) ended without closing it (killed or crashed)"]
    assert data["writer"] == {"state": "ended", "pid": proc.pid, "host": socket.gethostname(),
                              "reason": None}
    info = runner.invoke(cli, ["info", str(killed)])
    assert "state: not closed: its writer" in info.stdout
    assert "state: closed by its writer" in runner.invoke(cli, ["info", str(finished)]).stdout


def test_json_output_is_strict_json_and_what_a_rules_module_prints_is_not_in_it(runner,
                                                                             tmp_path):
    """info --json wrote a config's inf as Infinity (strict parsers refuse it); a rules
    module that prints put its text before check's document (jq failed, the gate read 2)."""
    path = tmp_path / "c.h5"
    with RunWriter(path, mode="w", config={"clip": float("inf"), "lr": float("nan")}) as w:
        w.declare("loss", {"value": None})
        w.append("loss", 0, {"value": 1.0})

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))

    info = strict(runner.invoke(cli, ["info", str(path), "--json"]).stdout)
    assert info["config"]["clip"] == "inf" and info["config"]["lr"] == "nan"
    rules = tmp_path / "noisy.py"
    rules.write_text(_RULES_FILE + "\nprint('loaded my rules')\n")
    result = runner.invoke(cli, ["check", str(path), "--json", "--rules", f"{rules}:RULES"])
    assert result.exit_code == 1, result.output  # loss_above: the loss 1.0 is above 0.5
    assert [f["rule"] for f in strict(result.stdout)["findings"]] == ["loss_above"]
    assert "loaded my rules" in result.stderr


def test_check_ignore_rule_leaves_a_rule_out_of_the_gate(runner, run_file, tmp_path):
    """No option left a rule out of a gate; a --rules list built to leave one out
    (default_rules(loss_spike=None)) was silently added to the built-in rules."""
    result = runner.invoke(cli, ["check", str(run_file), "--ignore-rule", "loss_spike",
                                 "--json"])
    assert result.exit_code == 1, result.output  # the stored error still fails it
    assert [f["rule"] for f in json.loads(result.stdout)["findings"]] == ["edge_of_stability"]
    both = ["--ignore-rule", "loss_spike", "--ignore-rule", "edge_of_stability"]
    assert runner.invoke(cli, ["check", str(run_file), *both]).exit_code == 0
    assert runner.invoke(cli, ["check", str(run_file), "--stored", *both]).exit_code == 0
    nan = write_run(tmp_path / "nan.h5", nan_loss_at=70)  # a recomputed finding
    assert runner.invoke(cli, ["check", str(nan)]).exit_code == 1
    result = runner.invoke(cli, ["check", str(nan), "--ignore-rule", "nonfinite"])
    assert result.exit_code == 0, result.output
    typo = runner.invoke(cli, ["check", str(run_file), "--ignore-rule", "lossspike"])
    assert typo.exit_code == 2 and "no rule named lossspike" in typo.output
    assert "loss_spike" in typo.output  # the names it knows
    with ls.Run.open(run_file) as run:
        kept = ls.alarms.collect_findings(run, ignore={"loss_spike"})
        assert {f.rule for f in kept} == {"edge_of_stability"}
        with pytest.raises(ValueError, match="no rule named nope"):
            ls.alarms.collect_findings(run, ignore={"nope"})
    rules = tmp_path / "without.py"
    rules.write_text("from landscape.alarms import default_rules\n"
                     "RULES = default_rules(loss_spike=None)\n")
    result = runner.invoke(cli, ["check", str(run_file), "--rules", f"{rules}:RULES"])
    assert "warning: --rules adds to the built-in rules: those your list leaves out " \
        "(loss_spike) still run" in result.stderr  # lower case, as every warning line
    assert "--ignore-rule" in result.stderr
    mine = tmp_path / "mine.py"  # a rule of one's own (and a replaced built-in): no warning
    mine.write_text(_RULES_FILE)
    result = runner.invoke(cli, ["check", str(run_file), "--rules", f"{mine}:RULES"])
    assert "warning" not in result.stderr.lower()


_STOPPED_TRAINING = '''
import os, signal, sys
import torch, torch.nn.functional as F
import landscape as ls
how, path = sys.argv[1], sys.argv[2]
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, warn=False) as mon:
    for step in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mon.step(step, batch=(x, y), loss=loss)
    if how == "raise":
        raise RuntimeError("the data loader broke")
    if how == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
'''


@pytest.mark.parametrize("how, code, reason", [
    ("finish", 0, None), ("raise", 1, "stopped on RuntimeError: the data loader broke"),
    ("sigterm", -15, "stopped by SIGTERM")])
def test_a_training_stopped_by_an_error_or_a_signal_is_not_finished(runner, tmp_path, how,
                                                                    code, reason):
    """The monitor closes its file on an exception and on SIGTERM: such a run read as
    closed, and check --require-finished passed it (own-diff review)."""
    path, script = tmp_path / "run.h5", tmp_path / "train.py"
    script.write_text(_STOPPED_TRAINING)
    done = subprocess.run([sys.executable, str(script), how, str(path)], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == code, done.stderr[-2000:]
    result = runner.invoke(cli, ["check", str(path), "--require-finished", "--json"])
    writer = json.loads(result.stdout)["writer"]
    assert writer["reason"] == reason
    if reason is None:
        assert result.exit_code == 0 and writer["state"] == "closed", result.output
    else:
        assert result.exit_code == 1 and writer["state"] == "stopped", result.output
        assert f"which stopped before the end ({reason})" in result.stderr
        info = runner.invoke(cli, ["info", str(path)])
        assert "state: closed by its writer, which stopped before the end" in info.stdout
    # the report says it too, on stderr and at the top of the page (a review found a
    # crashed run's report reading "No rule fired on this run." and nothing else)
    page = tmp_path / "report.html"
    reported = runner.invoke(cli, ["report", str(path), "-o", str(page)])
    assert reported.exit_code == 0, reported.output
    html = page.read_text()
    if reason is None:
        assert reported.stderr == "" and 'id="run-state"' not in html
    else:
        assert (f"note: {path} is closed by its writer, which stopped before the end "
                f"({reason}); reported up to step ") in reported.stderr
        assert 'id="run-state"' in html and f"which stopped before the end ({reason})" in html
    with RunWriter(path):  # a resume clears the reason: closed again when it finishes
        pass
    resumed = runner.invoke(cli, ["check", str(path), "--require-finished", "--json"])
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["writer"]["state"] == "closed"


def test_check_gates_a_sweep_of_runs_with_the_worst_status(runner, tmp_path):
    """``check sweep/*.h5``: click refused the extra arguments and a CI job had to loop
    (review). Each run gets its verdict line, then one line of totals; the exit status is
    the worst (2 for a run that cannot be read, which does not stop the others, then 1)."""
    ok = write_run(tmp_path / "ok.h5")
    nan = write_run(tmp_path / "nan.h5", nan_loss_at=50)
    missing = tmp_path / "missing.h5"
    result = runner.invoke(cli, ["check", str(ok), str(nan), "-q"])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{ok}: 0 findings") and lines[0].endswith("or worse)")
    assert lines[1].startswith(f"{nan}: 1 finding (1 error") and "FAIL" in lines[1]
    assert lines[2] == "2 runs: 1 ok, 1 FAIL"
    result = runner.invoke(cli, ["check", str(missing), str(ok), str(nan)])
    assert result.exit_code == 2, result.output
    assert f"Error: {missing}: no such file" in result.stderr
    assert result.stdout.splitlines()[-1] == "3 runs: 1 ok, 1 FAIL, 1 not checked"
    assert "nonfinite" in result.stdout  # the tables of the runs read
    twice = runner.invoke(cli, ["check", str(ok), str(ok.parent / "." / ok.name), "-q"])
    assert twice.exit_code == 0 and twice.stdout.splitlines()[-1] == "1 run: 1 ok, 0 FAIL"
    # --json: one list of documents, an unreadable run as its error
    result = runner.invoke(cli, ["check", str(ok), str(missing), str(nan), "--json"])
    assert result.exit_code == 2
    docs = json.loads(result.stdout)
    assert [d["run"] for d in docs] == [str(ok), str(missing), str(nan)]
    assert docs[0]["failed"] is False and docs[2]["failed_because"] == [
        "a finding at warning or worse"]
    assert docs[1] == {"run": str(missing), "error": f"{missing}: no such file"}
    assert f"Error: {missing}: no such file" in result.stderr  # named there too (review)
    # --ignore-rule may name a rule of any of the runs; a typo is one usage error
    mine = write_run(tmp_path / "mine.h5", findings=(
        Finding(40, "my_rule", "warning", "loss/value", 2.0, 1.0, "mine", "h"),))
    both = runner.invoke(cli, ["check", str(mine), str(ok), "--stored", "--ignore-rule",
                               "my_rule", "-q"])
    assert both.exit_code == 0, both.output
    typo = runner.invoke(cli, ["check", str(mine), str(ok), "--ignore-rule", "my_rul"])
    assert typo.exit_code == 2 and "no rule named my_rul" in typo.output
    assert "Missing argument" in runner.invoke(cli, ["check"]).output


def test_the_findings_table_wraps_its_messages_in_a_terminal_only():
    """Lines of 242 characters in an 80-column terminal (review); a pipe keeps one line per
    finding, whole, for grep. Where the other columns leave the message fewer than 30
    characters, it goes under its row."""
    from landscape_cli.commands.check import _table

    long = Finding(12, "loss_spike", "warning", "loss/value", 2.0, 1.0,
                   "loss spike: " + "a rise far above the window " * 6, "lower the lr " * 12)
    piped = _table([long])
    assert len(piped) == 4 and long.message.rstrip() in piped[2]
    for width in (80, 120):
        lines = _table([long], width)
        assert all(len(ln) <= width for ln in lines), lines
        text = " ".join(" ".join(lines[2:]).split())
        assert " ".join(long.message.split()) in text
        assert "hint: " + " ".join(long.hint.split()) in text
    beside = _table([long], 120)  # 62 characters left: the message column wraps
    assert beside[0].endswith("message") and "loss spike:" in beside[2]
    under = _table([long], 80)  # 22 left: the message goes under the row
    assert not under[0].endswith("message") and under[2].rstrip().endswith("1")
    assert under[3].startswith("      loss spike:")


def test_a_gate_does_not_pass_a_run_whose_metric_was_never_measured(runner, tmp_path):
    """A metric that failed on every row gave one info finding, so ``check`` passed a run
    whose rules had read nothing (the default monitor called without ``loss=``)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5"
    with pytest.warns(RuntimeWarning, match="needs step"), \
            ls.Monitor(model, F.cross_entropy, path, optimizer=opt) as mon:
        for step in range(12):
            x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            mon.step(step, batch=(x, y))  # no loss=: the loss metric fails at every step
    result = runner.invoke(cli, ["check", str(path), "--json"])
    assert result.exit_code == 1, result.output
    never = [f for f in json.loads(result.stdout)["findings"] if f["rule"] == "never_measured"]
    assert [(f["metric"], f["severity"], f["step"], f["value"]) for f in never] == [
        ("loss", "warning", 0, 12)]
    assert "the metric_failed finding at step 0 says why" in never[0]["message"]
    assert runner.invoke(cli, ["check", str(path), "--stored"]).exit_code == 1  # not a rule's
    assert runner.invoke(cli, ["check", str(path), "--ignore-rule",
                               "never_measured"]).exit_code == 0
    hidden = runner.invoke(cli, ["check", str(path), "--json", "--ignore-rule",
                                 "metric_failed"])  # the reason, quoted where it is not listed
    [never] = json.loads(hidden.stdout)["findings"]
    assert never["message"].endswith("the loss metric needs step(..., loss=loss)")


def test_never_measured_needs_every_row_of_the_metric_unmeasured():
    from landscape.alarms.online import never_measured

    failed = Finding(step=3, rule="metric_failed", severity="info", metric="m", value=np.nan,
                     threshold=np.nan, message="metric 'm' failed", hint="")
    rows = {"m": [3, 4, 5], "k": [3, 4, 5]}
    unmeasured = {("m", 3), ("m", 4), ("m", 5), ("k", 3)}  # k measured at 4 and 5
    found = never_measured(rows, unmeasured, [failed])
    assert [(f.metric, f.step, f.severity, f.value) for f in found] == [("m", 3, "warning", 3)]
    assert "its 3 rows (steps 3 to 5)" in found[0].message
    assert "finding at step 3" in found[0].message
    one = never_measured({"m": [7]}, {("m", 7)}, [])
    assert "its one row (step 7)" in one[0].message and "says why" not in one[0].message
    diverged = Finding(step=2, rule="nonfinite", severity="error", metric="loss",
                       value=np.nan, threshold=np.nan, message="NaN loss", hint="")
    assert never_measured(rows, unmeasured, [failed, diverged]) == []  # the error says why
    later = Finding(step=4, rule="nonfinite", severity="error", metric="loss",
                    value=np.nan, threshold=np.nan, message="NaN loss", hint="")
    assert len(never_measured(rows, unmeasured, [failed, later])) == 1
    assert never_measured(rows, set(), [failed]) == []
    # a GradScaler's skipped fp16 step is an info nonfinite finding: no divergence (review)
    skipped = Finding(step=0, rule="nonfinite", severity="info", metric="nonfinite/grad",
                      value=np.nan, threshold=np.nan, message="skipped step", hint="")
    assert [f.metric for f in never_measured(rows, unmeasured, [failed, skipped])] == ["m"]
    quoted = never_measured(rows, unmeasured, [failed], cite=False)[0].message
    assert quoted.endswith(": metric 'm' failed") and "finding at step" not in quoted


def test_a_metric_that_stopped_being_measured_is_no_longer_a_pass():
    """A metric measured at step 0 and failing on every later row gave one info finding:
    the gate passed a run whose rules went blind after its first step (review)."""
    from landscape.alarms.online import never_measured

    def failed(step):
        return Finding(step=step, rule="metric_failed", severity="info", metric="m",
                       value=np.nan, threshold=np.nan, message=f"failed at {step}", hint="")

    rows = {"m": list(range(10))}
    stopped = never_measured(rows, {("m", s) for s in range(1, 10)}, [failed(1)])
    assert [(f.step, f.severity, f.value) for f in stopped] == [(1, "warning", 9)]
    assert "its last 9 of 10 rows (steps 1 to 9)" in stopped[0].message
    assert "from step 1 on (the metric_failed finding at step 1 says why)" in \
        stopped[0].message
    # too few failed rows at the end, or a failure that stopped: a transient, as before
    assert never_measured(rows, {("m", 8), ("m", 9)}, []) == []
    assert never_measured({"m": list(range(40))}, {("m", s) for s in range(37, 40)}, []) == []
    assert never_measured(rows, {("m", s) for s in range(1, 9)}, []) == []
    assert len(never_measured({"m": list(range(30))}, {("m", s) for s in range(27, 30)},
                              [])) == 1
    # a divergence before the streak says why nothing was measured
    diverged = Finding(step=1, rule="nonfinite", severity="error", metric="loss",
                       value=np.nan, threshold=np.nan, message="NaN loss", hint="")
    assert never_measured(rows, {("m", s) for s in range(1, 10)}, [diverged]) == []


def test_both_forms_of_a_flag_pair_are_a_usage_error(runner, run_file, tmp_path):
    """click kept the last of --recompute --stored silently: a wrapper appending flags
    flipped a failing gate to a passing one (review)."""
    nan = write_run(tmp_path / "nan.h5", nan_loss_at=70)
    assert runner.invoke(cli, ["check", str(nan), "--recompute"]).exit_code == 1
    both = runner.invoke(cli, ["check", str(nan), "--recompute", "--stored"])
    assert both.exit_code == 2 and "--recompute and --stored do not go together" in both.output
    for command in (["plot", str(run_file), "-o", str(tmp_path / "p.png")],
                    ["report", str(run_file), "-o", str(tmp_path / "r.html")]):
        result = runner.invoke(cli, [*command, "--log", "--linear"])
        assert result.exit_code == 2 and "--log and --linear do not go together" in result.output
    # the value stays a bool for callers that do not parse a command line (review: a
    # multiple=True pair gave ctx.invoke an empty tuple, read as --stored)
    import click
    from landscape_cli.commands.check import check as check_command

    with click.Context(cli) as ctx, pytest.raises(click.exceptions.Exit) as ended:
        ctx.invoke(check_command, run_paths=(str(nan),))
    assert ended.value.exit_code == 1
    for recompute, code in ((True, 1), (False, 0)):
        mapped = runner.invoke(cli, ["check", str(nan)],
                               default_map={"check": {"recompute": recompute}})
        assert mapped.exit_code == code, mapped.output


def test_stored_refuses_a_run_whose_monitor_ran_without_alarms(runner, tmp_path):
    """check --stored passed (exit 0) a run whose loss went NaN when the monitor had
    alarms=False: the file stored no rule's finding, and said nothing of why (review)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.h5"
    with ls.Monitor(model, F.cross_entropy, path, optimizer=opt, metrics=["loss"],
                    alarms=False) as mon:
        for step in range(3):
            mon.step(step, loss=torch.tensor(float("nan") if step == 2 else 1.0))
    assert runner.invoke(cli, ["check", str(path)]).exit_code == 1  # the rules, on the rows
    stored = runner.invoke(cli, ["check", str(path), "--stored"])
    assert stored.exit_code == 2, stored.output
    assert "started with alarms=False" in stored.output and "drop --stored" in stored.output
    with ls.Run.open(path) as run:
        assert run.config["alarms"] == "off"
    other = write_run(tmp_path / "plain.h5")  # no monitor wrote it: --stored as before
    assert runner.invoke(cli, ["check", str(other), "--stored"]).exit_code == 0
