"""Output files written whole or not at all (reports, figures, exports)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


def _write(f: BinaryIO, data: bytes) -> None:
    f.write(data)


def _write_in_place(target: Path, data: bytes) -> None:
    with open(target, "wb") as f:
        _write(f, data)


def write_whole(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path``: an existing file keeps its old content or gets all the new.

    A full disk or a Ctrl-C while writing left a truncated report or a 0-byte figure where
    a good one had been. An existing regular file is therefore replaced by a complete
    copy written beside it (its mode, and where allowed its owner, kept); a new file is
    removed when its write fails. As a plain write does, a link is followed to the file it
    names; a device (``/dev/stdout``, ``/dev/full``), a pipe, a file with other names (hard
    links) and a file in a directory this process cannot create files in are written in
    place.

    Args:
        path: the file to write.
        data: its content (text is written as UTF-8).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    target = Path(os.path.realpath(p))
    try:
        old = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is None:
        try:
            with open(target, "xb") as f:
                _write(f, raw)
        except FileExistsError:  # created meanwhile: written in place, as asked
            _write_in_place(target, raw)
        except BaseException:
            with contextlib.suppress(OSError):
                target.unlink()
            raise
        return p
    if not stat.S_ISREG(old.st_mode) or old.st_nlink > 1:
        _write_in_place(target, raw)
        return p
    try:
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".partial")
    except OSError:  # no file can be created beside it: in place
        _write_in_place(target, raw)
        return p
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, raw)
        os.chmod(partial, stat.S_IMODE(old.st_mode))
        with contextlib.suppress(OSError):  # (only root may give a file away)
            os.chown(partial, old.st_uid, old.st_gid)
        os.replace(partial, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
    return p
