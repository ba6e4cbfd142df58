"""Partial RoPE, as GPT-NeoX's `rotary_pct`: rotate only the first `fraction` of each head's channels.

rot_dim = int(fraction * d_h), rounded down to even. x[..., :rot_dim] gets RoPE with its own frequencies
w_i = theta^(-2i/rot_dim), i < rot_dim/2, in the half-split layout within that slice (pair i is channels
(i, i + rot_dim/2)); x[..., rot_dim:] passes through unchanged (position-free channels).
"""

import torch

from fope_lm.errors import ConfigError
from fope_lm.position.base import apply_rotary
from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


@register("partial_rope")
class PartialRotaryPositionEncoding(RotaryPositionEncoding):
    """Tables are (1, T, rot_dim/2), not (1, T, head_dim/2): they cover the rotated slice only."""

    def __init__(self, *, fraction: float = 0.25, **options):
        super().__init__(**options)
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"partial_rope: fraction is the share of each head's dims rotated, in [0, 1]; got {fraction}")
        self.fraction = float(fraction)
        self.rot_dim = self.rotary_dim = int(self.fraction * self.head_dim) // 2 * 2

    def apply_table(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rot_dim == 0:
            return x
        rotated, passed = x[..., : self.rot_dim], x[..., self.rot_dim :]
        return torch.cat((apply_rotary(rotated, cos, sin), passed), dim=-1)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"fraction={self.fraction:g}, rot_dim={self.rot_dim}/{self.head_dim}", super().extra_repr()]))
