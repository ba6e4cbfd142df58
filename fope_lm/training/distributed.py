"""How a run spreads over processes: the Accelerator (DDP, or DeepSpeed ZeRO through accelerate's plugin), the
per-step agreement on stopping, and the signals and stop file that ask for a stop.

The Hydra config is the one source of batch sizes, accumulation, clipping and precision: the DeepSpeed JSON
leaves them "auto" and gets them filled in here; a JSON that pins a different value is an error.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from datetime import datetime
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator, DeepSpeedPlugin, DistributedType
from accelerate.utils import InitProcessGroupKwargs, str_to_bool

from fope_lm.errors import ConfigError
from fope_lm.nn.model import Transformer
from fope_lm.paths import CONFIG_DIR
from fope_lm.training.config import Precision, TrainSection

log = logging.getLogger(__name__)

DEEPSPEED_CONFIGS = CONFIG_DIR / "deepspeed"


def mixed_precision(precision: Precision) -> str:
    """accelerate's mixed_precision for a configured precision: "bf16" or "no" (fp32)."""
    if precision is Precision.auto:  # bf16 needs Ampere or newer; elsewhere fp32
        return "bf16" if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) else "no"
    return "bf16" if precision is Precision.bf16 else "no"


def deepspeed_config_path(configured: str | None) -> Path | None:
    """The DeepSpeed JSON of this run: `train.deepspeed` (a name in configs/deepspeed/ or a path), or the one an
    `accelerate launch --config_file` with distributed_type DEEPSPEED points at; None for DDP / one device."""
    path = None
    if configured:
        path = Path(configured) if configured.endswith(".json") or os.sep in configured else DEEPSPEED_CONFIGS / f"{configured}.json"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in DEEPSPEED_CONFIGS.glob("*.json")))
            raise ConfigError(f"train.deepspeed={configured}: {path} does not exist; use one of {names} or a path to a JSON")
    if str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if launcher == "none":
            raise ConfigError(
                "the accelerate config enables DeepSpeed without a deepspeed_config_file: point it at "
                "configs/deepspeed/zero{1,2,3}.json so the settings live in one file"
            )
        if path is not None and path.resolve() != Path(launcher).resolve():
            raise ConfigError(f"train.deepspeed={configured} disagrees with the accelerate config's {launcher}: keep one")
        path = Path(launcher)
    return path


def fill_deepspeed_config(path: Path, train: TrainSection, *, grad_accum: int, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON with every value the training config owns filled in for its "auto"."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read DeepSpeed config {path}: {exc}") from None
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"{path} has a {section!r} section; the optimizer and schedule come from the optim config: remove it")
    if "zero_optimization" not in config:
        raise ConfigError(f"{path} has no zero_optimization section (stage 1, 2 or 3)")
    owned = {  # DeepSpeed key -> (value, where the training config sets it)
        "train_micro_batch_size_per_gpu": (train.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (grad_accum, "train.global_batch_size / (micro_batch_size * world_size)"),
        "train_batch_size": (train.micro_batch_size * grad_accum * world_size, "train.global_batch_size"),
        "gradient_clipping": (train.grad_clip or 0.0, "train.grad_clip"),
        "bf16.enabled": (precision == "bf16", "train.precision"),
        "fp16.enabled": (False, "train.precision (fp16 is not supported)"),
    }
    for key, (value, source) in owned.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node.setdefault(parent, {})
        pinned = node.get(leaf, "auto")
        if pinned != "auto" and pinned != value:
            raise ConfigError(f'{path} pins {key}={pinned!r} but {source} gives {value!r}: set it to "auto"')
        node[leaf] = value
    return config


def build_accelerator(mixed_precision: str, grad_accum: int, deepspeed_config: dict | None) -> Accelerator:
    handlers = []
    if deepspeed_config and not torch.cuda.is_available():  # DeepSpeed's CPU default backend needs oneCCL
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=deepspeed_config) if deepspeed_config else None,
        kwargs_handlers=handlers,
    )


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers everywhere. DDP does this when it wraps a model; DeepSpeed broadcasts only parameters, and
    FoPE's frozen coefficients are buffers (so that ZeRO-3 does not partition them)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def model_for_export(accelerator: Accelerator, model) -> Transformer | None:
    """The trained model with full fp32 weights on rank 0 (None elsewhere), for `checkpoint.save_model`.

    Under DeepSpeed every rank must call this: the fp32 master weights are gathered from their ZeRO partitions.
    """
    unwrapped: Transformer = accelerator.unwrap_model(model)
    if not uses_deepspeed(accelerator):
        return unwrapped if accelerator.is_main_process else None
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(unwrapped.named_parameters(remove_duplicate=False))
    state = {}
    for name, tensor in unwrapped.state_dict(keep_vars=True).items():  # same order on every rank
        full = safe_get_full_fp32_param(params[name]) if name in params else None
        state[name] = (full if full is not None else tensor).detach().float().cpu()
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):
        export = Transformer(unwrapped.config)
    export.load_state_dict(state, assign=True)
    return export


class StopRequests:
    """SIGTERM or SIGUSR1 to this process, or the stop file appearing, asks for a graceful stop.

    `requested()` is this rank's view; the loop all-reduces it every step so that every rank stops (and saves)
    at the same step. Only rank 0 watches the file: one stat per step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, stop_file: Path, *, watch_file: bool, not_before: float | None = None):
        """not_before: when the run started (time.time()); a stop file older than that predates the run (a stop
        that was never consumed) and is removed with a warning instead of stopping this run at its first step."""
        self.stop_file = stop_file
        self.watch_file = watch_file
        self.reason: str | None = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._on_signal)
        if watch_file and not_before is not None and stop_file.exists() and stop_file.stat().st_mtime < not_before:
            created = datetime.fromtimestamp(stop_file.stat().st_mtime).isoformat(sep=" ", timespec="seconds")
            stop_file.unlink(missing_ok=True)
            log.warning("removed the stop file %s: it dates from %s, before this run started, so it does not stop it", stop_file, created)

    def _on_signal(self, signum, frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def requested(self) -> bool:
        if self.reason is None and self.watch_file and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        return self.reason is not None

    def consume_stop_file(self) -> None:
        """Remove the stop file once honoured, so that the resumed run does not stop at once."""
        if self.watch_file:
            self.stop_file.unlink(missing_ok=True)
