"""RoPE (Su et al. 2021), half-split (GPT-NeoX) layout, as OLMo computes it."""

import torch

from fope_lm.position.base import RotaryEncoding, rope_inv_freq
from fope_lm.position.registry import register


@register("rope")
class RotaryPositionEncoding(RotaryEncoding):
    def inv_freq(self, dynamic_len: int | None = None) -> torch.Tensor:
        return rope_inv_freq(self.head_dim, self.theta)

    def attention_factor(self, dynamic_len: int | None = None) -> float:
        return 1.0

    def rotary_frequencies(self, dynamic_len=None):
        freqs = self.inv_freq(dynamic_len)
        return freqs[freqs > 0]  # zero-frequency pairs (cos 1, sin 0) carry no position

    def build_table(self, positions, dynamic_len):
        angles = torch.outer(positions, self.inv_freq(dynamic_len).to(positions.device))  # (T, D/2)
        factor = self.attention_factor(dynamic_len)
        return (angles.cos() * factor)[None], (angles.sin() * factor)[None]
