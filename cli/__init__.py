"""Pieces shared by the command-line scripts: common flags, logging set-up, and turning user
mistakes into one line on stderr with a non-zero exit (never a traceback)."""
from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, NoReturn

import data
import distributed
import networks
from flag_types import (Range, RangeError, at_least, fraction, greater_than, in_range,  # noqa: F401
                        non_negative_float, non_negative_int, positive_float, positive_int, seed_int)
import precision
import progress
import utils

# Exit codes: 1 for results written elsewhere than asked, 2 for a user mistake (as argparse), 3 for
# a numerical failure, 4 for a torchrun rank that did not answer (or a collective that failed), 130
# for a stop.
EXIT_RESCUED, EXIT_USER, EXIT_NUMERIC, EXIT_DISTRIBUTED, EXIT_STOPPED = 1, 2, 3, 4, 130


# argparse's message for a value a flag's type refused (flag_types.Range): the first name, the reason.
ARGUMENT_MESSAGE = re.compile(r"^argument (-[^\s/:]+)(?:/[^\s:]+)*: (must be .*)$")


class OneLineParser(argparse.ArgumentParser):
    """The stage scripts' parser: a mistake on the command line is one line on stderr and exit
    code 2 (argparse's), without the usage block: ``error: --num must be >= 1, got 0`` for a value
    outside the range its flag declares (``flag_types.Range``), argparse's own message otherwise
    (``error: argument --amp: invalid choice: ... (see --help)``)."""

    def error(self, message: str) -> NoReturn:
        match = ARGUMENT_MESSAGE.match(message)  # "argument --num: must be >= 1, got 0" -> "--num must be ..."
        fail(f"{match.group(1)} {match.group(2)}" if match else f"{message} (see --help)")


class TrueFalseFlag(argparse.Action):
    """A boolean flag that also takes a value: ``--dsa``, ``--no-dsa``, ``--dsa True``, ``--dsa false``,
    so the reference scripts' ``--dsa True/False`` strings keep working (and mean what they say)."""

    TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

    def __init__(self, option_strings, dest, default=None, help=None, **kwargs):
        names = list(option_strings) + [f"--no-{name[2:]}" for name in option_strings if name.startswith("--")]
        super().__init__(names, dest, nargs="?", default=default, help=help, metavar="True|False")

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
        elif values is None or values.strip().lower() in self.TRUE:
            setattr(namespace, self.dest, True)
        elif values.strip().lower() in self.FALSE:
            setattr(namespace, self.dest, False)
        else:
            parser.error(f"{option_string}: expected True or False, got {values!r}")


# The reference scripts' default; a --data_path the user gives must exist.
DEFAULT_DATA_PATH = "data"


# --cifar100_stats: CIFAR-100's own mean/std (DC/DSA/DM, DataDAM, CLoM) or CIFAR-10's, which the
# CIFAR-100 loaders of mtt-distillation, DATM, PAD and CAFE use (their published tables were made so).
CIFAR100_STATS = ("cifar100", "cifar10")
# --norm_stats: the fixed per-dataset mean/std of DC's utils.get_dataset ("dc"), or the mean/std
# computed from the training images ("train": the KIP colab's get_normalization_data).
NORM_STATS = ("dc", "train")


def add_data_args(parser: argparse.ArgumentParser, cifar100_stats_default: str = "cifar100",
                  zca_default: str | None = None, norm_stats_default: str = "dc") -> None:
    """``--dataset --data_path --zca --download --res --subset --cifar100_stats --norm_stats``
    (reference names; ``cifar100_stats_default`` and ``norm_stats_default`` are what the help names
    as the default when the flag is left out).
    ``zca_default``: None keeps ``--zca`` off when left out; a text (``distill.py``: the methods'
    per-dataset defaults) makes the flag's default ``None`` (resolved later) and is named in its help."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="CIFAR10", help="MNIST, FashionMNIST, SVHN, CIFAR10, CIFAR100, "
                       "TinyImageNet (or Tiny), imagenette/imagewoof/imagefruit/imagemeow/imagesquawk/imageyellow, MHIST")
    group.add_argument("--data_path", default=DEFAULT_DATA_PATH, help="dataset root (FashionMNIST is also found in "
                       "/usr/share/datasets/fashion-mnist without it)")
    group.add_argument("--zca", action=argparse.BooleanOptionalAction, default=None if zca_default else False,
                       help="ZCA-whiten the data (eps 0.1); saved images stay whitened, pictures are inverted"
                            + (f" (default: {zca_default})" if zca_default else ""))
    group.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                       help="let torchvision download missing datasets (needs internet)")
    group.add_argument("--res", type=positive_int, default=None, help="image side in pixels for MHIST / ImageNet subsets")
    group.add_argument("--subset", default=None, help="ImageNet subset name when --dataset is ImageNet-style")
    group.add_argument("--cifar100_stats", default=None, choices=CIFAR100_STATS,
                       help="mean/std that normalise CIFAR100 (no effect on other datasets or with --zca): its own, "
                            "or CIFAR10's as mtt-distillation, DATM, PAD and CAFE do "
                            f"(default: {cifar100_stats_default})")
    group.add_argument("--norm_stats", default=None, choices=NORM_STATS,
                       help="mean/std that normalise the images (no effect with --zca): dc, the fixed per-dataset "
                            "values of DC's utils.get_dataset, or train, computed from the training images as the "
                            "KIP colab does (then --cifar100_stats has no effect); the set's own are recorded "
                            f"(default: {norm_stats_default})")


# --threads: torch.set_num_threads overflows past 2**31 - 1 and crashes the process far below it.
THREADS = in_range(1, 1024, int)
DIST_TIMEOUT_HELP = (
    "torchrun: seconds a rank may neither reach a collective nor finish a training step before every rank "
    "stops with one line naming it (also the process group's timeout). A working rank reports each training "
    "step, so this must exceed the longest stretch without one: one step of the slowest network, rank 0 "
    "writing a checkpoint, or the dataset loaded before the first collective, not a whole evaluation share. "
    f"Default: the environment variable {distributed.TIMEOUT_ENV}, else {distributed.DEFAULT_TIMEOUT_S:g} "
    "(10 minutes)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """``--seed --device --threads --dist_timeout``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=seed_int, default=0, help="base seed; experiment e uses seed + e")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    group.add_argument("--threads", type=THREADS, default=None, help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--dist_timeout", type=greater_than(0.0), default=None, metavar="SECONDS",
                       help=DIST_TIMEOUT_HELP)
    group.add_argument("--max_file_gb", type=greater_than(0.0), default=data.plain.DEFAULT_MAX_BYTES / 2 ** 30,
                       metavar="GIB",
                       help="largest input file (set, checkpoint, buffer, model) in GiB, and the most its tensors may "
                            "declare, checked before it is read (default 64: an ImageNet-1K set at ipc 50 is 28 GiB)")


AMP_HELP = ("mixed precision of forward passes (torch.autocast; fp16 adds a GradScaler, refused on CPU); "
            "parameters and synthetic images stay fp32. Default off (fp32). bf16 on CPU moved DC and DM "
            "evaluation accuracy by under 0.1 point; fp16 and CUDA not yet run (docs/results.md, Mixed precision)")


def add_amp_arg(parser: argparse.ArgumentParser) -> None:
    """``--amp off|bf16|fp16`` (``precision.Precision``) for the stage scripts that train networks."""
    parser.add_argument("--amp", default="off", choices=precision.AMP_CHOICES, help=AMP_HELP)


def setup_precision(args: argparse.Namespace, device) -> "precision.Precision":
    """Resolve ``--amp`` once for ``device`` (:func:`precision.resolve_precision`).

    Raises:
        utils.UserError: a precision this device cannot run (``fp16`` on CPU).
    """
    try:
        return precision.resolve_precision(getattr(args, "amp", None), device)
    except precision.PrecisionError as error:
        raise utils.UserError(str(error)) from None


def dist_timeout(args: argparse.Namespace) -> float:
    """``--dist_timeout`` in seconds (``distributed.resolve_timeout``: the flag, else
    ``DD_DIST_TIMEOUT_S``, else ``distributed.DEFAULT_TIMEOUT_S``), checked whether or not torchrun
    started this process.

    Raises:
        utils.UserError: not a finite number above 0 (one line naming the flag or the variable).
    """
    try:
        return distributed.resolve_timeout(getattr(args, "dist_timeout", None))
    except ValueError as error:
        raise utils.UserError(str(error)) from None


def setup_runtime(args: argparse.Namespace):
    """Apply ``--threads``, resolve ``--device`` and ``--dist_timeout`` once and, when torchrun
    started this process, join its process group (``distributed.init``: NCCL on CUDA with
    ``cuda:LOCAL_RANK``, gloo on CPU); returns this rank's ``torch.device``.

    Raises:
        utils.UserError: an unusable ``--device`` or ``--dist_timeout``, or a ``LOCAL_RANK``
            without its GPU.
    """
    import torch

    timeout_s = dist_timeout(args)
    if getattr(args, "max_file_gb", None):
        data.set_max_bytes(int(args.max_file_gb * 2 ** 30))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.resolve_device(args.device)
    try:
        return distributed.init(device, timeout_s=timeout_s)
    except ValueError as error:
        raise utils.UserError(f"--device {args.device}: {error}") from None


def quiet_other_ranks() -> None:
    """Under torchrun, send the standard output of every rank but 0 to ``os.devnull``, so that a
    script's printed report appears once; nothing for one process."""
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")


def normalize_like(args: argparse.Namespace, cifar100_stats_default: str = "cifar100",
                   norm_stats_default: str = "dc") -> str | None:
    """The ``data.load_dataset(normalize_like=...)`` value of the data flags: ``data.TRAIN_STATS``
    with ``--norm_stats train`` (or that default) and no ZCA; ``'CIFAR10'`` for CIFAR100 with
    ``--cifar100_stats cifar10`` (or that default) and no ZCA; else ``None``."""
    if (getattr(args, "norm_stats", None) or norm_stats_default) == "train" and not args.zca:
        from data import TRAIN_STATS

        return TRAIN_STATS
    stats = args.cifar100_stats or cifar100_stats_default
    if args.dataset.lower() == "cifar100" and stats == "cifar10" and not args.zca:
        return "CIFAR10"
    return None


def load_record(args: argparse.Namespace, device=None, cifar100_stats_default: str = "cifar100",
                norm_stats_default: str = "dc"):
    """The dataset named by the data flags (``data.load_dataset``); ZCA is fitted on ``device``;
    the images are normalised as :func:`normalize_like` says.

    Raises:
        data.DatasetError: the dataset is unknown or its files are missing (one line).
    """
    from data import DatasetError, load_dataset
    from data.torchvision_sets import FASHION_MNIST_SYSTEM_DIR

    if os.path.exists(args.data_path) and not os.path.isdir(args.data_path):
        raise utils.UserError(f"--data_path {args.data_path}: a file, not a directory")
    # A typo must not fall back silently to the system copy Fashion-MNIST is also found in.
    if (args.data_path != DEFAULT_DATA_PATH and not args.download and not os.path.isdir(args.data_path)
            and args.dataset.lower() == "fashionmnist"):
        raise utils.UserError(f"--data_path {args.data_path}: no such directory (leave --data_path out to use "
                              "the system Fashion-MNIST)")
    try:
        return load_dataset(args.dataset, args.data_path, zca=args.zca, download=args.download, res=args.res,
                            subset=args.subset, zca_device=device if device is not None else "cpu",
                            normalize_like=normalize_like(args, cifar100_stats_default, norm_stats_default))
    except DatasetError as error:
        # A first command on a fresh machine: point at the dataset that is there.
        if "not found" in str(error) and args.dataset.lower() != "fashionmnist" and os.path.isdir(FASHION_MNIST_SYSTEM_DIR):
            raise DatasetError(f"{error}; Fashion-MNIST is installed on this machine: --dataset FashionMNIST "
                               "runs without any file") from None
        raise


class NoFollowFileHandler(logging.FileHandler):
    """A ``logging.FileHandler`` (append) that never opens its file through a symbolic link
    (``O_NOFOLLOW``): a link planted at a run's ``log.txt`` is an ``OSError`` (``ELOOP``), not a
    write into the file it points to."""

    def _open(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        return os.fdopen(os.open(self.baseFilename, flags, 0o644), "a", encoding=self.encoding, errors=self.errors)


def setup_logging(log_file: str | None = None, quiet: bool = False) -> None:
    """Console (stderr) and optional file logging for the scripts; ``quiet`` keeps warnings and the
    progress lines of long stages (``progress.Progress``, shown when stderr is not a terminal).
    Under torchrun only rank 0 logs at that level and writes ``log_file``; the other ranks print
    warnings and errors only, prefixed with their rank. ``log_file`` is appended to, never through
    a symbolic link (:class:`NoFollowFileHandler`).

    Raises:
        utils.UserError: ``log_file`` is a symbolic link (or cannot be opened), in one line.
    """
    handlers = [logging.StreamHandler(sys.stderr)]
    if not distributed.is_main():
        logging.basicConfig(level=logging.WARNING, handlers=handlers, force=True,
                            format=f"%(asctime)s rank {distributed.rank()} %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        return
    if log_file:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        if os.path.islink(log_file):
            raise utils.UserError(f"{log_file} is a symbolic link; the log is never written through one "
                                  "(remove it, or choose another output folder)")
        try:
            handlers.append(NoFollowFileHandler(log_file))
        except OSError as error:
            raise utils.UserError(f"{log_file}: cannot write the log ({error.strerror or error})") from None
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    progress.progress_logger.setLevel(logging.INFO)


def resolve_eval_models(eval_mode: str, model: str, family: str = "DC") -> list:
    """Networks of an ``--eval_mode`` pool of ``family`` (``networks.FAMILY_POOLS``: ``"DC"`` or
    ``"MTT"``), each checked against the network registry.

    Raises:
        utils.UserError: unknown mode or network name.
    """
    try:
        models = networks.get_eval_pool(eval_mode, model, family=family)
    except (KeyError, ValueError) as error:
        raise utils.UserError(f"--eval_mode {eval_mode}: {error.args[0] if error.args else error}") from None
    check_models(models, "--eval_mode")
    return models


def check_models(models, flag: str) -> None:
    """Raise a one-line ``UserError`` naming ``flag`` if a network name is unknown."""
    known = set(networks.list_networks())
    for name in models:
        if name not in known:
            raise utils.UserError(f"{flag}: unknown model {name!r}; choose from: {', '.join(networks.list_networks())}")


def command_line(argv=None) -> str:
    """The command that started this process, shell-quoted (``argv`` when a script's ``main`` was
    called with one; otherwise ``sys.argv``), for the records a run writes."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([os.path.basename(sys.executable), sys.argv[0], *args])


def log_to_files(message: str) -> None:
    """Append ``message`` as an ERROR record to the log files :func:`setup_logging` opened (the
    run's ``log.txt``), not to the console, where :func:`fail` has printed it already."""
    record = logging.LogRecord("cli", logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def fail(message: str, code: int = EXIT_USER) -> NoReturn:
    """Print ``error: message`` on one line (also into the log file, if one is open) and exit."""
    print(f"error: {message}", file=sys.stderr)
    log_to_files(f"error: {message}")
    sys.exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop), raised where the script is, like Ctrl-C's ``KeyboardInterrupt``."""


def _raise_terminated(signum, frame):
    raise Terminated


def stop_word(stop: KeyboardInterrupt) -> str:
    """``'terminated (SIGTERM)'`` or ``'interrupted'`` (Ctrl-C), for a stage's stop message."""
    return "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"


# What a stopped torchrun job keeps when the stage does not say more (every file is written whole).
DIST_KEPT = "files written before it are kept whole"


@contextmanager
def user_errors(on_stop: str = "nothing was written; run the same command again"):
    """Turn the toolkit's user-facing exceptions into one line: exit code 2 for a user mistake,
    3 for a NaN/Inf loss, 130 for Ctrl-C or SIGTERM outside the distillation loop (which
    checkpoints first), saying ``on_stop`` (what is kept, how to continue), 4 for a torchrun rank
    that did not answer (``distributed.CollectiveError``, with what the stage says it kept, or a
    torch.distributed failure, ``distributed.backend_failure``). SIGTERM is turned
    into :class:`Terminated` (a ``KeyboardInterrupt``) while the block runs, so a stage's own
    ``except KeyboardInterrupt`` (buffer.py, train_original.py) reports both alike."""
    from data import DatasetError

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    except (utils.UserError, DatasetError) as error:
        fail(str(error))
    except FloatingPointError as error:
        fail(str(error), EXIT_NUMERIC)
    except distributed.CollectiveError as error:  # torchrun: a rank did not answer
        fail(f"{error}; every rank stops; {error.kept or DIST_KEPT}", EXIT_DISTRIBUTED)
    except RuntimeError as error:  # a torch.distributed failure outside distributed's collectives (--ddp)
        line = distributed.backend_failure(error)
        if line is None:
            raise
        fail(f"{line}; every rank stops; {DIST_KEPT}", EXIT_DISTRIBUTED)
    except OSError as error:  # an output that could not be written (full disk, permissions)
        fail(str(error) if str(error).startswith("cannot write") else f"{type(error).__name__}: {error}")
    except KeyboardInterrupt as stop:
        fail(f"{stop_word(stop)}; {on_stop}", EXIT_STOPPED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_or_rescue(write: Callable[[str], object], path: str, flag: str) -> object:
    """``write(path)``; if that fails at the end of a long computation, write the same results to
    a new file in the working directory (or, failing that, the temporary directory) rather than
    lose them, and end with one line naming both. Returns what ``write`` returned.

    Raises:
        SystemExit: code :data:`EXIT_RESCUED` after a rescue, :data:`EXIT_USER` when nothing
            could be written anywhere.
    """
    try:
        return write(path)
    except OSError as error:
        stem, suffix = os.path.splitext(os.path.basename(path))
        name = f"{stem}.rescued-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{suffix}"
        tried = []
        for folder in dict.fromkeys([os.getcwd(), tempfile.gettempdir()]):
            rescue = os.path.join(folder, name)
            try:
                write(rescue)
            except OSError:
                tried.append(folder)
                continue
            fail(f"{flag} {path}: {error}; the results were written to {rescue} instead", EXIT_RESCUED)
        fail(f"{flag} {path}: {error}; {', '.join(tried)} were not writable either, so only the printed table "
             "is left", EXIT_USER)


def refuse_inputs_as_outputs(flag: str, value: str, outputs, inputs) -> None:
    """Outputs never replace inputs: refuse when an existing file of ``outputs`` (paths derived from
    ``flag``'s ``value``: the file itself, a CSV or PNG beside it) is one of ``inputs`` (files the
    stage reads or that record them), the same file also through a hard or symbolic link
    (``os.path.samefile``).

    Raises:
        utils.UserError: one line naming ``flag`` and the input.
    """
    existing = [path for path in inputs if os.path.isfile(path)]
    for output in outputs:
        if not os.path.exists(output):
            continue
        for source in existing:
            if os.path.samefile(output, source):
                what = "" if os.path.normpath(output) == os.path.normpath(value) else f"{output}, written beside it, "
                raise utils.UserError(f"{flag} {value}: {what}is the input {source}; outputs never replace inputs, "
                                      f"choose another {flag}")


def _file_in_the_way(folder: str) -> str | None:
    """The nearest existing ancestor of ``folder`` (itself included) when it is not a directory."""
    current = os.path.normpath(folder)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent in ("", current):
            return None
        current = parent
    return None if os.path.isdir(current) else current


def check_writable(path: str, flag: str, directory: bool = False, given: str | None = None) -> None:
    """Refuse before any work an output that cannot be written: ``path`` (a file, or with
    ``directory`` a folder) must be creatable, and its folder writable.

    Args:
        path: the file or folder the script will write.
        flag: the flag that chose it.
        directory: ``path`` is a folder.
        given: the flag's value as typed when ``path`` is derived from it (``--save_path`` of a
            run directory inside it); the message shows it instead of ``path``.

    Raises:
        utils.UserError: one line naming ``flag`` and why (a file where a folder must be, by name).
    """
    shown = path if given is None else given
    folder = path if directory else (os.path.dirname(os.path.abspath(path)) or ".")
    if not directory and os.path.isdir(path):
        raise utils.UserError(f"{flag} {shown}: a directory, not a file")
    blocker = _file_in_the_way(folder)
    if blocker is not None:
        same = os.path.abspath(blocker) == os.path.abspath(shown)
        raise utils.UserError(f"{flag} {shown}: " + ("a file, not a directory" if same else
                                                     f"{blocker} is a file, not a directory"))
    try:
        os.makedirs(folder, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)  # a new file (O_EXCL): no link followed
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise utils.UserError(f"{flag} {path}: cannot write there ({error.strerror or error})") from None
