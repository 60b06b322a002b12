"""Output files are written whole or not at all: a failed write keeps the old file."""

from __future__ import annotations

import errno

import pytest

import landscape._files as files
from landscape.plotting.timelines import new_figure, save_figure


class _DiskFullAfter:
    """An ``open`` whose files take ``n`` bytes, then fail as a full disk does."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)
        limit = self.n

        class Half:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, data):
                real.write(data[:limit])
                raise OSError(errno.ENOSPC, "No space left on device")

        return Half()


def test_a_write_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """A full disk left a report cut mid-way (and plot a 0-byte PNG) where a good one was."""
    target = tmp_path / "report.html"
    target.write_text("the old report")
    monkeypatch.setattr(files, "open", _DiskFullAfter(5), raising=False)
    with pytest.raises(OSError, match="No space left"):
        files.write_whole(target, "a new report, longer than five bytes")
    assert target.read_text() == "the old report"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    fig = new_figure()
    fig.subplots().plot([0, 1], [1, 0])
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, tmp_path / "report.png")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    assert files.write_whole(target, "néw") == target
    assert target.read_text(encoding="utf-8") == "néw"
    files.write_whole(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
