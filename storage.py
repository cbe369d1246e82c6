"""Files the toolkit writes: the one atomic writer (temporary file, then rename), JSON and text
through it, checkpoints (versioned, read back without running code), numbered entries of a
directory, and the advisory lock that makes one process the owner of a directory. Knows no method."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

try:  # POSIX; on Windows directories are not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

import numpy as np
import torch

from data import PlainDataError, load_plain
from utils import UserError

# Version of the checkpoint layout written by :func:`save_checkpoint`.
CHECKPOINT_VERSION = 1


def numbered_entries(directory: str, pattern: "re.Pattern", require: Optional[str] = None) -> List[Tuple[int, str]]:
    """``(n, path)`` of the entries of ``directory`` whose name matches ``pattern`` (group 1 is the
    number ``n``), sorted by ``n``; with ``require``, only entries holding that file. Empty when the
    directory does not exist (numbered chunks of a buffer, ``index_{i}`` model folders)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = pattern.match(name)
        path = os.path.join(directory, name)
        if match and (require is None or os.path.isfile(os.path.join(path, require))):
            found.append((int(match.group(1)), path))
    return sorted(found)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """The toolkit's one atomic writer: ``write(tmp)`` writes a temporary file beside ``path``,
    which then replaces ``path`` (``os.replace``), so a run killed while saving never leaves a
    half-written file. The parent directory is created if needed; on an error the temporary file
    is removed and the previous ``path`` is left as it was. The temporary is ``PATH.tmpPID``
    (:data:`TEMPORARY`); an entry of that name found before writing (a link planted there) is
    removed first, and ``os.replace`` replaces a link at ``path`` rather than writing through it,
    so the write never follows a symbolic link.

    Raises:
        OSError: one line, ``cannot write PATH (reason)``, saying whether the previous file is
            intact; a full disk (:func:`disk_full`) reads ``no space left on device``.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.lexists(tmp):  # this process's own name: nothing else should be there
            os.remove(tmp)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:160]
        if disk_full(error, directory):
            reason = "no space left on device"
        kept = "; the previous file is intact" if os.path.exists(path) else "; nothing was replaced"
        raise OSError(f"cannot write {path} ({reason}){kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def disk_full(error: BaseException, directory: str) -> bool:
    """Whether a failed write ran out of space: ``ENOSPC``, or torch's zip writer's
    ``unexpected pos ... vs ...`` (how ``torch.save`` reports a short write) with less than 1 MiB
    free on the file system of ``directory``."""
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
        return True
    if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
        try:
            return shutil.disk_usage(directory).free < (1 << 20)
        except OSError:
            return False
    return False


# The name of :func:`atomic_write`'s temporary files, ``NAME.tmpPID`` (whole name; group 1: NAME,
# group 2: the writer's process id).
TEMPORARY = re.compile(r"(.+)\.tmp([1-9]\d{0,9})")


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporary files :func:`atomic_write` leaves when its process was killed while
    writing: regular files (not links or folders) of ``directory`` whose whole name is
    ``NAME.tmpPID`` (:data:`TEMPORARY`) and whose process no longer runs; returns their paths.
    Call it only while holding the directory's lock (:func:`lock_directory`), so that no other
    run of the toolkit writes there."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        match = TEMPORARY.fullmatch(name)
        if not match or int(match.group(2)) == os.getpid():
            continue
        try:
            if not stat.S_ISREG(os.lstat(os.path.join(directory, name)).st_mode):
                continue
        except OSError:
            continue
        try:
            os.kill(int(match.group(2)), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(directory, name)
        os.remove(path)
        removed.append(path)
    return removed


# The lock file :func:`lock_directory` holds inside the directory it locks.
LOCK_NAME = ".lock"
# Directories this process has locked: realpath of the lock file -> [file descriptor, holders].
_HELD: Dict[str, list] = {}


class DirectoryInUse(Exception):
    """Another process holds the lock of a directory (:func:`lock_directory`); ``pid`` is its
    process id as written in the lock file (None when it could not be read)."""

    def __init__(self, directory: str, pid: Optional[int]):
        super().__init__(f"{directory} is in use by " + (f"process {pid}" if pid else "another process"))
        self.directory, self.pid = directory, pid


def _lock_holder(fd: int) -> Optional[int]:
    """The process id written in an open lock file (its holder writes it right after locking, so a
    short wait covers a holder that has only just taken it); None if none can be read."""
    for _ in range(20):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


@contextlib.contextmanager
def lock_directory(directory: str) -> Iterator[Optional[str]]:
    """Hold an exclusive advisory lock (``fcntl.flock(LOCK_EX | LOCK_NB)``) on ``directory/.lock``
    (:data:`LOCK_NAME`, created if needed, never through a symbolic link; this process's id is
    written into it) while the block runs; yields the lock file's path. The lock is released when
    the block ends, also on an exception (the file descriptor is closed; the kernel releases it
    when a process dies). Re-entrant within one process: an inner ``lock_directory`` of a
    directory this process already holds shares the outer lock. Where ``fcntl`` does not exist
    (Windows) nothing is locked and it yields None. ``directory`` must exist.

    Raises:
        DirectoryInUse: another process holds the lock (its id, read from the file, in ``pid``).
        OSError: the lock file cannot be opened (a link planted at its name: ``ELOOP``).
    """
    if fcntl is None:
        yield None
        return
    path = os.path.join(os.path.realpath(directory), LOCK_NAME)
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield path
        finally:
            _HELD[path][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise DirectoryInUse(directory, _lock_holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[path] = [fd, 1]
        try:
            yield path
        finally:
            del _HELD[path]
    finally:
        os.close(fd)  # releases the lock


def atomic_save(obj: object, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write(text)
    atomic_write(path, write)


def write_json(path: str, obj: object) -> None:
    """Write ``obj`` as indented JSON (and a final newline) through :func:`atomic_write`."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: str, **state) -> None:
    """Write ``{'version': CHECKPOINT_VERSION, **state}`` atomically (temporary file, then rename)."""
    atomic_save({"version": CHECKPOINT_VERSION, **state}, path)


def _checkpoint_globals() -> list:
    """The only non-tensor types a checkpoint of ours holds beyond plain Python values: numpy's
    global RNG state (a uint32 array), allowed explicitly for ``torch.load(weights_only=True)``."""
    multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        UserError: the file is missing, unreadable or of another layout version.
    """
    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        state = load_plain(path, "checkpoint", _checkpoint_globals())
    except PlainDataError as error:  # a truncated or foreign file, or one that would run code
        raise UserError(f"--resume: {error}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"--resume: {path} is not a checkpoint of this toolkit (layout version {CHECKPOINT_VERSION})")
    return state
