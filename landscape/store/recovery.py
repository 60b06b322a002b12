"""Opening run files safely, and recovering those whose writer was killed.

A reader opens a file in SWMR-read mode after checking that it is a complete landscape
run; a writer reopening a file left in "open for SWMR write" state by a killed process
first rewrites it once without that flag (``docs/file-format.md``, "Durability and live
reading"). A file still written by a live process on this host is refused.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py

from landscape._errors import RunFileError
from landscape.store.format import LOCKING, _attr_value, _check_format, _h5_reason

__all__ = ["open_for_reading", "open_for_writing", "recover_crashed"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHECK_ATTEMPTS = 3  # a live writer's metadata can be caught mid-flush: look again
# run files this process has open for writing (RunWriter): its own file needs no check,
# which costs ~0.1 ms an object (Monitor.run() while the monitor writes)
WRITING: set[str] = set()

# what h5py raises for a damaged file: OSError at open, RuntimeError for a superblock it
# cannot decode or a bad checksum found later, KeyError/ValueError for broken links
_DAMAGED = (OSError, RuntimeError, KeyError, ValueError)


def _check_not_truncated(path: Path) -> None:
    """Refuse a file shorter than the end-of-file address its superblock records.

    SWMR readers do not check this themselves (reads past the end return zeros), so a
    file cut short by a copy or a full disk would otherwise read as silent zeros. Only
    superblock versions 2 and 3 (what ``libver='latest'`` writes) are checked; their
    end-of-file address sits at byte 28 (HDF5 File Format Specification, section II.A).
    """
    with open(path, "rb") as fh:
        head = fh.read(36)
    if len(head) < 36 or head[:8] != _HDF5_SIGNATURE or head[8] not in (2, 3):
        return
    width = head[9]
    if width != 8:
        return
    eof = int.from_bytes(head[28:36], "little")
    size = path.stat().st_size
    if size < eof:
        raise RunFileError(f"{path}: truncated file ({size} of {eof} bytes)")


def _touch(name: str, obj: Any) -> None:
    """Read one object's header and attributes (what a checksum guards)."""
    dict(obj.attrs)
    if isinstance(obj, h5py.Dataset):
        _ = obj.shape, obj.dtype


def _check_intact(path: Path) -> None:
    """Refuse a damaged file in one line, before it is opened in SWMR mode.

    A SWMR reader retries a metadata read whose checksum fails, sleeping in between (the
    writer may be halfway through a flush), so a damaged file made every command that
    reads it hang for tens of minutes, and ``landscape analyze`` could not be stopped by
    SIGTERM meanwhile. An ordinary (non-SWMR) read-only open of the same file fails in a
    millisecond: this opens it that way and reads every object's header and attributes.
    A file still marked open for SWMR writing (a live writer, or one that was killed)
    cannot be opened that way and is not checked here. A failure is looked at again, up to
    ``_CHECK_ATTEMPTS`` times within half a second. (Damaged *data*, which HDF5 does not
    checksum, cannot be told from real data.)
    """
    err: BaseException | None = None
    for attempt in range(_CHECK_ATTEMPTS):
        try:
            with h5py.File(path, "r", libver="latest", locking=LOCKING) as f:
                dict(f.attrs)
                f.visititems(_touch)
            return
        except _DAMAGED as caught:
            if "already open for write" in str(caught):
                return  # a live writer's file, or a killed one's: only SWMR reads it
            err = caught
            if attempt + 1 < _CHECK_ATTEMPTS:
                time.sleep(0.1 * (attempt + 1))
    raise RunFileError(f"{path}: not a readable HDF5 file ({_h5_reason(err)})")


def open_for_reading(path: Path) -> h5py.File:
    """Open a run file in SWMR-read mode.

    Args:
        path: the run file.

    Returns:
        The open file.

    Raises:
        RunFileError: a missing file, a directory, a truncated, unreadable or foreign file,
            or a format version newer than this library reads (one line, naming the file).
    """
    if not path.exists():
        raise RunFileError(f"{path}: no such file")
    if path.is_dir():
        raise RunFileError(f"{path}: is a directory, expected a run file (.h5)")
    _check_not_truncated(path)
    if str(path.resolve()) not in WRITING:
        _check_intact(path)
    try:
        f = h5py.File(path, "r", libver="latest", swmr=True, locking=LOCKING)
    except _DAMAGED as err:
        raise RunFileError(f"{path}: not a readable HDF5 file ({_h5_reason(err)})") from None
    try:
        _check_format(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_crashed(path: Path) -> None:
    """Rewrite a file whose writer died in SWMR mode, so that it can be opened for writing.

    HDF5 leaves a "file open for SWMR write" flag in the superblock when the writer is
    killed; reading still works (SWMR read ignores it), so copy everything into a fresh
    file beside it and replace the original atomically.

    Args:
        path: the run file.

    Raises:
        RunFileError: the file is not a landscape run, or a live process on this host is
            writing it.
    """
    src = h5py.File(path, "r", libver="latest", swmr=True, locking=LOCKING)
    try:
        _check_format(src, path)
        owner_pid = int(_attr_value(src.attrs.get("writer_pid", -1)))
        owner_host = _attr_value(src.attrs.get("writer_host", ""))
        if owner_pid > 0 and owner_host == socket.gethostname() and owner_pid != os.getpid():
            if _pid_alive(owner_pid):
                raise RunFileError(f"{path}: is being written by another process (pid {owner_pid})")
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".recover", dir=path.parent)
        os.close(fd)
        with h5py.File(tmp, "w", libver="latest", locking=LOCKING) as dst:
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for key in src:
                src.copy(src[key], dst, name=key)
    finally:
        src.close()
    os.replace(tmp, path)


def open_for_writing(path: Path) -> h5py.File:
    """Open an existing run file for appending, recovering it if its writer was killed.

    Args:
        path: the run file.

    Returns:
        The file, open read-write (not yet in SWMR mode).

    Raises:
        RunFileError: a truncated, unwritable or foreign file, or one a live process writes.
    """
    _check_not_truncated(path)
    _check_intact(path)
    try:
        f = h5py.File(path, "r+", libver="latest", locking=LOCKING)
    except _DAMAGED as err:
        if "already open for write" not in str(err):
            raise RunFileError(f"{path}: not a writable HDF5 file ({_h5_reason(err)})") from None
        recover_crashed(path)
        f = h5py.File(path, "r+", libver="latest", locking=LOCKING)
    try:
        _check_format(f, path)
    except BaseException:
        f.close()
        raise
    return f
