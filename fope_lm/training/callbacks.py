"""What happens around the training loop, as callbacks on a handful of hooks (OLMo-core's pattern): the metrics
file, wandb, the console, throughput/MFU and stop requests. The trainer calls every hook of every callback in
order; each hook is optional.

  on_train_start(trainer)               before the first step (after a resume's state is restored)
  on_step_start(trainer, step)          before optimizer step `step` (1-based)
  on_step_end(trainer, step, result)    after it (result: the step's loss, grad norm, lr, stop vote)
  on_log(trainer, step, metrics)        a step with metrics to report; callbacks earlier in the list may add
                                        entries (throughput), later ones write them (file, wandb, console)
  on_save(trainer, step, staging)       while checkpoint `step` is written: its weights are in `staging`
  on_finish(trainer, stopped)           after the last step, or after a requested stop
  stop_requested() -> bool              whether this rank was asked to stop (all-reduced by the step)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fope_lm.faults import Fault, digests_requested, fault_from_env, tensor_digest
from fope_lm.tracking import start_wandb
from fope_lm.training.distributed import StopRequests
from fope_lm.training.metrics import MetricsFile, peak_flops, peak_memory_gib

if TYPE_CHECKING:
    from fope_lm.training.trainer import StepResult, Trainer

log = logging.getLogger("fope_lm.training.trainer")


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_start(self, trainer: Trainer, step: int) -> None: ...
    def on_step_end(self, trainer: Trainer, step: int, result: StepResult) -> None: ...
    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None: ...
    def on_save(self, trainer: Trainer, step: int, staging: Path) -> None: ...
    def on_finish(self, trainer: Trainer, stopped: bool) -> None: ...
    def stop_requested(self) -> bool:
        return False


class Callbacks(list):
    """The trainer's callbacks, called in order."""

    def call(self, hook: str, *args: Any) -> None:
        for callback in self:
            getattr(callback, hook)(*args)

    def stop_requested(self) -> bool:
        return any(callback.stop_requested() for callback in self)


class Throughput(Callback):
    """perf/tokens_per_s_per_device, perf/step_seconds and perf/mfu over the steps since the last report (steps
    timed from start to end, logging and checkpoints excluded), and perf/peak_mem_gib; added to train metrics.

    MFU = achieved FLOP/s per device / the device's peak dense bf16 FLOP/s (fope_lm.training.metrics.PEAK_BF16_TFLOPS, or
    train.peak_tflops), with achieved = tokens/s x Transformer.flops_per_token(seq_len)."""

    def __init__(self, tokens_per_step_per_device: int, flops_per_token: float, peak: float | None):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step_per_device, flops_per_token, peak
        self.steps, self.seconds, self.started = 0, 0.0, 0.0

    @classmethod
    def for_trainer(cls, trainer: Trainer) -> Throughput:
        train, device = trainer.config.train, trainer.device
        device_peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        peak = train.peak_tflops * 1e12 if train.peak_tflops else device_peak
        return cls(train.tokens_per_step // trainer.plan.world_size, trainer.flops_per_token, peak)

    def on_step_start(self, trainer, step):
        self.started = time.perf_counter()

    def on_step_end(self, trainer, step, result):
        self.steps += 1
        self.seconds += time.perf_counter() - self.started

    def on_log(self, trainer, step, metrics):
        if "train/loss" in metrics:
            metrics |= self.report() | {"perf/peak_mem_gib": peak_memory_gib(trainer.device)}

    def report(self) -> dict[str, float]:
        if not self.steps:
            return {}
        tokens_per_s = self.steps * self.tokens_per_step / self.seconds
        metrics = {"perf/tokens_per_s_per_device": tokens_per_s, "perf/step_seconds": self.seconds / self.steps}
        if self.peak:
            metrics["perf/mfu"] = tokens_per_s * self.flops_per_token / self.peak
        self.steps, self.seconds = 0, 0.0
        return metrics


class MetricsFileWriter(Callback):
    """<run_dir>/metrics.jsonl (rank 0): one record per logged step. A resumed run first drops the records after the
    step it continues, so that the file is one trajectory."""

    def __init__(self, path: Path, keep_until: int):
        self.file, self.keep_until = MetricsFile(path), keep_until

    def on_train_start(self, trainer):
        self.file.keep_until(self.keep_until)

    def on_log(self, trainer, step, metrics):
        self.file.write(step, metrics)


class WandbLogger(Callback):
    """The run's wandb run (rank 0): resumed under the same id by a resume or a requeue; offline without credentials.
    Its config is the validated config, with the plan's `model_resolved` (the model's every shape value and
    n_parameters), so runs filter by size (model_resolved.n_parameters, model_resolved.d_model)."""

    def __init__(self):
        self.run = None

    def on_train_start(self, trainer):
        from fope_lm.training.config import to_container

        config, plan = trainer.config, trainer.plan
        if not config.wandb.enabled:
            return
        new_id = config.overwrite and plan.resume_from is None
        run = plan.run_dir
        self.run = start_wandb(
            config.wandb,
            directory=run.wandb_dir,
            id_file=run.wandb_id,
            run_name=config.run_name,
            config=to_container(config),
            new_id=new_id,
        )

    def on_log(self, trainer, step, metrics):
        if self.run is not None:
            self.run.log(metrics, step=step)

    def on_finish(self, trainer, stopped):
        if self.run is not None:
            self.run.finish()


class ConsoleProgress(Callback):
    """A tqdm bar on rank 0 (when stderr is a terminal) and one log line per logged step, ending with the time since
    this launch's first step and the time left at that pace (`elapsed 3m12s eta 23m28s`): a resumed run times only
    its own steps, so its ETA holds; evaluations and checkpoints are part of the pace."""

    SHOWN = (
        ("train/loss", "loss {:.4f}"),
        ("val/loss", "val {:.4f}"),
        ("train/lr", "lr {:.2e}"),
        ("train/grad_norm", "grad {:.3f}"),
        ("perf/tokens_per_s_per_device", "{:,.0f} tok/s/dev"),
        ("perf/mfu", "mfu {:.1%}"),
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.bar: tqdm | None = None
        self.redirect = logging_redirect_tqdm()
        self.clock = clock
        self.first_step: int | None = None  # this launch's first step, begun at self.started
        self.started = 0.0

    def on_train_start(self, trainer):
        self.redirect.__enter__()
        self.bar = tqdm(total=trainer.config.train.max_steps, initial=trainer.step, desc=trainer.config.run_name, disable=None)

    def on_step_start(self, trainer, step):
        if self.first_step is None:
            self.first_step, self.started = step, self.clock()

    def on_step_end(self, trainer, step, result):
        self.bar.update()
        self.bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)

    def on_log(self, trainer, step, metrics):
        shown = [f"step {step}/{trainer.config.train.max_steps}"]
        shown += [fmt.format(metrics[key]) for key, fmt in self.SHOWN if key in metrics]
        if self.first_step is not None:
            elapsed = self.clock() - self.started
            left = (trainer.config.train.max_steps - step) * elapsed / (step - self.first_step + 1)
            shown.append(f"elapsed {duration(elapsed)} eta {duration(left)}")
        log.info(" | ".join(shown))

    def on_finish(self, trainer, stopped):
        self.bar.close()
        self.redirect.__exit__(None, None, None)


def duration(seconds: float) -> str:
    """42s, 3m12s, 2h05m09s."""
    total = round(seconds)
    hours, minutes, secs = total // 3600, total // 60 % 60, total % 60
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class StopOnRequest(Callback):
    """SIGTERM/SIGUSR1 or the stop file ask for a stop (fope_lm.training.distributed.StopRequests); once honoured (the step
    saved), the stop file is removed so that the resumed run does not stop at once."""

    def __init__(self, stop_file: Path, *, watch_file: bool, not_before: float):
        self.requests = StopRequests(stop_file, watch_file=watch_file, not_before=not_before)

    def stop_requested(self) -> bool:
        return self.requests.requested()

    def on_finish(self, trainer, stopped):
        if stopped:
            reason = self.requests.reason or "asked by another rank"
            log.info("stopped at step %d (%s); resume with resume=auto", trainer.step, reason)
            self.requests.consume_stop_file()


class FaultInjection(Callback):
    """Acts out FOPE_FAULT on this rank and writes FOPE_DEBUG_DIGESTS (fope_lm.faults); installed only when asked for."""

    def __init__(self, fault: Fault | None, digests: bool):
        self.fault, self.digests = fault, digests
        self._nan_hook = None

    @classmethod
    def from_env(cls, rank: int) -> FaultInjection | None:
        """The callback the environment asks for on this rank, or None (the usual case: nothing is installed)."""
        fault, digests = fault_from_env(rank), digests_requested()
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
        if self._fires("disk_full_during_save", step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "optimizer.pt"))

    def on_finish(self, trainer, stopped):
        self._write_digests(trainer, "end")

    def _write_digests(self, trainer, tag: str) -> None:
        if not self.digests:
            return
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        path = trainer.plan.run_dir.debug / f"digests_rank{trainer.plan.rank}.json"
        path.parent.mkdir(exist_ok=True)
        digests = json.loads(path.read_text()) if path.exists() else {}
        digests[tag] = {name: tensor_digest(tensor) for name, tensor in state.items()}
        path.write_text(json.dumps(digests, indent=1, sort_keys=True))
