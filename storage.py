"""Files the toolkit writes: the one atomic writer (temporary file, then rename), JSON and text
through it, checkpoints (versioned, read back without running code) and numbered entries of a
directory. Knows no method."""
from __future__ import annotations

import json
import os
import re
from typing import Callable, List, Optional, Tuple

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
    is removed and the previous ``path`` is left as it was.

    Raises:
        OSError: one line, ``cannot write PATH (reason)``, saying whether the previous file is intact.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:160]
        kept = "; the previous file is intact" if os.path.exists(path) else ""
        raise OSError(f"cannot write {path} ({reason}){kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


TEMPORARY = re.compile(r"\.tmp(\d+)$")


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the temporary files :func:`atomic_write` leaves when its process was killed while
    writing (``NAME.tmpPID`` whose process no longer runs); returns their paths."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        match = TEMPORARY.search(name)
        if not match or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        path = os.path.join(directory, name)
        os.remove(path)
        removed.append(path)
    return removed


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
