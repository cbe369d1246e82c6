"""Cost measures for run summaries and ``scripts/cost.py``: network size and FLOPs at a dataset's image
size, peak memory, and the storage of a synthetic set.

Parameters and FLOPs reuse :func:`networks.count_parameters` and :func:`networks.flops_per_image`
(``torch.utils.flop_counter``; 2 FLOPs per multiply-add of convolutions and matrix products, see
:data:`networks.FLOPS_DEFINITION`). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA
(reset at the start of a run) and the process's peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux) on the CPU: the latter cannot be
reset, so it covers the whole process (dataset loading included).
"""
from __future__ import annotations

import resource
import sys
from typing import Mapping, Optional, Sequence

import torch

import networks

def network_cost(model: str, channel: int, im_size: Sequence[int], num_classes: int, device="cpu") -> dict:
    """Parameters and forward FLOPs per image of a fresh ``model`` for one input shape.

    The network is built in a forked RNG (the caller's stream does not move).

    Args:
        model: a ``networks`` name.
        channel, im_size, num_classes: the input (C, (H, W)) and the classifier width.
        device: where to build and count.

    Returns:
        ``{"model", "params", "flops_per_image", "macs_per_image"}`` (ints; MACs = FLOPs / 2).

    Raises:
        KeyError: unknown model (from ``networks.get_network``).
        ValueError: the image is too small for the network.
    """
    with torch.random.fork_rng(devices=[]):
        net = networks.get_network(model, channel, num_classes, tuple(im_size), device=torch.device(device))
    flops = networks.flops_per_image(net, channel, im_size)
    return {"model": model, "params": networks.count_parameters(net), "flops_per_image": flops,
            "macs_per_image": flops // 2}


def storage_bytes(tensors: Mapping[str, Optional[torch.Tensor]]) -> dict:
    """Bytes of each tensor as stored (``numel * element_size``; ``None`` entries are skipped).

    Args:
        tensors: e.g. ``{"images": (N, C, H, W) float32, "labels": (N,) int64, "syn_lr": ()}``.

    Returns:
        ``{name: bytes, ..., "total": bytes}``.
    """
    sizes = {name: int(t.numel() * t.element_size()) for name, t in tensors.items() if t is not None}
    sizes["total"] = sum(sizes.values())
    return sizes


def synthetic_storage(syn) -> dict:
    """:func:`storage_bytes` of what a result file keeps of a ``SyntheticSet``: the images, the
    exported labels (class indices, or soft-label logits when learned), the learned step size and
    the learned step schedule (DD: one value per step)."""
    step_lrs = getattr(syn, "step_lr_raw", None)
    return storage_bytes({"images": syn.images.detach(), "labels": syn.export_labels(),
                          "syn_lr": syn.syn_lr.detach() if syn.syn_lr is not None else None,
                          "step_lrs": step_lrs.detach() if step_lrs is not None else None})


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on CUDA (no-op on the CPU, whose peak cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """The peak memory so far: ``{"bytes": int, "measure": str}``.

    CUDA: ``torch.cuda.max_memory_allocated(device)`` since :func:`reset_peak_memory` (tensors
    only, not the caching allocator's reserve). CPU: the process's peak resident set size
    (``ru_maxrss``, KiB on Linux, bytes on macOS) since the process started.
    """
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "measure": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return {"bytes": int(rss * scale), "measure": "process peak RSS (getrusage ru_maxrss)"}


class SavedTensorMeter:
    """Peak bytes of the tensors autograd holds for backward, on any device (a CPU measure that,
    unlike the process's peak RSS, can be scoped to one piece of code).

    Inside ``with meter:`` every tensor an operation saves for its backward
    (``torch.autograd.graph.saved_tensors_hooks``) is counted with ``numel * element_size`` bytes
    while the graph holding it is alive; ``peak_bytes`` is the largest total seen. A tensor saved
    by two operations counts twice and views count their own size, so this is the graph's memory
    as autograd sees it, not the allocator's. Tensors kept by other means (a method's own lists,
    optimiser state, the data) are not counted. The hooks are thread-local: on CUDA, autograd runs
    backward functions on its device threads, where the graphs they build are not seen; use
    :func:`peak_memory` there.

    Attributes:
        live_bytes, peak_bytes: ints (bytes).
    """

    def __init__(self):
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = None

    def _pack(self, tensor: torch.Tensor):
        size = int(tensor.numel() * tensor.element_size())
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return _Counted(tensor, size, self)

    @staticmethod
    def _unpack(packed: "_Counted") -> torch.Tensor:
        return packed.tensor

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Counted:
    """A saved tensor that gives its bytes back to its meter when autograd frees it."""

    __slots__ = ("tensor", "size", "meter")

    def __init__(self, tensor: torch.Tensor, size: int, meter: SavedTensorMeter):
        self.tensor, self.size, self.meter = tensor, size, meter

    def __del__(self):
        self.meter.live_bytes -= self.size
