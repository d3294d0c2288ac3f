"""Where a model runs and in which float type: ``--device auto|cpu|cuda|cuda:i`` and
``--dtype auto|float32|bfloat16|float16`` turned into torch objects, and the precision plan of training.

``auto`` picks CUDA when available, else the CPU; its dtype is bfloat16 on CUDA and float32 on the CPU, so a
default run on a CPU machine computes exactly what it always did. float16 is refused on the CPU (PyTorch's CPU
kernels for it are incomplete and slow, and bfloat16 has float32's range).

Precision plan (:class:`Precision`):
- A module that is only run (a policy being decoded or evaluated, the frozen backbone under MTP-head training)
  holds its weights in the compute dtype: nothing is updated, so nothing is lost, and memory halves under bf16.
- A module that is trained (the SFT policy, an MTP head) keeps float32 master weights and float32 AdamW state,
  and runs its forward under ``torch.autocast`` in the compute dtype. With bf16 master weights an update smaller
  than 2⁻⁸ of a weight (most of them, at the learning rates used) would round away; autocast keeps matmuls in
  bf16 while reductions such as softmax and the losses stay float32 (the losses upcast logits themselves).
- float16 training (CUDA only) also scales the loss (``GradScaler``) so that small gradients do not underflow.
Sampling and verification always work on float32 probabilities: the LM head produces logits in the model's
dtype, and ``bebop.core.sampling`` (``probs_from_logits``, ``probs_fast``, ``verify``) upcasts them to float32
before the temperature, top-k/top-p, softmax and the acceptance tests, as vLLM's sampler does with its logits.
Plain and speculative decoding see the same logits, so RS/TO stay exact for the distribution the model defines.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from bebop.config import DTYPES, check_device, check_dtype
from bebop.errors import BebopError

__all__ = ["Precision", "precision", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` → ``cuda`` when CUDA is available, else ``cpu``; ``cpu``; ``cuda`` / ``cuda:i`` when that GPU
    exists. A bad spec, or CUDA asked for where there is none, raises a BebopError naming the value."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BebopError(f"device {spec!r} asked for, but CUDA is not available here; use --device cpu or auto")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise BebopError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def resolve_dtype(spec: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype:
    """``auto`` → bfloat16 on CUDA, float32 on the CPU; ``float32`` / ``bfloat16`` / ``float16`` as named
    (a ``torch.dtype`` is accepted too). float16 on the CPU, or an unknown name, raises a BebopError naming it."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if isinstance(spec, torch.dtype):
        names = {v: k for k, v in _DTYPES.items()}
        if spec not in names:
            raise BebopError(f"unsupported dtype {spec}; choose one of: {', '.join(DTYPES)}")
        spec = names[spec]
    check_dtype(spec)
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec == "float16" and device.type == "cpu":
        raise BebopError(f"dtype {spec!r}: float16 is not supported on CPU; use bfloat16 or float32")
    return _DTYPES[spec]


@dataclass(frozen=True)
class Precision:
    """A resolved device and compute dtype, with the training plan of the module doc: float32 master weights,
    forwards under :meth:`autocast`, the loss scaled by :meth:`grad_scaler` under float16."""

    device: torch.device
    dtype: torch.dtype

    @property
    def mixed(self) -> bool:
        """Whether compute runs in a lower precision than the float32 master weights."""
        return self.dtype != torch.float32

    @property
    def name(self) -> str:
        """The dtype's name as the CLI spells it (``float32``, ``bfloat16``, ``float16``)."""
        return str(self.dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in the compute dtype for mixed precision; a no-op context under float32 (so a float32
        run executes exactly the ops it always did)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled only for float16 (bfloat16 has float32's exponent range and needs none);
        disabled it passes losses and optimizer steps through unchanged."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)


def precision(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Precision:
    """Resolve ``device`` then ``dtype`` (``auto`` dtype depends on the device) into a :class:`Precision`."""
    dev = resolve_device(device)
    return Precision(dev, resolve_dtype(dtype, dev))
