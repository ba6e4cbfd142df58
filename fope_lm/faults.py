"""Deterministic fault injection and state digests for the trainer's tests: a callback (fope_lm.callbacks) that the
trainer installs only when one of these variables is set, so the production loop holds no test seams.

FOPE_FAULT=<kind>:<step>[:<rank>] (every rank when no rank is given):
  kill_after_step       SIGKILL right after step N's optimizer step, before its logging or checkpoint
  kill_during_save      SIGKILL while checkpoint N is written: after its weights, before the rest and its marker
  sigterm_at_step       SIGTERM to self as step N starts (the graceful-stop path saves step N)
  stop_file_at_step     create the stop file as step N starts
  nan_loss_at_step      make step N's loss NaN (on_nonfinite handling)
  hold_at_step          as step N starts, wait until a stop is requested (so a test can signal a run that is
                        certainly still running, and knows the step it stops at)
FOPE_FAULT=prepare_kill_after_units:<n>: SIGKILL a data prepare (fope_lm.data.prepare) once n units are newly
  tokenized, so a test can resume it.
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

import torch

from fope_lm.callbacks import Callback

KINDS = ("kill_after_step", "kill_during_save", "sigterm_at_step", "stop_file_at_step", "nan_loss_at_step", "hold_at_step")


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


class FaultInjection(Callback):
    """Acts out FOPE_FAULT on this rank and writes FOPE_DEBUG_DIGESTS."""

    def __init__(self, fault: Fault | None, digests: bool):
        self.fault, self.digests = fault, digests
        self._nan_hook = None

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        """The callback the environment asks for on this rank, or None (the usual case: nothing is installed)."""
        spec, digests = os.environ.get("FOPE_FAULT"), bool(os.environ.get("FOPE_DEBUG_DIGESTS"))
        fault = Fault.parse(spec) if spec else None
        fault = fault if fault is not None and fault.rank in (None, rank) else None
        return cls(fault, digests) if fault or digests else None

    def _fires(self, kind: str, step: int) -> bool:
        return self.fault is not None and self.fault.fires(kind, step)

    def on_train_start(self, trainer):
        self._write_digests(trainer, "start")

    def on_step_start(self, trainer, step):
        if self._fires("sigterm_at_step", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._fires("stop_file_at_step", step):
            trainer.plan.stop_file.touch()
        if self._fires("hold_at_step", step):
            while not trainer.stop_agreed():  # a collective: every rank polls it equally often, all see one answer
                time.sleep(0.05)
        if self._fires("nan_loss_at_step", step):  # every micro-batch's loss of this step becomes NaN
            module = trainer.accelerator.unwrap_model(trainer.model)
            self._nan_hook = module.register_forward_hook(lambda mod, args, out: out._replace(loss=out.loss * float("nan")))

    def on_step_end(self, trainer, step, result):
        if self._nan_hook is not None:
            self._nan_hook.remove()
            self._nan_hook = None
        if self._fires("kill_after_step", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, trainer, step, staging):
        if self._fires("kill_during_save", step):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_finish(self, trainer, stopped):
        self._write_digests(trainer, "end")

    def _write_digests(self, trainer, tag: str) -> None:
        if not self.digests:
            return
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        path = trainer.plan.run_dir / "debug" / f"digests_rank{trainer.plan.rank}.json"
        path.parent.mkdir(exist_ok=True)
        digests = json.loads(path.read_text()) if path.exists() else {}
        digests[tag] = {name: tensor_digest(tensor) for name, tensor in state.items()}
        path.write_text(json.dumps(digests, indent=1, sort_keys=True))


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
