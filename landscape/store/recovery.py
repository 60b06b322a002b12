"""Opening run files safely, and recovering those whose writer was killed.

A reader opens a file in SWMR-read mode after checking that it is a complete landscape
run; a writer reopening a file left in "open for SWMR write" state by a killed process
first rewrites it once without that flag (``docs/file-format.md``, "Durability and live
reading"). A file still written by a live process on this host is refused.

A writer killed while the file was out of SWMR mode (a structural change, the first
moments of a resume) leaves the plain "open for write" flag, which no HDF5 open accepts,
although every committed row is intact. :func:`clear_open_flags` clears it as HDF5's
``h5clear -s`` does, on a copy: readers read the copy, writers replace the file with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from landscape._errors import LandscapeError, RunFileError
from landscape.store.format import (
    DISK_MARGIN,
    FORMAT,
    LOCKING,
    _attr_value,
    _check_format,
    _h5_reason,
    check_tables,
)

__all__ = [
    "clear_open_flags", "holds_nothing", "is_hdf5", "open_for_reading", "open_for_writing",
    "recover_crashed", "refuse_to_overwrite_hdf5", "refuse_to_replace_with_a_run",
    "writers_excluded",
]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHECK_ATTEMPTS = 3  # a live writer's metadata can be caught mid-flush: look again
# run files this process has open for writing (RunWriter): its own file needs no check,
# which costs ~0.1 ms an object (Monitor.run() while the monitor writes)
WRITING: set[str] = set()

# what h5py raises for a damaged file: OSError at open, RuntimeError for a superblock it
# cannot decode or a bad checksum found later, KeyError/ValueError for broken links
_DAMAGED = (OSError, RuntimeError, KeyError, ValueError)


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a file as ``torch.save`` writes it.

    A zip archive holding a pickle (``NAME/data.pkl``; a NumPy ``.npz`` holds none), or a
    pickle of the legacy format (protocol 2).
    """
    import zipfile

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head == b"PK\x03\x04":
            with zipfile.ZipFile(path) as z:
                return any(n.endswith("/data.pkl") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return head[:2] == b"\x80\x02"  # torch.save's legacy format: pickle protocol 2


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an existing file that starts with the HDF5 signature.

    The report and the figures refuse to write over such a file: ``-o run.h5`` would
    replace the run itself.
    """
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == _HDF5_SIGNATURE
    except OSError:  # missing, a directory, unreadable
        return False


def refuse_to_replace_with_a_run(path: Path) -> None:
    """Raise :class:`RunFileError` unless ``path`` may be replaced by a new run file.

    ``RunWriter(mode="w")`` (``--overwrite``) replaces a run file, an empty file, or an
    HDF5 file that cannot be read (a damaged run); anything else it would destroy: a
    checkpoint named by mistake (``-o ckpt.pt``, or a shell glob after ``-o``), a report,
    source code, another program's HDF5 file, and a run file that a live process is still
    writing. A plain open fails on a file marked open for writing (a live writer's, or
    one whose writer was killed), which once let ``--overwrite`` truncate a training run
    under its writer: its recorded writer is read from a copy with the marks cleared (a
    SWMR open of a damaged file could retry for minutes), and a damaged copy is replaced.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    if not is_hdf5(path):
        raise RunFileError(f"{path}: is not a landscape run file (an HDF5 file), so it is not "
                           "overwritten: a checkpoint, a report or code? write the run to "
                           "another path")
    try:
        with h5py.File(path, "r", locking=LOCKING) as f:
            fmt = f.attrs.get("format", None)
    except Exception as err:
        if not _plainly_open(err):
            return  # a damaged run (or another file HDF5 cannot read): replaced
        tmp = None
        try:  # marked open for writing: a live writer's file, or a killed one's
            _check_not_truncated(path)
            tmp = _cleared_copy(path, anywhere=True)
            with h5py.File(tmp, "r", libver="latest", locking=LOCKING) as f:
                fmt = f.attrs.get("format", None)
                writer = _live_writer(f)
        except NoRoomForCopy:  # who writes it cannot be read: not replaced on a guess
            raise RunFileError(
                f"{path}: is marked open for writing (a live writer, or one that was killed) "
                "and there is no room to read who writes it, so it is not overwritten: free "
                "some space, or write the run to another path") from None
        except Exception:  # cut short, or unreadable even with its marks cleared: damaged
            return
        finally:
            if tmp is not None:
                _discard(tmp)
        if writer is not None:
            raise _being_written(path, writer) from None
    if _attr_value(fmt) != FORMAT:
        raise RunFileError(f"{path}: an HDF5 file, but not a landscape run (no "
                           "format='landscape'), so it is not overwritten: write the run to "
                           "another path")


def refuse_to_overwrite_hdf5(path: str | os.PathLike, by: str) -> None:
    """Raise :class:`LandscapeError` when ``path`` is an HDF5 file (:func:`is_hdf5`).

    ``by``: what would have been written over it ("the report", "a figure"), for the message.
    """
    if is_hdf5(path):
        raise LandscapeError(f"{path}: is an HDF5 file (a run file?); not overwritten by {by}")


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


def holds_nothing(path: Path) -> bool:
    """Whether ``path`` is an empty file, or an HDF5 superblock and nothing after it.

    What a writer killed between creating a run file and its first flush leaves (48 bytes
    whose superblock records a larger end of file): no table, no row, nothing to resume.
    """
    size = path.stat().st_size
    if size == 0:
        return True
    if size > _SUPERBLOCK:
        return False
    with open(path, "rb") as fh:
        return fh.read(8) == _HDF5_SIGNATURE


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


# lookup3's mix(): six rounds of "x -= y; x ^= rot(y, k); y += z" with (x, y, z) turning
# from (a, c, b) to (b, a, c) to (c, b, a); its final(): seven rounds of "x ^= y;
# x -= rot(y, k)" with x = c, a, b, c, a, b, c and y the previous x
_MIX = (4, 6, 8, 16, 19, 4)
_FINAL = ((2, 14), (0, 11), (1, 25), (2, 16), (0, 4), (1, 14), (2, 24))  # (x, k); y = x - 1


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' ``hashlittle`` (lookup3.c, 2006): HDF5's metadata checksum.

    The HDF5 File Format Specification (section II.A, "Superblock", versions 2 and 3)
    guards the superblock with this 32-bit hash of its preceding bytes.
    """
    m = 0xFFFFFFFF
    n = len(data)
    v = [(0xDEADBEEF + n + initval) & m] * 3  # a, b, c

    def add(block: bytes) -> None:
        for j in range(3):
            v[j] = (v[j] + int.from_bytes(block[4 * j:4 * j + 4], "little")) & m

    i = 0
    while n - i > 12:
        add(data[i:i + 12])
        x, y, z = 0, 2, 1  # a, c, b
        for k in _MIX:
            v[x] = ((v[x] - v[y]) & m) ^ _rot(v[y], k)
            v[y] = (v[y] + v[z]) & m
            x, y, z = z, x, y
        i += 12
    if n - i == 0:
        return v[2]
    add(data[i:] + bytes(12 - (n - i)))  # the last 1-12 bytes, zero-padded
    for x, k in _FINAL:
        y = (x - 1) % 3
        v[x] = ((v[x] ^ v[y]) - _rot(v[y], k)) & m
    return v[2]


_SUPERBLOCK = 48  # versions 2 and 3 with 8-byte offsets: 44 bytes, then the checksum


def _superblock(fh: Any) -> bytearray | None:
    """The superblock at the start of the open file ``fh``, when this module reads it.

    Version 2 or 3 with 8-byte offsets at byte 0 (what ``libver="latest"`` writes), its
    checksum intact; None for any other (or a damaged one).
    """
    block = bytearray(fh.read(_SUPERBLOCK))
    if (len(block) < _SUPERBLOCK or block[:8] != _HDF5_SIGNATURE or block[8] not in (2, 3)
            or block[9] != 8):
        return None
    if int.from_bytes(block[44:48], "little") != lookup3(bytes(block[:44])):
        return None
    return block


def open_flags(path: Path) -> int | None:
    """The superblock's file consistency flags of ``path``: 0 once its writer closed it.

    HDF5 sets them when a writer opens the file (bit 0: open for writing, bit 2: for SWMR
    writing) and clears them when it closes the file; a writer that was killed leaves
    them set (the HDF5 File Format Specification, section II.A, "File Consistency Flags").

    Returns:
        The flags, or None for a superblock this module does not read.
    """
    with open(path, "rb") as fh:
        block = _superblock(fh)
    return None if block is None else block[11]


def clear_open_flags(path: Path) -> bool:
    """Zero the superblock's file consistency flags of ``path`` in place (``h5clear -s``).

    Only a superblock of version 2 or 3 with 8-byte offsets at byte 0 (what
    ``libver="latest"`` writes) whose checksum is intact is changed; its checksum is
    recomputed (:func:`lookup3`).

    Returns:
        Whether flags were set and are now cleared (False: nothing to do, or a superblock
        this does not know).
    """
    with open(path, "r+b") as fh:
        block = _superblock(fh)
        if block is None or block[11] == 0:
            return False
        block[11] = 0
        block[44:48] = lookup3(bytes(block[:44])).to_bytes(4, "little")
        fh.seek(0)
        fh.write(block)
    return True


def _host_prefix(path: Path) -> str:
    """The name prefix of this host's recovery copies of ``path``: ``<run>.<host>.``."""
    host = socket.gethostname().replace(".", "_") or "host"
    return f"{path.name}.{host}."


def _copy_prefix(path: Path) -> str:
    """The name prefix of this process's recovery copies of ``path``: run, host, pid.

    A copy is renamed over the run or removed when the recovery ends; a process killed in
    between (SIGKILL, out of memory) leaves it, and :func:`_sweep_stale_copies` removes it
    at the next recovery on the same host once that process is gone.
    """
    return f"{_host_prefix(path)}{os.getpid()}."


def _sweep_stale_copies(path: Path) -> None:
    """Remove recovery copies of ``path`` left by dead processes of this host (quietly).

    Only copies named by :func:`_copy_prefix` whose process no longer runs here: a copy of
    a live process (a recovery in progress) or of another host is left alone.
    """
    prefix = _host_prefix(path)
    with contextlib.suppress(OSError):
        for copy in path.parent.glob(f"{prefix}*.recover"):
            pid = copy.name[len(prefix):].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                _discard(copy)


class NoRoomForCopy(RunFileError):
    """:func:`_cleared_copy` found no room for its copy (a full disk, a read-only folder)."""


def _cleared_copy(path: Path, anywhere: bool = False) -> Path:
    """A copy of ``path`` with the open flags cleared and its contents checked.

    Beside the run (a writer replaces the run with it); with ``anywhere`` (a reader), in
    the system's temporary folder when the run's folder takes no copy.

    Raises:
        RunFileError: the copy is not a readable HDF5 file either (really damaged).
    """
    tmp = None
    _sweep_stale_copies(path)
    # beside the run (a writer replaces the run with it), else (a reader) the temp folder
    for where in (path.parent, None) if anywhere else (path.parent,):
        try:
            fd, name = tempfile.mkstemp(prefix=_copy_prefix(path), suffix=".recover", dir=where)
            os.close(fd)
            tmp = Path(name)
            shutil.copyfile(path, tmp)
            break
        except OSError as err:  # a read-only folder, a full disk
            if tmp is not None:
                _discard(tmp)
                tmp = None
            if where is None or not anywhere:
                raise NoRoomForCopy(f"{path}: left open for writing by a process that stopped, "
                                    f"and no room for a cleared copy ({err.strerror})") from None
    assert tmp is not None
    try:
        if not clear_open_flags(tmp):
            raise RunFileError(f"{path}: not a readable HDF5 file (left open for writing by "
                               "a process that stopped, in a form this cannot clear)")
        _check_intact(tmp, report=path)
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _discard(tmp: Path | str) -> None:
    """Remove a temporary copy, quietly (it may be gone or its folder read-only)."""
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _plainly_open(err: BaseException) -> bool:
    """Whether an HDF5 open failed on the plain (not SWMR) "open for write" flag."""
    text = str(err)
    return "not already open for SWMR writing" in text or "already open for write" in text


def _touch(name: str, obj: Any) -> None:
    """Read one object's header, attributes and chunk index (what a checksum guards).

    The chunk index too (the blocks that map a dataset's chunks, checksummed; read by
    HDF5 only when the data are): a damaged one made a SWMR reader retry for tens of
    minutes, past Ctrl-C. Walked without reading the data (``chunk_iter``; where this
    h5py lacks it, the data chunk by chunk, never a whole dataset at once).
    """
    dict(obj.attrs)
    if isinstance(obj, h5py.Dataset):
        _ = obj.shape, obj.dtype
        if obj.chunks is None or not obj.size:
            return
        if hasattr(obj.id, "chunk_iter"):
            obj.id.chunk_iter(lambda info: None)
        else:  # pragma: no cover - h5py < 3.8
            for part in obj.iter_chunks():
                obj[part]


def _check_intact(path: Path, report: Path | None = None) -> None:
    """Refuse a damaged file in one line, before it is opened in SWMR mode.

    A SWMR reader retries a metadata read whose checksum fails, sleeping in between (the
    writer may be halfway through a flush), so a damaged file made every command that
    reads it hang for tens of minutes, and ``landscape analyze`` could not be stopped by
    SIGTERM meanwhile. An ordinary (non-SWMR) read-only open of the same file fails in a
    millisecond: this opens it that way and reads every object's header and attributes
    and every dataset's chunk index.
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
    raise RunFileError(f"{report or path}: not a readable HDF5 file ({_h5_reason(err)})")


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
    if _is_checkpoint(path):  # `landscape info ckpt.pt`: say what it is and what reads it
        raise RunFileError(f"{path}: a PyTorch checkpoint, not a run file (landscape "
                           "analyze or surface measures checkpoints into a run file, which "
                           "info, check, plot, report and watch read)")
    if path.stat().st_size > 0 and holds_nothing(path):  # (an empty file: below)
        raise RunFileError(f"{path}: holds no run yet (its writer has just created it, or "
                           "stopped before writing anything; writing to it again starts it "
                           "anew)")
    _check_not_truncated(path)
    if str(path.resolve()) not in WRITING:
        _check_intact(path)
    f = None
    for attempt in range(_CHECK_ATTEMPTS):
        try:
            f = h5py.File(path, "r", libver="latest", swmr=True, locking=LOCKING)
            break
        except _DAMAGED as err:
            if not _plainly_open(err):
                raise RunFileError(
                    f"{path}: not a readable HDF5 file ({_h5_reason(err)})") from None
            # a live writer's structural change (milliseconds), or a writer killed in one
            if attempt + 1 < _CHECK_ATTEMPTS:
                time.sleep(0.1 * (attempt + 1))
    if f is None:  # killed out of SWMR mode: read a copy without the flag
        tmp = _cleared_copy(path, anywhere=True)
        try:
            f = h5py.File(tmp, "r", libver="latest", swmr=True, locking=LOCKING)
        finally:
            _discard(tmp)  # the open file stays readable (POSIX)
    try:
        _check_format(f, path)
        _check_tables_of_live_file(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _check_tables_of_live_file(f: h5py.File, path: Path) -> None:
    """:func:`check_tables`, looked at again while a live writer may be mid-change.

    A reader can catch a writer's change half done (a resume's ``truncate_from``
    shrinking the tables), or share, in one process, an HDF5 view that another open
    handle refreshed only in part (a notebook's long-lived ``Run`` and its ``refresh()``):
    read as damage, both were transient. While the file's writer runs (another process
    on this host, or this one), a failed check waits a moment, refreshes every dataset
    and looks again; a file that stays damaged is refused as before.
    """
    for attempt in range(_CHECK_ATTEMPTS + 2):
        try:
            check_tables(f, path)
            return
        except RunFileError:
            live = _live_writer(f) is not None or str(path.resolve()) in WRITING
            if not live or attempt + 1 == _CHECK_ATTEMPTS + 2:
                raise
        time.sleep(0.05 * (attempt + 1))
        f.visititems(_refresh)


def _refresh(name: str, obj: Any) -> None:
    """Refresh a dataset's view of a file a live writer extends (SWMR)."""
    if isinstance(obj, h5py.Dataset):
        obj.refresh()


WRITERS_WAIT = 30.0
"""Seconds :func:`writers_excluded` waits for another process's lock before going on."""

# per thread: the directories whose writers' lock it holds, and how deep (another thread of
# the process takes the lock on a descriptor of its own, and waits like another process)
_HELD = threading.local()


@contextlib.contextmanager
def writers_excluded(path: Path) -> Iterator[None]:
    """Only this process opens, recovers or reopens a run file for writing in the block.

    Two processes resuming one crashed file at once both recovered it, and the second
    replaced the file under the first, whose rows were lost without a word; two creating
    one new file both truncated it and one died of raw HDF5 errors. Their checks (is the
    file there, is its writer alive, is it flagged open) and their actions (recover,
    create, record themselves as its writer) are not atomic; this advisory lock on the
    file's directory (``flock``, released when the process dies, so a killed writer never
    leaves it held) makes them so. Re-entrant within a thread; another thread waits.
    Where there is no ``flock`` (Windows) or the file system refuses it (some network file
    systems), or another process held it :data:`WRITERS_WAIT` seconds, the block runs
    unlocked, as before.
    """
    key = os.path.dirname(os.path.realpath(path))  # (a link and its target: one lock)
    held: dict[str, int] = _HELD.__dict__.setdefault("depth", {})
    if key in held:
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    try:
        import fcntl
        fd = os.open(key, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here, or no directory (the caller says so)
        yield
        return
    try:
        _take(fcntl, fd)
        held[key] = 1
        try:
            yield
        finally:
            del held[key]
    finally:
        os.close(fd)  # (closing releases the lock)


def _take(fcntl: Any, fd: int) -> None:
    """Lock ``fd`` exclusively, waiting at most :data:`WRITERS_WAIT` seconds.

    Past that (a process stopped inside its block, a recovery of a huge file) the caller
    goes on unlocked, as without the lock: the lock covers every run file of the
    directory, and a file of another run must not wait for ever.
    """
    deadline = time.monotonic() + WRITERS_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)
        except OSError:  # a file system without flock
            return


def pid_alive(pid: int) -> bool:
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
    # the file a link names: replaced beside it, the link kept (the copy had replaced the
    # link itself, and the crashed file stayed where it pointed)
    path = Path(os.path.realpath(path))
    try:
        src = h5py.File(path, "r", libver="latest", swmr=True, locking=LOCKING)
    except _DAMAGED as err:
        if not _plainly_open(err):
            raise RunFileError(f"{path}: not a readable HDF5 file ({_h5_reason(err)})") from None
        # killed out of SWMR mode: the flag-cleared copy replaces the file
        tmp = _cleared_copy(path)
        try:
            with h5py.File(tmp, "r", libver="latest", locking=LOCKING) as check:
                _check_format(check, path)
                _refuse_live_writer(check, path)
        except BaseException:
            _discard(tmp)
            raise
        _replace(tmp, path)
        return
    tmp = None
    try:
        _check_format(src, path)
        _refuse_live_writer(src, path)
        _sweep_stale_copies(path)
        _refuse_without_room_for_a_copy(path)
        fd, tmp = tempfile.mkstemp(prefix=_copy_prefix(path), suffix=".recover",
                                   dir=path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w", libver="latest", locking=LOCKING) as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for key in src:
                    src.copy(src[key], dst, name=key)
        except OSError as err:  # the disk filled up under the copy
            raise RunFileError(f"{path}: its writer was killed, and the copy that reopens "
                               f"it could not be written ({_h5_reason(err)})") from None
    except BaseException:
        if tmp is not None:  # no half-written copy left beside the run
            _discard(tmp)
        raise
    finally:
        src.close()
    _replace(tmp, path)


def _refuse_without_room_for_a_copy(path: Path) -> None:
    """Refuse to recover ``path`` when its disk cannot hold a copy of it (and a margin).

    A crashed run resumed on a nearly full disk raised HDF5's raw "Unable to create file"
    from inside the recovery, and left nothing to tell what to do.
    """
    try:
        size = os.path.getsize(path)
        free = shutil.disk_usage(path.parent).free
    except OSError:  # cannot tell: the copy says so if it fails
        return
    if free < size + DISK_MARGIN:
        raise RunFileError(
            f"{path}: its writer was killed, and reopening it takes a copy of it beside it "
            f"({size / 2**20:.1f} MiB); {free / 2**20:.1f} MiB are free on its disk: free "
            "some space (or write to another path)")


def _replace(copy: Path | str, path: Path) -> None:
    """Put a recovered ``copy`` in place of ``path``, with ``path``'s permissions.

    The copy was made by ``mkstemp`` (mode 0600): a run another user or a dashboard read
    would become unreadable to them. The owner and group are kept where this process may
    set them (as root, or its own group).
    """
    stat = os.stat(path)
    shutil.copymode(path, copy)
    with contextlib.suppress(OSError, AttributeError):  # not ours to give away; Windows
        os.chown(copy, stat.st_uid, stat.st_gid)
    os.replace(copy, path)


def running_here(pid: int | None, host: str | None) -> bool:
    """Whether a recorded writer is another process that still runs on this host.

    ``pid`` and ``host``: the file's ``writer_pid`` and ``writer_host`` attributes.
    """
    return (pid is not None and pid > 0 and host == socket.gethostname()
            and pid != os.getpid() and pid_alive(pid))


def _live_writer(f: h5py.File) -> int | None:
    """The pid of the file's recorded writer when it is another process still running here."""
    owner_pid = int(_attr_value(f.attrs.get("writer_pid", -1)))
    owner_host = _attr_value(f.attrs.get("writer_host", ""))
    return owner_pid if running_here(owner_pid, owner_host) else None


def _being_written(path: Path, pid: int) -> RunFileError:
    """The refusal of a file that process ``pid`` is writing."""
    return RunFileError(f"{path}: is being written by another process (pid {pid})")


def _refuse_live_writer(f: h5py.File, path: Path) -> None:
    """Raise when the process recorded as the file's writer still runs on this host."""
    owner_pid = _live_writer(f)
    if owner_pid is not None:
        raise _being_written(path, owner_pid)


def open_for_reading_here(err: BaseException) -> bool:
    """Whether HDF5 refused a write because this process holds the file open to read.

    HDF5 keeps one list of open files per process: a ``Run`` left open (a notebook's
    ``run = callback.run()``) makes a later writer fail with "already open for read-only"
    (appending) or "unable to truncate a file which is already open" (``mode="w"``).
    """
    text = str(err)
    return "already open for read-only" in text or "truncate a file which is already open" in text


def read_here_message(path: Path) -> str:
    """The one line for :func:`open_for_reading_here`."""
    return (f"{path}: is open for reading in this process (a Run from Run.open() or "
            "callback.run() not closed yet): close it first (run.close(), or read it in "
            "'with Run.open(path) as run:'), or write to another path")


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
        if open_for_reading_here(err):
            raise RunFileError(read_here_message(path)) from None
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
