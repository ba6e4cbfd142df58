"""The training loop: config -> data -> model -> Accelerator -> steps, with checkpoints and reporting beside it.

Generic over models and position encodings; distribution is accelerate's (DDP, or DeepSpeed ZeRO 1/2/3).
One optimizer step takes this rank's share of the global batch in micro-batches. Each micro-batch's summed
loss is divided by the number of target tokens of the whole global batch, so the accumulated gradient is the
token-weighted mean over every micro-batch of every rank, however the batch is split.

`plan` checks everything that can be checked without compute (config, data, model shape, resume source) on
every rank, so a mistake fails at once with a one-line message; `Trainer` then builds and runs. Checkpoints are
the `Checkpointer`'s (fope_lm.training.checkpointer); metrics, wandb, the console, throughput and stop requests are
callbacks (fope_lm.training.callbacks), as is fault injection for tests (fope_lm.training.faults, installed only when asked for).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import hydra
import torch
from accelerate.utils import set_seed, str_to_bool
from omegaconf import DictConfig

from fope_lm.checkpoint import load_state_dict, load_weights, read_model_config, transfer_weights, write_json_atomic
from fope_lm.data import DataConfig, TokenData, TrainBatches, ValidationTokens
from fope_lm.devices import device_name
from fope_lm.errors import ConfigError, FopeError
from fope_lm.nn.attention import attention_kernels, choose_kernel
from fope_lm.nn.documents import Documents
from fope_lm.nn.model import ModelConfig, Transformer
from fope_lm.provenance import git_sha, package_versions
from fope_lm.run_dir import RunDir, RunLock, resolve_checkpoint
from fope_lm.schema import validated
from fope_lm.training.callbacks import (
    Callbacks,
    ConsoleProgress,
    FaultInjection,
    MetricsFileWriter,
    StopOnRequest,
    Throughput,
    WandbLogger,
)
from fope_lm.training.checkpointer import (
    Checkpointer,
    changed_settings,
    check_resumable,
    resume_point,
)
from fope_lm.training.config import OnNonFinite, TrainConfig, build_model_config, resolved_model, to_container, to_yaml
from fope_lm.training.distributed import (
    broadcast_buffers,
    build_accelerator,
    deepspeed_config_path,
    fill_deepspeed_config,
    mixed_precision,
    uses_deepspeed,
)
from fope_lm.training.optim import build_optimizer, learning_rate, set_learning_rate
from fope_lm.training.prefetch import HostBatch, Prefetcher, prepare_batch

log = logging.getLogger(__name__)


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
    run_dir: RunDir
    rank: int
    world_size: int
    data: TokenData
    model_config: ModelConfig
    grad_accum: int  # micro-batches per rank per optimizer step
    mixed_precision: str
    deepspeed_config: dict | None
    compile: bool  # train.compile resolved for this device and engine
    resume_from: Path | None  # a complete checkpoint to continue, or None for a new run
    resume_state: dict | None  # its trainer_state.json
    resume_changes: dict  # "section.key" -> [saved value, new value] for the settings a resume may change
    init_from: Path | None  # the checkpoint a new run starts from, resolved once (a run dir may gain newer ones)
    keep_history_until: int  # the run dir's checkpoints and metrics after this step are another trajectory's
    eval_hooks: dict
    stop_file: Path
    started: float  # time.time() when planning began: a stop file older than this predates the run
    lock: RunLock | None = None  # rank 0's hold on the run dir, for the life of the process

    @property
    def start_step(self) -> int:
        return self.resume_state["step"] if self.resume_state else 0


def plan(cfg: DictConfig, *, rank: int = 0, world_size: int = 1) -> Plan:
    started = time.time()
    config = validated(TrainConfig, cfg)
    train = config.train
    data_cfg = DataConfig.from_cfg(config.data)
    if data_cfg.dir is not None:  # data.dir: the dir as prepared; the run records its config, not the group's ignored keys
        config.data = data_cfg.to_config()
    data = TokenData.from_config(data_cfg)  # by its absolute path, as run_info.json and the checkpoints record it
    model_config = build_model_config(config.model, config.pe, max_seq_len=train.seq_len, default_vocab_size=data.vocab_size)
    data.check_vocab(model_config.vocab_size)
    record_resolved_model(config, model_config, warn=rank == 0)
    if rank == 0:
        warn_if_warmup_fills_the_run(config)
    if 0 < (instances := data.train_instances(train.seq_len)) < train.batch_size:  # 0: TrainBatches says the length is too long
        raise ConfigError(
            f"train.global_batch_size={train.batch_size} is more than the {instances} training instances of {data.dir} at "
            f"seq_len={train.seq_len}: a step would repeat samples; use a global batch of at most {instances}, or prepare more data"
        )

    per_step = train.micro_batch_size * world_size
    if train.batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.batch_size} is not a multiple of micro_batch_size "
            f"{train.micro_batch_size} x {world_size} processes = {per_step}"
        )
    grad_accum = train.batch_size // per_step
    precision = mixed_precision(train.precision)
    deepspeed_path = deepspeed_config_path(train.deepspeed)
    deepspeed_config = None
    if deepspeed_path is not None:
        deepspeed_config = fill_deepspeed_config(deepspeed_path, train, grad_accum=grad_accum, world_size=world_size, precision=precision)
        if train.on_nonfinite is OnNonFinite.skip:
            raise ConfigError("train.on_nonfinite=skip does not work with DeepSpeed, which steps inside backward: use stop")

    compile = resolve_compile(train.compile, deepspeed_config)
    if train.attention == "flash":  # flash-attn missing, a CPU run or a bias it cannot compute: one line, now
        with torch.device("meta"):
            encoding = model_config.pe_spec.build(head_dim=model_config.head_dim, n_heads=model_config.n_heads, max_seq_len=train.seq_len)
        choose_kernel("flash", encoding, head_dim=model_config.head_dim, device="cuda" if runs_on_cuda() else "cpu")
    run_dir = RunDir(Path(config.run_root) / config.run_name)
    created = not run_dir.path.exists()
    lock = run_dir.lock() if rank == 0 else None  # one run per run dir: before anything in it is set aside or written
    try:
        resumed = resume_point(resume=config.resume, overwrite=config.overwrite, run_dir=run_dir, rank=rank)
        resume_from, resume_state = resumed if resumed is not None else (None, None)
        init_from = None
        resume_changes: dict = {}
        if resume_from is not None and resume_state is not None:
            check_resumable(resume_from, resume_state, model_config, data)
            resume_changes = changed_settings(resume_state["config"], to_container(config))
            if resume_state["step"] >= train.max_steps:
                log.info("%s is at step %d, train.max_steps=%d: nothing to train (raise max_steps to extend the run)",
                         resume_from, resume_state["step"], train.max_steps)  # fmt: skip
        elif config.init_from is not None:
            init_from = resolve_checkpoint(config.init_from)
            read_model_config(init_from)  # exists and is readable; shapes are checked on load
        own_history = resume_from is not None and resume_state is not None and run_dir.owns(resume_from)
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
            compile=compile,
            resume_from=resume_from,
            resume_state=resume_state,
            resume_changes=resume_changes,
            init_from=init_from,
            keep_history_until=resume_state["step"] if own_history and resume_state else 0,
            eval_hooks=instantiate_eval_hooks(train.eval_hooks),
            stop_file=Path(train.stop_file) if train.stop_file else run_dir.stop_file,
            started=started,
            lock=lock,
        )
    except BaseException:
        if lock is not None:  # planning failed: let go, and leave no run dir that only the lock made
            lock.release()
            if created:
                run_dir.lock_file.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    run_dir.path.rmdir()
        raise


def record_resolved_model(config: TrainConfig, model_config: ModelConfig, *, warn: bool) -> None:
    """config.model_resolved: the model this run builds (config.yaml, trainer_state.json and wandb record it; the
    `model` section keeps what was asked for, nulls included, so that an override or a resume means what it meant).
    A value that came in with the config (a re-run config.yaml, a command line) is replaced, and named if it differs."""
    resolved = resolved_model(model_config)
    given = config.model_resolved
    if warn and given is not None and given != resolved:
        changed = "; ".join(f"{key} {given.get(key)!r} -> {value!r}" for key, value in resolved.items() if given.get(key) != value)
        log.warning(
            "model_resolved is a record of the model that `model`, `pe` and train.seq_len give, not a setting: recomputed "
            "(%s); set the shape with model.*", changed or f"unknown keys {sorted(set(given) - set(resolved))} dropped",
        )  # fmt: skip
    config.model_resolved = resolved


def warn_if_warmup_fills_the_run(config: TrainConfig) -> None:
    """A run whose max_steps is at most optim.warmup_steps never leaves the linear warmup (optim.learning_rate): say
    so, with both values and what the LR then does."""
    train, optim = config.train, config.optim
    if train.max_steps > optim.warmup_steps:
        return
    max_steps = f"train.max_steps={train.max_steps}" + (f" (from train.max_tokens={train.max_tokens})" if train.max_tokens else "")
    if train.max_steps == optim.warmup_steps:
        what = f"the LR reaches its peak optim.lr={optim.lr:g} only at the last step and never decays"
    else:
        reached = optim.lr * train.max_steps / optim.warmup_steps
        what = (
            f"the LR never reaches its peak optim.lr={optim.lr:g}: it rises linearly to {reached:.3g} "
            f"({train.max_steps / optim.warmup_steps:.0%} of it) at the last step and never decays"
        )
    log.warning(
        "%s <= optim.warmup_steps=%d: the run never leaves warmup; %s (no cosine phase down to optim.alpha_f x lr); "
        "lower optim.warmup_steps or raise train.max_steps", max_steps, optim.warmup_steps, what,
    )  # fmt: skip


def resolve_compile(configured: bool | None, deepspeed_config: dict | None) -> bool:
    """train.compile: null compiles on CUDA (DDP, one GPU, ZeRO-1/2), not on CPU, where compiling a small model costs
    more than it saves. ZeRO-3 is refused: its parameter hooks exhaust dynamo's recompile limit, which then falls back
    to eager module by module without a word."""
    zero3 = deepspeed_config is not None and deepspeed_config["zero_optimization"].get("stage") == 3
    if configured and zero3:
        raise ConfigError(
            "train.compile=true with DeepSpeed ZeRO-3: dynamo recompiles on ZeRO-3's parameter hooks and silently falls back "
            "to eager; compile with DDP or ZeRO-1/2, or set train.compile=false"
        )
    if configured is not None:
        return configured
    return runs_on_cuda() and not zero3


def runs_on_cuda() -> bool:
    """Whether this run's processes will train on CUDA (accelerate's ACCELERATE_USE_CPU forces the CPU)."""
    return torch.cuda.is_available() and not str_to_bool(os.environ.get("ACCELERATE_USE_CPU", "false"))


def instantiate_eval_hooks(hooks: dict) -> dict:
    """`train.eval_hooks`: name -> {_target_: a function, **its options}, called at each eval as
    fn(model=..., accelerator=..., step=...) -> {metric: value} on every rank (e.g. fope_lm.evaluation.runner's
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


def accumulate_gradients(
    accelerator,
    model,
    labels: torch.Tensor,
    micro_batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict]],
    *,
    grad_accum: int,
    world_size: int,
    loss_chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's forwards and backwards over its micro-batches (inputs, labels, document arguments), each gradient
    that of sum(token losses) / the targets of the whole step on every rank. Returns this rank's summed loss and the
    global target count (both on the device: the caller reads them with the rest of the step's numbers)."""
    global_targets = accelerator.reduce((labels != -100).sum(), reduction="sum").clamp_min(1)  # all filtered: no loss
    # accelerate divides each micro-batch loss by grad_accum and DDP/DeepSpeed average over ranks: undo both,
    # so the gradient is sum(token losses) / global_targets.
    scale = grad_accum * world_size / global_targets
    loss_sum = torch.zeros((), device=accelerator.device)
    for inputs, micro_labels, documents in micro_batches:
        with accelerator.accumulate(model):
            loss = model(inputs, micro_labels, reduction="sum", loss_chunk_size=loss_chunk_size, **documents).loss
            accelerator.backward(loss * scale)
            loss_sum += loss.detach()
    return loss_sum, global_targets


class Trainer:
    def __init__(self, plan: Plan):
        self.plan, self.config = plan, plan.config
        train = self.config.train
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        if train.deterministic:  # bitwise-reproducible steps (and so resumes) on the same hardware and world size
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.accelerator = build_accelerator(plan.mixed_precision, plan.grad_accum, plan.deepspeed_config)
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        if self.device.type == "cuda":  # TF32 tensor cores for fp32 matmuls (what autocast leaves in fp32, or fp32 runs)
            torch.backends.cuda.matmul.fp32_precision = "tf32" if train.tf32 else "ieee"
        self.checkpointer = Checkpointer(
            plan.run_dir, self.accelerator, rank=plan.rank, deepspeed=uses_deepspeed(self.accelerator), keep_last=train.keep_last
        )
        if self.is_main:
            self._prepare_run_dir()
        self.accelerator.wait_for_everyone()

        model = self._build_model()
        self.flops_per_token, self.num_parameters = model.flops_per_token(train.seq_len), model.num_parameters()
        model.to(self.device)
        model.set_attention(train.attention, self.device)  # train.attention=flash without flash-attn: one line, no compute
        model.set_activation_checkpointing(train.checkpoint_every)
        if plan.compile:  # one graph per forward for every PE (tests/test_compile.py)
            model.compile()  # in place: the same module, parameters and state-dict keys
        self.model, self.optimizer = self.accelerator.prepare(model, build_optimizer(model, self.config.optim))
        if self.checkpointer.deepspeed:
            broadcast_buffers(self.accelerator.unwrap_model(self.model))

        # the next step's batch is read, filtered and cut into documents on a background thread (fope_lm.training.prefetch);
        # state_dict() is the position after the steps done, not after the batch prepared ahead
        self.batches: Prefetcher[HostBatch] = Prefetcher(
            TrainBatches(plan.data, train.seq_len, train.batch_size, seed=self.config.seed, rank=plan.rank, world_size=plan.world_size),
            self._prepare_batch,
        )
        self.val_chunks = self._validation_shard()
        self.step, self.tokens_seen, self.skipped_steps, self.filtered_instances = 0, 0, 0, 0
        self.instance_filter = train.repetition_filter if train.instance_filter else None
        set_seed(self.config.seed, device_specific=True)  # from here on, each rank draws its own random numbers
        if plan.resume_from is not None:
            state = self.checkpointer.restore(plan.resume_from, self.model, self.optimizer, world_size=plan.world_size)
            self.batches.load_state_dict(state["data"])
            self.step, self.tokens_seen, self.skipped_steps = state["step"], state["tokens_seen"], state["skipped_steps"]
            self.filtered_instances = state.get("filtered_instances", 0)  # absent from checkpoints of older code
            log.info("resumed %s at step %d (%d tokens seen)", plan.resume_from, self.step, self.tokens_seen)
        self.callbacks = self._callbacks()

    def _callbacks(self) -> Callbacks:
        plan = self.plan
        callbacks = Callbacks([Throughput.for_trainer(self)])
        if self.is_main:
            callbacks += [MetricsFileWriter(plan.run_dir.metrics, plan.keep_history_until), WandbLogger(), ConsoleProgress()]
        callbacks.append(StopOnRequest(plan.stop_file, watch_file=self.is_main, not_before=plan.started))
        if (faults := FaultInjection.from_env(plan.rank)) is not None:
            callbacks.append(faults)
        return callbacks

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

    def _prepare_run_dir(self) -> None:
        """Rank 0: the run dir holds one trajectory, so what another one left beyond the start step goes; provenance."""
        plan = self.plan
        plan.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.checkpointer.discard_history_after(plan.keep_history_until, plan.start_step)
        for key, (saved, new) in plan.resume_changes.items():
            log.warning("resuming %s with %s=%s (it was saved with %s)", plan.resume_from, key, new, saved)
        plan.run_dir.config.write_text(to_yaml(plan.config))
        write_json_atomic(
            plan.run_dir.run_info,
            {
                "git_sha": git_sha(),
                "packages": package_versions(),
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": sys.argv,
                "world_size": plan.world_size,
                "device": device_name(self.device),
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
        handler = logging.FileHandler(plan.run_dir.train_log)
        handler.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(handler)
        log.info("run dir %s (git %s)", plan.run_dir, git_sha())

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
        train, callbacks = self.config.train, self.callbacks
        self._log_start()
        callbacks.call("on_train_start", self)
        stopped, first_step, skipped_before = False, self.step + 1, self.skipped_steps
        try:
            while self.step < train.max_steps and not stopped:
                step = self.step + 1
                callbacks.call("on_step_start", self, step)
                result = self.train_step(step)
                self.step, self.tokens_seen, stopped = step, self.tokens_seen + train.tokens_per_step, result.stop
                callbacks.call("on_step_end", self, step, result)
                last = step == train.max_steps
                metrics = self.train_metrics(result) if step % train.log_interval == 0 or last or stopped else {}
                if step % train.eval_interval == 0 or last:
                    metrics |= self.evaluate(step)
                if metrics:
                    callbacks.call("on_log", self, step, metrics)
                if stopped or step % train.save_interval == 0 or last:
                    self.save(step)
        finally:
            self.batches.close()  # the prefetching thread, when a step raises too
        callbacks.call("on_finish", self, stopped)
        # every rank reaches the end before the process group goes away (else exits race and some abort)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.plan.lock is not None:
            self.plan.lock.release()
        self._fail_if_nothing_trained(self.step - first_step + 1, self.skipped_steps - skipped_before)

    def _fail_if_nothing_trained(self, steps: int, skipped: int) -> None:
        """on_nonfinite=skip drops non-finite updates: a run that dropped every one of its steps trained nothing and
        must not look like a success; one that dropped most of them is warned about."""
        if steps > 0 and skipped == steps:
            raise FopeError(
                f"all {steps} steps of this run had a non-finite loss or gradient and were skipped: nothing was trained "
                f"(checkpoint {self.plan.run_dir.latest_checkpoint()} holds the weights it started from); lower optim.lr"
            )
        if skipped > steps // 2:
            log.warning("%d of this run's %d steps were skipped (non-finite loss or gradient): lower optim.lr", skipped, steps)

    def train_step(self, step: int) -> StepResult:
        train, accelerator = self.config.train, self.accelerator
        optim = self.config.optim
        lr = learning_rate(step, peak=optim.lr, warmup_steps=optim.warmup_steps, max_steps=train.max_steps, alpha_f=optim.alpha_f)
        set_learning_rate(self.optimizer, lr)  # before backward: DeepSpeed steps inside the last one

        batch = self.batches.next()  # prepared on the host (filter, documents) while the last step ran
        filtered = batch.filtered
        labels = batch.labels.to(self.device, non_blocking=True)  # pinned on CUDA: the copy does not wait
        micro = train.micro_batch_size
        micro_batches = (
            (inputs.to(self.device, non_blocking=True), micro_labels, self.document_kwargs(documents))
            for (inputs, documents), micro_labels in zip(batch.micro_batches(micro), labels.split(micro), strict=True)
        )
        loss_sum, global_targets = accumulate_gradients(
            accelerator,
            self.model,
            labels,
            micro_batches,
            grad_accum=self.plan.grad_accum,
            world_size=self.plan.world_size,
            loss_chunk_size=train.loss_chunk_size,
        )
        norm = accelerator.clip_grad_norm_(self.model.parameters(), train.grad_clip or float("inf"))  # None: DeepSpeed's own

        # one tiny all-reduce (the step's loss over all ranks, and whether any rank was asked to stop), then the step's
        # one read of the device: loss, stop votes, target count and grad norm together
        stop_flag = torch.tensor(float(self.callbacks.stop_requested()), device=self.device)
        filtered_here = torch.tensor(float(filtered), device=self.device)
        loss_and_votes = accelerator.reduce(torch.stack((loss_sum, stop_flag, filtered_here)), reduction="sum")
        # DDP / one process: a tensor; DeepSpeed: its engine's norm, a float it has read itself (or None)
        norm_or_zero = torch.as_tensor(0.0 if norm is None else norm, device=self.device)
        host = torch.cat((loss_and_votes.double(), global_targets.double()[None], norm_or_zero.double()[None])).tolist()
        loss_total, stop_votes, filtered_total, targets, norm_value = host
        self.filtered_instances += int(filtered_total)
        loss, grad_norm = loss_total / targets, None if norm is None else norm_value
        # every rank decides alike: the loss is all-reduced and the grad norm is of the all-reduced gradients.
        # (DeepSpeed has stepped already; `on_nonfinite=stop` then exits before anything is saved.)
        skipped = not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)))
        if skipped:
            self._on_nonfinite(step, loss, grad_norm)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, stop=stop_votes > 0)

    def document_kwargs(self, inputs: torch.Tensor | Documents | None) -> dict:
        """The forward's document arguments for input rows still on the host, or their documents found there already
        (`train.document_mask`, `train.document_positions`); none when training attends across documents from global
        positions."""
        train = self.config.train
        if not train.uses_documents or inputs is None:
            return {}
        documents = inputs if isinstance(inputs, Documents) else Documents.of_tokens(inputs, self.plan.data.eos_id)
        return {"doc_ids": documents.to(self.device), "document_mask": train.document_mask, "restart_positions": train.restart_positions}

    def _prepare_batch(self, rows: torch.Tensor) -> HostBatch:
        """On the prefetching thread: a step's rows -> inputs, labels without the filtered rows, each micro-batch's
        documents; pinned for asynchronous copies on CUDA."""
        train = self.config.train
        return prepare_batch(
            rows, micro_batch_size=train.micro_batch_size, instance_filter=self.instance_filter,
            eos_id=self.plan.data.eos_id if train.uses_documents else None, pin=self.device.type == "cuda",
        )  # fmt: skip

    def stop_agreed(self) -> bool:
        """Whether any rank has been asked to stop (a collective: every rank must call it)."""
        flag = torch.tensor(float(self.callbacks.stop_requested()), device=self.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0

    def _on_nonfinite(self, step: int, loss: float, grad_norm: float | None) -> None:
        """Stop (no checkpoint of this step: the last saved one stays the restart point) or count a skipped step."""
        what = f"non-finite loss {loss} / grad norm {grad_norm} at step {step}"
        if self.config.train.on_nonfinite is OnNonFinite.stop:
            last = self.plan.run_dir.latest_checkpoint()
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
        for rows in self.val_chunks.split(self.config.train.micro_batch_size):
            chunk = rows.to(self.device)
            out = self.model(
                chunk[:, :-1], chunk[:, 1:], reduction="sum", loss_chunk_size=self.config.train.loss_chunk_size,
                **self.document_kwargs(rows[:, :-1]),
            )  # fmt: skip
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
        if self.instance_filter is not None:
            metrics["train/filtered_instances"] = self.filtered_instances  # since the run began, over all ranks
        return metrics | ({"train/grad_norm": result.grad_norm} if result.grad_norm is not None else {})

    def save(self, step: int) -> None:
        self.checkpointer.save(
            step,
            self.model,
            self.optimizer,
            trainer_state={
                "step": step,
                "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps,
                "filtered_instances": self.filtered_instances,
                "data": self.batches.state_dict(),
                "world_size": self.plan.world_size,
                "deepspeed": self.checkpointer.deepspeed,
                "git_sha": git_sha(),
                "config": to_container(self.config),
            },
            metadata={
                "pe": self.plan.model_config.pe,
                "train_seq_len": self.config.train.seq_len,
                "data_fingerprint": self.plan.data.fingerprint,
                "data_dir": str(self.plan.data.dir),
                "step": step,
                "tokens_seen": self.tokens_seen,
            },
            on_weights_written=lambda staging: self.callbacks.call("on_save", self, step, staging),
        )

    def _log_start(self) -> None:
        plan, train = self.plan, self.config.train
        if plan.deepspeed_config is not None:
            backend = f"DeepSpeed ZeRO-{plan.deepspeed_config['zero_optimization']['stage']}"
        else:
            backend = "DDP" if plan.world_size > 1 else "one process"
        log.info(
            "%s: %.1fM parameters, pe %s, L=%d; global batch %d = %d processes x %d micro-batches x %d; %s on %s, %s; steps %d -> %d",
            self.config.run_name, self.num_parameters / 1e6, plan.model_config.pe, train.seq_len, train.batch_size,
            plan.world_size, plan.grad_accum, train.micro_batch_size, backend, self.device,
            "bf16" if plan.mixed_precision == "bf16" else "fp32", self.step, train.max_steps,
        )  # fmt: skip
        shape = plan.model_config
        log.info(
            "model: d_model %d, %d layers, %d heads (%d key/value), ffn %d, vocab %d, max_seq_len %d, pe %s %s",
            shape.d_model, shape.n_layers, shape.n_heads, shape.kv_heads, shape.hidden_size,
            shape.vocab_size, shape.max_seq_len, shape.pe, shape.pe_options or "{}",
        )  # fmt: skip
        model = self.accelerator.unwrap_model(self.model)
        log.info("attention: %s; torch.compile %s", attention_kernels(model), "on" if plan.compile else "off")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf
