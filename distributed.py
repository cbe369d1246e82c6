"""Several processes (``torchrun``), one code path: the toolkit's only contact with ``torch.distributed``.

A stage script run as ``torchrun --nproc_per_node N distill.py ...`` starts N copies of the same
program; torchrun tells each its place through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`init` joins them into one process group
(NCCL on CUDA, gloo on CPU). Without torchrun nothing is joined: the world is one process of rank 0
and every function here is then a no-op or the identity, so one process runs exactly the program it
ran before this module existed.

Three ways of spreading work use these pieces (docs/scale-out.md):

* independent units (evaluation networks, experts, original models): :func:`shard` says which
  unit indices this rank owns; each unit draws from a generator derived from the seed and the
  unit's index, never the rank, so the results do not depend on the number of processes;
  :func:`gather_units` collects the per-unit results on every rank (or rank 0);
* a loss that is a sum over classes (DC, DSA, DM, DataDAM): each rank computes its classes' terms,
  :func:`all_reduce_sum` adds the gradients of the synthetic images, every rank applies the same
  update;
* data-parallel training of one network (``--ddp``): ``torch.nn.parallel.DistributedDataParallel``
  with :func:`distributed_indices` (a ``torch.utils.data.DistributedSampler``).

Checkpoints and results are written by rank 0 (:func:`is_main`), a stop requested by a signal on
any rank is agreed by :func:`any_flag`, and :func:`barrier` keeps the others from leaving before
rank 0 has finished writing.

A stuck rank (``--dist_timeout``): before each collective of this module every rank marks its
arrival in the process group's key-value store (the ``torch.distributed`` store that
``init_process_group`` set up) and waits there until every rank has arrived; a rank still
working says so by :func:`beat` (called by ``progress.tick``, once per training step). A rank
that neither arrives nor beats for the timeout is named in a :class:`CollectiveError` on every
waiting rank, which also leaves the message in the store, so that the late rank, if it ever
arrives, stops with the same explanation instead of a gloo traceback. The collective itself then
starts only once every rank is there; its own timeout (``init_process_group``'s) is the same.

Source: the PyTorch documentation of ``torch.distributed`` (``init_process_group`` with the
``env://`` method torchrun sets up, ``all_reduce``, ``all_gather_object``, ``barrier``, the
key-value store's ``set``, ``check``, ``add``, ``get``, ``delete_key``) and of ``torchrun``.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

# Seconds a rank may neither reach a collective nor finish a training step before the waiting ranks
# stop the run (--dist_timeout; the environment variable DD_DIST_TIMEOUT_S when the flag is left
# out). A busy rank beats once per training step (progress.tick), so the timeout bounds the longest
# step, a checkpoint written by rank 0, or the dataset loaded before the first collective, not a
# whole evaluation share or a model trained while the other ranks wait.
DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "DD_DIST_TIMEOUT_S"
# Keys of this module in the process group's store.
_KEY = "dd_toolkit/"
_ABORT_KEY = _KEY + "abort"

SHARD_MODES = ("round_robin", "blocks")


def launched() -> bool:
    """Whether torchrun (or another launcher setting ``WORLD_SIZE`` > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    """Whether this process has joined a process group (:func:`init`)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes working together (1 without torchrun)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in [0, :func:`world_size`). Before :func:`init` it is read from
    torchrun's ``RANK`` (0 without torchrun), so that logging set up first already knows it."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK``; 0 without torchrun): its CUDA device index."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files, logs and shows progress."""
    return rank() == 0


def device_for_rank(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when ``device`` is CUDA and torchrun started
    several processes (one GPU per process), else ``device`` unchanged."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", local_rank())
    return device


class CollectiveError(RuntimeError):
    """A collective of this module could not take place: a rank did not arrive within the timeout
    (``missing`` names it), or this rank arrived after the others had stopped, or the store or
    backend failed. The message is one line; scripts print it and exit (``cli.user_errors``).

    Attributes:
        missing: the ranks that did not arrive (empty when not known).
        kept: what the caller's files keep, appended by the stage that knows (``""``: not said).
    """

    def __init__(self, message: str, missing: Sequence[int] = ()):
        super().__init__(message)
        self.missing = tuple(missing)
        self.kept = ""


class _Guard:
    """This process's side of the arrival check (module docstring): the store, the timeout, the
    number of collectives entered and the time of the next heartbeat."""

    store: Optional[Any] = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    entered = 0
    next_beat = 0.0
    left_at = 0.0  # time.monotonic() when this rank left its last collective (or joined)


def resolve_timeout(seconds: Optional[float]) -> float:
    """The collective timeout in seconds: ``seconds`` (``--dist_timeout``) when given, else the
    environment variable ``DD_DIST_TIMEOUT_S``, else :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        ValueError: the value (or the variable) is not a finite number above 0; the message names
            where it came from.
    """
    if seconds is None and os.environ.get(TIMEOUT_ENV, "").strip():
        text = os.environ[TIMEOUT_ENV]
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected seconds above 0") from None
        where = f"{TIMEOUT_ENV}={text}"
    else:
        where = f"--dist_timeout {seconds:g}" if seconds is not None else ""
    if seconds is None:
        return DEFAULT_TIMEOUT_S
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{where}: the timeout must be a finite number of seconds above 0")
    return float(seconds)


def init(device: torch.device, timeout_s: Optional[float] = None) -> torch.device:
    """Join torchrun's process group once, if torchrun started this process; returns this rank's device.

    NCCL when ``device`` is CUDA (each rank then uses ``cuda:LOCAL_RANK`` and makes it current),
    gloo otherwise. Without torchrun (``WORLD_SIZE`` unset or 1) nothing happens and ``device`` is
    returned. Calling it again returns the device without joining twice.

    Args:
        device: the device ``--device`` resolved to (``utils.resolve_device``).
        timeout_s: seconds a rank may neither reach a collective nor beat (:func:`beat`) before
            the others stop the run; also ``init_process_group``'s timeout (the rendezvous and
            each collective). Default: :func:`resolve_timeout` (``DD_DIST_TIMEOUT_S`` or
            :data:`DEFAULT_TIMEOUT_S`).

    Raises:
        ValueError: ``LOCAL_RANK`` names a CUDA device that is not visible, or the timeout is not
            above 0.
        RuntimeError: the rendezvous failed (torch.distributed's message).
    """
    device = device_for_rank(device)
    if not launched():
        return device
    seconds = resolve_timeout(timeout_s)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {device.index}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(device)
    if not is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=seconds))
        _Guard.timeout_s, _Guard.entered, _Guard.next_beat = seconds, 0, 0.0
        _Guard.left_at = time.monotonic()
        # The store init_process_group built from torchrun's environment (no public accessor).
        _Guard.store = getattr(dist.distributed_c10d, "_get_default_store", lambda: None)()
    return device


def beat_every_s() -> float:
    """Seconds between two heartbeats of a working rank (a quarter of the timeout, at most 10 s)."""
    return min(10.0, _Guard.timeout_s / 4)


def beat() -> None:
    """Tell the other ranks that this one is working (a counter in the store), at most once per
    :func:`beat_every_s`; nothing for one process. Called by ``progress.tick`` and
    ``progress.Progress.update``, so any training step counts. A store that no longer answers is
    ignored here (the next collective reports it)."""
    if _Guard.store is None or world_size() == 1:
        return
    now = time.monotonic()
    if now < _Guard.next_beat:
        return
    _Guard.next_beat = now + beat_every_s()
    try:
        _Guard.store.add(f"{_KEY}beat/{rank()}", 1)
    except RuntimeError:
        pass


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _arrive(name: str) -> None:
    """Mark this rank's arrival at its next collective (``name``) and wait until every rank has
    arrived (module docstring); nothing for one process or without a store.

    Raises:
        CollectiveError: a rank neither arrived nor beat for the timeout (named), the other ranks
            have stopped, or the store no longer answers.
    """
    store = _Guard.store
    if store is None or world_size() == 1:
        return
    _Guard.entered += 1
    number, me = _Guard.entered, rank()
    keys = [f"{_KEY}at/{number}/{r}" for r in range(world_size())]
    if time.monotonic() - _Guard.left_at >= _Guard.timeout_s:  # away long enough to have been given up on
        _refuse_if_abandoned(store, name)
    try:
        store.set(keys[me], "1")
        if not store.check(keys):
            _wait_for_ranks(store, keys, name)
        if number > 1:  # every rank has passed the previous collective's wait
            store.delete_key(f"{_KEY}at/{number - 1}/{me}")
    except CollectiveError:
        raise
    except RuntimeError as error:  # torch.distributed.DistError: the store's host has gone
        raise CollectiveError(f"rank {me} reached {name} but the process group's store no longer answers, so "
                              f"another rank (or torchrun) has stopped ({_first_line(error)})") from None


def _refuse_if_abandoned(store: Any, name: str) -> None:
    """For a rank back after the timeout: stop if the others have (the message they left in the
    store, or a store whose host, rank 0 without torchrun's agent, has gone: a plain connection
    attempt first, since a store operation on a closed connection prints a C++ stack dump).

    Raises:
        CollectiveError: the other ranks have stopped.
    """
    me = rank()
    address, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if address and port.isdigit():
        try:
            socket.create_connection((address, int(port)), timeout=min(10.0, _Guard.timeout_s)).close()
        except OSError:
            raise CollectiveError(f"rank {me} reached {name} after the other ranks had stopped (the process group's "
                                  f"store at {address}:{port} is gone)") from None
    try:
        reason = _abort_reason(store)
    except RuntimeError:
        return  # the next store operation says it
    if reason is not None:
        raise CollectiveError(f"rank {me} reached {name} after the other ranks had stopped: {reason}")


def _wait_for_ranks(store: Any, keys: List[str], name: str) -> None:
    """Poll the store until every key of ``keys`` (one per rank) exists; every second (or tenth
    of the timeout) look for an abort message and at the heartbeats of the ranks not there yet.
    Polling (``check``, with a growing pause up to 50 ms) rather than ``store.wait``, whose
    timeouts print C++ warnings."""
    me, pause = rank(), 1e-4
    look_every = min(1.0, _Guard.timeout_s / 10)
    next_look, seen = 0.0, {}  # rank -> (its beat count, when it last changed)
    while True:
        time.sleep(pause)
        pause = min(pause * 1.5, 0.05)
        if store.check(keys):
            return
        now = time.monotonic()
        if now < next_look:
            continue
        next_look = now + look_every
        reason = _abort_reason(store)
        if reason is not None:  # another waiting rank has given up already
            raise CollectiveError(reason)
        behind = [r for r, key in enumerate(keys) if not store.check([key])]
        for r in behind:
            beats = store.add(f"{_KEY}beat/{r}", 0)
            if r not in seen or seen[r][0] != beats:
                seen[r] = (beats, now)
        stuck = [r for r in behind if now - seen[r][1] >= _Guard.timeout_s]
        if stuck:
            who = f"rank {stuck[0]}" if len(stuck) == 1 else f"ranks {', '.join(map(str, stuck))}"
            message = (f"{who} did not reach {name} within --dist_timeout {_Guard.timeout_s:g} s, nor finished "
                       "a training step in that time")
            store.set(_ABORT_KEY, message)
            raise CollectiveError(message, stuck)


def _abort_reason(store: Any) -> Optional[str]:
    """The message a rank that gave up left in the store, or ``None``."""
    if not store.check([_ABORT_KEY]):
        return None
    return store.get(_ABORT_KEY).decode("utf-8", "replace")


def _collective(name: str, run, *args, **kwargs):
    """``run(*args, **kwargs)`` (a ``torch.distributed`` collective) once every rank has arrived
    (:func:`_arrive`); the backend's failure (gloo's timeout, a peer gone) as one line.

    Raises:
        CollectiveError: see :func:`_arrive`; or the backend failed (its first line).
    """
    _arrive(name)
    try:
        return run(*args, **kwargs)
    except RuntimeError as error:
        try:  # the others arrived, gave up on another rank and left: say why
            reason = _abort_reason(_Guard.store) if _Guard.store is not None else None
        except RuntimeError:
            reason = None
        if reason is not None:
            raise CollectiveError(f"rank {rank()} reached {name} after the other ranks had stopped: {reason}") from None
        raise CollectiveError(f"rank {rank()}: {name} failed ({_first_line(error)}); another rank has stopped or "
                              "does not answer") from None
    finally:
        _Guard.left_at = time.monotonic()


def backend_failure(error: BaseException) -> Optional[str]:
    """One line for a ``torch.distributed`` failure raised outside this module's collectives
    (``DistributedDataParallel``'s gradient all-reduce timing out, a peer gone), else ``None``.

    Source: the exception classes of ``torch.distributed`` (``DistError``) and gloo's messages.
    """
    if not is_initialized() or not isinstance(error, RuntimeError) or isinstance(error, CollectiveError):
        return None
    text = str(error)
    if isinstance(error, getattr(dist, "DistError", ())) or "gloo" in text or "NCCL" in text:
        return (f"rank {rank()}: a torch.distributed collective failed ({_first_line(error)}); another rank has "
                f"stopped or did not answer within --dist_timeout {_Guard.timeout_s:g} s")
    return None


def shutdown() -> None:
    """Leave the process group (at the end of a script); nothing without one."""
    if is_initialized():
        dist.destroy_process_group()
    _Guard.store = None


def shard(units: int | Sequence[int], mode: str = "round_robin", *, of: Optional[int] = None,
          at: Optional[int] = None) -> List[int]:
    """The units this rank owns.

    Args:
        units: a count ``n`` (units ``0 .. n-1``) or the unit indices themselves, in order.
        mode: ``round_robin`` (rank r owns positions r, r + W, ...; balanced when units cost alike)
            or ``blocks`` (contiguous runs, the first ``n mod W`` ranks one longer).
        of, at: world size and rank to shard for (default: this process's).

    Returns:
        The owned unit indices, in their original order (all of them for one process; possibly
        none when there are fewer units than ranks).

    Raises:
        ValueError: unknown ``mode``.
    """
    items = list(range(units)) if isinstance(units, int) else list(units)
    size = world_size() if of is None else of
    me = rank() if at is None else at
    if mode == "round_robin":
        return items[me::size]
    if mode == "blocks":
        base, extra = divmod(len(items), size)
        start = me * base + min(me, extra)
        return items[start:start + base + (1 if me < extra else 0)]
    raise ValueError(f"shard mode {mode!r}: expected one of {', '.join(SHARD_MODES)}")


def gather_objects(obj: Any, to_all: bool = True) -> Optional[List[Any]]:
    """Every rank's picklable ``obj``, in rank order (``all_gather_object`` / ``gather_object``).

    Returns:
        The list on every rank (``to_all``) or on rank 0 only (``None`` on the others); ``[obj]``
        for one process.
    """
    if world_size() == 1:
        return [obj]
    if to_all:
        found: List[Any] = [None] * world_size()
        _collective("all_gather_object", dist.all_gather_object, found, obj)
        return found
    found = [None] * world_size() if is_main() else None
    _collective("gather_object", dist.gather_object, obj, found, dst=0)
    return found


def gather_units(results: Dict[int, Any], to_all: bool = True) -> Optional[Dict[int, Any]]:
    """Merge per-unit results (``{unit index: result}``, each rank holding its own units) into one
    dict ordered by unit index, on every rank (``to_all``) or on rank 0 (``None`` elsewhere).

    Raises:
        ValueError: two ranks report the same unit.
    """
    parts = gather_objects(dict(results), to_all)
    if parts is None:
        return None
    merged: Dict[int, Any] = {}
    for part in parts:
        for unit, value in part.items():
            if unit in merged:
                raise ValueError(f"unit {unit} was computed by two ranks")
            merged[unit] = value
    return dict(sorted(merged.items()))


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Replace every tensor (e.g. the gradient of the synthetic images) by its sum over the ranks,
    in place; nothing for one process. The tensors are flattened into one buffer, so the ranks
    exchange a single message."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    _collective("all_reduce", dist.all_reduce, flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the ``.grad`` of ``params`` over the ranks (a missing gradient counts as zeros and is
    created, so that every rank sends the same layout)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params])


def sum_scalar(value: torch.Tensor) -> torch.Tensor:
    """A scalar tensor summed over the ranks (a new tensor; ``value`` itself for one process)."""
    if world_size() == 1:
        return value
    total = value.detach().reshape(1).to(device=_collective_device(), dtype=torch.float64)
    _collective("all_reduce", dist.all_reduce, total, op=dist.ReduceOp.SUM)
    return total.reshape(()).to(device=value.device, dtype=value.dtype)


def any_flag(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (an all-reduce with MAX): the synchronised stop flag,
    asked by every rank at the same point, so that all stop at the same iteration."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    _collective("all_reduce (stop flag)", dist.all_reduce, value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``broadcast_object_list``); ``obj`` for one process."""
    if world_size() == 1:
        return obj
    holder = [obj]
    _collective("broadcast_object_list", dist.broadcast_object_list, holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every rank arrives here (nothing for one process)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            _collective("barrier", dist.barrier, device_ids=[torch.cuda.current_device()])
        else:
            _collective("barrier", dist.barrier)


def distributed_indices(num_samples: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's share of one epoch's shuffled sample indices, as ``torch.utils.data.DistributedSampler``
    draws them (shuffled with ``seed + epoch``, padded so every rank has as many).

    Returns:
        (ceil(num_samples / W),) int64 indices into the training set.
    """
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(num_samples), num_replicas=world_size(), rank=rank(), shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def data_parallel(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` wrapped in ``DistributedDataParallel`` (gradients averaged over the ranks in every
    backward pass), or ``net`` itself for one process. Every rank must hold the same initial
    weights (DDP also broadcasts rank 0's at construction)."""
    if world_size() == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    device = next(net.parameters()).device
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: the current CUDA device under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
