"""Which device and autocast dtype a stage runs with, and the device's name: one place for every entry point
(eval, the trainer's in-loop evals, analysis, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from fope_lm.errors import ConfigError

# the names configs use for a 16-bit autocast dtype (eval's dtype, the trainer's precision, the benchmarks' --dtype)
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda when available, else cpu; cpu, cuda or cuda:N (an error when CUDA is not available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available: use device=cpu or device=auto")
    return torch.device(name)


def resolve_autocast(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a dtype name: auto is bfloat16 on CUDA and none (float32) elsewhere; float32, fp32 and
    no mean no autocast."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AUTOCAST_DTYPES.get(name)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on the device's type with `dtype`, or nothing for None."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with its core and thread counts (results and run_info.json record it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)"
