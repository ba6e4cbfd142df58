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

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Positions:
    """The absolute positions of the T tokens of a forward: start .. start + length - 1, Python ints (training,
    eval, and a KV-cache step whose start is the cache length), or `per_token` positions (B, T) int64 on the
    activations' device, which replace the range (a packed row's per-document positions)."""

    start: int
    length: int
    per_token: torch.Tensor | None = None

    @property
    def end(self) -> int:
        """One past the last position of the range: the length dynamic scaling (YaRN, dynamic NTK) scales for."""
        return self.start + self.length

    def tensor(self, device: torch.device) -> torch.Tensor:
        """The positions as int64, (T,) for a range or (B, T) per token."""
        if self.per_token is not None:
            return self.per_token
        return torch.arange(self.start, self.end, device=device)

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


class PositionEncoding(nn.Module):
    """Base class: no positional signal at all (NoPE's behaviour). Subclasses override what they change."""

    name: str = ""

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

    @property
    def alibi_slopes(self) -> torch.Tensor | None:
        """Per-head ALiBi slopes when the bias is exactly ALiBi's (flash-attn computes it in-kernel)."""
        return None

    # --- what analysis asks for ----------------------------------------------------------------------
    def rotary_frequencies(self, dynamic_len: int | None = None) -> torch.Tensor:
        """The angular frequencies (radians per token, float32, highest first) that q and k are rotated by.

        Position-free (zero-frequency) pairs are left out; empty when nothing rotates (NoPE, bias methods).
        Used by analysis (e.g. `fope_lm.spectrum`) to mark a method's own frequencies, never by the model.
        """
        return torch.empty(0, dtype=torch.float32, device="cpu")

    # --- lifecycle ---------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """(Re)initialise random state; called by the model's init, including after meta-device builds."""

    def transfer_state(self, state: dict[str, torch.Tensor], *, expand: bool = False) -> list[str]:
        """Load this module's state from a checkpoint of a possibly different run (`init_from`).

        Returns human-readable warnings. The default requires identical shapes.
        """
        self.load_state_dict(state, strict=True)
        return []


def relative_distance(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """i - j in float32 with a heads axis to broadcast over: (1, Tq, Tk) for positions (Tq,), (Tk,), and
    (B, 1, Tq, Tk) for per-token positions (B, Tq), (B, Tk)."""
    return (q_positions[..., :, None] - k_positions[..., None, :]).to(torch.float32).unsqueeze(-3)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE's frequencies w_i = theta^(-2i/d), i = 0..d/2-1, highest first, in float32 (as OLMo computes them).

    On the CPU by default, explicitly: models built under `torch.device("meta")` still get real frequencies; the
    model's forward asks for them on the activations' device."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def keep_prefix(freqs: torch.Tensor, n_kept: int) -> torch.Tensor:
    """The first n_kept frequencies, and zero (a position-free pair: cos 1, sin 0) for the others."""
    return torch.cat((freqs[:n_kept], freqs.new_zeros(freqs.numel() - n_kept)))


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
    length-scaling options (`RotaryScaling`): YaRN (static or dynamic), position interpolation, NTK-aware and
    dynamic-NTK base scaling, and ABF (a new base), so eval-time scaling works on any rotary checkpoint.
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
        self.scaling = RotaryScaling(
            method=scaling,
            scale=scale,
            original_max_seq_len=original_max_seq_len or self.max_seq_len,
            dynamic=dynamic,
            attention_factor=attention_factor,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
            base=base,
        )

    # --- frequencies -----------------------------------------------------------------------------------
    def unscaled_frequencies(self, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
        """This encoding's frequencies (float32, highest first) with RoPE's at base `theta` as the raw material."""
        return rope_inv_freq(self.rotary_dim, theta, device)

    def frequencies(self, dynamic_len: int | None = None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
        """The frequencies q and k rotate by, after length scaling, and the factor the tables are multiplied by."""
        scaling = self.scaling
        theta = scaling.base_for(self.theta, self.rotary_dim, dynamic_len)
        return scaling.rescale(self.unscaled_frequencies(theta, device), dim=self.rotary_dim, theta=self.theta, dynamic_len=dynamic_len)

    def inv_freq(self, dynamic_len: int | None = None) -> torch.Tensor:
        return self.frequencies(dynamic_len)[0]

    def attention_factor(self, dynamic_len: int | None = None) -> float:
        return self.frequencies(dynamic_len)[1]

    def rotary_frequencies(self, dynamic_len=None):
        freqs = self.inv_freq(dynamic_len)
        return freqs[freqs > 0]  # zero-frequency pairs (cos 1, sin 0) carry no position

    # --- tables and rotation ---------------------------------------------------------------------------
    def tables(self, positions: torch.Tensor, dynamic_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
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
        dynamic_len = positions.end if dynamic_len is None else dynamic_len
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            cos, sin = self.tables(positions.tensor(torch.device(device)).to(device=device, dtype=torch.float32), dynamic_len)
        return cos.to(dtype), sin.to(dtype)

    def rotate(self, x: torch.Tensor, positions: Positions | torch.Tensor, dynamic_len: int | None = None) -> torch.Tensor:
        """Rotate x (B, heads, T, head_dim) at `positions`."""
        cos, sin = self.cos_sin(positions, device=x.device, dtype=x.dtype, dynamic_len=dynamic_len)
        return self.apply_table(x, *_for_heads(cos, sin, x.shape[-3]))

    def rotate_qk(self, q, k, positions, dynamic_len=None):
        cos, sin = self.cos_sin(positions, device=q.device, dtype=q.dtype, dynamic_len=dynamic_len)
        return self.apply_table(q, *_for_heads(cos, sin, q.shape[-3])), self.apply_table(k, *_for_heads(cos, sin, k.shape[-3]))

    def apply_table(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by a cos/sin table of this encoding; a subclass may rotate only part of x."""
        return apply_rotary(x, cos, sin)

    def extra_repr(self) -> str:
        return self.scaling.describe() if self.scaling.active else ""


def _for_heads(cos: torch.Tensor, sin: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables with one row per key/value head, repeated for the query heads of each group (a shared row broadcasts)."""
    rows = cos.shape[-3]
    if rows in (1, n_heads):
        return cos, sin
    return cos.repeat_interleave(n_heads // rows, dim=-3), sin.repeat_interleave(n_heads // rows, dim=-3)


# --- length scaling, an option of every rotary encoding ------------------------------------------------------
SCALING_METHODS = ("none", "yarn", "linear", "ntk", "dynamic_ntk", "abf")


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


def yarn_frequencies(inv_freq, *, head_dim, theta, scale, original_max_seq_len, beta_fast=32.0, beta_slow=1.0):
    """NTK-by-parts: w'_i = (w_i / s) * ramp_i + w_i * (1 - ramp_i), for the first len(inv_freq) pairs."""
    ramp = yarn_ramp(head_dim, theta, original_max_seq_len, beta_fast, beta_slow, inv_freq.device)[: inv_freq.numel()]
    return (inv_freq / scale) * ramp + inv_freq * (1 - ramp)


def yarn_attention_factor(scale: float, attention_factor: float | None) -> float:
    """cos and sin are multiplied by this, so logits scale by its square. Default: 0.1 ln(s) + 1."""
    if attention_factor is not None:
        return float(attention_factor)
    return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0


class RotaryScaling:
    """How a rotary encoding reaches beyond its training length L0, for a scale s (`method`):

      yarn         NTK-by-parts interpolation of the frequencies and an attention temperature (Peng et al. 2023);
                   `dynamic`: s = max(1, T / L0) for the evaluated length T
      linear       position interpolation: w / s (Chen et al. 2023)
      ntk          NTK-aware base scaling: theta' = theta s^(d/(d-2))
      dynamic_ntk  transformers' "dynamic": theta' = theta ((s T / L0) - (s - 1))^(d/(d-2)), T = max(T, L0)
      abf          adjusted base frequency: theta' = `base` (Xiong et al. 2023)
      none         the encoding as trained
    method null (the default) means yarn whenever scale > 1 or dynamic (the official FoPE+YaRN), else none.
    """

    def __init__(self, *, method, scale, original_max_seq_len, dynamic, attention_factor, beta_fast, beta_slow, base):
        if method is None:
            method = "yarn" if dynamic or scale > 1 else "none"
        if method not in SCALING_METHODS:
            raise ValueError(f"scaling={method!r} is not one of {', '.join(SCALING_METHODS)}")
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if dynamic and method != "yarn":
            raise ValueError(f"dynamic=true is YaRN's (scaling=yarn); scaling={method} is static, or use scaling=dynamic_ntk")
        if (method == "abf") != (base is not None):
            raise ValueError("scaling=abf takes the new base as `base` (e.g. base=500000), and only it does")
        self.method, self.scale, self.original_max_seq_len = method, float(scale), int(original_max_seq_len)
        self.dynamic, self.attention_factor = bool(dynamic), attention_factor
        self.beta_fast, self.beta_slow, self.base = float(beta_fast), float(beta_slow), base

    @property
    def active(self) -> bool:
        return self.method != "none"

    def effective_scale(self, dynamic_len: int | None) -> float:
        if self.method == "yarn" and self.dynamic:
            return max(1.0, (dynamic_len or 0) / self.original_max_seq_len)
        return self.scale

    def base_for(self, theta: float, dim: int, dynamic_len: int | None) -> float:
        """The RoPE base the frequencies are computed at."""
        if self.method == "ntk":
            return theta * self.scale ** (dim / (dim - 2))
        if self.method == "dynamic_ntk":
            length = max(dynamic_len or 0, self.original_max_seq_len)
            return theta * ((self.scale * length / self.original_max_seq_len) - (self.scale - 1)) ** (dim / (dim - 2))
        if self.method == "abf":
            return float(self.base)
        return theta

    def rescale(self, freqs: torch.Tensor, *, dim: int, theta: float, dynamic_len: int | None) -> tuple[torch.Tensor, float]:
        """(frequencies after interpolation, table factor)."""
        if self.method == "linear":
            return freqs / self.scale, 1.0
        if self.method != "yarn":
            return freqs, 1.0
        scale = self.effective_scale(dynamic_len)
        if scale <= 1 and self.attention_factor is None:
            return freqs, 1.0
        yarn = yarn_frequencies(
            freqs, head_dim=dim, theta=theta, scale=scale, original_max_seq_len=self.original_max_seq_len,
            beta_fast=self.beta_fast, beta_slow=self.beta_slow,
        )  # fmt: skip
        return yarn, yarn_attention_factor(scale, self.attention_factor)

    def describe(self) -> str:
        if self.method == "yarn":
            mode = "dynamic" if self.dynamic else f"scale={self.scale:g}"
            return f"yarn({mode}, L0={self.original_max_seq_len}, attention_factor={self.attention_factor})"
        if self.method == "abf":
            return f"abf(base={self.base:g})"
        return f"{self.method}(scale={self.scale:g}, L0={self.original_max_seq_len})"
