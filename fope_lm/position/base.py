"""The interface every position encoding implements, and the rotary machinery shared by RoPE/YaRN/FoPE.

One instance lives in each attention layer. The model calls only two things:
  - `rotate_qk(q, k, positions)`: position-dependent transform of queries and keys (identity by default);
  - `attention_bias(q_positions, k_positions)`: an additive (heads, Tq, Tk) float32 logit bias, or None.
Positions are absolute token indices (int64, shape (T,)), so a KV-cache offset is just a shifted range.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEncoding(nn.Module):
    """Base class: no positional signal at all (NoPE's behaviour). Subclasses override what they change."""

    name: str = ""

    def __init__(self, *, head_dim: int, n_heads: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary position encodings, got {head_dim}")
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.max_seq_len = max_seq_len
        self.theta = theta

    # --- what the attention layer asks for ---------------------------------------------------------
    def rotate_qk(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, dynamic_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def attention_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor | None:
        """Additive float32 logit bias of shape (heads, Tq, Tk), or None. Must be cheap to call per query chunk."""
        return None

    @property
    def has_attention_bias(self) -> bool:
        return False

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


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """RoPE's frequencies w_i = theta^(-2i/d), i = 0..d/2-1, highest first, in float32 (as OLMo computes them).

    On the CPU by default, explicitly: models built under `torch.device("meta")` still get real frequencies."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x' = x * concat(cos, cos) + rot(x) * concat(sin, sin), half-split layout, rot(x) = concat(-x2, x1).

    x: (B, H, T, D); cos, sin: (H or 1, T, D/2), already in x's dtype.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def as_range(positions: torch.Tensor) -> tuple[int, int] | None:
    """(start, stop) if positions is a contiguous increasing CPU range, so tables can be sliced, not gathered."""
    if positions.device.type != "cpu" or positions.numel() == 0:
        return None
    start = int(positions[0])
    stop = start + positions.numel()
    if int(positions[-1]) != stop - 1 or not torch.equal(positions, torch.arange(start, stop)):
        return None
    return start, stop


class RotaryEncoding(PositionEncoding):
    """Shared cos/sin-table machinery. Subclasses define `build_table` (float32 math) and `table_key`.

    The table is built once per (length, device, dtype, key) and reused across steps, so any rotary method
    costs the same elementwise work per forward. Positions beyond the cached length grow the table.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._cache: tuple | None = None  # (key, length, cos, sin); deliberately not a buffer

    def build_table(self, positions: torch.Tensor, dynamic_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (H or 1, T, head_dim/2) in float32 for float32 `positions` (T,)."""
        raise NotImplementedError

    def table_key(self, dynamic_len: int | None) -> tuple | None:
        """Everything besides length/device/dtype that the table depends on; None disables caching."""
        return ()

    def cos_sin(
        self, positions: torch.Tensor, *, device: torch.device, dtype: torch.dtype, dynamic_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (H or 1, T, head_dim/2) cos/sin for `positions`, in `dtype` on `device`."""
        needed = int(positions.max()) + 1
        dynamic_len = needed if dynamic_len is None else dynamic_len  # dynamic YaRN's T
        key = self.table_key(dynamic_len)
        if key is None:  # learnable tables: recompute with autograd every call
            cos, sin = self._compute(needed, device, dynamic_len)
            cos, sin = cos.to(dtype), sin.to(dtype)
        else:
            full_key = (key, device, dtype)
            if self._cache is None or self._cache[0] != full_key or self._cache[1] < needed:
                length = max(needed, self.max_seq_len)
                length = 1 << (length - 1).bit_length()  # grow by powers of two: few rebuilds at eval
                cos, sin = self._compute(length, device, dynamic_len)
                self._cache = (full_key, length, cos.to(dtype), sin.to(dtype))
            _, _, cos, sin = self._cache
        span = as_range(positions)
        if span is not None:
            return cos[..., span[0] : span[1], :], sin[..., span[0] : span[1], :]
        index = positions.to(device)
        return cos.index_select(-2, index), sin.index_select(-2, index)

    def _compute(self, length: int, device: torch.device, dynamic_len: int | None):
        with torch.autocast(device_type=device.type, enabled=False):
            return self.build_table(torch.arange(length, dtype=torch.float32, device=device), dynamic_len)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, dynamic_len: int | None = None) -> torch.Tensor:
        """Rotate x (B, H, T, head_dim) at absolute int positions (T,)."""
        cos, sin = self.cos_sin(positions, device=x.device, dtype=x.dtype, dynamic_len=dynamic_len)
        return self.apply_table(x, cos, sin)

    def rotate_qk(self, q, k, positions, dynamic_len=None):
        cos, sin = self.cos_sin(positions, device=q.device, dtype=q.dtype, dynamic_len=dynamic_len)
        return self.apply_table(q, cos, sin), self.apply_table(k, cos, sin)

    def apply_table(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by a cos/sin table of this encoding; a subclass may rotate only part of x."""
        return apply_rotary(x, cos, sin)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None  # loaded state may change the table (FoPE coefficients)
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._cache = None  # .to()/.cuda()/.half() move or recast the state the table was built from
        return super()._apply(fn, *args, **kwargs)


# --- YaRN frequency math, shared by `yarn` and FoPE+YaRN ----------------------------------------------
def yarn_ramp(head_dim: int, theta: float, original_max_seq_len: int, beta_fast: float, beta_slow: float):
    """ramp_i in [0, 1] for i < head_dim/2: 0 keeps w_i (high frequencies), 1 fully interpolates w_i / s."""

    def correction_dim(n_rotations: float) -> float:
        return head_dim * math.log(original_max_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if high == low:
        high += 0.001  # avoid division by zero, as the reference does
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)
    return ramp.clamp(0.0, 1.0)


def yarn_frequencies(inv_freq, *, head_dim, theta, scale, original_max_seq_len, beta_fast=32.0, beta_slow=1.0):
    """NTK-by-parts: w'_i = (w_i / s) * ramp_i + w_i * (1 - ramp_i), for the first len(inv_freq) pairs."""
    ramp = yarn_ramp(head_dim, theta, original_max_seq_len, beta_fast, beta_slow)[: inv_freq.numel()]
    ramp = ramp.to(inv_freq.device)
    return (inv_freq / scale) * ramp + inv_freq * (1 - ramp)


def yarn_attention_factor(scale: float, attention_factor: float | None) -> float:
    """cos and sin are multiplied by this, so logits scale by its square. Default: 0.1 ln(s) + 1."""
    if attention_factor is not None:
        return float(attention_factor)
    return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0


class YarnScaling:
    """YaRN options and the effective scale for a length (static, or dynamic s = max(1, T / L0))."""

    def __init__(self, *, scale, original_max_seq_len, dynamic, attention_factor, beta_fast, beta_slow):
        if scale < 1:
            raise ValueError(f"YaRN scale must be >= 1, got {scale}")
        self.scale = float(scale)
        self.original_max_seq_len = int(original_max_seq_len)
        self.dynamic = bool(dynamic)
        self.attention_factor = attention_factor
        self.beta_fast = float(beta_fast)
        self.beta_slow = float(beta_slow)

    def effective_scale(self, dynamic_len: int | None) -> float:
        if not self.dynamic:
            return self.scale
        return max(1.0, (dynamic_len or 0) / self.original_max_seq_len)

    @property
    def active(self) -> bool:
        return self.dynamic or self.scale > 1

    def apply(self, inv_freq: torch.Tensor, head_dim: int, theta: float, scale: float) -> tuple[torch.Tensor, float]:
        """(rescaled frequencies, attention factor) at effective scale `scale`."""
        if scale <= 1 and self.attention_factor is None:
            return inv_freq, 1.0
        freqs = yarn_frequencies(
            inv_freq,
            head_dim=head_dim,
            theta=theta,
            scale=scale,
            original_max_seq_len=self.original_max_seq_len,
            beta_fast=self.beta_fast,
            beta_slow=self.beta_slow,
        )
        return freqs, yarn_attention_factor(scale, self.attention_factor)

    def describe(self) -> str:
        mode = "dynamic" if self.dynamic else f"scale={self.scale:g}"
        return f"yarn({mode}, L0={self.original_max_seq_len}, attention_factor={self.attention_factor})"
