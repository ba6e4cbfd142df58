"""Length scaling: how a rotary encoding reaches beyond the length L0 its rotary weights were trained at.

Every rotary encoding takes these options (`ScalingOptions`, written flat in its pe_options, or as eval.py's
`scaling` section), and they build one typed object per method:

  none         the encoding as trained
  yarn         NTK-by-parts interpolation of the frequencies and an attention temperature (Peng et al. 2023);
               `dynamic`: s = max(1, T / L0) for the length T being run
  linear       position interpolation: w / s (Chen et al. 2023)
  ntk          NTK-aware base scaling: theta' = theta s^(d/(d-2))
  dynamic_ntk  transformers' "dynamic": theta' = theta ((s T / L0) - (s - 1))^(d/(d-2)), T = max(T, L0)
  abf          adjusted base frequency: theta' = `base` (Xiong et al. 2023)

Each object validates itself, rescales frequencies, names itself (`label`), says which transformers `rope_type`
computes it exactly (`rope_parameters`, or None), and records itself (`record`). Methods that depend on the length
being run (`depends_on_length`) take that length as a Python int, or as a float32 tensor (..., T, 1) holding each
token's own length (the length of its document when positions restart at each document of a packed row), so a
packed row scales every document as if it were run alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fope_lm.errors import ConfigError

Length = int | torch.Tensor  # what dynamic scaling scales for: one length, or one per token (..., T, 1) float32
# A dynamic scaling serves any length; an export declares this many times L0 as its longest context by default: the
# range this project evaluates length generalisation over (the demo: 0.5x to 16x; YaRN's preset scale is 16).
DYNAMIC_SERVING_FACTOR = 16


@dataclass
class ScalingOptions:
    """Length scaling as configs write it (pe_options of a rotary encoding; eval.py's `scaling` section)."""

    method: str | None = None  # none | yarn | linear | ntk | dynamic_ntk | abf; null: yarn when scale > 1 or dynamic
    scale: float = 1.0  # s (yarn static, linear, ntk, dynamic_ntk)
    original_max_seq_len: int | None = None  # L0; null: the training length
    dynamic: bool = False  # yarn: s = max(1, T / L0) for the length T being run
    attention_factor: float | None = None  # yarn: null: 0.1 ln(s) + 1; 1.0 disables the temperature
    beta_fast: float = 32.0  # yarn's ramp bounds (rotations per L0)
    beta_slow: float = 1.0
    base: float | None = None  # abf: the new RoPE base

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_pe_options(cls, options: dict[str, Any]) -> ScalingOptions:
        """The scaling of a rotary encoding's pe_options, where the method is written `scaling`."""
        values = {("method" if key == "scaling" else key): value for key, value in options.items()}
        return cls(**{key: value for key, value in values.items() if key in cls.names()})

    def build(self, *, max_seq_len: int) -> Scaling:
        """The typed scaling; a one-line ConfigError for a method that does not exist or options that contradict it."""
        method = self.method if self.method is not None else ("yarn" if self.dynamic or self.scale > 1 else "none")
        if method not in SCALINGS:
            raise ConfigError(f"scaling={method!r} is not one of {', '.join(SCALINGS)}")
        if self.scale < 1:
            raise ConfigError(f"scale must be >= 1, got {self.scale}")
        if self.dynamic and method != "yarn":
            raise ConfigError(f"dynamic=true is YaRN's (scaling=yarn); scaling={method} is static, or use scaling=dynamic_ntk")
        if (method == "abf") != (self.base is not None):
            raise ConfigError("scaling=abf takes the new base as `base` (e.g. base=500000), and only it does")
        original = int(self.original_max_seq_len or max_seq_len)
        if original < 1:
            raise ConfigError(f"original_max_seq_len must be positive, got {original}")
        return SCALINGS[method](dataclasses.replace(self, method=method, original_max_seq_len=original))


class Scaling:
    """One length-scaling method over RoPE-style frequencies (highest first), with its options resolved."""

    method: ClassVar[str]
    rope_type: ClassVar[str | None] = None  # transformers' rope_type that computes exactly this (with rope_parameters)
    # whether that rope_type reads a Llama config's max_position_embeddings as the original length L0 (then a native
    # export must hold `max_position_embeddings()` there, whatever length it serves)
    rope_type_reads_max_position_embeddings: ClassVar[bool] = False

    def __init__(self, options: ScalingOptions):
        self.options = options
        self.scale = float(options.scale)
        self.original_max_seq_len = int(options.original_max_seq_len or 0)

    @property
    def active(self) -> bool:
        return True

    @property
    def depends_on_length(self) -> bool:
        """Whether the frequencies change with the length being run (then that length must be passed)."""
        return False

    def base(self, theta: float, dim: int, length: Length | None) -> float | torch.Tensor:
        """The RoPE base the frequencies are computed at."""
        return theta

    def rescale(self, freqs: torch.Tensor, *, dim: int, theta: float, length: Length | None) -> tuple[torch.Tensor, float | torch.Tensor]:
        """(frequencies after interpolation, the factor cos and sin are multiplied by)."""
        return freqs, 1.0

    def label(self) -> str:
        """A short name for tables and plots: "yarn(s=4)", "yarn(dynamic)", "abf(base=500000)", ..."""
        return f"{self.method}(s={self.scale:g})"

    def describe(self) -> str:
        """The module's repr: every option that matters."""
        return f"{self.method}(scale={self.scale:g}, L0={self.original_max_seq_len})"

    def record(self) -> dict[str, Any]:
        """The options as results.json records them (every ScalingOptions field, resolved)."""
        return dataclasses.asdict(self.options) | {"scale": self.scale}

    def pe_options(self, *, minimal: bool = False) -> dict[str, Any]:
        """The pe_options that rebuild this scaling on any rotary encoding: every option (to override another scaling),
        or with `minimal` only those that differ from their defaults."""
        defaults = dataclasses.asdict(ScalingOptions())
        options = {key: value for key, value in self.record().items() if not (minimal and key != "method" and value == defaults[key])}
        return {("scaling" if key == "method" else key): value for key, value in options.items()}

    def rope_parameters(self, theta: float) -> dict[str, Any] | None:
        """transformers' rope_parameters computing exactly this scaling, or None when no rope_type does."""
        return None

    def max_position_embeddings(self, max_seq_len: int) -> int:
        """A Llama config's max_position_embeddings for a model trained at max_seq_len with this scaling (what
        transformers' rope_type reads as its original length, where it reads one)."""
        return max_seq_len

    def serving_length(self, max_seq_len: int) -> int:
        """The longest context an export of a model trained at max_seq_len declares by default (its config's
        max_position_embeddings, which lm-evaluation-harness and vLLM take as the longest input): the training length,
        or L0 x s where a static scaling stretches L0 by s (YaRN s=4 at L=1024: 4096); a dynamic scaling has no such
        bound and declares DYNAMIC_SERVING_FACTOR x L0."""
        factor = DYNAMIC_SERVING_FACTOR if self.depends_on_length else self.scale
        return max(max_seq_len, round(self.original_max_seq_len * factor))


class NoScaling(Scaling):
    method = "none"
    rope_type = "default"

    @property
    def active(self) -> bool:
        return False

    def label(self) -> str:
        return "none"

    def describe(self) -> str:
        return ""

    def rope_parameters(self, theta):
        return {"rope_type": "default", "rope_theta": theta}


def yarn_ramp(head_dim: int, theta: float, original_max_seq_len: int, beta_fast: float, beta_slow: float, device="cpu"):
    """ramp_i in [0, 1] for i < head_dim/2: 0 keeps w_i (high frequencies), 1 fully interpolates w_i / s."""

    def correction_dim(n_rotations: float) -> float:
        return head_dim * math.log(original_max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if high == low:
        high += 0.001  # avoid division by zero, as the reference does
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)
    return ramp.clamp(0.0, 1.0)


class YarnScaling(Scaling):
    method = "yarn"
    rope_type = "yarn"

    def __init__(self, options: ScalingOptions):
        super().__init__(options)
        self.dynamic = bool(options.dynamic)
        self.attention_factor = options.attention_factor
        self.beta_fast, self.beta_slow = float(options.beta_fast), float(options.beta_slow)
        if self.dynamic:
            self.scale = 1.0  # the scale comes from the length being run

    @property
    def depends_on_length(self) -> bool:
        return self.dynamic

    def effective_scale(self, length: Length | None) -> float | torch.Tensor:
        if not self.dynamic:
            return self.scale
        if isinstance(length, torch.Tensor):
            return (length / self.original_max_seq_len).clamp(min=1.0)
        return max(1.0, (length or 0) / self.original_max_seq_len)

    def temperature(self, scale: float | torch.Tensor) -> float | torch.Tensor:
        """cos and sin are multiplied by this, so logits scale by its square. Default: 0.1 ln(s) + 1."""
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if isinstance(scale, torch.Tensor):
            return 0.1 * scale.log() + 1.0  # 1 exactly where s = 1
        return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0

    def rescale(self, freqs, *, dim, theta, length):
        scale = self.effective_scale(length)
        if not isinstance(scale, torch.Tensor) and scale <= 1 and self.attention_factor is None:
            return freqs, 1.0
        # NTK-by-parts: w'_i = (w_i / s) * ramp_i + w_i * (1 - ramp_i), for the first len(freqs) pairs
        ramp = yarn_ramp(dim, theta, self.original_max_seq_len, self.beta_fast, self.beta_slow, freqs.device)[: freqs.shape[-1]]
        interpolated = (freqs / scale) * ramp + freqs * (1 - ramp)
        if isinstance(scale, torch.Tensor):  # per token: tokens with s = 1 keep the frequencies exactly
            interpolated = torch.where(scale > 1, interpolated, freqs)
        return interpolated, self.temperature(scale)

    def label(self) -> str:
        return "yarn(dynamic)" if self.dynamic else f"yarn(s={self.scale:g})"

    def describe(self) -> str:
        mode = "dynamic" if self.dynamic else f"scale={self.scale:g}"
        return f"yarn({mode}, L0={self.original_max_seq_len}, attention_factor={self.attention_factor})"

    def rope_parameters(self, theta):
        if self.dynamic:
            return None  # transformers' yarn is static
        parameters = {
            "rope_type": "yarn", "rope_theta": theta, "factor": self.scale,
            "original_max_position_embeddings": self.original_max_seq_len, "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
        }  # fmt: skip
        if self.attention_factor is not None:
            parameters["attention_factor"] = self.attention_factor
        return parameters


class LinearScaling(Scaling):
    method = "linear"
    rope_type = "linear"

    def rescale(self, freqs, *, dim, theta, length):
        return freqs / self.scale, 1.0

    def rope_parameters(self, theta):
        return {"rope_type": "linear", "rope_theta": theta, "factor": self.scale}


class NtkScaling(Scaling):
    method = "ntk"

    def base(self, theta, dim, length):
        return theta * self.scale ** (dim / (dim - 2))


class DynamicNtkScaling(Scaling):
    method = "dynamic_ntk"
    rope_type = "dynamic"
    rope_type_reads_max_position_embeddings = True  # transformers' dynamic grows the base past max_position_embeddings

    @property
    def depends_on_length(self) -> bool:
        return True

    def base(self, theta, dim, length):
        original = self.original_max_seq_len
        length = length.clamp(min=original) if isinstance(length, torch.Tensor) else max(length or 0, original)
        return theta * ((self.scale * length / original) - (self.scale - 1)) ** (dim / (dim - 2))

    def rope_parameters(self, theta):
        return {"rope_type": "dynamic", "rope_theta": theta, "factor": self.scale}

    def max_position_embeddings(self, max_seq_len):
        return self.original_max_seq_len  # transformers' dynamic scales from max_position_embeddings, our L0


class AbfScaling(Scaling):
    method = "abf"

    def __init__(self, options: ScalingOptions):
        super().__init__(options)
        self.scale = 1.0  # abf changes the base, not a scale
        self.new_base = float(options.base or 0.0)

    def base(self, theta, dim, length):
        return self.new_base

    def label(self) -> str:
        return f"abf(base={self.new_base:g})"

    def describe(self) -> str:
        return f"abf(base={self.new_base:g})"


SCALINGS: dict[str, type[Scaling]] = {
    cls.method: cls for cls in (NoScaling, YarnScaling, LinearScaling, NtkScaling, DynamicNtkScaling, AbfScaling)
}


def scaling_options_of_rope_parameters(rope: dict[str, Any], *, max_position_embeddings: int) -> ScalingOptions:
    """Our ScalingOptions for transformers' rope_parameters (a Llama config's), or a one-line ConfigError naming what
    has no exact equivalent here."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    by_rope_type = {cls.rope_type: cls for cls in SCALINGS.values() if cls.rope_type is not None}
    if rope_type not in by_rope_type:
        raise ConfigError(f"rope_type {rope_type!r} has no equivalent here; supported: {', '.join(by_rope_type)}")
    method = by_rope_type[rope_type].method
    if method == "none":
        return ScalingOptions()
    options = ScalingOptions(method=method, scale=float(rope["factor"]))
    if method == "dynamic_ntk":
        return dataclasses.replace(options, original_max_seq_len=max_position_embeddings)
    if method == "yarn":
        if any(rope.get(key) for key in ("mscale", "mscale_all_dim")) or rope.get("truncate") is False:
            raise ConfigError("yarn with mscale, mscale_all_dim or truncate=false has no equivalent here")
        return dataclasses.replace(
            options,
            original_max_seq_len=int(rope["original_max_position_embeddings"]),
            attention_factor=rope.get("attention_factor"),
            beta_fast=float(rope.get("beta_fast") or 32.0),
            beta_slow=float(rope.get("beta_slow") or 1.0),
        )
    return options
