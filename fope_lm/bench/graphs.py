"""What the compiler sees of the model: graphs and graph breaks of a forward (`torch._dynamo.explain`), and the
host reads of a computation (every `.item()`, `int()`, `bool()`, `float()` of a device tensor dispatches
`aten._local_scalar_dense`). Shared by tests/test_compile.py, scripts/bench/compile_step.py and the GPU suite."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch._dynamo
from torch.utils._python_dispatch import TorchDispatchMode


def graph_breaks(fn, *args, **kwargs) -> dict:
    """{"graphs", "breaks", "reasons"} of tracing fn(*args, **kwargs) once (a fresh dynamo state)."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [str(getattr(reason, "reason", reason)).splitlines()[0] for reason in explained.break_reasons]
    torch._dynamo.reset()
    return {"graphs": explained.graph_count, "breaks": explained.graph_break_count, "reasons": reasons}


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value on the host (`count`); `paused()` leaves out a part (e.g. an optimizer
    whose step counters live on the host by design)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self._paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self._paused:
            self.count += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
