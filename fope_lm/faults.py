"""Deterministic fault injection and state digests for tests, read from the environment in this one place: the
trainer acts them out through a callback (fope_lm.training.callbacks.FaultInjection) installed only when one of
these variables is set, and a data prepare through `prepare_kill_after_units`, so production code holds no test seams.

FOPE_FAULT=<kind>:<step>[:<rank>] (every rank when no rank is given):
  kill_after_step       SIGKILL right after step N's optimizer step, before its logging or checkpoint
  kill_during_save      SIGKILL while checkpoint N is written: after its weights, before the rest and its marker
  sigterm_at_step       SIGTERM to self as step N starts (the graceful-stop path saves step N)
  stop_file_at_step     create the stop file as step N starts
  nan_loss_at_step      make step N's loss NaN (on_nonfinite handling)
  hold_at_step          as step N starts, wait until a stop is requested (so a test can signal a run that is
                        certainly still running, and knows the step it stops at)
  disk_full_during_save writing checkpoint N fails with ENOSPC after its weights (as a full disk would)
FOPE_FAULT=prepare_kill_after_units:<n>: SIGKILL a data prepare (fope_lm.data.prepare) once n units are newly
  tokenized, so a test can resume it.
FOPE_DEBUG_DIGESTS=1: every rank writes sha256 digests of its model tensors at the start and end of training
  to <run_dir>/debug/digests_rank<r>.json (to compare ranks, and weights carried by init_from).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch

KINDS = (
    "kill_after_step", "kill_during_save", "sigterm_at_step", "stop_file_at_step", "nan_loss_at_step", "hold_at_step",
    "disk_full_during_save", "prepare_kill_after_units",
)  # fmt: skip


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Fault:
        kind, step, *target = spec.split(":")
        if kind not in KINDS:
            raise ValueError(f"FOPE_FAULT kind {kind!r} is not one of {', '.join(KINDS)}")
        return cls(kind, int(step), int(target[0]) if target else None)

    def fires(self, kind: str, step: int) -> bool:
        return self.kind == kind and self.step == step


def fault_from_env(rank: int | None = None) -> Fault | None:
    """FOPE_FAULT as a Fault, if it is set and targets this rank (every rank when it names none)."""
    spec = os.environ.get("FOPE_FAULT")
    fault = Fault.parse(spec) if spec else None
    return fault if fault is not None and fault.rank in (None, rank) else None


def digests_requested() -> bool:
    return bool(os.environ.get("FOPE_DEBUG_DIGESTS"))


def prepare_kill_after_units() -> int | None:
    """FOPE_FAULT=prepare_kill_after_units:N: a data prepare SIGKILLs itself once N units are newly finished."""
    fault = fault_from_env()
    return fault.step if fault is not None and fault.kind == "prepare_kill_after_units" else None


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
