"""Small generic helpers every layer may use: the user-error type, seeds and random-number
generators, device choice, flag-range checks and the resume-compatibility
check. Nothing here knows about any distillation method, the evaluation protocol or argparse.

Where the rest went: the evaluation protocol and training loop are the ``evaluation`` package;
atomic writes and checkpoints ``storage.py``; image grids ``pictures.py``; tables and number
formats ``tables.py``; chunked forward/backward passes ``chunked.py``; progress of long stages
``progress.py``.
"""
from __future__ import annotations

import logging
import random
from typing import List, Optional, Sequence

import numpy as np
import torch


logger = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake in what the user asked for (a flag value, a file); scripts print it on one line."""


# --------------------------------------------------------------------------------------------
# Seeds, generators, devices
# --------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) global RNGs once.

    Args:
        seed: any integer; the scripts use ``--seed + experiment index``.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded with ``seed``.

    All sampling of real images and augmentation parameters draws from such generators (on the
    CPU, then moved), so the global RNG is never reseeded.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return generator


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn a ``--device`` value into a ``torch.device``, once per script.

    Args:
        spec: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UserError: the value is not one of those, or asks for CUDA on a machine without it.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available on this machine (use --device cpu or auto)")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")


def rng_state() -> dict:
    """Capture the global RNG states (python, numpy, torch CPU, CUDA) for a checkpoint."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_flag_ranges(values: object, at_least_one: Sequence[str] = (), positive: Sequence[str] = (),
                      non_negative: Sequence[str] = ()) -> None:
    """Check the named attributes of ``values`` (a config whose fields are flag names).

    Raises:
        UserError: ``--NAME must be at least 1 / positive / >= 0, got V`` for the first value out of range.
    """
    for name in at_least_one:
        if getattr(values, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(values, name)}")
    for name in positive:
        if not getattr(values, name) > 0:
            raise UserError(f"--{name} must be positive, got {getattr(values, name)}")
    for name in non_negative:
        if not getattr(values, name) >= 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(values, name)}")


def config_differences(saved: dict, current: dict, flag_names: Optional[dict] = None) -> List[str]:
    """The toolkit's one resume-compatibility check: ``'--flag saved → current'`` for every key
    whose value differs between a saved and the current flat configuration (run checkpoints,
    expert buffers, original models); empty when they agree. ``flag_names`` maps a key to its
    flag's name where they differ (``iterations`` is ``--Iteration``)."""
    names = flag_names or {}
    keys = list(dict.fromkeys([*current, *saved]))
    return [f"--{names.get(key, key)} {saved.get(key)!r} → {current.get(key)!r}"
            for key in keys if saved.get(key) != current.get(key)]
