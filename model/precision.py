"""Precision decided in one place: a name ("fp32", "bf16", "fp16") becomes an autocast context and a
grad scaler (nanoGPT's `ctx`, open_clip's `get_autocast`). Weights stay fp32; autocast runs the matmuls
and convolutions in the lower precision. fp16 needs loss scaling, bf16 and fp32 do not."""
from __future__ import annotations

import contextlib
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")


def _device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def default_precision(device: torch.device | str) -> Precision:
    """fp32 on CPU (CPU autocast is slow and gains nothing at toy sizes), bf16 on CUDA (no loss scaling,
    the fp32 exponent range)."""
    return "bf16" if _device_type(device) == "cuda" else "fp32"


def autocast_dtype(precision: Precision) -> torch.dtype:
    _check(precision)
    return PRECISIONS[precision]


def autocast_context(device_type: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """A context that runs the forward pass in `precision`: a no-op for fp32, torch.autocast otherwise.
    fp16 is refused on CPU, where autocast does not support it well; use bf16 there."""
    _check(precision)
    device_type = _device_type(device_type)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("fp16 autocast is for CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device_type=device_type, dtype=PRECISIONS[precision])


def grad_scaler(precision: Precision, device: torch.device | str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only. For fp32/bf16 the scaler is disabled: `scale(loss)` returns the loss,
    `step(opt)` calls `opt.step()`, `update()` does nothing, so training code calls the same three
    methods whatever the precision."""
    _check(precision)
    device_type = _device_type(device)
    if precision == "fp16" and device_type == "cpu":
        raise ValueError("fp16 training is for CUDA; use bf16 or fp32 on CPU")
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")
