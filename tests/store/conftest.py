"""Fixtures of the store tests."""

from __future__ import annotations

import pytest

from landscape.store import RunWriter


@pytest.fixture(params=["hdf5", "memory"])
def writer_factory(request, tmp_path):
    def make(**kwargs):
        if request.param == "memory":
            return RunWriter.memory(**kwargs)
        return RunWriter(tmp_path / "run.h5", **kwargs)

    return make
