"""The evaluation config as typed dataclasses: the one place where every eval setting, its default and its check
live (fope_lm.schema's pattern). configs/eval.yaml only selects this schema (`eval_schema`, registered with Hydra
below) and the data group, so a default is never written twice; a typo or a wrong type fails before any model is
loaded, and each `__post_init__` rejects the values that types cannot express.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fope_lm.errors import ConfigError
from fope_lm.position import ScalingOptions
from fope_lm.schema import Choice
from fope_lm.tracking import WandbConfig

PAPER_LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192]


class AutocastDtype(Choice):
    auto = "auto"  # bfloat16 on cuda, float32 (no autocast) on cpu
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _check_lengths(name: str, lengths: list[int]) -> None:
    if not lengths or any(length < 2 for length in lengths):
        raise ConfigError(f"{name} must be a non-empty list of lengths >= 2, got {list(lengths)}")


@dataclass
class SlidingWindowConfig:
    window: int | None = None  # e.g. 1024 to also report sliding-window perplexity; null: off
    stride: int = 256  # each window scores only its last `stride` tokens; must be < window

    def __post_init__(self):
        if self.window is not None and not 1 <= self.stride < self.window:
            raise ConfigError(f"sliding_window.stride must be in [1, window={self.window}), got {self.stride}")


@dataclass
class PerplexityConfig:
    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: list(PAPER_LENGTHS))
    tokens_total: int = 2**21  # per length; rounded down to a multiple of the largest length, capped by the split
    tokens_per_batch: int | None = None  # constant across lengths (batch = tokens_per_batch // T, min 1); null: the largest length
    loss_chunk_tokens: int = 4096  # LM-head rows per call: bounds the float32 logits held at once
    per_document: bool = False  # each document scored alone (its first T tokens), bucketed by position in the document
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)

    def __post_init__(self):
        _check_lengths("perplexity.lengths", self.lengths)
        if self.tokens_per_batch is not None and self.tokens_per_batch < 1:
            raise ConfigError(f"perplexity.tokens_per_batch must be positive, got {self.tokens_per_batch}")
        if self.loss_chunk_tokens < 1:
            raise ConfigError(f"perplexity.loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}")


@dataclass
class PasskeyConfig:
    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: list(PAPER_LENGTHS))
    trials: int = 50  # per length, the same seeded keys and depths at every length
    seed: int = 0
    distractors: int = 9  # teacher-forced: the true key must outscore all of them (chance 1/10)
    max_new_tokens: int = 10  # greedy, KV-cached; correct if the first integer in the continuation is the key
    depth_buckets: int = 5  # equal-width depth bins in [0, 1] for the per-depth accuracies

    def __post_init__(self):
        _check_lengths("passkey.lengths", self.lengths)
        if self.trials < 1 or self.distractors < 1 or self.depth_buckets < 1:
            raise ConfigError("passkey.trials, passkey.distractors and passkey.depth_buckets must be positive")
        if self.max_new_tokens < 1:
            raise ConfigError(f"passkey.max_new_tokens must be positive, got {self.max_new_tokens}")


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # a checkpoint dir (step_XXXXXX) or a run dir (its newest complete checkpoint)
    output_dir: str | None = None  # null: <run_dir>/eval/<step_N>/<label> (a run's checkpoint)
    label: str | None = None  # the curve's name in tables and plots; null: the PE (+ eval-time YaRN)
    # the validation split and the tokenizer: by default (no data group, dir null) the data the checkpoint was trained on
    # (fope_lm.run_dir.recorded_data_dir); data=<configs/data/*.yaml> or data.dir=<a prepared dir>: that data
    data: Any = field(default_factory=lambda: {"dir": None})
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    dtype: AutocastDtype = AutocastDtype.auto  # autocast dtype
    attention: str = "auto"  # auto (flash-attn where it fits, else PyTorch SDPA) | flash (or a one-line error) | sdpa
    progress: bool = True  # tqdm bars per length
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    # length scaling applied at evaluation time to any rotary checkpoint (fope_lm.position.scaling): its pe_options gain
    # these, its weights are untouched (FoPE+YaRN for FoPE); original_max_seq_len null: the checkpoint's L0
    scaling: ScalingOptions = field(default_factory=lambda: ScalingOptions(method="none", scale=4.0))
    wandb: WandbConfig = field(default_factory=lambda: WandbConfig(enabled=False))

    def __post_init__(self):
        if self.label is not None and (self.label in ("", ".", "..") or any(sep and sep in self.label for sep in ("/", os.sep, os.altsep))):
            raise ConfigError(  # it names the dir eval/step_N/<label>: `..` or `a/b` would write elsewhere
                f"label={self.label!r} is not a name: results go to eval/step_N/<label>, so use a non-empty label "
                "without / that is not . or .., e.g. label=rope-yarn4"
            )
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device!r} is not auto, cpu, cuda or cuda:<index>")
        if self.dtype not in AutocastDtype.__members__:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {AutocastDtype.names()}")
        self.dtype = AutocastDtype(self.dtype)
        try:
            self.scaling.build(max_seq_len=1)  # its checks; L0 comes from the checkpoint
        except ConfigError as exc:
            raise ConfigError(f"scaling: {exc}") from None
        if self.data is not None and not isinstance(self.data, Mapping):
            raise ConfigError(f"data must be a data config (data=<name of a configs/data/*.yaml> or data.dir=PATH), got {self.data!r}")

    @property
    def checkpoint_data(self) -> bool:
        """Whether `data` leaves the choice to the checkpoint: no data group selected and no data.dir."""
        return self.data is None or all(value is None for value in self.data.values())


ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
