"""Shared helpers for the benchmark scripts: timing one train step, interleaved so that machine noise hits
all contenders alike, and printing a table. Benchmarks report numbers; they never assert on speed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fope_lm import devices
from fope_lm.devices import resolve_autocast


def autocast(device: torch.device, dtype: str):
    """The benchmarks' --dtype (bf16 or fp32) as an autocast context."""
    return devices.autocast(device, resolve_autocast(dtype, device))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(model, loss_fn, optimizer, device, dtype):
    """A closure running forward + backward + optimizer step once and returning its wall time."""

    def step() -> float:
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = loss_fn(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        return time.perf_counter() - start

    return step


def time_interleaved(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step for each named step function, run round-robin."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))
