"""``evaluate.py``'s label regimes and teacher: which regimes every set and random row is trained
under (``--label_regimes``; by default hard labels, the sets' own regime, and soft and teacher
labels whenever a teacher is known), and the teacher that labels them: the one the flags name
(``cli.teacher_flags``) or, without flags, the one recorded with the sets (``meta['teacher']``,
loaded again from its spec and checked to be the same networks by sha256)."""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence, Tuple

import evaluation
import utils
from cli import teacher_flags
from pretrained import teachers


def add_regime_args(parser: argparse.ArgumentParser) -> None:
    """``--label_regimes`` and the teacher flags (``cli.teacher_flags.add_teacher_args``)."""
    parser.add_argument("--label_regimes", nargs="+", default=None, choices=evaluation.LABEL_REGIMES,
                        help="train every set and random-real row under each of these label regimes (default: hard "
                             "and the sets' own regime, plus soft and teacher whenever a teacher is given or recorded "
                             "with the sets, so random real images with the teacher's labels are always beside them)")
    teacher_flags.add_teacher_args(parser)


def recorded_teacher(sets: Sequence) -> Optional[dict]:
    """The teacher record the sets share (``SavedSet.teacher``), or ``None`` when none records one.

    Raises:
        utils.UserError: the sets record different teachers (the flags must choose one).
    """
    found = {}
    for saved in sets:
        if saved.teacher is not None:
            found.setdefault(json.dumps(saved.teacher.get("spec"), sort_keys=True), (saved.path, saved.teacher))
    if len(found) > 1:
        paths = ", ".join(path for path, _ in found.values())
        raise utils.UserError(f"--syn_path: the sets were made with different teachers ({paths}); pass --teacher_model "
                              "or --teacher_arch/--teacher_path to choose the one every row is labelled by")
    return next(iter(found.values()))[1] if found else None


def label_regimes(args: argparse.Namespace, protocols: Sequence["evaluation.EvalProtocol"],
                  teacher_known: bool) -> Tuple[str, ...]:
    """The regimes every row is trained under, in ``evaluation.LABEL_REGIMES`` order:
    ``--label_regimes``, else hard, the sets' own (``protocol.labels`` after the flags) and, when a
    teacher is known, soft and teacher.

    Raises:
        utils.UserError: a regime that needs a teacher while none is given or recorded.
    """
    if args.label_regimes:
        wanted = set(args.label_regimes)
    else:
        wanted = {"hard", *(protocol.labels for protocol in protocols)}
        wanted |= {"soft", "teacher"} if teacher_known else set()
    needing = [regime for regime in evaluation.LABEL_REGIMES if regime in wanted and regime != "hard"]
    if needing and not teacher_known:
        flag = "--label_regimes" if args.label_regimes else "--labels (the sets' protocol)"
        raise utils.UserError(f"{flag} {needing[0]} needs a teacher and none is given or recorded with the sets: pass "
                              "--teacher_model (train_original.py models) or --teacher_arch with --teacher_path")
    return tuple(regime for regime in evaluation.LABEL_REGIMES if regime in wanted)


def resolve_teacher(args: argparse.Namespace, sets: Sequence) -> Tuple[Optional[teachers.TeacherSpec], Optional[dict]]:
    """``(spec, recorded)``: the teacher the flags name, else the one recorded with the sets (its
    spec), and the recorded record (to check a replay against); ``(None, None)`` without either.

    Raises:
        utils.UserError: invalid teacher flags; sets recording different teachers; a record
            whose teacher was built in memory (no spec to load it from).
    """
    spec = teacher_flags.teacher_spec(args)
    recorded = recorded_teacher(sets)
    if spec is None and recorded is not None:
        spec = teachers.TeacherSpec.from_dict(recorded)
    return spec, recorded


def load_evaluation_teacher(spec: teachers.TeacherSpec, recorded: Optional[dict], from_flags: bool, record, args,
                            device) -> teachers.Teacher:
    """Load ``spec`` for the test set's data (class count, channels, image size, ZCA) and, when it
    replays a recorded teacher without flags, check it is the recorded networks (sha256); with
    flags that name another teacher than the recorded one, say so in one line and use the flags'.

    Raises:
        utils.UserError: one line for a missing file, a file that would run code, another class
            count / input size / ZCA setting (``pretrained.teachers.load_teacher``) or a replayed
            teacher whose weights changed (``check_same_teacher``).
    """
    what = "the teacher given by the flags" if from_flags else "the teacher recorded with the set (meta['teacher'])"
    try:
        teacher = teachers.load_teacher(spec, device=device, dataset=args.dataset, num_classes=record.num_classes,
                                        channel=record.channel, im_size=record.im_size, zca=record.zca is not None,
                                        subset=getattr(args, "subset", None))
    except utils.UserError as error:
        raise utils.UserError(f"{what}: {error}") from None
    if recorded is not None and isinstance(recorded.get("networks"), list):
        try:
            teachers.check_same_teacher(recorded, teacher)
        except utils.UserError as error:
            if not from_flags:
                raise utils.UserError(f"{what}: {error}") from None
            print(f"note: the set was made with another teacher ({error}); every row is labelled by the flags' teacher")
    return teacher
