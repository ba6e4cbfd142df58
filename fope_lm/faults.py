"""Deterministic fault injection and state digests for the trainer's tests; inert unless the variables are set.

FOPE_FAULT=<kind>:<step>[:<rank>] (every rank when no rank is given):
  kill_after_step       SIGKILL right after step N's optimizer step, before its logging or checkpoint
  kill_during_save      SIGKILL while checkpoint N is written: after its weights, before the rest and its marker
  sigterm_at_step       SIGTERM to self as step N starts (the graceful-stop path saves step N)
  stop_file_at_step     create the stop file as step N starts
  nan_loss_at_step      make step N's loss NaN (on_nonfinite handling)
  hold_at_step          as step N starts, wait until a stop is requested (so a test can signal a run that is
                        certainly still running, and knows the step it stops at)
FOPE_DEBUG_DIGESTS=1: every rank writes sha256 digests of its model tensors at the start and end of training
  to <run_dir>/debug/digests_rank<r>.json (to compare ranks, and weights carried by init_from).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("kill_after_step", "kill_during_save", "sigterm_at_step", "stop_file_at_step", "nan_loss_at_step", "hold_at_step")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None

    @classmethod
    def from_env(cls, rank: int) -> "Fault | None":
        spec = os.environ.get("FOPE_FAULT")
        if not spec:
            return None
        kind, step, *target = spec.split(":")
        if kind not in KINDS:
            raise ValueError(f"FOPE_FAULT kind {kind!r} is not one of {', '.join(KINDS)}")
        fault = cls(kind, int(step), int(target[0]) if target else None)
        return fault if fault.rank in (None, rank) else None

    def fires(self, kind: str, step: int) -> bool:
        return self.kind == kind and self.step == step


def trigger(fault: Fault | None, kind: str, step: int, *, stop_file: Path | None = None, stop_agreed=None) -> bool:
    """Act out `fault` if it is of `kind` at `step`. Returns whether it fired (for nan_loss_at_step).

    stop_agreed (hold_at_step): a collective that says whether any rank was asked to stop; every rank polls it
    the same number of times, since all see the same answer."""
    if fault is None or not fault.fires(kind, step):
        return False
    if kind in ("kill_after_step", "kill_during_save"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigterm_at_step":
        os.kill(os.getpid(), signal.SIGTERM)
    elif kind == "stop_file_at_step":
        stop_file.touch()
    elif kind == "hold_at_step":
        while not stop_agreed():
            time.sleep(0.05)
    return True


def write_digests(run_dir: Path, rank: int, tag: str, state: dict[str, torch.Tensor]) -> None:
    if not os.environ.get("FOPE_DEBUG_DIGESTS"):
        return
    path = run_dir / "debug" / f"digests_rank{rank}.json"
    path.parent.mkdir(exist_ok=True)
    digests = json.loads(path.read_text()) if path.exists() else {}
    digests[tag] = {name: tensor_digest(tensor) for name, tensor in state.items()}
    path.write_text(json.dumps(digests, indent=1, sort_keys=True))


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
