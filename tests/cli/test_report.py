"""``landscape report`` through click's CliRunner."""

from __future__ import annotations

import pytest
from landscape_cli.main import cli

import landscape as ls
from tests.cli._results import one_line_error
from tests.cli._runs import bad_inputs, tiny_surface


def test_report_writes_one_self_contained_file(runner, run_file, tmp_path):
    out = tmp_path / "r.html"
    result = runner.invoke(cli, ["report", str(run_file), "-o", str(out), "--title", "My <run>"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 timelines, 0 surfaces" in result.output
    text = out.read_text()
    assert "<title>My &lt;run&gt;</title>" in text
    assert text.count("<img ") == 3 and text.count('src="data:image/png;base64,') == 3
    assert "http://" not in text and "https://" not in text
    assert "loss jumped" in text and "past 2/eta" in text and "lower lr" in text
    assert "&lt;b&gt;&amp;" in text  # the config is escaped
    quiet = runner.invoke(cli, ["report", str(run_file), "-o", str(out), "-q"])
    assert quiet.exit_code == 0 and quiet.output == ""


def test_report_bad_inputs(runner, run_file, empty_run, tmp_path):
    for path, fragment in bad_inputs(tmp_path):
        one_line_error(runner.invoke(cli, ["report", path, "-o", str(tmp_path / "r.html")]),
                        fragment)
    one_line_error(
        runner.invoke(cli, ["report", str(run_file), "-o", str(tmp_path / "no" / "r.html")]),
        "does not exist",
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    one_line_error(
        runner.invoke(cli, ["report", str(run_file), "-o", f"{a_file}/"]),
        "exists and is not a directory",
    )
    # an empty run still gives a (short) report
    out = tmp_path / "empty.html"
    result = runner.invoke(cli, ["report", str(empty_run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "The run holds no metrics." in out.read_text() and "No findings." in out.read_text()
    # said on stderr too, where check exits 2 on such a run (review)
    assert f"note: {empty_run} holds no rows, surfaces or findings yet" in result.stderr


@pytest.mark.parametrize("existing", [False, True])
def test_report_into_a_directory_writes_report_html(runner, run_file, tmp_path, existing):
    folder = tmp_path / "new" / "reports"
    if existing:
        folder.mkdir(parents=True)
        target = str(folder)  # an existing directory, no trailing slash
    else:
        target = f"{folder}/"  # a trailing slash: a directory, created like plot's
    result = runner.invoke(cli, ["report", str(run_file), "-o", target])
    assert result.exit_code == 0, result.output
    assert folder.is_dir() and (folder / "report.html").read_text().startswith("<!DOCTYPE")
    assert f"wrote {folder / 'report.html'}:" in result.output


def test_report_into_a_directory_of_a_missing_run_creates_nothing(runner, tmp_path):
    one_line_error(
        runner.invoke(cli, ["report", str(tmp_path / "missing.h5"), "-o", f"{tmp_path}/d/"]),
        "no such file",
    )
    assert not (tmp_path / "d").exists()


def test_report_and_plot_never_write_over_a_run_file(runner, run_file, tmp_path):
    """`report run.h5 -o run.h5` replaced the run with HTML (exit 0): the data were lost."""
    import shutil

    copy = tmp_path / "copy.h5"
    shutil.copy(run_file, copy)
    before = run_file.read_bytes()
    for args in (["report", str(run_file), "-o", str(run_file)],
                 ["report", str(run_file), "-o", str(copy)],
                 ["plot", str(run_file), "-m", "loss", "-o", str(copy)],
                 ["plot", str(run_file), "-m", "loss", "-o", str(tmp_path / "x.png")]):
        if args[-1].endswith(".png"):  # a run file renamed to what a figure would be
            shutil.copy(run_file, args[-1])
        result = runner.invoke(cli, args)
        one_line_error(result, "is an HDF5 file (a run file?); not overwritten")
    assert run_file.read_bytes() == before and copy.read_bytes() == before
    from landscape.plotting import surfaces

    with pytest.raises(ls.LandscapeError, match="not overwritten by the VTK file"):
        surfaces.export_vtk(tiny_surface(), copy)


def test_the_report_never_writes_over_a_file_that_is_not_html(runner, run_file, tmp_path):
    """`report run.h5 -o ckpt-100.pt` (or -o mypkg.py) replaced the file with HTML."""
    code = tmp_path / "mypkg.py"
    code.write_text("def net():\n    ...\n")
    result = runner.invoke(cli, ["report", str(run_file), "-o", str(code)])
    one_line_error(result, "exists and is not an HTML page", "-o")
    assert code.read_text() == "def net():\n    ...\n"
    earlier = tmp_path / "report.html"
    for _ in range(2):  # an earlier report is replaced, as asked
        again = runner.invoke(cli, ["report", str(run_file), "-o", str(earlier)])
        assert again.exit_code == 0, again.output



def test_a_report_named_as_another_format_is_refused_before_any_work(runner, run_file,
                                                                     tmp_path):
    """-o report.pdf wrote an HTML page named .pdf."""
    result = runner.invoke(cli, ["report", str(run_file), "-o", str(tmp_path / "r.pdf")])
    one_line_error(result, "the report is an HTML page", "name it r.html")
    assert not (tmp_path / "r.pdf").exists()


def test_report_ignore_rule_leaves_its_findings_out_and_says_so(runner, run_file, tmp_path):
    out = tmp_path / "r.html"
    result = runner.invoke(cli, ["report", str(run_file), "-o", str(out),
                                 "--ignore-rule", "loss_spike"])
    assert result.exit_code == 0, result.output
    assert "1 finding (1 error)" in result.output
    text = out.read_text()
    assert "loss jumped" not in text and "past 2/eta" in text
    assert '<p id="ignored-rules">Left out (ignored): the findings of loss_spike.' in text
    typo = runner.invoke(cli, ["report", str(run_file), "-o", str(out), "--ignore-rule", "nope"])
    assert typo.exit_code == 2 and "no rule named nope" in typo.output
    # the library call behind it: render_report leaves them out by itself too
    with ls.Run.open(run_file) as run:
        page = ls.report.render_report(run, ignored_rules=["loss_spike"])
    assert "loss jumped" not in page and 'id="ignored-rules"' in page


def test_a_report_of_several_runs_names_the_command_that_compares_them(runner, run_file,
                                                                        tmp_path):
    """`report RUN1 RUN2` said click's "Got unexpected extra argument" (review)."""
    result = runner.invoke(cli, ["report", str(run_file), str(run_file), "-o",
                                 str(tmp_path / "r.html")])
    assert result.exit_code == 2
    assert "a report is of one RUN, got 2: name its file with -o FILE.html; to compare " \
        "runs, plot them together: landscape plot RUN1 RUN2" in result.output
    assert not (tmp_path / "r.html").exists()
