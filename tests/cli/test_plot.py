"""``landscape plot`` through click's CliRunner: timelines, surfaces, formats."""

from __future__ import annotations

import types

import numpy as np
import pytest
from landscape_cli.main import cli
from matplotlib.figure import Figure

import landscape as ls
from landscape.store import RunWriter
from tests.cli._results import one_line_error, usage_error
from tests.cli._runs import PNG, add_line_and_plane, bad_inputs, write_run


def test_plot_every_metric_into_a_directory(runner, run_file, tmp_path):
    out = tmp_path / "plots"
    result = runner.invoke(cli, ["plot", str(run_file), "-o", str(out), "--log"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["hessian.png", "loss.png", "spectral_alignment.png"]
    for p in out.iterdir():
        assert p.read_bytes().startswith(PNG)
        assert f"wrote {p}" in result.output


def test_plot_one_metric_to_a_file_and_formats(runner, run_file, tmp_path):
    svg = tmp_path / "loss.svg"
    result = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "-o", str(svg), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert svg.read_text().lstrip().startswith("<?xml")
    two = tmp_path / "two"
    result = runner.invoke(
        cli, ["plot", str(run_file), "-m", "loss", "-m", "hessian", "-o", str(two), "--format=pdf"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in two.iterdir()) == ["hessian.pdf", "loss.pdf"]
    assert (two / "loss.pdf").read_bytes().startswith(b"%PDF")


def test_plot_bad_inputs(runner, run_file, empty_run, tmp_path):
    for path, fragment in bad_inputs(tmp_path):
        one_line_error(runner.invoke(cli, ["plot", path, "-o", str(tmp_path / "x.png")]), fragment)
    plot = ["plot", str(run_file)]
    one_line_error(
        runner.invoke(cli, [*plot, "-m", "nope", "-o", str(tmp_path / "x.png")]),
        "no metric 'nope'", "metrics: hessian, loss, spectral_alignment",
    )
    # the run file itself as -o: refused also when several figures would take its name
    one_line_error(runner.invoke(cli, [*plot, "-o", str(run_file)]),
                   "is an HDF5 file (a run file?); not overwritten by a figure")
    # several metrics and a file name: one image per metric next to it (no longer an error)
    several = runner.invoke(
        cli, [*plot, "-m", "loss", "-m", "hessian", "-o", str(tmp_path / "a.png"), "-q"]
    )
    assert several.exit_code == 0, several.output
    assert (tmp_path / "a-loss.png").is_file() and (tmp_path / "a-hessian.png").is_file()
    # a suffix of no image format: a usage error (exit 2), as --format gif is
    usage_error(runner.invoke(cli, [*plot, "-m", "loss", "-o", str(tmp_path / "a.bmpx")]),
                "cannot tell the image format of .bmpx")
    one_line_error(
        runner.invoke(cli, [*plot, "-m", "loss", "-o", str(tmp_path / "no" / "a.png")]),
        "does not exist",
    )
    usage_error(runner.invoke(cli, [*plot, "--3d", "-o", "x.png"]), "--surface")
    usage_error(runner.invoke(cli, [*plot, "-m", "loss", "--surface", "plane", "-o", "x.png"]),
                 "use either --metric or --surface, not both")
    one_line_error(
        runner.invoke(cli, ["plot", str(empty_run), "-o", str(tmp_path / "e.png")]),
        "no metrics to plot",
    )
    one_line_error(
        runner.invoke(cli, [*plot, "--surface", "nope", "-o", str(tmp_path / "s.png")]),
        "no surface 'nope'",
    )
    usage = runner.invoke(cli, ["plot", str(run_file)])  # click's usage error: exit 2
    assert usage.exit_code == 2 and "Error: Missing option '-o'" in usage.stderr
    assert "Traceback" not in usage.output


def test_plot_field_without_surface_is_refused(runner, run_file, tmp_path):
    out = tmp_path / "x.png"
    usage_error(
        runner.invoke(cli, ["plot", str(run_file), "--field", "accuracy", "-o", str(out)]),
        "--field applies to surfaces only", "--surface",
    )
    assert not out.exists() and not list(tmp_path.glob("x-*.png"))


def _with_an_empty_metric(path):
    write_run(path)
    with RunWriter(path) as w:
        w.declare("adaptive", {"scale": None})  # a monitor declares it up front, 0 rows
    return path


def test_plot_and_report_leave_out_metrics_without_rows(runner, tmp_path):
    run = _with_an_empty_metric(tmp_path / "a.h5")
    result = runner.invoke(cli, ["plot", str(run), "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("p-*.png")) == [
        "p-hessian.png", "p-loss.png", "p-spectral_alignment.png"
    ]
    asked = runner.invoke(cli, ["plot", str(run), "-m", "adaptive", "-o", str(tmp_path / "e.png")])
    assert asked.exit_code == 0 and (tmp_path / "e.png").is_file()  # named: drawn anyway
    out = tmp_path / "r.html"
    result = runner.invoke(cli, ["report", str(run), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 3 timelines, 0 surfaces" in result.output
    assert out.read_text().count("<img ") == 3 and "No rows yet: adaptive." in out.read_text()
    only = tmp_path / "only.h5"
    with RunWriter(only, mode="w") as w:
        w.declare("adaptive", {"scale": None})
    one_line_error(runner.invoke(cli, ["plot", str(only), "-o", str(tmp_path / "o.png")]),
                    "no metrics to plot (no rows yet: adaptive)")


def _fake_surfaces(monkeypatch):
    """A stand-in for landscape.plotting.surfaces that records what it was asked to draw."""
    calls = []

    def make(kind):
        def draw(surface, field="loss", **kwargs):
            calls.append((kind, surface.name, surface.ndim))
            fig = Figure(figsize=(2, 2))
            fig.add_subplot().plot(surface.x, np.nan_to_num(next(iter(surface.values.values()))
                                                            .reshape(-1)[: len(surface.x)]))
            return fig

        return draw

    module = types.ModuleType("landscape.plotting.surfaces")
    module.curve, module.contour, module.surface3d = make("curve"), make("contour"), make("3d")
    monkeypatch.setattr("landscape.report._surface_plots", module)
    return calls


def test_plot_surface_uses_the_surface_plots(runner, tmp_path, monkeypatch):
    calls = _fake_surfaces(monkeypatch)
    run = write_run(tmp_path / "s.h5", surface=True)
    plot = ["plot", str(run), "--surface"]
    assert runner.invoke(cli, [*plot, "line", "-o", str(tmp_path / "l.png")]).exit_code == 0
    assert runner.invoke(cli, [*plot, "plane", "-o", str(tmp_path / "p.png")]).exit_code == 0
    assert runner.invoke(cli, [*plot, "plane", "--3d", "-o", str(tmp_path / "q.png")]
                         ).exit_code == 0
    assert calls == [("curve", "line", 1), ("contour", "plane", 2), ("3d", "plane", 2)]
    for name in ("l.png", "p.png", "q.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    one_line_error(  # named by its option, not the library's argument (three_d:)
        runner.invoke(cli, [*plot, "line", "--3d", "-o", str(tmp_path / "x.png")]),
        "--3d: surface 'line' is 1-D"
    )


def test_plot_surface_with_the_real_surface_plots(runner, tmp_path):
    path = tmp_path / "surf.h5"
    with RunWriter(path, mode="w") as w:
        add_line_and_plane(w)
    plot = ["plot", str(path), "--surface"]
    for args, name in (
        (["line"], "l.png"),
        (["line", "--field", "accuracy"], "a.png"),
        (["plane", "--log"], "p.png"),
        (["plane", "--3d"], "q.png"),
    ):
        result = runner.invoke(cli, [*plot, *args, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).read_bytes().startswith(PNG)
    one_line_error(
        runner.invoke(cli, [*plot, "plane", "--field", "acc", "-o", str(tmp_path / "x.png")]),
        "has no field 'acc'",
    )


def test_plot_a_whole_run_into_a_directory_includes_the_surfaces(runner, tmp_path, monkeypatch):
    calls = _fake_surfaces(monkeypatch)
    run = write_run(tmp_path / "s.h5", surface=True)
    result = runner.invoke(cli, ["plot", str(run), "-o", str(tmp_path / "all"), "-q"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "hessian.png", "loss.png", "spectral_alignment.png", "surface-line.png",
        "surface-plane.png",
    ]
    assert calls == [("curve", "line", 1), ("contour", "plane", 2)]
    # surfaces only: a file target gets the hint, a directory gets the surfaces
    only = tmp_path / "only.h5"
    with RunWriter(only, mode="w") as w:
        w.create_surface("line", np.linspace(-1, 1, 3))
    one_line_error(runner.invoke(cli, ["plot", str(only), "-o", str(tmp_path / "o.png")]),
                    "no metrics to plot (its surfaces go into a directory")
    result = runner.invoke(cli, ["plot", str(only), "-o", str(tmp_path / "odir")])
    assert result.exit_code == 0 and (tmp_path / "odir" / "surface-line.png").exists()
    # --surface into a directory: the same name (it wrote line.svg; report review)
    result = runner.invoke(cli, ["plot", str(only), "--surface", "line", "--format", "svg",
                                 "-o", str(tmp_path / "sdir")])
    assert result.exit_code == 0 and (tmp_path / "sdir" / "surface-line.svg").exists()


def test_plot_writes_a_surface_as_vtk(runner, tmp_path):
    """The command line had no VTK export (loss-landscape's h52vtp)."""
    run = write_run(tmp_path / "r.h5", surface=True)
    with ls.Run.open(run) as opened:
        name = opened.surfaces()[0]
    out = tmp_path / "s.vtk"
    result = runner.invoke(cli, ["plot", str(run), "--surface", name, "-o", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert text.startswith("# vtk DataFile") and "SCALARS computed int 1" in text
    usage_error(runner.invoke(cli, ["plot", str(run), "-o", str(tmp_path / "t.vtk")]),
                 "a .vtk file holds a surface: add --surface NAME")


def test_a_vtk_file_takes_vmax_and_refuses_the_image_options(runner, tmp_path):
    """--vmax, --3d, --levels and --dpi were ignored without a word for a .vtk file: the
    heights reached 69 under --vmax 3 (surfaces audit)."""
    path = tmp_path / "r.h5"
    x = np.linspace(-1, 1, 5)
    with RunWriter(path) as w:
        w.create_surface("plane", x, x)
        for j in range(5):
            for i in range(5):
                w.write_surface("plane", (j, i), {"loss": 0.1 + x[i] ** 2 + x[j] ** 2})
    out = tmp_path / "s.vtk"

    def heights():
        lines = out.read_text().splitlines()
        start = next(k for k, ln in enumerate(lines) if ln.startswith("POINTS")) + 1
        return [float(ln.split()[2]) for ln in lines[start:start + 25]]

    base = ["plot", str(path), "--surface", "plane", "-o", str(out), "-q"]
    assert runner.invoke(cli, base).exit_code == 0
    assert max(heights()) == pytest.approx(2.1)
    assert runner.invoke(cli, [*base, "--vmax", "1"]).exit_code == 0
    assert max(heights()) == pytest.approx(1.0)
    for option in (["--3d"], ["--levels", "4"], ["--dpi", "300"]):
        usage_error(runner.invoke(cli, [*base, *option]), option[0], "does not apply to a .vtk")


def test_plot_clips_and_levels_a_surface_on_the_command_line(runner, tmp_path):
    """The Python functions took vmax and levels; the command line had neither."""
    import torch.nn.functional as F

    from landscape.report import surface_figure
    from landscape.surface import plane
    from tests import models

    path = tmp_path / "p.h5"
    x, y = models.classification_data()
    surf = plane(models.mlp(), F.cross_entropy, (x, y), steps=5, span=3.0, writer=path,
                 progress=False)
    result = runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax", "2.0",
                                 "--levels", "7", "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    fig = surface_figure(surf, vmax=2.0, levels=7)
    (contours,) = [c for c in fig.axes[0].get_children() if hasattr(c, "levels")]
    levels = np.asarray(contours.levels)
    assert len(levels) <= 9 and levels.max() <= 2.0 + 1e-9 < surf.values["loss"].max()
    usage_error(runner.invoke(cli, ["plot", str(path), "--vmax", "1", "-o",
                                     str(tmp_path / "t.png")]), "--vmax applies to surfaces")
    for word in ("auto", "none", "NONE"):
        result = runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax", word,
                                     "-o", str(tmp_path / f"{word}.png")])
        assert result.exit_code == 0, result.output
    low = float(np.nanmin(surf.values["loss"]))  # a clip below every value: a blank image
    one_line_error(runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax",
                                        f"{low - 0.01}", "-o", str(tmp_path / "b.png")]),
                    "is at or below the smallest loss")
    result = runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--vmax", "some",
                                 "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "float|auto|none" in result.output
    line = write_run(tmp_path / "r.h5", surface=True)  # a 1-D surface
    with ls.Run.open(line) as opened:
        name = opened.surfaces()[0]
    one_line_error(runner.invoke(cli, ["plot", str(line), "--surface", name, "--levels", "5",
                                        "-o", str(tmp_path / "u.png")]), "--levels: surface")
    # a 3-D view has no levels: the option was ignored without a word (newcomer audit);
    # options that do not go together are a usage error (exit 2; it was 1, after reading)
    usage_error(runner.invoke(cli, ["plot", str(path), "--surface", "plane", "--3d",
                                     "--levels", "5", "-o", str(tmp_path / "v.png")]),
                "--levels does not go with --3d")


def test_a_field_spanning_decades_is_drawn_on_a_log_axis_by_default(runner, tmp_path):
    """On a linear axis a ratio climbing from 0.02 to 3,500 was a flat line until its last
    rows: the early rise the alarms read could not be seen."""
    from landscape.plotting.timelines import timeline

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("ratio", {"r": None, "small": None, "signed": None})
        for step in range(40):
            w.append("ratio", step, {"r": 0.02 * 1.35 ** step, "small": 1.0 + 0.01 * step,
                                     "signed": float(step - 20) * 100})
    with ls.Run.open(path) as run:
        scales = [ax.get_yscale() for ax in timeline(run, "ratio", findings=[]).axes[:3]]
        assert scales == ["log", "linear", "linear"]
        assert {ax.get_yscale() for ax in timeline(run, "ratio", findings=[],
                                                   log=False).axes[:3]} == {"linear"}
        assert timeline(run, "ratio", findings=[], log=True).axes[2].get_yscale() == "symlog"
    for args in ([], ["--linear"], ["--log"]):
        result = runner.invoke(cli, ["plot", str(path), "-o", str(tmp_path / "f.png"), *args])
        assert result.exit_code == 0, result.output


def test_sharpness_is_drawn_with_its_threshold_on_one_axis(tmp_path):
    """lambda_max and the stability threshold were on separate panels with their own
    scales: where they cross (the edge of stability) could not be seen."""
    from landscape.plotting.timelines import timeline

    path = tmp_path / "run.h5"
    with RunWriter(path) as w:
        w.declare("sharpness", {"lambda_max": None, "threshold": None, "ratio": None})
        for step in range(10):
            w.append("sharpness", step, {"lambda_max": 1.0 + step, "threshold": 8.0,
                                         "ratio": (1.0 + step) / 8.0})
    with ls.Run.open(path) as run:
        fig = timeline(run, "sharpness", findings=[])
    top = fig.axes[0]
    assert top.get_ylabel() == "lambda_max"
    lines = {line.get_label(): line for line in top.get_lines()}
    assert "threshold" in lines and list(lines["threshold"].get_ydata()) == [8.0] * 10
    # a learning rate changed between two rows: the threshold holds, then drops at once
    # (a sloped line read as a gradual change)
    assert lines["threshold"].get_drawstyle() == "steps-post"


def test_a_format_other_than_the_files_own_suffix_is_a_usage_error(runner, run_file, tmp_path):
    # --format svg -o w.png wrote a PNG without a word
    out = tmp_path / "w.png"
    usage_error(runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--format", "svg",
                                     "-o", str(out)]), "--format svg", "-o w.svg")
    assert not out.exists()
    ok = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--format", "svg", "-o",
                             str(tmp_path / "w.svg"), "-q"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "w.svg").read_bytes().lstrip().startswith((b"<?xml", b"<svg"))


def test_jpg_and_jpeg_are_one_format(runner, run_file, tmp_path):
    for fmt, name in (("jpg", "w.jpeg"), ("jpeg", "v.JPG")):
        ok = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--format", fmt, "-o",
                                 str(tmp_path / name), "-q"])
        assert ok.exit_code == 0, ok.output
        assert (tmp_path / name).read_bytes()[:2] == b"\xff\xd8"  # a JPEG



# ----------------------------------------------------------------------------- several runs


def test_plot_several_runs_compares_them_metric_by_metric(runner, run_file, tmp_path):
    """The default invocation with two runs: every metric either holds, one figure each."""
    other = tmp_path / "other"
    other.mkdir()
    control = write_run(other / "run.h5")  # same name elsewhere: labelled by their folders
    out = tmp_path / "compare"
    result = runner.invoke(cli, ["plot", str(run_file), str(control), "-o", str(out)])
    assert result.exit_code == 0, result.output
    # the runs' "hessian" under its current name, as a comparison of old and new files has it
    assert sorted(p.name for p in out.iterdir()) == [
        "loss.png", "spectral_alignment.png", "top_eigenvalues.png"]
    assert "renamed" not in result.output  # the old name is read, not asked for
    for p in out.iterdir():
        assert p.read_bytes().startswith(PNG)
        assert f"wrote {p}" in result.output


def test_plot_several_runs_draws_each_and_marks_each_first_warning(runner, run_file, tmp_path,
                                                                   monkeypatch):
    from landscape_cli.commands import plot as plot_command

    drawn = {}

    def keep(fig, path, dpi=120):
        drawn[path.name] = fig
        return path

    monkeypatch.setattr(plot_command, "save_figure", keep)
    control = write_run(tmp_path / "control.h5")
    result = runner.invoke(cli, ["plot", str(run_file), str(control), "-m", "loss", "--stored",
                                 "-o", str(tmp_path / "loss.png")])
    assert result.exit_code == 0, result.output
    fig = drawn["loss.png"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # the run's stored warning at step 30 (its error at 60 comes later); the control has none
    assert legend == ["run (100 rows)", "control (100 rows)",
                      "run: first warning at 30 (loss_spike)"]


def test_plot_several_runs_refuses_a_surface_and_names_a_file_it_cannot_read(
        runner, run_file, tmp_path):
    other = write_run(tmp_path / "other.h5")
    two = ["plot", str(run_file), str(other)]
    usage_error(runner.invoke(cli, [*two, "--surface", "line", "-o", str(tmp_path / "s.png")]),
                "--surface plots a surface of one run: give one RUN")
    one_line_error(runner.invoke(cli, [*two, "-m", "nope", "-o", str(tmp_path / "x.png")]),
                   "no metric 'nope' in any of the runs",
                   "(metrics: hessian, loss, spectral_alignment)")
    one_line_error(runner.invoke(cli, ["plot", str(run_file), str(tmp_path / "." / "run.h5"),
                                       "-o", str(tmp_path / "x.png")]),
                   "the same run as", "given twice")
    for path, fragment in bad_inputs(tmp_path):
        one_line_error(
            runner.invoke(cli, ["plot", str(run_file), path, "-o", str(tmp_path / "x.png")]),
            fragment)


def test_plot_ignore_rule_marks_none_of_its_findings(runner, run_file, tmp_path, monkeypatch):
    from landscape_cli.commands import plot as plot_command

    drawn = {}

    def keep(fig, path, dpi=120):
        drawn[path.name] = fig
        return path

    monkeypatch.setattr(plot_command, "save_figure", keep)
    marked = []
    real_timelines = plot_command.timelines

    def timelines(run, names, *, findings, **kw):
        marked.append(sorted({f.rule for f in findings}))
        return real_timelines(run, names, findings=findings, **kw)

    monkeypatch.setattr(plot_command, "timelines", timelines)
    result = runner.invoke(cli, ["plot", str(run_file), "-m", "loss", "--stored",
                                 "--ignore-rule", "loss_spike", "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    assert marked == [["edge_of_stability"]]  # the stored error stays marked
    control = write_run(tmp_path / "control.h5")
    result = runner.invoke(cli, ["plot", str(run_file), str(control), "-m", "loss", "--stored",
                                 "--ignore-rule", "loss_spike", "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    legend = [t.get_text() for t in drawn["b.png"].legends[0].get_texts()]
    assert legend == ["run (100 rows)", "control (100 rows)",
                      "run: first error at 60 (edge_of_stability)"]
    typo = runner.invoke(cli, ["plot", str(run_file), "--ignore-rule", "los_spike",
                               "-o", str(tmp_path / "c.png")])
    assert typo.exit_code == 2 and "no rule named los_spike" in typo.output
    # a rule of one of the compared runs only (its training's own rule) is known
    from landscape.findings import Finding

    own = write_run(tmp_path / "own.h5", findings=(
        Finding(40, "my_rule", "warning", "loss/value", 2.0, 1.0, "mine", "h"),))
    both = runner.invoke(cli, ["plot", str(own), str(control), "-m", "loss", "--stored",
                               "--ignore-rule", "my_rule", "-o", str(tmp_path / "d.png")])
    assert both.exit_code == 0, both.output
    legend = [t.get_text() for t in drawn["d.png"].legends[0].get_texts()]
    assert legend == ["own (100 rows)", "control (100 rows)"]
    # each compared run's rules are read once, not once per run marked (k^2 reads)
    read = []
    real_names = plot_command.rule_names
    monkeypatch.setattr(plot_command, "rule_names",
                        lambda run, rules: read.append(run) or real_names(run, rules))
    runs = [write_run(tmp_path / f"sweep{i}.h5") for i in range(4)]
    sweep = runner.invoke(cli, ["plot", *map(str, runs), "-m", "loss", "--stored",
                                "--ignore-rule", "loss_spike", "-o", str(tmp_path / "e.png")])
    assert sweep.exit_code == 0, sweep.output
    assert len(read) == 4
