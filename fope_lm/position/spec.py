"""A position encoding as configs name it, typed: the one place that decides anything encoding-specific for the
rest of the code (model building, eval-time length scaling, labels, Hugging Face export and import).

Configs keep plain values (`pe: {name: fope, sigma: 0.3}`, a checkpoint's `pe` and `pe_options`); `EncodingSpec.of`
types them against the encoding's constructor (its keyword options, their types and defaults) and its length
scaling (`fope_lm.position.scaling`), so a misspelt option, a wrong type or contradicting scaling options fail in one
line before anything is built. Nothing outside fope_lm.position names an encoding or a scaling method.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fope_lm.errors import ConfigError
from fope_lm.position.base import PositionEncoding, RotaryEncoding
from fope_lm.position.registry import available, get_class, option_parameters
from fope_lm.position.scaling import SCALINGS, NoScaling, Scaling, ScalingOptions, scaling_options_of_rope_parameters


@dataclass(frozen=True)
class LlamaRope:
    """The rotary settings of a Llama config.json that computes an encoding exactly, for the transformers versions
    that read each: 5.x reads `rope_parameters` (rope_theta inside); 4.x reads `rope_scaling` (None when unscaled)
    with `rope_theta` at the config's top level (5.x takes those too, and `rope_scaling` over `rope_parameters`, so
    both say the same)."""

    rope_parameters: dict[str, Any]
    rope_scaling: dict[str, Any] | None
    rope_theta: float
    max_position_embeddings: int  # what the rope_type reads as the original length, where it reads one (else L)
    reads_max_position_embeddings: bool  # the config must hold max_position_embeddings above (dynamic NTK: L0)


@dataclass(frozen=True)
class EncodingSpec:
    """A registered encoding and its options (plain values), checked. `eval_scaling`: length scaling applied at
    evaluation time on top of the trained encoding (its options already merged into `options`)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    eval_scaling: Scaling | None = None

    @classmethod
    def of(cls, name: str, options: dict[str, Any] | None = None) -> EncodingSpec:
        """The spec of `name` with `options`; a one-line ConfigError for an unknown name, option, type or scaling."""
        encoding = get_class(name)
        options = dict(options or {})
        parameters = option_parameters(encoding)
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            known = ", ".join(sorted(parameters)) or "none"
            raise ConfigError(f"position encoding {name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
        for option, value in options.items():
            if not _fits(value, parameters[option][0]):
                raise ConfigError(f"position encoding {name!r}: {option}={value!r} must be {_type_name(parameters[option][0])}")
        spec = cls(name, options)
        spec.scaling(max_seq_len=1)  # checks the scaling options (their L0 default does not matter here)
        return spec

    # --- what the encoding is ----------------------------------------------------------------------------
    @property
    def encoding_class(self) -> type[PositionEncoding]:
        return get_class(self.name)

    @property
    def is_rotary(self) -> bool:
        return issubclass(self.encoding_class, RotaryEncoding)

    def resolved_options(self) -> dict[str, Any]:
        """Every option, the unset ones at their defaults."""
        defaults = {name: default for name, (_, default) in option_parameters(self.encoding_class).items()}
        return defaults | self.options

    def scaling(self, *, max_seq_len: int) -> Scaling:
        """The length scaling this encoding runs with at training length max_seq_len (none for non-rotary ones)."""
        if not self.is_rotary:
            return NoScaling(ScalingOptions(method="none", original_max_seq_len=max_seq_len))
        return ScalingOptions.from_pe_options(self.resolved_options()).build(max_seq_len=max_seq_len)

    def original_max_seq_len(self, max_seq_len: int) -> int:
        """L0: the length the rotary weights were first trained at (a continued run records it), else max_seq_len."""
        return int(self.options.get("original_max_seq_len") or max_seq_len)

    def build(
        self, *, head_dim: int, n_heads: int, max_seq_len: int, theta: float = 10000.0, n_kv_heads: int | None = None
    ) -> PositionEncoding:
        """The encoding module for one attention layer."""
        shape: dict[str, Any] = dict(head_dim=head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads, max_seq_len=max_seq_len, theta=theta)
        return self.encoding_class(**shape, **self.options)

    def label(self) -> str:
        """The name for tables and plots: the encoding, plus eval-time scaling ("rope+yarn(dynamic)", "fope+yarn(s=4)")."""
        return self.name if self.eval_scaling is None else f"{self.name}+{self.eval_scaling.label()}"

    # --- evaluation: length scaling on a trained encoding -------------------------------------------------------
    def with_eval_scaling(self, options: ScalingOptions, *, max_seq_len: int) -> EncodingSpec:
        """This trained encoding with length scaling applied at evaluation time (the weights are untouched): its own
        options stay (FoPE's coefficient settings), the scaling options replace its scaling, and L0 defaults to the
        length its rotary weights were first trained at."""
        original = options.original_max_seq_len or self.original_max_seq_len(max_seq_len)
        scaling = dataclasses.replace(options, original_max_seq_len=original).build(max_seq_len=max_seq_len)
        if not scaling.active:
            return self
        if not self.is_rotary:
            raise ConfigError(f"eval-time length scaling rescales rotary encodings; this checkpoint uses {self.name!r}, which has none")
        return dataclasses.replace(self, options={**self.options, **scaling.pe_options()}, eval_scaling=scaling)

    # --- Hugging Face: the context an export serves, and what transformers computes natively ---------------------
    def serving_length(self, *, max_seq_len: int) -> int:
        """The longest context an export of this encoding, trained at max_seq_len, declares by default (its config's
        max_position_embeddings): the training length, L0 x s for a static length scaling, DYNAMIC_SERVING_FACTOR x L0
        for a dynamic one (`Scaling.serving_length`)."""
        return self.scaling(max_seq_len=max_seq_len).serving_length(max_seq_len)

    def llama_rope(self, *, theta: float, max_seq_len: int) -> tuple[dict[str, Any], int] | None:
        """(transformers' rope_parameters, the Llama config's max_position_embeddings) for an exact native equivalent of
        this encoding, or None: only an encoding that is exactly Llama's rotary, with a scaling some rope_type computes."""
        native = self.llama_native(theta=theta, max_seq_len=max_seq_len)
        return None if native is None else (native.rope_parameters, native.max_position_embeddings)

    def llama_native(self, *, theta: float, max_seq_len: int) -> LlamaRope | None:
        """What a Llama config.json holds for an exact native equivalent of this encoding (`LlamaRope`), or None."""
        if not self.encoding_class.llama_equivalent:
            return None
        scaling = self.scaling(max_seq_len=max_seq_len)
        rope = scaling.rope_parameters(theta)
        if rope is None:
            return None
        return LlamaRope(
            rope_parameters=rope,
            rope_scaling={key: value for key, value in rope.items() if key != "rope_theta"} if scaling.active else None,
            rope_theta=theta,
            max_position_embeddings=scaling.max_position_embeddings(max_seq_len),
            reads_max_position_embeddings=scaling.rope_type_reads_max_position_embeddings,
        )

    @classmethod
    def of_rope_parameters(cls, rope: dict[str, Any], *, max_position_embeddings: int) -> EncodingSpec:
        """The encoding a Llama config's rope_parameters describe: RoPE with their scaling (a one-line ConfigError
        for a rope_type or option that has no exact equivalent here)."""
        options = scaling_options_of_rope_parameters(rope, max_position_embeddings=max_position_embeddings)
        scaling = options.build(max_seq_len=max_position_embeddings)
        return cls.of("rope", scaling.pe_options(minimal=True) if scaling.active else {})


def llama_native_summary() -> str:
    """Which encodings and scalings export as a native LlamaForCausalLM, for messages."""
    encodings = [name for name in available() if get_class(name).llama_equivalent]
    scalings = [cls.method for cls in SCALINGS.values() if cls.rope_type is not None and cls.method != "none"]
    return f"{', '.join(encodings)}, unscaled or with static {' / '.join(scalings)} scaling"


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain config value fits an option's type hint (float takes ints; bool is not a number)."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def build_position_encoding(
    name: str, *, head_dim: int, n_heads: int, max_seq_len: int, theta: float = 10000.0, n_kv_heads: int | None = None, **options
) -> PositionEncoding:
    """Build the position encoding `name` for one attention layer (`EncodingSpec.of(name, options).build(...)`)."""
    spec = EncodingSpec.of(name, options)
    return spec.build(head_dim=head_dim, n_heads=n_heads, max_seq_len=max_seq_len, theta=theta, n_kv_heads=n_kv_heads)
