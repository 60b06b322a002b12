"""Output files written whole or not at all (reports, figures, exports)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_whole(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that it holds either its old content or all the new.

    The data go to a temporary file beside ``path`` first, which then replaces it: a full
    disk or a Ctrl-C while writing left a truncated report or a 0-byte figure where a good
    one had been. The temporary file is removed when the write fails.

    Args:
        path: the file to write.
        data: its content (text is written as UTF-8).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    partial = p.with_name(f".{p.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(raw)
        os.replace(partial, p)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return p
