"""A run's training checkpoints: what one holds, how every rank writes its part of it (published atomically) and
reads it back, and the checks that decide which checkpoint a run continues, all before any compute.

A training checkpoint is a model checkpoint (fope_lm.checkpoint: weights + model config, what eval and export
read) plus the state that resumes training exactly:
  trainer_state.json   step, tokens seen, skipped steps, data position, world size, git SHA, the config
  optimizer.pt         AdamW state (DDP / one process; torch.save of a state_dict, loaded with weights_only=True)
  deepspeed/           DeepSpeed's sharded optimizer and module states (instead of optimizer.pt)
  rng_rank<r>.pt       python, numpy and torch (CPU, CUDA) generator states of rank r
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import safetensors
import torch
from accelerate.utils import gather_object

from fope_lm.checkpoint import WEIGHTS_FILE, read_model_config, save_model, write_json_atomic
from fope_lm.errors import CheckpointError, FopeError
from fope_lm.nn.model import ModelConfig, Transformer
from fope_lm.run_dir import RunDir, checkpoint_step, move_aside, publish_checkpoint, resolve_checkpoint, staging_dir
from fope_lm.training.config import RESUME_MAY_CHANGE
from fope_lm.training.distributed import model_for_export

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
DEEPSPEED_STATE = "deepspeed"  # the DeepSpeed engine's own sharded model/optimizer states (pickles)
RNG_STATE = "rng_rank{rank}.pt"


class Checkpointer:
    """Saves and restores a run's training checkpoints (<run_dir>/checkpoints/step_N) on every rank.

    A checkpoint is written into step_N.tmp (each rank its own files), fsynced, marked COMPLETE and renamed by
    rank 0: a reader never sees a half-written step_N. The newest `keep_last` are kept.
    """

    def __init__(self, run_dir: RunDir, accelerator, *, rank: int, deepspeed: bool, keep_last: int | None):
        self.run_dir, self.accelerator, self.rank = run_dir, accelerator, rank
        self.is_main = accelerator.is_main_process
        self.deepspeed, self.keep_last = deepspeed, keep_last

    def discard_history_after(self, step: int, resumed_step: int) -> None:
        """Rank 0, before training: the checkpoints after `step` (overwrite=true's) and half-written ones go."""
        for path in self.run_dir.remove_checkpoints_after(step):
            log.warning("removed %s: this run continues from step %d", path, resumed_step)

    def save(self, step: int, model, optimizer, *, trainer_state: dict, metadata: dict,
             on_weights_written: Callable[[Path], None] | None = None) -> Path:  # fmt: skip
        """Every rank: the full fp32 weights (written by rank 0), optimizer, RNG of each rank, trainer state;
        published atomically. `on_weights_written(staging)` runs on every rank between the weights and the rest."""
        final = self.run_dir.checkpoint(step)
        staging = staging_dir(final)
        errors: list[str] = []  # this rank's first failed write (a full disk, a quota): later writes are skipped

        def attempt(write: Callable[[], object]) -> None:
            if not errors:
                try:
                    write()
                except OSError as exc:
                    errors.append(f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))

        if self.is_main:
            attempt(lambda: staging.mkdir(parents=True, exist_ok=True))
        self.accelerator.wait_for_everyone()
        export = model_for_export(self.accelerator, model)  # a collective under DeepSpeed
        if export is not None:  # rank 0
            attempt(lambda: save_model(staging, export, metadata=metadata))
        if on_weights_written is not None:
            attempt(lambda: on_weights_written(staging))
        if self.deepspeed:  # its sharded optimizer (and module) states; every rank writes its own part, in a collective
            try:
                model.save_checkpoint(str(staging), tag=DEEPSPEED_STATE, save_latest=False)
            except OSError as exc:
                errors.append(f"{exc.strerror or exc}" + (f" ({exc.filename})" if exc.filename else ""))
        elif self.is_main:  # DDP: every rank holds the same optimizer state
            attempt(lambda: torch.save(optimizer.state_dict(), staging / OPTIMIZER_STATE))
        attempt(lambda: torch.save(rng_state(), staging / RNG_STATE.format(rank=self.rank)))
        if self.is_main:
            attempt(lambda: write_json_atomic(staging / TRAINER_STATE, trainer_state))
        self._agree_it_was_written(final, staging, errors[0] if errors else None)
        if self.is_main:
            publish_checkpoint(staging, final)
            self.run_dir.prune_checkpoints(self.keep_last)
            log.info("saved %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _agree_it_was_written(self, final: Path, staging: Path, error: str | None) -> None:
        """Every rank learns whether every rank wrote its part (a collective); if one did not, the staging goes and
        every rank stops with the same one line: the reason, the free space, the newest intact checkpoint."""
        reasons = gather_object([error]) if self.accelerator.num_processes > 1 else [error]
        failed = [(rank, reason) for rank, reason in enumerate(reasons) if reason]
        if not failed:
            return
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # a half-written checkpoint only keeps the disk full
        rank, reason = failed[0]
        free = shutil.disk_usage(self.run_dir.path).free / 2**30
        where = f" on rank {rank}" if self.accelerator.num_processes > 1 else ""
        raise CheckpointError(
            f"cannot save {final.name}: {reason}{where}; {free:.1f} GiB free in {self.run_dir}; newest intact checkpoint: "
            f"{self.run_dir.latest_checkpoint() or 'none'}; free space, then continue with resume=auto"
        )

    def restore(self, checkpoint: Path, model, optimizer, *, world_size: int) -> dict:
        """Optimizer (or DeepSpeed's states) and this rank's RNG from `checkpoint` (its weights were loaded into the
        model before `accelerator.prepare`); returns its trainer state."""
        state = read_trainer_state(checkpoint)
        if self.deepspeed:
            if not (checkpoint / DEEPSPEED_STATE).is_dir():
                raise CheckpointError(f"{checkpoint} was saved without DeepSpeed: resume it without, or init_from it")
            loaded, _ = model.load_checkpoint(str(checkpoint), tag=DEEPSPEED_STATE, load_lr_scheduler_states=False)
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {checkpoint / DEEPSPEED_STATE}")
        else:
            if not (checkpoint / OPTIMIZER_STATE).is_file():
                raise CheckpointError(f"{checkpoint} was saved with DeepSpeed: resume it with the same DeepSpeed config")
            optimizer.load_state_dict(fit_to_parameters(load_torch_file(checkpoint / OPTIMIZER_STATE), optimizer))
        rng_file = checkpoint / RNG_STATE.format(rank=self.rank)
        note = rng_restore_note(checkpoint, saved_by=state["world_size"], world_size=world_size, rank=self.rank, rng_file=rng_file)
        if note:
            log.warning(note)
        else:
            set_rng_state(load_torch_file(rng_file))
        return state


# --- which checkpoint a run continues: checked by `plan`, before anything is built ------------------------------
def resume_point(*, resume: str | None, overwrite: bool, run_dir: RunDir, rank: int) -> tuple[Path, dict] | None:
    """The checkpoint this run continues and its trainer state, every file checked (`check_training_checkpoint`), or
    None for a new run. Nothing of the run dir is deleted unless overwrite=true: a run dir holds one trajectory, so
    what an explicit resume= would abandon is refused."""
    if resume is None:
        latest = run_dir.latest_checkpoint()
        if latest is not None and not overwrite:
            raise CheckpointError(
                f"{run_dir} already has checkpoints (newest {latest.name}): pass resume=auto to continue it, "
                "overwrite=true to start it over, or another run_name"
            )
        return None
    if resume == "auto":  # the newest that loads; None: nothing saved yet, start (or init_from) as new
        return latest_loadable_checkpoint(run_dir, move_corrupt=rank == 0)
    checkpoint = resolve_checkpoint(resume)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise CheckpointError(f"{checkpoint} holds weights only, no training state: start from it with init_from={checkpoint}")
    own = run_dir.owns(checkpoint)
    abandoned = run_dir.checkpoints_after(checkpoint_step(checkpoint)) if own else run_dir.list_checkpoints()
    if abandoned and not overwrite:
        names = ", ".join(path.name for path in abandoned)
        what = f"newer checkpoints ({names})" if own else f"checkpoints of its own ({names})"
        raise CheckpointError(
            f"resume={resume}: {run_dir} has {what} that continuing {checkpoint} would discard; pass "
            f"resume=auto to continue its newest, overwrite=true to discard them, or another run_name to continue "
            f"{checkpoint.name} in a new run dir"
        )
    return checkpoint, check_training_checkpoint(checkpoint)


def check_resumable(checkpoint: Path, state: dict, model_config: ModelConfig, data) -> None:
    """Refuse to continue a checkpoint with another model shape, PE, training length or data (a TokenData)."""
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


def changed_settings(saved: dict, new: dict) -> dict[str, list]:
    """The RESUME_MAY_CHANGE settings whose value differs between a checkpoint's config and this run's."""
    changes = {}
    for key in RESUME_MAY_CHANGE:
        section, name = key.split(".")
        before = saved.get(section, {}).get(name)  # a checkpoint of older code may lack a key
        if before != new[section][name]:
            changes[key] = [before, new[section][name]]
    return changes


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {checkpoint / TRAINER_STATE}: {exc}") from None


def check_training_checkpoint(checkpoint: Path) -> dict:
    """Raise CheckpointError unless every file of a training checkpoint is there, whole and loadable, before any
    compute; return its trainer state. The weights fit the model the checkpoint's config describes (names and shapes,
    read from the safetensors header); our pickles (optimizer, RNG) unpickle with weights_only=True, their tensors
    memory-mapped rather than read. DeepSpeed's own files are only checked whole (a zip directory): DeepSpeed loads
    them itself with full unpickling, so a checkpoint's deepspeed/ must come from a trusted run."""
    state = read_trainer_state(checkpoint)
    config = read_model_config(checkpoint)
    weights = checkpoint / WEIGHTS_FILE
    try:
        with safetensors.safe_open(str(weights), "pt") as f:  # the header, and that its data fills the file exactly
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118  # not a dict
    except Exception as exc:
        raise CheckpointError(f"corrupt weights file {weights} ({type(exc).__name__}: {exc})") from None
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("lm_head.weight")
    if shapes != expected and not _only_scalar_shapes_differ(shapes, expected):
        wrong = sorted(set(shapes) ^ set(expected)) or [k for k in expected if shapes.get(k) != expected[k]]
        raise CheckpointError(
            f"weights in {weights} do not fit the model its config describes ({', '.join(wrong[:4])}): they were overwritten"
        )
    if not (checkpoint / OPTIMIZER_STATE).exists() and not (checkpoint / DEEPSPEED_STATE).is_dir():
        raise CheckpointError(f"{checkpoint} has neither {OPTIMIZER_STATE} nor {DEEPSPEED_STATE}/: its optimizer state is missing")
    ours = [checkpoint / OPTIMIZER_STATE] if (checkpoint / OPTIMIZER_STATE).exists() else []
    ours += sorted(checkpoint.glob(RNG_STATE.format(rank="*")))
    for path in ours + sorted((checkpoint / DEEPSPEED_STATE).rglob("*.pt")):  # torch.save's zip directory sits at the end
        try:
            zipfile.ZipFile(path).close()
        except (OSError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"corrupt checkpoint file {path} ({exc}): it was cut short or overwritten") from None
    for path in ours:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # garbled, or a pickle that would run code
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            raise CheckpointError(f"{path} does not load with weights_only=True ({type(exc).__name__}: {first_line[:200]})") from None
    return state


def _only_scalar_shapes_differ(shapes: dict, expected: dict) -> bool:
    """The same tensors, where only 0-dim vs (1,) differ: FIRE's scalars as checkpoints of older code hold them."""
    return shapes.keys() == expected.keys() and all(shapes[k] == expected[k] or {shapes[k], expected[k]} == {(), (1,)} for k in shapes)


def latest_loadable_checkpoint(run_dir: RunDir, *, move_corrupt: bool) -> tuple[Path, dict] | None:
    """The newest complete checkpoint of a run whose files are whole (`check_training_checkpoint`) and its trainer
    state, or None. Newer ones that fail the check are skipped with a warning, and moved aside when `move_corrupt`
    (rank 0's job: every rank reaches the same verdict on the same files)."""
    for checkpoint in reversed(run_dir.list_checkpoints()):
        try:
            return checkpoint, check_training_checkpoint(checkpoint)
        except CheckpointError as exc:
            where = f"moved aside to {move_aside(checkpoint).name}" if move_corrupt else "skipped"
            log.warning("resume=auto: %s does not load (%s); %s, trying the next newest", checkpoint, exc, where)
    return None


# --- files ----------------------------------------------------------------------------------------------------
def load_torch_file(path: Path):
    """A checkpoint's torch.save file (tensors and plain containers only), or a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, garbled pickle, unpickling refused
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"cannot load {path} ({type(exc).__name__}: {first_line}); resume an older checkpoint") from None


def fit_to_parameters(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state_dict whose per-parameter slots (AdamW's exp_avg, exp_avg_sq) take their parameter's shape
    where only the shape changed, not the size: checkpoints of older code hold FIRE's scalars as 0-dim tensors."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    for index, slots in state.get("state", {}).items():
        param = params[index]
        for key, value in slots.items():
            if key != "step" and torch.is_tensor(value) and value.shape != param.shape and value.numel() == param.numel():
                slots[key] = value.reshape(param.shape)
    return state


def rng_restore_note(checkpoint: Path, *, saved_by: int, world_size: int, rank: int, rng_file: Path) -> str | None:
    """Why this rank cannot restore its random state from a checkpoint, or None when it can."""
    if saved_by != world_size:
        ranks = f"{saved_by} rank{'' if saved_by == 1 else 's'}"
        return f"{checkpoint} was saved by {ranks}, this run has {world_size}: the random state of each rank is seeded anew"
    if not rng_file.is_file():
        return f"{checkpoint} has no {rng_file.name}: the random state of rank {rank} is seeded anew"
    return None


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states in types that `torch.load(weights_only=True)` reads."""
    name, keys, position, has_gauss, cached = cast(tuple, np.random.get_state())  # the legacy tuple form
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
