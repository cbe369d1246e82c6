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

Source: the PyTorch documentation of ``torch.distributed`` (``init_process_group`` with the
``env://`` method torchrun sets up, ``all_reduce``, ``all_gather_object``, ``barrier``) and of
``torchrun``.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

# Seconds a collective may wait for the slowest rank before the run fails (init_process_group's
# timeout). Long: an evaluation on one rank can take much longer than the others' share; override
# with the environment variable DD_DIST_TIMEOUT_S.
DEFAULT_TIMEOUT_S = 3600.0

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


def init(device: torch.device, timeout_s: Optional[float] = None) -> torch.device:
    """Join torchrun's process group once, if torchrun started this process; returns this rank's device.

    NCCL when ``device`` is CUDA (each rank then uses ``cuda:LOCAL_RANK`` and makes it current),
    gloo otherwise. Without torchrun (``WORLD_SIZE`` unset or 1) nothing happens and ``device`` is
    returned. Calling it again returns the device without joining twice.

    Args:
        device: the device ``--device`` resolved to (``utils.resolve_device``).
        timeout_s: collective timeout; default ``DD_DIST_TIMEOUT_S`` or :data:`DEFAULT_TIMEOUT_S`.

    Raises:
        ValueError: ``LOCAL_RANK`` names a CUDA device that is not visible.
        RuntimeError: the rendezvous failed (torch.distributed's message).
    """
    device = device_for_rank(device)
    if not launched():
        return device
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {device.index}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(device)
    if not is_initialized():
        seconds = timeout_s if timeout_s is not None else float(os.environ.get("DD_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                timeout=datetime.timedelta(seconds=seconds))
    return device


def shutdown() -> None:
    """Leave the process group (at the end of a script); nothing without one."""
    if is_initialized():
        dist.destroy_process_group()


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
        dist.all_gather_object(found, obj)
        return found
    found = [None] * world_size() if is_main() else None
    dist.gather_object(obj, found, dst=0)
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
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
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
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.reshape(()).to(device=value.device, dtype=value.dtype)


def any_flag(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (an all-reduce with MAX): the synchronised stop flag,
    asked by every rank at the same point, so that all stop at the same iteration."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``broadcast_object_list``); ``obj`` for one process."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every rank arrives here (nothing for one process)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


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
