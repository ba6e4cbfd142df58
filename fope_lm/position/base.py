"""The interface every position encoding implements, and the rotary machinery shared by RoPE/YaRN/FoPE.

One instance lives in each attention layer. The model calls only these:
  - `rotate_qk(q, k, positions)`: position-dependent transform of queries and keys (identity by default);
  - `token_state(x)`: per-token state computed from the layer input (FoX's forget gates), cached with the keys;
  - `logit_bias(inputs)`: an additive float32 logit bias for a block of queries against every key, or None. It
    sees the positions, and content-dependent encodings (CoPE, FoX) also the queries, keys and token state
    (`BiasInputs`); position-only encodings implement `attention_bias(q_positions, k_positions)` instead.

Nothing here needs a tensor's value on the host, so a forward traces into one graph (docs/ARCHITECTURE.md):
`Positions` describes the common case, a contiguous range, by Python ints (start, length), and per-token positions
(e.g. restarting at each document of a packed row) as a (B, T) tensor. Rotary tables are computed from the
positions in every forward (a few elementwise ops, fused by the compiler), so there is no cache to invalidate.
Queries may have more heads than keys (grouped-query attention): a table with one row per key/value head is
repeated for the queries of each group.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from fope_lm.position.scaling import Scaling, ScalingOptions


@dataclass(frozen=True)
class Positions:
    """The absolute positions of the T tokens of a forward: start .. start + length - 1, Python ints (training,
    eval, and a KV-cache step whose start is the cache length), or `per_token` positions (B, T) int64 on the
    activations' device, which replace the range (a packed row's per-document positions). `lengths` (B, T), with
    per-token positions: the length of each token's document, which dynamic scaling scales for instead of the row's."""

    start: int
    length: int
    per_token: torch.Tensor | None = None
    lengths: torch.Tensor | None = None

    @property
    def end(self) -> int:
        """One past the last position of the range: the length dynamic scaling (YaRN, dynamic NTK) scales for."""
        return self.start + self.length

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The positions as int64, (T,) for a range or (B, T) per token."""
        if self.per_token is not None:
            return self.per_token
        return torch.arange(self.start, self.end, device=device)

    def dynamic_length(self, dynamic_len: int | None) -> int | torch.Tensor:
        """What dynamic scaling scales for: `dynamic_len` when given, else each token's document length (float32
        (B, T, 1)) when known, else the range's end."""
        if dynamic_len is not None:
            return dynamic_len
        if self.lengths is not None:
            return self.lengths.to(torch.float32)[..., None]
        return self.end

    @classmethod
    def of(cls, positions: Positions | torch.Tensor) -> Positions:
        """A Positions for a Positions or a tensor of positions (T,) or (B, T) (taken per token, as given)."""
        if isinstance(positions, Positions):
            return positions
        return cls(0, positions.shape[-1], per_token=positions)


@dataclass(frozen=True)
class BiasInputs:
    """What a logit bias may read, for a block of Tq queries (the last ones, at the end of the keys) against all Tk keys."""

    q_positions: torch.Tensor  # (Tq,) or (B, Tq) int64: the encoding's positions of the queries
    k_positions: torch.Tensor  # (Tk,) or (B, Tk)
    q: torch.Tensor  # (B, H, Tq, Dh) after rotate_qk
    k: torch.Tensor  # (B, H, Tk, Dh) after rotate_qk, repeated to the H query heads
    mask: torch.Tensor  # (Tq, Tk) or (B, Tq, Tk) bool: True where the query may attend the key (causal, same document)
    q_rows: slice  # the queries' indices among the keys (queries are the last keys: a KV cache, a query chunk)
    k_state: torch.Tensor | None = None  # token_state of the keys (B, S, Tk); the queries' are its q_rows


@dataclass(frozen=True)
class LinearDistanceBias:
    """A logit bias -slopes[h] * (i - j) by the tokens' indices, which a kernel computes in-kernel (flash-attn's
    `alibi_slopes`). slopes: (H,) float32, a buffer of the encoding (so it lives on the model's device)."""

    slopes: torch.Tensor


class PositionEncoding(nn.Module):
    """Base class: no positional signal at all (NoPE's behaviour). Subclasses override what they change."""

    name: str = ""
    llama_equivalent: bool = False  # exactly Llama's rotary (transformers computes it natively); each class says so itself

    def __init__(self, *, head_dim: int, n_heads: int, max_seq_len: int, theta: float = 10000.0, n_kv_heads: int | None = None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary position encodings, got {head_dim}")
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads  # keys may have fewer heads than queries (grouped-query attention)
        self.max_seq_len = max_seq_len
        self.theta = theta

    # --- what the attention layer asks for ---------------------------------------------------------
    def rotate_qk(
        self, q: torch.Tensor, k: torch.Tensor, positions: Positions | torch.Tensor, dynamic_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, Dh) and k (B, H_kv, T, Dh) at `positions`; dynamic_len: the length dynamic scaling scales for
        (default: the positions' end)."""
        return q, k

    def token_state(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-token state (B, S, T) float32 computed from the layer input x (B, T, D), which `logit_bias` reads for
        queries and keys alike; a KV cache keeps it beside the keys. None: the encoding has none."""
        return None

    def logit_bias(self, inputs: BiasInputs) -> torch.Tensor | None:
        """Additive float32 logit bias (H, Tq, Tk) or (B, H, Tq, Tk) for a block of queries against every key, or None.
        Position-only encodings leave this as it is and implement `attention_bias`."""
        return self.attention_bias(inputs.q_positions, inputs.k_positions)

    def attention_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor | None:
        """A bias that depends on positions only: (H, Tq, Tk) for positions (Tq,), (Tk,), and (B, H, Tq, Tk) for
        per-token positions (B, Tq), (B, Tk). Must be cheap to call per query chunk."""
        return None

    @property
    def has_attention_bias(self) -> bool:
        return False

    @property
    def bias_memory(self) -> int:
        """Float32 tensors of the bias's shape that computing it holds at once (the query chunk is sized by it)."""
        return 1

    def kernel_bias(self) -> LinearDistanceBias | None:
        """The bias in a form an attention kernel computes itself, or None: `LinearDistanceBias` when it is exactly
        -slope_h * (i - j) (flash-attn's in-kernel `alibi_slopes`)."""
        return None

    # --- what analysis asks for ----------------------------------------------------------------------
    def rotary_frequencies(self, dynamic_len: int | None = None) -> torch.Tensor:
        """The angular frequencies (radians per token, float32, highest first) that q and k are rotated by.

        Position-free (zero-frequency) pairs are left out; empty when nothing rotates (NoPE, bias methods).
        Used by analysis (e.g. `fope_lm.evaluation.spectrum`) to mark a method's own frequencies, never by the model.
        """
        return torch.empty(0, dtype=torch.float32, device="cpu")

    # --- lifecycle ---------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """(Re)initialise random state; called by the model's init (after `init_constants`), including after
        meta-device builds."""

    def init_constants(self) -> None:
        """(Re)compute constant buffers (non-persistent: never in a checkpoint), which a meta-device build or a loader
        that materialises them empty leaves without values. Touches no state."""

    def transfer_state(self, state: dict[str, torch.Tensor], *, expand: bool = False) -> list[str]:
        """Load this module's state from a checkpoint of a possibly different run (`init_from`).

        Returns human-readable warnings. The default requires identical shapes.
        """
        self.load_state_dict(state, strict=True)
        return []


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off on `device_type`; nothing where autocast does not exist (the meta device, where
    torch.autocast raises)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def relative_distance(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """i - j in float32 with a heads axis to broadcast over: (1, Tq, Tk) for positions (Tq,), (Tk,), and
    (B, 1, Tq, Tk) for per-token positions (B, Tq), (B, Tk)."""
    return (q_positions[..., :, None] - k_positions[..., None, :]).to(torch.float32).unsqueeze(-3)


def rope_inv_freq(head_dim: int, theta: float | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE's frequencies w_i = theta^(-2i/d), i = 0..d/2-1, highest first, in float32 (as OLMo computes them); for a
    tensor of bases (..., 1) (dynamic scaling per token), one row of frequencies per base.

    On the CPU by default, explicitly: models built under `torch.device("meta")` still get real frequencies; the
    model's forward asks for them on the activations' device."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def keep_prefix(freqs: torch.Tensor, n_kept: int) -> torch.Tensor:
    """The first n_kept frequencies, and zero (a position-free pair: cos 1, sin 0) for the others."""
    return torch.cat((freqs[..., :n_kept], freqs.new_zeros(*freqs.shape[:-1], freqs.shape[-1] - n_kept)), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x * concat(cos, cos) + rot(x) * concat(sin, sin), half-split layout, rot(x) = concat(-x2, x1).

    x: (B, H, T, D); cos, sin: (H or 1, T, D/2), or (B, H or 1, T, D/2), already in x's dtype.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RotaryEncoding(PositionEncoding):
    """The rotary machinery every rotary encoding shares: its frequencies, length scaling, tables and rotation.

    A subclass states its unscaled frequencies (`unscaled_frequencies`: RoPE's at a base, clipped, a prefix, ...) and,
    if its table is not RoPE's cos/sin of the angles, `tables` (FoPE mixes them). Every rotary encoding takes the
    length-scaling options (`fope_lm.position.scaling`): YaRN (static or dynamic), position interpolation, NTK-aware
    and dynamic-NTK base scaling, and ABF (a new base), so eval-time scaling works on any rotary checkpoint.
    """

    rotary_dim: int  # the channels of each head that rotate (head_dim; partial_rope: its prefix)

    def __init__(
        self,
        *,
        scaling: str | None = None,
        scale: float = 1.0,
        original_max_seq_len: int | None = None,
        dynamic: bool = False,
        attention_factor: float | None = None,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        base: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.rotary_dim = self.head_dim
        options = ScalingOptions(scaling, scale, original_max_seq_len, dynamic, attention_factor, beta_fast, beta_slow, base)
        self.scaling: Scaling = options.build(max_seq_len=self.max_seq_len)

    # --- frequencies -----------------------------------------------------------------------------------
    def unscaled_frequencies(self, theta: float | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        """This encoding's frequencies (float32, highest first) with RoPE's at base `theta` as the raw material."""
        return rope_inv_freq(self.rotary_dim, theta, device)

    def frequencies(
        self, dynamic_len: int | torch.Tensor | None = None, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """The frequencies q and k rotate by, after length scaling, and the factor the tables are multiplied by. For a
        per-token length (..., T, 1), per-token frequencies (..., T, P) and factor (..., T, 1) or a float."""
        scaling = self.scaling
        theta = scaling.base(self.theta, self.rotary_dim, dynamic_len)
        if isinstance(theta, torch.Tensor):
            theta = theta.to(device)
        return scaling.rescale(self.unscaled_frequencies(theta, device), dim=self.rotary_dim, theta=self.theta, length=dynamic_len)

    def inv_freq(self, dynamic_len: int | None = None) -> torch.Tensor:
        return self.frequencies(dynamic_len)[0]

    def rotary_frequencies(self, dynamic_len=None):
        freqs = self.inv_freq(dynamic_len)
        return freqs[freqs > 0]  # zero-frequency pairs (cos 1, sin 0) carry no position

    # --- tables and rotation ---------------------------------------------------------------------------
    def tables(self, positions: torch.Tensor, dynamic_len: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin in float32 for float32 positions (T,) or (B, T): (1 or H_kv, T, rotary_dim/2), with a leading B
        for per-token positions."""
        freqs, factor = self.frequencies(dynamic_len, positions.device)
        angles = positions[..., None] * freqs  # (..., T, P)
        return (angles.cos() * factor).unsqueeze(-3), (angles.sin() * factor).unsqueeze(-3)

    def cos_sin(
        self, positions: Positions | torch.Tensor, *, device: torch.device, dtype: torch.dtype, dynamic_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables for `positions` in `dtype` on `device` (built in float32 with autocast off)."""
        positions = Positions.of(positions)
        length = positions.dynamic_length(dynamic_len) if self.scaling.depends_on_length else positions.end
        with autocast_off(torch.device(device).type):
            cos, sin = self.tables(positions.tensor(torch.device(device)).to(device=device, dtype=torch.float32), length)
        return cos.to(dtype), sin.to(dtype)

    def rotate_qk(self, q, k, positions, dynamic_len=None):
        cos, sin = self.cos_sin(positions, device=q.device, dtype=q.dtype, dynamic_len=dynamic_len)
        return self.apply_table(q, *_for_heads(cos, sin, q.shape[-3])), self.apply_table(k, *_for_heads(cos, sin, k.shape[-3]))

    def apply_table(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by a cos/sin table of this encoding; a subclass may rotate only part of x."""
        return apply_rotary(x, cos, sin)

    def extra_repr(self) -> str:
        return self.scaling.describe()


def _for_heads(cos: torch.Tensor, sin: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables with one row per key/value head, repeated for the query heads of each group (a shared row broadcasts)."""
    rows = cos.shape[-3]
    if rows in (1, n_heads):
        return cos, sin
    return cos.repeat_interleave(n_heads // rows, dim=-3), sin.repeat_interleave(n_heads // rows, dim=-3)
