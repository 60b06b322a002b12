"""Output files are written whole or not at all: a failed write keeps the old file."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import landscape._files as files
from landscape.plotting.timelines import new_figure, save_figure


def _disk_full_after(n: int):
    """A ``_write`` that puts ``n`` bytes down, then fails as a full disk does."""

    def write(f, data):
        f.write(data[:n])
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def _figure():
    fig = new_figure()
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_a_write_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    """A full disk left a report cut mid-way (and plot a 0-byte PNG) where a good one was."""
    target = tmp_path / "report.html"
    target.write_text("the old report")
    monkeypatch.setattr(files, "_write", _disk_full_after(5))
    with pytest.raises(OSError, match="No space left"):
        files.write_whole(target, "a new report, longer than five bytes")
    assert target.read_text() == "the old report"
    with pytest.raises(OSError, match="No space left"):
        save_figure(_figure(), tmp_path / "new.png")  # a new file: removed
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_a_write_keeps_what_a_plain_write_keeps(tmp_path):
    """Its mode (a private report stays private), a link (the file it names is written),
    and devices and files with other names are written in place (-o /dev/full must not
    become a regular file)."""
    target = tmp_path / "out.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    assert files.write_whole(target, "néw") == target
    assert target.read_text(encoding="utf-8") == "néw"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    files.write_whole(link, b"\x00\x01")
    assert link.is_symlink() and target.read_bytes() == b"\x00\x01"
    other = tmp_path / "other-name.txt"
    os.link(target, other)
    files.write_whole(target, "both")
    assert other.read_text() == "both"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "other-name.txt",
                                                           "out.txt"]
    if os.path.exists("/dev/full"):
        with pytest.raises(OSError, match="No space left"):
            files.write_whole("/dev/full", "x")
        assert stat.S_ISCHR(os.stat("/dev/full").st_mode)
