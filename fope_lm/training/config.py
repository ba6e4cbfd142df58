"""The training config's schema: dataclasses that the composed Hydra config is merged into and checked against
before anything is built, so a typo, a wrong type or an impossible value is a one-line error.

The dataclasses hold types and checks (fope_lm.schema's pattern); the values live in configs/train.yaml (and its
groups), so every default is written once. The model section is derived from `ModelConfig`, so a model setting is
declared once too. `build_model_config` is shared with the other entry points (eval).
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fope_lm.data.instance_filter import RepetitionFilter
from fope_lm.errors import ConfigError
from fope_lm.nn.attention import ATTENTION_MODES
from fope_lm.nn.model import ModelConfig, Transformer, preset_config
from fope_lm.schema import Choice
from fope_lm.tracking import WandbConfig
from fope_lm.training.sweep import seeded


def resumable() -> Any:
    """A setting a resumed run may change (a run gets extended, its batch or schedule adjusted): warned and recorded."""
    return field(default=MISSING, metadata={"resume_may_change": True})


class Precision(Choice):
    auto = "auto"  # bf16 where the device supports it (CUDA with bf16), else fp32
    bf16 = "bf16"  # autocast to bf16 (DeepSpeed: bf16 weights with fp32 master weights)
    fp32 = "fp32"
    no = "no"  # accelerate's name for fp32


class OnNonFinite(Choice):
    stop = "stop"  # exit with an error, no checkpoint of the bad step
    skip = "skip"  # drop the step's update and go on (not with DeepSpeed, which steps inside backward)


# ModelConfig fields the model section does not take: the training length and the PE have sections of their own.
SET_ELSEWHERE = ("max_seq_len", "pe", "pe_options")


def _model_section() -> type:
    """The `model` section: a preset of fope_lm.nn.model.PRESETS plus every other ModelConfig field as an optional
    override (null: the preset's value, or ModelConfig's default; vocab_size null: the data tokenizer's size).
    Derived from ModelConfig, so that a new model setting is declared in one place."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [(f.name, hints[f.name] | None, None) for f in dataclasses.fields(ModelConfig) if f.name not in SET_ELSEWHERE]

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}

    return dataclasses.make_dataclass(
        "ModelSection", [("preset", str, MISSING), *fields], namespace={"overrides": overrides, "__doc__": _model_section.__doc__}
    )


ModelSection = _model_section()


@dataclass
class TrainSection:
    seq_len: int = MISSING
    global_batch_size: int | None = resumable()  # null with global_batch_tokens set
    global_batch_tokens: int | None = None
    micro_batch_size: int = MISSING
    max_steps: int = resumable()
    max_tokens: int | None = None
    precision: Precision = MISSING
    grad_clip: float | None = MISSING
    loss_chunk_size: int | None = None
    on_nonfinite: OnNonFinite = MISSING
    log_interval: int = MISSING
    eval_interval: int = MISSING
    eval_tokens: int = MISSING
    eval_hooks: dict[str, Any] = MISSING
    save_interval: int = MISSING
    keep_last: int | None = MISSING
    stop_file: str | None = None
    deepspeed: str | None = None
    deterministic: bool = MISSING
    num_threads: int | None = None
    peak_tflops: float | None = None
    compile: bool | None = MISSING  # null: on for CUDA with DDP / ZeRO-1/2, off on CPU (resolved by the trainer's plan)
    tf32: bool = MISSING
    attention: str = MISSING  # auto | flash | sdpa (fope_lm.nn.attention.choose_kernel)
    activation_checkpointing: str = MISSING  # none | full | every_<n>
    document_mask: bool = resumable()  # attention within each document of a packed row (fope_lm.nn.documents)
    document_positions: str | None = resumable()  # global | restart (at each document); null: restart when masking
    instance_filter: bool = resumable()  # OLMo's repetition filter: rows with a long repeated n-gram leave the loss
    repetition_max_period: int = resumable()
    repetition_min_period: int = resumable()
    repetition_max_count: int = resumable()

    @property
    def restart_positions(self) -> bool:
        return self.document_positions == "restart"

    @property
    def uses_documents(self) -> bool:
        """The forward needs the documents of each row (to mask attention, or to restart positions)."""
        return self.document_mask or self.restart_positions

    @property
    def repetition_filter(self) -> RepetitionFilter:
        return RepetitionFilter(self.repetition_max_period, self.repetition_min_period, self.repetition_max_count)

    @property
    def checkpoint_every(self) -> int:
        """Recompute every n-th block in backward instead of storing its activations: 0 none, 1 every block."""
        if self.activation_checkpointing == "none":
            return 0
        return 1 if self.activation_checkpointing == "full" else int(self.activation_checkpointing.removeprefix("every_"))

    def __post_init__(self):
        if self.global_batch_size is None and self.global_batch_tokens is None:
            raise ConfigError("set train.global_batch_size (sequences per step) or train.global_batch_tokens (tokens per step)")
        positive = ("seq_len", "micro_batch_size", "log_interval", "eval_interval", "save_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("global_batch_size", "global_batch_tokens", "max_tokens", "loss_chunk_size", "keep_last", "num_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{name} must be positive or null, got {value}")
        if not re.fullmatch(r"none|full|every_[1-9][0-9]*", self.activation_checkpointing):
            raise ConfigError(
                f"train.activation_checkpointing must be none, full or every_<n> (every n-th block), got {self.activation_checkpointing!r}"
            )
        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"train.attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.document_positions is None:
            self.document_positions = "restart" if self.document_mask else "global"
        if self.document_positions not in ("global", "restart"):
            raise ConfigError(f"train.document_positions must be global, restart or null, got {self.document_positions!r}")
        try:
            self.repetition_filter  # noqa: B018  # validates the three repetition_* values
        except ValueError as err:
            raise ConfigError(f"train.{err}") from None
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1, got {self.max_steps}")
        if self.grad_clip is not None and not self.grad_clip > 0:  # a negative max norm flips the gradient's sign
            raise ConfigError(f"train.grad_clip must be positive (the max gradient norm) or null for no clipping, got {self.grad_clip}")
        if self.global_batch_tokens is not None:  # tokens per step instead of sequences per step
            if self.global_batch_size is not None:
                raise ConfigError(
                    f"train.global_batch_size={self.global_batch_size} and train.global_batch_tokens={self.global_batch_tokens} "
                    "are both set: set one, e.g. train.global_batch_size=null train.global_batch_tokens=..."
                )
            if self.global_batch_tokens % self.seq_len:
                raise ConfigError(f"train.global_batch_tokens={self.global_batch_tokens} is not a multiple of train.seq_len={self.seq_len}")
            self.global_batch_size = self.global_batch_tokens // self.seq_len
        if self.max_tokens is not None:  # a token budget for the run takes precedence over max_steps
            self.max_steps = math.ceil(self.max_tokens / self.tokens_per_step)

    @property
    def batch_size(self) -> int:
        """Sequences per optimizer step over all processes (global_batch_size, or global_batch_tokens / seq_len)."""
        assert self.global_batch_size is not None  # __post_init__ sets it
        return self.global_batch_size

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class OptimSection:
    """AdamW with OLMo's defaults, linear warmup, cosine decay to alpha_f * lr at max_steps."""

    lr: float = resumable()
    betas: list[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING
    decay_norms: bool = MISSING
    decay_embeddings: bool = MISSING
    warmup_steps: int = resumable()
    alpha_f: float = resumable()

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optim.betas needs two values in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be positive, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or not 0 <= self.alpha_f <= 1:
            raise ConfigError(f"optim.warmup_steps must be >= 0 and optim.alpha_f in [0, 1], got {self.warmup_steps}, {self.alpha_f}")


@dataclass
class TrainConfig:
    run_root: str = MISSING
    run_name: str = MISSING
    seed: int = MISSING
    resume: str | None = None  # null: a new run; "auto": the newest complete checkpoint of this run; or a path
    overwrite: bool = MISSING  # let a new run (resume=null) replace a run dir that has checkpoints
    init_from: str | None = None  # a checkpoint whose weights start a new run (PE and length may differ)
    init_expand: bool = MISSING  # init_from: keep fresh values where a PE tensor grew (else zeros)
    model: ModelSection = MISSING  # type: ignore[valid-type]
    # a record, not a setting: the ModelConfig that model + pe + train.seq_len + the tokenizer resolve to (every shape
    # value filled in, n_parameters), set by the trainer's plan for config.yaml, trainer_state.json and wandb; a value
    # given here (a re-run config.yaml) is recomputed, and a different one warned about: the shape is set by `model`
    model_resolved: dict[str, Any] | None = None
    pe: dict[str, Any] = MISSING  # {name: <registered PE>, **its options}
    data: Any = MISSING  # the data group; validated by fope_lm.data.DataConfig
    train: TrainSection = MISSING
    optim: OptimSection = MISSING
    wandb: WandbConfig = MISSING

    def __post_init__(self):
        if not isinstance(self.pe, Mapping) or "name" not in self.pe:
            raise ConfigError("pe needs a name, e.g. +pe=fope or pe.name=rope")
        name = PurePath(self.run_name)
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise ConfigError(
                f"run_name={self.run_name!r} must name a directory inside run_root={self.run_root!r} (relative, no '..'): "
                "to write elsewhere, set run_root"
            )


def resume_may_change() -> tuple[str, ...]:
    """ "section.key" of every setting declared `resumable()`."""
    sections = {"train": TrainSection, "optim": OptimSection}
    fields = ((name, f) for name, section in sections.items() for f in dataclasses.fields(section))
    return tuple(f"{name}.{f.name}" for name, f in fields if f.metadata.get("resume_may_change"))


RESUME_MAY_CHANGE = resume_may_change()


def to_yaml(config: Any) -> str:
    """A validated config (dataclass instance) as YAML, as recorded in run dirs and checkpoints."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_container(config: Any) -> dict:
    """A validated config as plain JSON-able containers (enums by name)."""
    return OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)  # type: ignore[return-value]  # a mapping


def build_model_config(model: Any, pe: Mapping, *, max_seq_len: int, default_vocab_size: int) -> ModelConfig:
    """The ModelConfig a config describes (vocab_size: the model section's, else `default_vocab_size`, the
    tokenizer's), checked by building it on the meta device (no memory, no compute), so an unknown preset or PE,
    a PE option it does not take or a bad shape fails before anything runs."""
    pe_options = {k: v for k, v in pe.items() if k != "name"}
    overrides = {"vocab_size": default_vocab_size, **model.overrides(), "max_seq_len": max_seq_len}
    config = preset_config(model.preset, pe=pe["name"], pe_options=pe_options, **overrides)
    try:
        with torch.device("meta"):
            Transformer(config)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:  # a PE constructor rejecting a value, e.g. yarn scale < 1
        raise ConfigError(f"pe {pe['name']} with options {pe_options}: {exc}") from None
    return config


def resolved_model(model_config: ModelConfig) -> dict[str, Any]:
    """TrainConfig.model_resolved: the ModelConfig with its derived values filled in (key/value heads, the SwiGLU
    width) and the trainable parameter count (counted on the meta device: no memory); without n_parameters it is a
    ModelConfig of the same model."""
    with torch.device("meta"):
        n_parameters = Transformer(model_config).num_parameters()
    shape = {"n_kv_heads": model_config.kv_heads, "ffn_hidden_size": model_config.hidden_size}
    return {**model_config.to_dict(), **shape, "n_parameters": n_parameters}


def check_command_line(config_dir: str, config_name: str, argv: list[str]) -> None:
    """Compose the config once before Hydra does, so that an unknown group option (`model=huge`, `+pe=nosuch`)
    or key (`train.bogus=1`) is a one-line error instead of Hydra's multi-line report. Command lines with Hydra
    flags (--multirun, --help, --cfg, ...) are left to Hydra."""
    if any(arg.startswith("-") for arg in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name, overrides=argv)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(hydra_error_line(exc)) from None


def hydra_error_line(exc: Exception) -> str:
    """Hydra's message in one line: "Could not find 'model/huge'; available options in 'model': 150m, ..."."""
    text = str(exc).split("Config search path")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("Available options"):
            return "; ".join(lines[:i]) + f"; {line[0].lower()}{line[1:]} " + ", ".join(lines[i + 1 :])
    return "; ".join(line for line in lines if not line.startswith(("full_key:", "object_type=")))


# --- --help: the groups a run selects ----------------------------------------------------------------------------
CONFIG_GROUPS_RESOLVER = "fope.config_groups"


def config_groups(*groups: str) -> str:
    """`${fope.config_groups:model,pe,...}` in configs/train.yaml's help template: each named config group with its
    options, one line each, as Hydra's $APP_CONFIG_GROUPS writes them. That one lists every directory of configs/ that
    holds YAML, among them configs/accelerate/ (`accelerate launch --config_file`) and configs/paper/ (what the
    experiments share), which no run selects. The options are Hydra's own (its config search path)."""
    from hydra.core.global_hydra import GlobalHydra

    from fope_lm.paths import CONFIG_DIR

    hydra = GlobalHydra.instance()
    loader = hydra.config_loader() if hydra.is_initialized() else None

    def options(group: str) -> list[str]:  # outside a Hydra app: the config dir's files
        return loader.get_group_options(group) if loader is not None else [path.stem for path in (CONFIG_DIR / group).glob("*.yaml")]

    return "\n".join(f"{group}: {', '.join(sorted(options(group)))}" for group in groups)


if not OmegaConf.has_resolver(CONFIG_GROUPS_RESOLVER):
    OmegaConf.register_new_resolver(CONFIG_GROUPS_RESOLVER, config_groups)


# --- run_name: what the command line changed, in the name ------------------------------------------------------
RUN_NAME_RESOLVER = "fope.run_name"
NAME_KEEPS = ("pe", "seed", "run_name", "experiment")  # shown by the template's {pe} / the seed suffix, or naming themselves


def derive_run_name(template: str, pe: str, *, seed: int, hydra: Any = None, argv: list[str] | None = None) -> str:
    """The run name of `run_name: ${fope.run_name:TEMPLATE,PE}` (configs/train.yaml, configs/experiment/*.yaml).

    TEMPLATE names the run as its config file sets it up; PE is the pe config it stands for. `hydra` is Hydra's node of
    the run (None where the config was composed without one: TEMPLATE's defaults then):
    - `{pe}` becomes the pe config chosen (`pe=rope_clip`, `+pe=fope_nomix`), else PE; a TEMPLATE without `{pe}` gets
      `_pe-NAME` when another PE than PE was chosen;
    - every override of a PE option (`pe.sigma=0.1`), and in a multirun every swept key (`optim.lr=1e-3,3e-3`, read
      from the command line, `argv`), adds `_KEY-VALUE`, sorted (characters other than letters, digits and `._+-`
      become `-`);
    - `{seed}` becomes the seed; a TEMPLATE without it gets `_s<seed>` for a nonzero seed (seed 0 is the bare name).
    An explicit `run_name=...` replaces all of this."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    chosen = hydra.runtime.choices.get("pe") if hydra is not None else None
    other_pe = f"_pe-{chosen}" if chosen and chosen != pe else ""  # a TEMPLATE without {pe}
    name = template.replace("{pe}", chosen or pe) if "{pe}" in template else template + other_pe
    overrides = OverridesParser.create().parse_overrides(list(hydra.overrides.task)) if hydra is not None else []
    swept = swept_keys(sys.argv[1:] if argv is None else argv) if hydra is not None and hydra.mode == RunMode.MULTIRUN else set()
    items = set()
    for override in overrides:
        key = override.key_or_group
        if key in NAME_KEEPS or (key == "pe.name" and "{pe}" in template and not chosen):  # pe.name=X: already {pe}
            continue
        if key.startswith("pe.") or key in swept:
            value = "del" if override.is_delete() else override.get_value_element_as_str()
            items.add(f"{key}-{re.sub(r'[^A-Za-z0-9._+-]', '-', value)}")
    name += "".join(f"_{item}" for item in sorted(items))
    if "{seed}" in template:
        return name.replace("{seed}", str(seed))
    return seeded(name, seed)


def swept_keys(argv: list[str]) -> set[str]:
    """The keys a multirun command line sweeps (`pe.sigma=0.1,0.3`, `seed=range(3)`); flags and their values are
    skipped. Sweeps declared in a config (hydra.sweeper.params) are not seen: give those jobs a run_name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, keys = OverridesParser.create(), set()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def _run_name_resolver(template: str, pe: str, *, _root_: Any) -> str:
    from hydra.core.hydra_config import HydraConfig

    # composed with return_hydra_config=True: its node; train.py: Hydra holds it (the job's, in a multirun)
    hydra = _root_.hydra if "hydra" in _root_ else (HydraConfig.get() if HydraConfig.initialized() else None)
    return derive_run_name(str(template), str(pe), seed=int(_root_.seed), hydra=hydra)


if not OmegaConf.has_resolver(RUN_NAME_RESOLVER):
    OmegaConf.register_new_resolver(RUN_NAME_RESOLVER, _run_name_resolver)
