"""Findings keep their ``extra``; older files and renamed metrics still read."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pytest

from landscape.findings import Finding
from landscape.store import Run, RunWriter


def _findings() -> list[Finding]:
    return [
        Finding(3, "sign_collapse", "warning", "spectral_alignment/minority", 0.01, 0.05,
                "collapse", "lower lr", extra={"layer": "blocks.0.fc1",
                                               "layer_index": np.int64(2)}),
        Finding(3, "loss_spike", "warning", "loss/value", 9.0, 3.0, "spike",
                extra={"z": 7.25, "median": np.float64(1.5), "path": [1, "a"], "ok": True}),
        Finding(5, "nonfinite", "error", "loss/value", float("inf"), 0.0, "inf loss"),
    ]


def _same(read: list[Finding], raised: list[Finding]) -> None:
    assert read == raised
    assert [f.extra for f in read] == [f.extra for f in raised]


def test_findings_keep_their_extra_through_the_store(writer_factory):
    w = writer_factory()
    raised = _findings()
    for f in raised:
        w.add_finding(f)
    _same(w.run().findings(), raised)
    w.close()


def test_findings_keep_their_extra_through_a_file(tmp_path):
    raised = _findings()
    with RunWriter(tmp_path / "run.h5") as w:
        for f in raised:
            w.add_finding(f)
    with Run.open(tmp_path / "run.h5") as run:
        read = run.findings()
    _same(read, raised)
    assert read[0].extra == {"layer": "blocks.0.fc1", "layer_index": 2}


def test_an_extra_too_long_to_store_keeps_its_leading_items(writer_factory):
    w = writer_factory()
    w.add_finding(Finding(0, "r", "info", "m", 1.0, 1.0, "m", extra={"a": 1, "b": "x" * 2000}))
    assert w.run().findings()[0].extra == {"a": 1}
    w.close()


def _make_old_layout(path) -> None:
    """Rewrite ``/findings`` as files written before the ``extra`` column had it."""
    with h5py.File(path, "r+") as f:
        g = f["findings"]
        del g["extra"]
        fields = json.loads(g.attrs["fields"])
        del fields["extra"]
        g.attrs["fields"] = json.dumps(fields)


def test_a_file_without_the_extra_column_still_reads_and_resumes(tmp_path):
    path = tmp_path / "old.h5"
    with RunWriter(path) as w:
        w.add_finding(_findings()[0])
    _make_old_layout(path)
    with Run.open(path) as run:
        (old,) = run.findings()
    assert old == _findings()[0] and old.extra == {} and old.hint == "lower lr"
    with RunWriter(path) as w:  # resuming keeps the file's layout
        w.add_finding(_findings()[1])
    with Run.open(path) as run:
        assert [(f.rule, f.extra) for f in run.findings()] == [
            ("sign_collapse", {}),
            ("loss_spike", {}),
        ]
        assert "extra" not in run._backend.table_fields("findings")


def _run_with_metric(tmp_path, name: str) -> Run:
    with RunWriter(tmp_path / f"{name}.h5") as w:
        w.declare(name, {"top": (2,)}, cls="TopEigenvalues", schedule="every(10)")
        for step in (0, 10):
            w.append(name, step, {"top": [2.0 + step, 1.0]})
    return Run.open(tmp_path / f"{name}.h5")


def _reads_under(run: Run, name: str) -> None:
    assert name in run and run.has_metric(name)
    steps, values = run.series(name, "top")
    assert list(steps) == [0, 10] and values[1, 0] == 12.0
    assert list(run.steps(name)) == [0, 10]
    assert list(run.fields(name)) == ["top"]
    assert run.metric_attrs(name)["schedule"] == "every(10)"


def test_a_new_name_finds_the_group_of_an_older_file_without_warning(tmp_path):
    with _run_with_metric(tmp_path, "hessian") as run:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _reads_under(run, "top_eigenvalues")
            _reads_under(run, "hessian")  # the name it has in the file
        assert run.metrics() == ["hessian"]


def test_an_old_name_finds_the_group_of_a_newer_file_with_a_warning(tmp_path):
    with _run_with_metric(tmp_path, "top_eigenvalues") as run:
        with pytest.warns(DeprecationWarning, match="'hessian' was renamed 'top_eigenvalues'"):
            _reads_under(run, "hessian")
        with pytest.warns(DeprecationWarning, match="top_eigenvalues") as record:
            run.series("hessian", "top")
        assert record[0].filename == __file__  # points at the caller
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _reads_under(run, "top_eigenvalues")


def test_unknown_metrics_are_still_unknown(tmp_path):
    with _run_with_metric(tmp_path, "top_eigenvalues") as run:
        assert "taylor" not in run and "taylor_radius" not in run and 3 not in run
        with pytest.raises(KeyError, match=r"no metric 'taylor'.*top_eigenvalues"):
            run.series("taylor", "radius")


def test_tensors_in_a_findings_extra_are_stored_as_numbers(writer_factory):
    """A custom rule's extra may hold tensors (untested until the coverage audit)."""
    import torch

    w = writer_factory()
    w.add_finding(Finding(3, "mine", "warning", "loss/value", 1.0, 0.5, "m",
                          extra={"t": torch.tensor([1.0, 2.0]), "s": torch.tensor(3.0)}))
    assert w.run().findings()[0].extra == {"t": [1.0, 2.0], "s": 3.0}
    w.close()
