"""Fixtures shared by the command-line tests."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from landscape.store import RunWriter
from tests.cli._runs import ERR, WARN, write_run


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def run_file(tmp_path):
    """A run of 100 steps with a warning at step 30 and an error at step 60."""
    return write_run(tmp_path / "run.h5", findings=(WARN, ERR))


@pytest.fixture
def empty_run(tmp_path):
    path = tmp_path / "empty.h5"
    RunWriter(path, mode="w").close()
    return path
