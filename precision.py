"""Mixed precision (``--amp bf16|fp16``): the one place that knows how forward passes are cast.

A :class:`Precision` is resolved once per script from ``--amp`` and the device
(:func:`resolve_precision`) and passed down explicitly (distillation methods, the evaluation
protocol's :class:`evaluation.EvalConfig`, expert and original-model training). It follows PyTorch's
automatic mixed precision recipe (``torch.autocast`` around forward passes and losses, a
``torch.amp.GradScaler`` for float16; Micikevicius et al., "Mixed Precision Training", ICLR 2018):

* parameters, synthetic images and every other learned tensor stay float32; autocast casts the
  inputs of matrix products and convolutions to the low precision inside the ``autocast`` block
  and their gradients come back in float32;
* float16 scales each loss before ``backward`` and unscales before the optimiser step (skipping
  steps whose gradients overflowed); bfloat16 has float32's exponent range and needs no scaler.

float16 is refused on CPU: PyTorch's CPU float16 convolutions have no fast kernels (a ConvNet
layer took 0.58 s against 0.018 s in float32 and 0.017 s in bfloat16 on the development machine,
whose CPU has AVX-512 FP16), so it would only make runs slower.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

AMP_CHOICES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """An ``--amp`` value this device cannot run (the message names ``--amp``)."""


@dataclass(frozen=True)
class Precision:
    """How forward passes are computed.

    Attributes:
        amp: ``"off"`` (float32), ``"bf16"`` or ``"fp16"``: the autocast dtype of forward passes.
    """

    amp: str = "off"

    def __post_init__(self):
        if self.amp not in AMP_CHOICES:
            raise PrecisionError(f"--amp {self.amp!r}: expected one of {', '.join(AMP_CHOICES)}")

    @property
    def enabled(self) -> bool:
        """Whether forward passes run under autocast."""
        return self.amp != "off"

    @property
    def dtype(self) -> torch.dtype:
        """The autocast dtype (float32 when off)."""
        return _DTYPES.get(self.amp, torch.float32)

    def autocast(self, device):
        """Context in which forward passes and losses on ``device`` (a ``torch.device`` or its
        type string) run under ``torch.autocast``; a no-op context when ``amp`` is off."""
        if not self.enabled:
            return nullcontext()
        device_type = device if isinstance(device, str) else device.type
        return torch.autocast(device_type, dtype=self.dtype)

    def grad_scaler(self, device) -> Optional["torch.amp.GradScaler"]:
        """A fresh ``torch.amp.GradScaler`` for float16 on ``device``; ``None`` otherwise
        (float32 and bfloat16 need no loss scaling)."""
        if self.amp != "fp16":
            return None
        return torch.amp.GradScaler(device if isinstance(device, str) else device.type)

    def describe(self) -> str:
        """``"fp32"`` or ``"autocast bf16"`` / ``"autocast fp16 + GradScaler"``, for result records."""
        if not self.enabled:
            return "fp32"
        return f"autocast {self.amp}" + (" + GradScaler" if self.amp == "fp16" else "")


FP32 = Precision()


def resolve_precision(amp: Optional[str], device: torch.device) -> Precision:
    """The :class:`Precision` of ``--amp`` on ``device``, resolved once per script.

    Args:
        amp: ``None``/``"off"``, ``"bf16"`` or ``"fp16"``.
        device: the device the script runs on.

    Raises:
        PrecisionError: unknown value; ``fp16`` on CPU (see the module docstring); ``bf16`` on a
            CUDA device without bfloat16 support.
    """
    precision = Precision(amp or "off")
    if precision.amp == "fp16" and device.type == "cpu":
        raise PrecisionError("--amp fp16 is refused on CPU (PyTorch's CPU float16 kernels are ~30x slower "
                             "than float32); use --amp bf16 on CPU, fp16 on CUDA")
    if precision.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; use --amp fp16")
    return precision


def scaled_backward(loss: torch.Tensor, scaler: Optional["torch.amp.GradScaler"]) -> None:
    """``loss.backward()``, scaled first when ``scaler`` is given (float16)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Optional["torch.amp.GradScaler"]) -> None:
    """``optimizer.step()``; with ``scaler``: unscale, skip on inf/NaN gradients, update the scale.
    Only for an optimizer stepped once per backward (one scaler per optimizer)."""
    if scaler is None:
        optimizer.step()
        return
    scaler.step(optimizer)
    scaler.update()
