"""One case of the training-cost study (``scripts/cost_study.py``): a method at one ipc on
generated images, timed iteration by iteration, with its loss time and peak memory.

The measurement follows the training-cost evaluation of Yu, Liu & Wang, "Dataset Distillation: A
Comprehensive Review", IEEE TPAMI 46(1), 2024 (run time of the outer loop and of the loss function,
and peak memory); ``cost_study.py``'s docstring defines the columns. This module knows no command
line: ``cost_study.py`` builds a :class:`CaseSpec` from its flags, runs :func:`measure_case` in
a child process (or in its own) and tables the rows.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

import methods
import utils
from data import DatasetRecord, RealSampler
from sets import resources
from sets.resources import SavedTensorMeter

# Options of trajectory-matching methods set for the generated 4-epoch buffer (applied only to a
# method that has the option); see the module docstring.
BUFFER_OPTIONS = {"expert_epochs": 2, "max_start_epoch": 2, "current_max_start_epoch": 1, "min_start_epoch": 0,
                  "threshold": 1e9}
BUFFER_EPOCHS = 4
DATASET_NAME = "Generated"
# The status of a row (KILLED and FAILED are given by cost_study.py, which runs the cases).
OK, OVER_TIME, OUT_OF_MEMORY, KILLED, FAILED = "ok", "over time bound", "out of memory", "killed", "error"


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One (method, ipc) measurement, everything a child process needs.

    Attributes:
        method, ipc: what to measure.
        model: network (``networks`` name).
        image_shape: (C, H, W) of the generated images; num_classes: K.
        real_per_class: generated real images per class (raised to ipc when smaller).
        iterations: timed iterations after the warm-up (0: the warm-up is the timed one).
        time_bound: seconds; a warm-up longer than this is the only timed iteration.
        device: ``cpu`` / ``cuda[:N]``; seed: for torch, the generator and the generated data.
        buffer_root: the generated expert buffer (trajectory matching), or None.
    """

    method: str
    ipc: int
    model: str
    image_shape: tuple
    num_classes: int
    real_per_class: int
    iterations: int
    time_bound: float
    device: str
    seed: int = 0
    buffer_root: Optional[str] = None



def generated_record(channel: int, size: Sequence[int], num_classes: int, per_class: int, seed: int = 0) -> DatasetRecord:
    """A dataset of generated images: a random prototype per class plus N(0, 0.5^2) noise.

    Args:
        channel, size: image shape C and (H, W); num_classes: K; per_class: training images per
            class (class-major; the test split has ``max(1, per_class // 10)`` per class).
        seed: of the prototypes and the noise.

    Returns:
        A ``data.DatasetRecord`` named ``Generated`` (mean 0, std 1, no ZCA).
    """
    generator = utils.make_generator(seed)
    prototypes = torch.randn(num_classes, channel, *size, generator=generator)

    def split(count):
        labels = torch.arange(num_classes).repeat_interleave(count)
        return prototypes[labels] + 0.5 * torch.randn(len(labels), channel, *size, generator=generator), labels

    (train_x, train_y), (test_x, test_y) = split(per_class), split(max(1, per_class // 10))
    return DatasetRecord(name=DATASET_NAME, channel=channel, im_size=tuple(size), num_classes=num_classes,
                         class_names=[str(c) for c in range(num_classes)], mean=[0.0] * channel, std=[1.0] * channel,
                         images_train=train_x, labels_train=train_y, images_test=test_x, labels_test=test_y)


def needs_buffer(method_name: str) -> bool:
    """Whether a registered method reads expert trajectories (it has a ``buffer_path`` option)."""
    return any(option.name == "buffer_path" for option in methods.get_method_class(method_name).option_specs())


def make_generated_buffer(model: str, image_shape: Sequence[int], num_classes: int, device: torch.device,
                          root: str, seed: int = 0) -> str:
    """A 1-expert, ``BUFFER_EPOCHS``-epoch buffer of ``model`` on 256 generated images, batches of
    32 (so consecutive snapshots differ), in ``buffer.py``'s layout under ``root``; returns ``root``."""
    from pretrained import buffers, experts

    per_class = max(1, 256 // num_classes)
    record = generated_record(image_shape[0], image_shape[1:], num_classes, per_class, seed)
    cfg = experts.ExpertConfig(dataset=DATASET_NAME, model=model, train_epochs=BUFFER_EPOCHS, batch_train=32)
    experts.make_buffer(cfg, record, buffers.buffer_dir(root, DATASET_NAME, model, False), 1, device=device,
                        test_every=0)
    return root


def case_config(spec: CaseSpec) -> methods.DistillConfig:
    """The method's reference defaults at ``spec.ipc`` and ``spec.model``, with the buffer
    options of the module docstring for trajectory matching."""
    cls = methods.get_method_class(spec.method)
    fields = {key: value for key, value in cls.defaults.items() if key != "eval_mode"}
    fields.update(ipc=spec.ipc, model=spec.model)
    if fields.get("init", "noise") not in ("noise", "real") and "real" in cls.init_choices:
        fields["init"] = "real"
    extra = dict(fields.pop("extra", {}))
    option_names = {option.name for option in cls.option_specs()}
    if "buffer_path" in option_names:
        extra["buffer_path"] = spec.buffer_root
        extra.update({name: value for name, value in BUFFER_OPTIONS.items() if name in option_names})
    return methods.DistillConfig(method=spec.method, dataset=DATASET_NAME, extra=extra, **fields)


class LossTimer:
    """Seconds a method spends on its loss and its gradient to the set during ``step``.

    Wraps, on the method instance, every function named in its ``loss_functions`` and its
    ``update_images``; the time of the outermost of these calls adds up (a call inside another is
    already counted). On CUDA the device is synchronised at each boundary.

    Attributes:
        seconds: loss time since :meth:`reset`; updates: ``update_images`` calls; loss_calls:
            calls of the ``loss_functions``.

    Raises:
        ValueError: a name in ``loss_functions`` is not a function of the method.
    """

    def __init__(self, method, device: torch.device):
        self.device = device
        self.reset()
        self._depth = 0
        for name in (*type(method).loss_functions, "update_images"):
            function = getattr(method, name, None)
            if not callable(function):
                raise ValueError(f"{type(method).__name__}.loss_functions names {name!r}, which it does not have")
            setattr(method, name, self._wrap(name, function))

    def reset(self) -> None:
        """Start counting anew (before each iteration)."""
        self.seconds, self.updates, self.loss_calls = 0.0, 0, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, name: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if name == "update_images":
                self.updates += 1
            else:
                self.loss_calls += 1
            outermost = self._depth == 0
            if outermost:
                self._sync()
                start = time.perf_counter()
            self._depth += 1
            try:
                return function(*args, **kwargs)
            finally:
                self._depth -= 1
                if outermost:
                    self._sync()
                    self.seconds += time.perf_counter() - start
        return timed


def resident_mb() -> Optional[float]:
    """The process's current resident set in MiB (Linux ``/proc/self/status``), or None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is torch running out of memory (CUDA, or the CPU allocator / a limit)."""
    text = str(error)
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def measure_case(spec: CaseSpec, on_iteration: Optional[Callable[[int], None]] = None) -> dict:
    """Build ``spec.method`` at ``spec.ipc`` on generated data and time its iterations.

    Args:
        spec: the case.
        on_iteration: called with the iteration number before each iteration starts, and with
            None after the last.

    Returns:
        A row: ``method, ipc, status`` (ok, over time bound, out of memory, error), ``loss_s``,
        ``iteration_s`` (medians over the timed iterations), ``updates`` (image updates per
        iteration), ``timed`` (how many), ``peak_mb``, ``memory_measure``, ``graph_mb`` (CPU),
        ``base_mb``, ``data_mb``, ``note``.
    """
    device = torch.device(spec.device)
    row = {"method": spec.method, "ipc": spec.ipc, "status": OK, "loss_s": None, "iteration_s": None,
           "updates": None, "timed": 0, "peak_mb": None, "graph_mb": None, "base_mb": None, "note": ""}
    per_class = max(spec.real_per_class, spec.ipc)
    record = generated_record(spec.image_shape[0], spec.image_shape[1:], spec.num_classes, per_class, spec.seed)
    row["data_mb"] = record.images_train.numel() * 4 / 2**20
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    method = syn = None
    # The generated buffer holds fewer training images than a case: expected, not worth a warning.
    logging.getLogger("pretrained.buffers").setLevel(logging.ERROR)
    try:
        utils.seed_everything(spec.seed)
        sampler = RealSampler(record.images_train, record.labels_train, record.num_classes, device)
        cls = methods.get_method_class(spec.method)
        method = cls(case_config(spec), channel=record.channel, num_classes=record.num_classes,
                     im_size=record.im_size, sampler=sampler, device=device, generator=utils.make_generator(spec.seed))
        syn = method.init_synthetic()
        timer = LossTimer(method, device)
        row["base_mb"] = resident_mb() if device.type == "cpu" else None
        seconds, loss_seconds, updates, loss_calls = [], [], [], []
        for iteration in range(1, spec.iterations + 2):
            if on_iteration is not None:
                on_iteration(iteration)
            timer.reset()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            if iteration == 1 and device.type == "cpu":
                with SavedTensorMeter() as meter:
                    method.step(syn, iteration)
                row["graph_mb"] = meter.peak_bytes / 2**20
            else:
                method.step(syn, iteration)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            warm_up_only = iteration == 1 and (spec.iterations == 0 or elapsed > spec.time_bound)
            if iteration > 1 or warm_up_only:
                seconds.append(elapsed)
                loss_seconds.append(timer.seconds)
                updates.append(timer.updates)
                loss_calls.append(timer.loss_calls)
            if warm_up_only:
                if spec.iterations:
                    row["note"] = "warm-up alone timed (it exceeded the time bound)"
                break
        if on_iteration is not None:
            on_iteration(None)
        row["timed"] = len(seconds)
        row["iteration_s"] = statistics.median(seconds)
        row["updates"] = statistics.median(updates)
        row["loss_s"] = sum(loss_seconds) / max(1, sum(updates))
        if not sum(updates):
            row["note"] = "; ".join(filter(None, [row["note"], "no image update: loss = its forward only"]))
        if not sum(loss_calls):
            row["note"] = "; ".join(filter(None, [row["note"], "loss_functions not called: loss = update_images only"]))
        if row["iteration_s"] > spec.time_bound:
            row["status"] = OVER_TIME
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        row["status"], row["note"] = OUT_OF_MEMORY, " ".join(str(error).split())[:160]
    finally:
        del method, syn
        gc.collect()
    peak = resources.peak_memory(device)
    row["peak_mb"], row["memory_measure"] = peak["bytes"] / 2**20, peak["measure"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row
