"""The evaluation config (configs/eval.yaml) as typed dataclasses.

Hydra merges the YAML onto these (so a typo or a wrong type fails before any model is loaded), and
`EvalConfig.check()` rejects the combinations that types cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from fope_lm.config import WandbMode
from fope_lm.errors import ConfigError

PAPER_LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192]
YARN_MODES = ("none", "static", "dynamic")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SlidingWindowConfig:
    window: int | None = None  # null: off
    stride: int = 256  # tokens scored per window (its last `stride`); must be < window


@dataclass
class PerplexityConfig:
    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: list(PAPER_LENGTHS))
    tokens_total: int = 2**21  # rounded down to a multiple of the largest length, capped by the split's size
    tokens_per_batch: int | None = None  # null: the largest length, so the top length runs at batch 1
    loss_chunk_tokens: int = 4096  # LM-head rows per call: bounds the float32 logits held at once
    sliding_window: SlidingWindowConfig = field(default_factory=SlidingWindowConfig)


@dataclass
class PasskeyConfig:
    enabled: bool = True
    lengths: list[int] = field(default_factory=lambda: list(PAPER_LENGTHS))
    trials: int = 50
    seed: int = 0
    distractors: int = 9
    max_new_tokens: int = 10
    depth_buckets: int = 5  # equal-width depth bins in [0, 1] for the per-depth accuracies


@dataclass
class YarnEvalConfig:
    """YaRN applied at evaluation time to a rotary checkpoint (rope -> yarn, fope -> FoPE+YaRN)."""

    mode: str = "none"  # none | static | dynamic (s = max(1, T / L) per evaluated length)
    scale: float = 4.0  # the static mode's s
    attention_factor: float | None = None  # null: 0.1 ln(s) + 1
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass
class WandbConfig:
    """As the trainer's wandb section (fope_lm.metrics.start_wandb reads it), plus an on/off switch."""

    enabled: bool = False
    project: str = "fope-lm"
    entity: str | None = None
    group: str | None = None
    name: str | None = None  # null: the run's label
    tags: list[str] = field(default_factory=list)
    mode: WandbMode | None = None  # null: WANDB_MODE, else online with credentials, else offline


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # a checkpoint dir (step_XXXXXX) or a run dir (its newest complete checkpoint)
    output_dir: str | None = None  # null: <run_dir>/eval/<step_N>/<label> (a run's checkpoint)
    label: str | None = None  # the curve's name in tables and plots; null: the PE (+ eval-time YaRN)
    data: Any = None  # a data config (configs/data/*.yaml): the validation split and the tokenizer
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # autocast dtype; auto: bfloat16 on cuda, float32 (no autocast) on cpu
    progress: bool = True
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    yarn: YarnEvalConfig = field(default_factory=YarnEvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def check(self) -> None:
        """Raise ConfigError naming the first invalid setting."""
        for name, lengths in ("perplexity.lengths", self.perplexity.lengths), ("passkey.lengths", self.passkey.lengths):
            if not lengths or any(length < 2 for length in lengths):
                raise ConfigError(f"{name} must be a non-empty list of lengths >= 2, got {list(lengths)}")
        if self.perplexity.tokens_per_batch is not None and self.perplexity.tokens_per_batch < 1:
            raise ConfigError(f"perplexity.tokens_per_batch must be positive, got {self.perplexity.tokens_per_batch}")
        if self.perplexity.loss_chunk_tokens < 1:
            raise ConfigError(f"perplexity.loss_chunk_tokens must be positive, got {self.perplexity.loss_chunk_tokens}")
        window = self.perplexity.sliding_window
        if window.window is not None and not 1 <= window.stride < window.window:
            raise ConfigError(f"sliding_window.stride must be in [1, window={window.window}), got {window.stride}")
        if self.passkey.trials < 1 or self.passkey.distractors < 1 or self.passkey.depth_buckets < 1:
            raise ConfigError("passkey.trials, passkey.distractors and passkey.depth_buckets must be positive")
        if self.passkey.max_new_tokens < 1:
            raise ConfigError(f"passkey.max_new_tokens must be positive, got {self.passkey.max_new_tokens}")
        if self.yarn.mode not in YARN_MODES:
            raise ConfigError(f"yarn.mode={self.yarn.mode!r} is not one of {', '.join(YARN_MODES)}")
        if self.yarn.scale < 1:
            raise ConfigError(f"yarn.scale must be >= 1, got {self.yarn.scale}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device={self.device!r} is not auto, cpu, cuda or cuda:<index>")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.data is None:
            raise ConfigError("no eval data: set data=<name of a configs/data/*.yaml>, e.g. data=embedded")
