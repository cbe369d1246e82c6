"""What a distillation run says when its numbers or its checkpoint are wrong, naming where the
fault is rather than guessing: :func:`divergence_message` (a loss that became NaN or infinite:
which learned tensor of the synthetic set, or the real images, holds the non-finite values, and
since when), :func:`evaluation_failure_message` (the same for an evaluation of the set),
:func:`kept_message` (what is on disk to continue from, only if it is there) and
:func:`check_checkpoint` (the fields, their types and their values of a ``last.pt`` before
``--resume`` continues it) and :func:`restore_position` (restoring it, a part that does not fit
named in one line). ``methods.runner`` calls them; nothing here knows a command line
beyond naming the flags in its messages.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

import utils


def _count_non_finite(tensor: Optional[torch.Tensor]) -> int:
    """How many entries of a floating (or complex) ``tensor`` are NaN or infinite; 0 for ``None``,
    integer and boolean tensors."""
    if tensor is None or not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    return int((~torch.isfinite(tensor.detach())).sum())


def non_finite_parts(syn) -> List[str]:
    """The learned tensors of a synthetic set (``methods.synthetic.SyntheticSet``) that hold NaN or
    infinite values, each as ``'the synthetic images (12 of 768 values)'``; labels first (a
    non-finite label spreads into the images' gradient, not the other way round), then the images,
    the learned step size, the learned step schedule and the add-ons' learned tensors. Empty when
    every one is finite."""
    parts = [("the soft-label logits", syn.label_logits), ("the learned label values", syn.label_values),
             ("the synthetic labels", syn.labels), ("the synthetic images", syn.images),
             ("the learned step size (syn_lr)", syn.syn_lr), ("the learned step schedule", syn.step_lr_raw),
             *((f"the add-on's learned {name}", value) for name, value in syn.extras.items())]
    found = []
    for name, tensor in parts:
        bad = _count_non_finite(tensor)
        if bad:
            found.append(f"{name} ({bad} of {tensor.numel()} values)")
    return found


def divergence_message(method: str, exp: int, iteration: int, loss: float, syn, first_iteration: int,
                       at_start: Sequence[str], origin: str, real_images: Optional[torch.Tensor] = None) -> str:
    """The line for a loss that became ``loss`` (NaN or infinite) at ``iteration`` of experiment
    ``exp``, naming where the non-finite values are:

    - ``at_start`` (:func:`non_finite_parts` of the set before this process's first iteration
      ``first_iteration`` of the experiment): the set held them from ``origin`` (``'their
      initialisation'`` or ``'the resumed checkpoint'``);
    - the real training images ``real_images`` (N, C, H, W) the method matches hold them;
    - else the set was finite at the start and the loss finite up to ``iteration - 1``: an update
      made the learned tensors :func:`non_finite_parts` of ``syn`` now names diverge (a smaller
      ``--lr_img`` is suggested when the images alone did), or, with every learned tensor still
      finite, the value arose inside this iteration's loss.

    A method's step computes the loss of the set before its update and then updates it, so the
    state after the failing iteration cannot tell where it began; hence ``at_start``.

    Returns:
        One line, without what was kept (:func:`kept_message`).
    """
    head = f"{method} loss became {loss} at experiment {exp}, iteration {iteration}"
    if at_start:
        return f"{head}: {' and '.join(at_start)} held NaN or infinite values from {origin}, before any update"
    bad_real = _count_non_finite(real_images)
    if bad_real:
        return (f"{head}: the real training images hold {bad_real} NaN or infinite values (the dataset files); "
                "the synthetic set was finite at the start")
    since = (f"the loss was finite up to iteration {iteration - 1}" if iteration > first_iteration
             else "this is its first iteration here")
    now = non_finite_parts(syn)
    if iteration > first_iteration and now:
        hint = ("try a smaller --lr_img" if len(now) == 1 and now[0].startswith("the synthetic images")
                else "a learning rate too large for them")
        return (f"{head}: the synthetic set was finite at the start and {since}; an update made "
                f"{' and '.join(now)} NaN or infinite ({hint})")
    return (f"{head}: the synthetic set was finite at the start, the real images are finite and {since}, so the "
            "value arose inside this iteration's loss (a step size too large for it: --lr_img, or the method's "
            "inner step sizes)")


def evaluation_failure_message(error: FloatingPointError, exp: int, iteration: int, syn) -> str:
    """The line for an evaluation of experiment ``exp``'s set after ``iteration`` (0: the initial
    set) whose training loss became NaN or infinite (``error``): the learned tensors of ``syn``
    that are non-finite (:func:`non_finite_parts`), or that the set is finite and the evaluation's
    own training diverged. Without what was kept (:func:`kept_message`)."""
    parts = non_finite_parts(syn)
    where = (f"NaN or infinite values in {' and '.join(parts)}" if parts else
             "the set is finite, so the evaluation's training diverged (its step size: --lr_net, or the "
             "learned one, is too large for this set)")
    return f"evaluating the set of experiment {exp} after iteration {iteration}: {error}: {where}"


def kept_message(checkpoint_path: str, checkpointed: Optional[tuple], result_path: str, finished: int) -> str:
    """What a run that failed leaves to continue from, checked on disk: the checkpoint
    ``checkpoint_path`` (experiment and iteration ``checkpointed``) if the file exists, and the
    result file ``result_path`` with its ``finished`` experiments if it exists; otherwise that
    nothing was kept."""
    kept = []
    if os.path.isfile(checkpoint_path):
        where = f" (experiment {checkpointed[0]}, iteration {checkpointed[1]})" if checkpointed else ""
        kept.append(f"checkpoint {checkpoint_path}{where} is kept")
    if finished and os.path.isfile(result_path):
        kept.append(f"result file {result_path} with {finished} finished experiment(s) is kept")
    if not kept:
        return "no checkpoint or result was written before it, so nothing is kept (--checkpoint_every writes one)"
    return "; ".join(kept)


# The fields of a checkpoint written by methods.runner (DistillationRun.checkpoint), with their types; a field
# missing from older checkpoints is read with a default there, so only these are required.
_REQUIRED = {"config": dict, "exp": int, "iteration": int, "data_save": list, "summary_rows": list}
_OPTIONAL = {"num_exp": int, "seed": int, "pending_eval": bool, "syn": (dict, type(None)),
             "method": (dict, type(None)), "generator": (torch.Tensor, type(None)), "rng": (dict, type(None)),
             "learned_lr": list, "schedules": list, "accs_by_exp": list, "accs_all_exps": dict, "finished": list,
             "best": list, "selection": (dict, type(None))}
_NAMES = {int: "an integer", bool: "a boolean", dict: "a mapping", list: "a list", torch.Tensor: "a tensor",
          str: "a string", float: "a number", tuple: "a list"}


def _kind(value: object) -> str:
    return "a boolean" if isinstance(value, bool) else _NAMES.get(type(value), f"a {type(value).__name__}")


def _wanted(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("none" if t is type(None) else _NAMES.get(t, t.__name__) for t in types)


def _type_ok(value: object, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:  # True is an int to Python, not to a checkpoint
        return False
    return isinstance(value, types)


def first_non_finite(value: object, where: str) -> Optional[str]:
    """The first floating tensor inside ``value`` (dicts, lists and tuples, walked in order) that
    holds NaN or infinite values, as ``"WHERE['images'] (3 of 48 values)"``; ``None`` if every
    one is finite."""
    stack = [(where, value)]
    while stack:
        name, item = stack.pop()
        if torch.is_tensor(item):
            bad = _count_non_finite(item)
            if bad:
                return f"{name} ({bad} of {item.numel()} values)"
        elif isinstance(item, dict):
            stack.extend(reversed([(f"{name}[{key!r}]", sub) for key, sub in item.items()]))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(f"{name}[{index}]", sub) for index, sub in enumerate(item)]))
    return None


def check_checkpoint(saved: dict, path: str) -> None:
    """Refuse a checkpoint whose fields a resume cannot use, before anything is restored from it:
    a required field missing, a field of the wrong type (``exp`` a string, ``config`` a list,
    ...), a negative position, entries of its per-experiment lists of the wrong type, or a NaN or
    infinite value in any of its tensors (the set in progress, the method's state, a finished
    set), named by its place in the file.

    Args:
        saved: what ``storage.load_checkpoint`` read from ``path`` (a dict).
        path: the checkpoint file, for the messages.

    Raises:
        utils.UserError: one line ``--resume: PATH ...`` naming the field and what is wrong.
    """
    fix = "remove it to start again, or use another --run_dir"
    for name, types in [*_REQUIRED.items(), *_OPTIONAL.items()]:
        if name not in saved:
            if name in _REQUIRED:
                raise utils.UserError(f"--resume: {path} has no '{name}' field; it cannot be continued: {fix}")
            continue
        if not _type_ok(saved[name], types):
            raise utils.UserError(f"--resume: {path}: field '{name}' is {_kind(saved[name])}, expected {_wanted(types)}; "
                                  f"it cannot be continued: {fix}")
    if "accs_by_exp" not in saved and "accs_all_exps" not in saved:
        raise utils.UserError(f"--resume: {path} has no 'accs_by_exp' field (nor the older 'accs_all_exps'); it "
                              f"cannot be continued: {fix}")
    for name in ("exp", "iteration", "num_exp"):
        if name in saved and saved[name] < 0:
            raise utils.UserError(f"--resume: {path}: field '{name}' is {saved[name]}, expected 0 or more; {fix}")
    entry_types = {"data_save": (list, tuple), "summary_rows": dict, "accs_by_exp": dict, "finished": dict,
                   "best": (dict, type(None)), "schedules": (dict, type(None)), "learned_lr": (int, float)}
    for name, types in entry_types.items():
        for index, entry in enumerate(saved.get(name) or []):
            if not isinstance(entry, types) or (name == "learned_lr" and isinstance(entry, bool)):
                raise utils.UserError(f"--resume: {path}: entry {index} of '{name}' is {_kind(entry)}, expected "
                                      f"{_wanted(types)}; it cannot be continued: {fix}")
    for model, accs in (saved.get("accs_all_exps") or {}).items():
        if not isinstance(accs, (list, tuple)):
            raise utils.UserError(f"--resume: {path}: 'accs_all_exps' of {model!r} is {_kind(accs)}, expected a list; "
                                  f"it cannot be continued: {fix}")
    for index, entry in enumerate(saved["data_save"]):
        if len(entry) < 2 or not all(torch.is_tensor(t) for t in entry[:2]):
            raise utils.UserError(f"--resume: {path}: entry {index} of 'data_save' is not [images, labels, ...] "
                                  f"(tensors); it cannot be continued: {fix}")
    for index, entry in enumerate(saved.get("finished") or []):
        if not _type_ok(entry.get("iteration"), int):
            raise utils.UserError(f"--resume: {path}: entry {index} of 'finished' has no integer 'iteration'; {fix}")
    for name, value in saved.items():
        bad = None if name in ("rng", "generator") else first_non_finite(value, str(name))
        if bad is not None:
            raise utils.UserError(f"--resume: {path} holds NaN or infinite values in {bad}; the run it saved had "
                                  f"diverged, so it cannot be continued: {fix}")


def restore_position(checkpoint_path: str, exp: int, position: dict, method, syn, generator) -> None:
    """Continue experiment ``exp`` from ``position`` (``methods.runner`` ``position``, read from
    ``last.pt``): the set (``SyntheticSet.load_state_dict``), the method's state, the generator's
    and the global RNG states.

    Raises:
        utils.UserError: one line naming ``checkpoint_path`` and the part that does not fit (a
            tensor of another shape, a missing entry, a value of the wrong type).
    """
    parts = (("synthetic set", lambda: syn.load_state_dict(position["syn"])),
             ("method state", lambda: method.load_state_dict(position["method"])),
             ("generator state", lambda: generator.set_state(position["generator"])),
             ("random-number states", lambda: utils.set_rng_state(position["rng"])))
    for name, load in parts:
        try:
            load()
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
            detail = " ".join(str(error).split())[:300] or type(error).__name__
            raise utils.UserError(f"--resume: {checkpoint_path}: its {name} of experiment {exp} cannot be "
                                  f"restored ({type(error).__name__}: {detail}); it cannot be continued: remove "
                                  "it to start again, or use another --run_dir") from None
