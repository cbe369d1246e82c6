"""Who owns a run directory (``--run_dir``): the files that make a directory a run of this toolkit
(:data:`RUN_FILES`) and the claim a process holds on one while it runs (:func:`claim_run_dir`:
a lock file taken with ``fcntl.flock``, :func:`storage.lock_directory`). ``methods.runner`` takes
the claim for the whole run; ``distill.py`` takes it before its ``log.txt`` is opened.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
from typing import Iterator, Optional

import storage
import utils

# Names (shell patterns) of the entries a run directory of this toolkit holds (module docstring),
# and their temporaries (storage.TEMPORARY): a non-empty directory with none of them is someone else's.
RUN_FILES = ("config.yaml", "last.pt", "res_*.pt", "best_*.pt", "summary.csv", "results.json", "log.txt",
             "logged_files", "vis_*.png", storage.LOCK_NAME)


def holds_run_files(directory: str) -> bool:
    """Whether ``directory`` holds an entry named as in :data:`RUN_FILES` (or a temporary of one)."""
    for name in os.listdir(directory):
        temporary = storage.TEMPORARY.fullmatch(name)
        base = temporary.group(1) if temporary else name
        if any(fnmatch.fnmatchcase(base, pattern) for pattern in RUN_FILES):
            return True
    return False


@contextlib.contextmanager
def claim_run_dir(run_dir: str, flag: str = "--run_dir", given: Optional[str] = None,
                  refuse_foreign: bool = True) -> Iterator[None]:
    """Make this process the owner of ``run_dir`` while the block runs: with ``refuse_foreign``, a
    directory that exists, is not empty and holds none of :data:`RUN_FILES` is refused; then the
    directory is created if needed and its lock taken (``storage.lock_directory``: ``.lock``,
    ``fcntl.flock``, released when the block ends, also on an exception; nothing is locked where
    ``fcntl`` does not exist). Re-entrant within one process. Under torchrun only rank 0 calls it.

    Args:
        run_dir: the run directory.
        flag: the flag that chose it, for the messages (``--save_path`` when derived from it).
        given: the flag's value as typed, when ``run_dir`` is derived from it.
        refuse_foreign: refuse a non-empty directory of other files (``distill.py``).

    Raises:
        utils.UserError: one line naming ``flag`` and ``run_dir``: a file, not a directory; a
            directory of other files; in use by another process (its id); a lock file that cannot
            be opened (a symbolic link planted at ``.lock``).
    """
    shown = f"{flag} {run_dir}" if given is None or os.path.normpath(given) == os.path.normpath(run_dir) else \
        f"{flag} {given}: run directory {run_dir}"
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise utils.UserError(f"{shown}: a file, not a directory")
    if refuse_foreign and os.path.isdir(run_dir) and os.listdir(run_dir) and not holds_run_files(run_dir):
        raise utils.UserError(f"{shown} is not empty and holds no run of this toolkit (no config.yaml, last.pt, "
                              "res_*.pt, results.json, ...); choose an empty or new --run_dir")
    os.makedirs(run_dir, exist_ok=True)
    lock_path = os.path.join(run_dir, storage.LOCK_NAME)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(storage.lock_directory(run_dir))
        except storage.DirectoryInUse as error:
            who = f"process {error.pid}" if error.pid else "another process"
            raise utils.UserError(f"{shown} is in use by {who} (it holds {lock_path}); wait for it to end, "
                                  "or choose another --run_dir") from None
        except OSError as error:
            raise utils.UserError(f"{shown}: cannot lock {lock_path} ({error.strerror or error})") from None
        yield
