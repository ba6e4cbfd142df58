"""The training loop: config -> data -> model -> Accelerator -> steps -> metrics and checkpoints.

Generic over models and position encodings; distribution is accelerate's (DDP, or DeepSpeed ZeRO 1/2/3).
One optimizer step takes this rank's share of the global batch in micro-batches. Each micro-batch's summed
loss is divided by the number of target tokens of the whole global batch, so the accumulated gradient is the
token-weighted mean over every micro-batch of every rank, however the batch is split.

`plan` checks everything that can be checked without compute (config, data, model shape, resume source) on
every rank, so a mistake fails at once with a one-line message; `Trainer` then builds and runs.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from fope_lm import faults
from fope_lm.checkpoint import (
    CHECKPOINTS_DIR,
    DEEPSPEED_STATE,
    OPTIMIZER_STATE,
    RNG_STATE,
    RUN_INFO,
    TRAINER_STATE,
    check_training_checkpoint,
    checkpoint_dir,
    checkpoint_step,
    checkpoints_after,
    find_latest_checkpoint,
    latest_loadable_checkpoint,
    list_checkpoints,
    load_state_dict,
    load_weights,
    prune_checkpoints,
    publish_checkpoint,
    read_model_config,
    remove_checkpoints_after,
    resolve_checkpoint,
    save_model,
    staging_dir,
    transfer_weights,
    write_json_atomic,
)
from fope_lm.config import OnNonFinite, TrainConfig, build_model_config, to_container, to_yaml, validated
from fope_lm.data import DataConfig, TokenData, TrainBatches, ValidationTokens, ensure_prepared
from fope_lm.distributed import (
    StopRequests,
    broadcast_buffers,
    build_accelerator,
    deepspeed_config_path,
    fill_deepspeed_config,
    mixed_precision,
    model_for_export,
    uses_deepspeed,
)
from fope_lm.errors import CheckpointError, ConfigError, FopeError
from fope_lm.metrics import MetricsFile, Throughput, peak_flops, peak_memory_gib, start_wandb
from fope_lm.model import ModelConfig, Transformer
from fope_lm.optim import build_optimizer, learning_rate, set_learning_rate
from fope_lm.provenance import git_sha, package_versions

log = logging.getLogger(__name__)

# Files of a run dir (a checkpoint's own files: fope_lm.checkpoint).
CONFIG_YAML = "config.yaml"
METRICS = "metrics.jsonl"
LOG_FILE = "train.log"
# Settings a resumed run may change (a run gets extended, its batch or schedule adjusted): warned and recorded.
RESUME_MAY_CHANGE = ("train.global_batch_size", "train.max_steps", "optim.lr", "optim.warmup_steps", "optim.alpha_f")


def main(cfg: DictConfig) -> None:
    """Hydra entry point (train.py). User errors print one line to stderr and exit 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    setup_logging(rank, world_size)
    try:
        Trainer(plan(cfg, rank=rank, world_size=world_size)).fit()
    except FopeError as exc:
        prefix = f"[rank {rank}] " if world_size > 1 else ""
        print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def setup_logging(rank: int, world_size: int) -> None:
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("fope_lm").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)


# --- plan: every check that needs no compute ------------------------------------------------------------
@dataclass
class Plan:
    config: TrainConfig
    run_dir: Path
    rank: int
    world_size: int
    data: TokenData
    model_config: ModelConfig
    grad_accum: int  # micro-batches per rank per optimizer step
    mixed_precision: str
    deepspeed_config: dict | None
    resume_from: Path | None  # a complete checkpoint to continue, or None for a new run
    resume_state: dict | None  # its trainer_state.json
    resume_changes: dict  # "section.key" -> [saved value, new value] for the RESUME_MAY_CHANGE settings that differ
    init_from: Path | None  # the checkpoint a new run starts from, resolved once (a run dir may gain newer ones)
    keep_history_until: int  # the run dir's checkpoints and metrics after this step are another trajectory's
    eval_hooks: dict
    stop_file: Path
    started: float  # time.time() when planning began: a stop file older than this predates the run

    @property
    def start_step(self) -> int:
        return self.resume_state["step"] if self.resume_state else 0


def plan(cfg: DictConfig, *, rank: int = 0, world_size: int = 1) -> Plan:
    started = time.time()
    config = validated(TrainConfig, cfg)
    train = config.train
    data = TokenData(ensure_prepared(DataConfig.from_cfg(config.data)))
    model_config = build_model_config(config.model, config.pe, max_seq_len=train.seq_len, default_vocab_size=data.vocab_size)
    data.check_vocab(model_config.vocab_size)

    per_step = train.micro_batch_size * world_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of micro_batch_size "
            f"{train.micro_batch_size} x {world_size} processes = {per_step}"
        )
    grad_accum = train.global_batch_size // per_step
    precision = mixed_precision(train.precision)
    deepspeed_path = deepspeed_config_path(train.deepspeed)
    deepspeed_config = None
    if deepspeed_path is not None:
        deepspeed_config = fill_deepspeed_config(deepspeed_path, train, grad_accum=grad_accum, world_size=world_size, precision=precision)
        if train.on_nonfinite is OnNonFinite.skip:
            raise ConfigError("train.on_nonfinite=skip does not work with DeepSpeed, which steps inside backward: use stop")

    run_dir = Path(config.run_root) / config.run_name
    resume_from = resume_point(config, run_dir, rank=rank)
    resume_state = init_from = None
    resume_changes = {}
    if resume_from is not None:
        resume_state = check_training_checkpoint(resume_from)
        check_resumable(resume_from, resume_state, model_config, data)
        resume_changes = changed_settings(resume_state["config"], to_container(config))
        if resume_state["step"] >= train.max_steps:
            log.info("%s is at step %d, train.max_steps=%d: nothing to train (raise max_steps to extend the run)",
                     resume_from, resume_state["step"], train.max_steps)  # fmt: skip
    elif config.init_from is not None:
        init_from = resolve_checkpoint(config.init_from)
        read_model_config(init_from)  # exists and is readable; shapes are checked on load
    return Plan(
        config=config,
        run_dir=run_dir,
        rank=rank,
        world_size=world_size,
        data=data,
        model_config=model_config,
        grad_accum=grad_accum,
        mixed_precision=precision,
        deepspeed_config=deepspeed_config,
        resume_from=resume_from,
        resume_state=resume_state,
        resume_changes=resume_changes,
        init_from=init_from,
        keep_history_until=resume_state["step"] if resume_from is not None and is_own_checkpoint(resume_from, run_dir) else 0,
        eval_hooks=instantiate_eval_hooks(train.eval_hooks),
        stop_file=Path(train.stop_file) if train.stop_file else run_dir / "STOP",
        started=started,
    )


def resume_point(config: TrainConfig, run_dir: Path, *, rank: int) -> Path | None:
    """The checkpoint this run continues, or None for a new one. Nothing of the run dir is deleted unless
    overwrite=true: a run dir holds one trajectory, so what an explicit resume= would abandon is refused."""
    if config.resume is None:
        latest = find_latest_checkpoint(run_dir)
        if latest is not None and not config.overwrite:
            raise CheckpointError(
                f"{run_dir} already has checkpoints (newest {latest.name}): pass resume=auto to continue it, "
                "overwrite=true to start it over, or another run_name"
            )
        return None
    if config.resume == "auto":  # the newest that loads; None: nothing saved yet, start (or init_from) as new
        return latest_loadable_checkpoint(run_dir, move_corrupt=rank == 0)
    checkpoint = resolve_checkpoint(config.resume)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise CheckpointError(f"{checkpoint} holds weights only, no training state: start from it with init_from={checkpoint}")
    own = is_own_checkpoint(checkpoint, run_dir)
    abandoned = checkpoints_after(run_dir, checkpoint_step(checkpoint)) if own else list_checkpoints(run_dir)
    if abandoned and not config.overwrite:
        names = ", ".join(path.name for path in abandoned)
        what = f"newer checkpoints ({names})" if own else f"checkpoints of its own ({names})"
        raise CheckpointError(
            f"resume={config.resume}: {run_dir} has {what} that continuing {checkpoint} would discard; pass "
            f"resume=auto to continue its newest, overwrite=true to discard them, or another run_name to continue "
            f"{checkpoint.name} in a new run dir"
        )
    return checkpoint


def is_own_checkpoint(checkpoint: Path, run_dir: Path) -> bool:
    return checkpoint.resolve().parent == (run_dir / CHECKPOINTS_DIR).resolve()


def changed_settings(saved: dict, new: dict) -> dict[str, list]:
    """The RESUME_MAY_CHANGE settings whose value differs between a checkpoint's config and this run's."""
    changes = {}
    for key in RESUME_MAY_CHANGE:
        section, name = key.split(".")
        before = saved.get(section, {}).get(name)  # a checkpoint of older code may lack a key
        if before != new[section][name]:
            changes[key] = [before, new[section][name]]
    return changes


def check_resumable(checkpoint: Path, state: dict, model_config: ModelConfig, data: TokenData) -> None:
    """Refuse to continue a checkpoint with another model shape, PE, training length or data."""
    saved = read_model_config(checkpoint).to_dict()
    wanted = model_config.to_dict()
    changed = [f"{key} {saved[key]!r} -> {wanted[key]!r}" for key in wanted if saved.get(key) != wanted[key]]
    if changed:
        raise CheckpointError(
            f"cannot resume {checkpoint}: this config changes {'; '.join(changed)}; resume with the checkpoint's "
            f"settings, or start a new run from its weights with init_from={checkpoint}"
        )
    try:
        data.check_fingerprint(state["data"]["data_fingerprint"])
    except FopeError as exc:
        raise CheckpointError(f"cannot resume {checkpoint}: {exc}") from None


def instantiate_eval_hooks(hooks: dict) -> dict:
    """`train.eval_hooks`: name -> {_target_: a function, **its options}, called at each eval as
    fn(model=..., accelerator=..., step=...) -> {metric: value} on every rank (e.g. fope_lm.evaluate's
    multi-length perplexity); the metrics are logged as eval/<name>/<metric>."""
    built = {}
    for name, node in hooks.items():
        try:
            built[name] = hydra.utils.instantiate(node, _partial_=True)
        except Exception as exc:  # ImportError, InstantiationException, a missing _target_
            raise ConfigError(f"train.eval_hooks.{name}: {str(exc).splitlines()[0]}") from None
    return built


# --- the trainer ------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    lr: float
    stop: bool  # some rank asked to stop: save and exit after this step


class Trainer:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.config = config = plan.config
        train = config.train
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        if train.deterministic:  # bitwise-reproducible steps (and so resumes) on the same hardware and world size
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)

        self.accelerator = accelerator = build_accelerator(plan.mixed_precision, plan.grad_accum, plan.deepspeed_config)
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process
        self.run_dir = plan.run_dir
        self.deepspeed = uses_deepspeed(accelerator)
        if self.is_main:
            self._prepare_run_dir()
        accelerator.wait_for_everyone()

        model = self._build_model()
        self.flops_per_token = model.flops_per_token(train.seq_len)
        self.num_parameters = model.num_parameters()
        model.to(self.device)
        if train.compile:
            # AOTAutograd's on-disk cache off: torch 2.13 crashes on a warm hit for graphs that end in views of an
            # intermediate (q, k, v at the rotary graph break), i.e. on every rerun or resume (docs/benchmarks.md)
            torch._functorch.config.enable_autograd_cache = False
            model.compile()  # in place: the same module, parameters and state-dict keys
        optimizer = build_optimizer(model, config.optim)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if self.deepspeed:
            broadcast_buffers(accelerator.unwrap_model(self.model))

        self.batches = TrainBatches(
            plan.data, train.seq_len, train.global_batch_size, seed=config.seed, rank=plan.rank, world_size=plan.world_size
        )
        self.val_chunks = self._validation_shard()
        self.step, self.tokens_seen, self.skipped_steps = 0, 0, 0
        set_seed(config.seed, device_specific=True)  # from here on, each rank draws its own random numbers
        if plan.resume_from is not None:
            self._load_training_state(plan.resume_from, plan.resume_state)

        self.fault = faults.Fault.from_env(plan.rank)
        self.stop_requests = StopRequests(plan.stop_file, watch_file=self.is_main, not_before=plan.started)
        self.metrics = MetricsFile(self.run_dir / METRICS)
        device_peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.throughput = Throughput(
            train.tokens_per_step // plan.world_size,
            self.flops_per_token,
            train.peak_tflops * 1e12 if train.peak_tflops else device_peak,
        )
        self.wandb = None
        if self.is_main:
            self.wandb = start_wandb(
                config.wandb,
                run_dir=self.run_dir,
                run_name=config.run_name,
                config=to_container(config),
                new_id=config.overwrite and plan.resume_from is None,
            )
        faults.write_digests(self.run_dir, plan.rank, "start", accelerator.unwrap_model(self.model).state_dict())

    def _build_model(self) -> Transformer:
        """The same initial weights on every rank, then a resumed checkpoint's weights or init_from's."""
        plan, config = self.plan, self.config
        set_seed(config.seed)
        model = Transformer(plan.model_config)
        if plan.resume_from is not None:
            load_weights(model, load_state_dict(plan.resume_from), plan.resume_from)
            if config.init_from is not None:
                log.info("resuming %s: init_from=%s only starts a run", plan.resume_from, config.init_from)
        elif plan.init_from is not None:
            for note in transfer_weights(model, plan.init_from, expand=config.init_expand):
                log.info("init_from %s: %s", plan.init_from, note)
            log.info("init_from %s: weights carried; new optimizer, schedule and data order", plan.init_from)
        return model

    # --- run dir ---------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        """Rank 0: the run dir holds one trajectory, so what lies beyond the start step goes; then provenance."""
        plan = self.plan
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_checkpoints_after(self.run_dir, plan.keep_history_until):  # overwrite=true, or half-written
            log.warning("removed %s: this run continues from step %d", path, plan.start_step)
        MetricsFile(self.run_dir / METRICS).keep_until(plan.keep_history_until)
        for key, (saved, new) in plan.resume_changes.items():
            log.warning("resuming %s with %s=%s (it was saved with %s)", plan.resume_from, key, new, saved)
        (self.run_dir / CONFIG_YAML).write_text(to_yaml(plan.config))
        write_json_atomic(
            self.run_dir / RUN_INFO,
            {
                "git_sha": git_sha(),
                "packages": package_versions(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": sys.argv,
                "world_size": plan.world_size,
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type,
                "mixed_precision": plan.mixed_precision,
                "deepspeed": plan.deepspeed_config,
                "model": plan.model_config.to_dict(),
                "data_dir": str(plan.data.dir),
                "data_fingerprint": plan.data.fingerprint,
                "resumed_from": str(plan.resume_from) if plan.resume_from else None,
                "changed_on_resume": plan.resume_changes,
                "init_from": str(plan.init_from) if plan.init_from else None,
            },
        )
        handler = logging.FileHandler(self.run_dir / LOG_FILE)
        handler.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(handler)
        log.info("run dir %s (git %s)", self.run_dir, git_sha())

    def _validation_shard(self) -> torch.Tensor:
        """This rank's equal share of the validation prefix, in training-length chunks (equal, so that every rank
        runs the same number of forwards, as ZeRO-3 requires)."""
        train, world_size = self.config.train, self.plan.world_size
        chunks = ValidationTokens(self.plan.data, train.eval_tokens, train.seq_len).chunks(train.seq_len)
        per_rank = len(chunks) // world_size
        if per_rank == 0:
            raise ConfigError(f"train.eval_tokens={train.eval_tokens} gives {len(chunks)} validation chunks, fewer than {world_size} ranks")
        return chunks[self.plan.rank * per_rank : (self.plan.rank + 1) * per_rank]

    # --- the loop --------------------------------------------------------------------------------------
    def fit(self) -> None:
        train = self.config.train
        plan = self.plan
        if self.deepspeed:
            backend = f"DeepSpeed ZeRO-{plan.deepspeed_config['zero_optimization']['stage']}"
        else:
            backend = "DDP" if plan.world_size > 1 else "one process"
        log.info(
            "%s: %.1fM parameters, pe %s, L=%d; global batch %d = %d processes x %d micro-batches x %d; %s on %s, %s; steps %d -> %d",
            self.config.run_name,
            self.num_parameters / 1e6,
            plan.model_config.pe,
            train.seq_len,
            train.global_batch_size,
            plan.world_size,
            plan.grad_accum,
            train.micro_batch_size,
            backend,
            self.device,
            "bf16" if plan.mixed_precision == "bf16" else "fp32",
            self.step,
            train.max_steps,
        )
        progress = tqdm(total=train.max_steps, initial=self.step, disable=None if self.is_main else True, desc=self.config.run_name)
        with logging_redirect_tqdm():
            while self.step < train.max_steps:
                step = self.step + 1
                faults.trigger(self.fault, "sigterm_at_step", step)
                faults.trigger(self.fault, "stop_file_at_step", step, stop_file=plan.stop_file)
                faults.trigger(self.fault, "hold_at_step", step, stop_agreed=self.stop_agreed)
                started = time.perf_counter()
                result = self.train_step(step)
                self.throughput.add_step(time.perf_counter() - started)
                self.step, self.tokens_seen = step, self.tokens_seen + train.tokens_per_step
                faults.trigger(self.fault, "kill_after_step", step)
                progress.update()
                progress.set_postfix(loss=f"{result.loss:.4f}", refresh=False)

                metrics = {}
                if step % train.log_interval == 0 or step == train.max_steps or result.stop:
                    metrics |= self.train_metrics(result)
                if step % train.eval_interval == 0 or step == train.max_steps:
                    metrics |= self.evaluate(step)
                if metrics:
                    self.log_metrics(step, metrics)
                if result.stop or step % train.save_interval == 0 or step == train.max_steps:
                    self.save(step)
                if result.stop:
                    log.info("stopped at step %d (%s); resume with resume=auto", step, self.stop_requests.reason or "asked by another rank")
                    self.stop_requests.consume_stop_file()  # rank 0's: only it watches the file
                    break
        progress.close()
        self.finish()

    def train_step(self, step: int) -> StepResult:
        train, accelerator = self.config.train, self.accelerator
        optim = self.config.optim
        lr = learning_rate(step, peak=optim.lr, warmup_steps=optim.warmup_steps, max_steps=train.max_steps, alpha_f=optim.alpha_f)
        set_learning_rate(self.optimizer, lr)  # before backward: DeepSpeed steps inside the last one

        batch = self.batches.next_batch().to(self.device)
        inputs, labels = batch[:, :-1], batch[:, 1:]
        global_targets = accelerator.reduce((labels != -100).sum(), reduction="sum")
        # accelerate divides each micro-batch loss by grad_accum and DDP/DeepSpeed average over ranks: undo both,
        # so the gradient is sum(token losses) / global_targets.
        scale = self.plan.grad_accum * self.plan.world_size / global_targets
        loss_sum = torch.zeros((), device=self.device)
        for micro_inputs, micro_labels in zip(inputs.split(train.micro_batch_size), labels.split(train.micro_batch_size)):
            with accelerator.accumulate(self.model):
                loss = self.model(micro_inputs, micro_labels, reduction="sum", loss_chunk_size=train.loss_chunk_size).loss
                if faults.trigger(self.fault, "nan_loss_at_step", step):
                    loss = loss * float("nan")
                accelerator.backward(loss * scale)
                loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), train.grad_clip or float("inf"))
        grad_norm = None if grad_norm is None else float(grad_norm)

        # one tiny all-reduce: the step's loss over all ranks, and whether any rank was asked to stop
        stop_flag = torch.tensor(float(self.stop_requests.requested()), device=self.device)
        loss_total, stop_votes = accelerator.reduce(torch.stack((loss_sum, stop_flag)), reduction="sum").tolist()
        loss = loss_total / global_targets.item()
        # every rank decides alike: the loss is all-reduced and the grad norm is of the all-reduced gradients.
        # (DeepSpeed has stepped already; `on_nonfinite=stop` then exits before anything is saved.)
        skipped = not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)))
        if skipped:
            self._on_nonfinite(step, loss, grad_norm)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, stop=stop_votes > 0)

    def stop_agreed(self) -> bool:
        """Whether any rank has been asked to stop (a collective: every rank must call it)."""
        flag = torch.tensor(float(self.stop_requests.requested()), device=self.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0

    def _on_nonfinite(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Stop (no checkpoint of this step: the last saved one stays the restart point) or count a skipped step."""
        what = f"non-finite loss {loss} / grad norm {grad_norm} at step {step}"
        if self.config.train.on_nonfinite is OnNonFinite.stop:
            last = find_latest_checkpoint(self.run_dir)
            raise FopeError(
                f"{what}; stopped without saving it (last checkpoint: {last or 'none'}); lower optim.lr, or set "
                "train.on_nonfinite=skip to drop such steps"
            )
        self.skipped_steps += 1
        log.warning("%s: update skipped (%d so far)", what, self.skipped_steps)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Validation loss at the training length (token-weighted over every rank's shard), plus the eval hooks."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for chunk in self.val_chunks.split(self.config.train.micro_batch_size):
            chunk = chunk.to(self.device)
            out = self.model(chunk[:, :-1], chunk[:, 1:], reduction="sum", loss_chunk_size=self.config.train.loss_chunk_size)
            totals += torch.stack((out.loss.double(), out.n_targets.double()))
        loss_sum, n_targets = self.accelerator.reduce(totals, reduction="sum").tolist()
        metrics = {"val/loss": loss_sum / n_targets, "val/ppl": perplexity(loss_sum / n_targets)}
        for name, hook in self.plan.eval_hooks.items():
            results = hook(model=self.model, accelerator=self.accelerator, step=step)
            metrics |= {f"eval/{name}/{key}": value for key, value in results.items()}
        self.model.train()
        return metrics

    def train_metrics(self, result: StepResult) -> dict[str, float]:
        metrics = {
            "train/loss": result.loss,
            "train/ppl": perplexity(result.loss),
            "train/lr": result.lr,
            "train/tokens": self.tokens_seen,
            "train/skipped_steps": self.skipped_steps,
        }
        if result.grad_norm is not None:
            metrics["train/grad_norm"] = result.grad_norm
        return metrics | self.throughput.report() | {"perf/peak_mem_gib": peak_memory_gib(self.device)}

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        self.metrics.write(step, metrics)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        shown = [f"step {step}/{self.config.train.max_steps}"]
        for key, fmt in (
            ("train/loss", "loss {:.4f}"),
            ("val/loss", "val {:.4f}"),
            ("train/lr", "lr {:.2e}"),
            ("train/grad_norm", "grad {:.3f}"),
            ("perf/tokens_per_s_per_device", "{:,.0f} tok/s/dev"),
            ("perf/mfu", "mfu {:.1%}"),
        ):
            if key in metrics:
                shown.append(fmt.format(metrics[key]))
        log.info(" | ".join(shown))

    # --- checkpoints -------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        """Every rank: weights, optimizer, data position, RNG of each rank, counters; published atomically."""
        final = checkpoint_dir(self.run_dir, step)
        staging = staging_dir(final)
        if self.is_main:
            staging.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        export = model_for_export(self.accelerator, self.model)  # a collective under DeepSpeed
        if self.is_main:
            save_model(
                staging,
                export,
                metadata={
                    "pe": self.plan.model_config.pe,
                    "train_seq_len": self.config.train.seq_len,
                    "data_fingerprint": self.plan.data.fingerprint,
                    "data_dir": str(self.plan.data.dir),
                    "step": step,
                    "tokens_seen": self.tokens_seen,
                },
            )
        faults.trigger(self.fault, "kill_during_save", step)
        if self.deepspeed:  # its sharded optimizer (and module) states; every rank writes its own part
            self.model.save_checkpoint(str(staging), tag=DEEPSPEED_STATE, save_latest=False)
        elif self.is_main:  # DDP: every rank holds the same optimizer state
            torch.save(self.optimizer.state_dict(), staging / OPTIMIZER_STATE)
        torch.save(rng_state(), staging / RNG_STATE.format(rank=self.plan.rank))
        if self.is_main:
            write_json_atomic(staging / TRAINER_STATE, self.trainer_state(step))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            publish_checkpoint(staging, final)
            prune_checkpoints(self.run_dir, self.config.train.keep_last)
            log.info("saved %s", final)
        self.accelerator.wait_for_everyone()

    def trainer_state(self, step: int) -> dict:
        return {
            "step": step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "data": self.batches.state_dict(),
            "world_size": self.plan.world_size,
            "deepspeed": self.deepspeed,
            "git_sha": git_sha(),
            "config": to_container(self.config),
        }

    def _load_training_state(self, checkpoint: Path, state: dict) -> None:
        """Optimizer, data position, counters and RNG (the weights were loaded before prepare)."""
        if self.deepspeed:
            if not (checkpoint / DEEPSPEED_STATE).is_dir():
                raise CheckpointError(f"{checkpoint} was saved without DeepSpeed: resume it without, or init_from it")
            loaded, _ = self.model.load_checkpoint(str(checkpoint), tag=DEEPSPEED_STATE, load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {checkpoint / DEEPSPEED_STATE}")
        else:
            if not (checkpoint / OPTIMIZER_STATE).is_file():
                raise CheckpointError(f"{checkpoint} was saved with DeepSpeed: resume it with the same DeepSpeed config")
            self.optimizer.load_state_dict(load_torch_file(checkpoint / OPTIMIZER_STATE))
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]
        rng_file = checkpoint / RNG_STATE.format(rank=self.plan.rank)
        note = rng_restore_note(
            checkpoint, saved_by=state["world_size"], world_size=self.plan.world_size, rank=self.plan.rank, rng_file=rng_file
        )
        if note:
            log.warning(note)
        else:
            set_rng_state(load_torch_file(rng_file))
        log.info("resumed %s at step %d (%d tokens seen)", checkpoint, self.step, self.tokens_seen)

    def finish(self) -> None:
        faults.write_digests(self.run_dir, self.plan.rank, "end", self.accelerator.unwrap_model(self.model).state_dict())
        if self.wandb is not None:
            self.wandb.finish()
        # every rank reaches the end before the process group goes away (else exits race and some abort)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def rng_restore_note(checkpoint: Path, *, saved_by: int, world_size: int, rank: int, rng_file: Path) -> str | None:
    """Why this rank cannot restore its random state from a checkpoint, or None when it can."""
    if saved_by != world_size:
        ranks = f"{saved_by} rank{'' if saved_by == 1 else 's'}"
        return f"{checkpoint} was saved by {ranks}, this run has {world_size}: the random state of each rank is seeded anew"
    if not rng_file.is_file():
        return f"{checkpoint} has no {rng_file.name}: the random state of rank {rank} is seeded anew"
    return None


def load_torch_file(path: Path):
    """A checkpoint's torch.save file (tensors and plain containers only), or a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbled pickle, unpickling refused
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"cannot load {path} ({type(exc).__name__}: {first_line}); resume an older checkpoint") from None


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states in types that `torch.load(weights_only=True)` reads."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
