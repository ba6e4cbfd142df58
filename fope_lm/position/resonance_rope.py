"""Resonance RoPE (Wang et al. 2024, "Resonance RoPE: Improving Context Length Generalization of Large Language
Models"): every rotary wavelength rounded to an integer number of tokens, theta_i' = 2 pi / round(2 pi / theta_i),
so each feature repeats exactly at integer positions and positions beyond the training length reuse the angles seen
in training. Rounding comes after length scaling, so `scaling=yarn` gives Resonance YaRN (as in the reference,
sheryc/resonance_rope, whose YaRN variant rounds the YaRN-scaled frequencies). Angles are taken as
(t mod lambda_i) * theta_i', the reference's way: equal to t * theta_i', and exactly periodic in float32.
"""

import math

import torch

from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


@register("resonance_rope")
class ResonanceRotaryPositionEncoding(RotaryPositionEncoding):
    def wavelengths(self, dynamic_len: int | None = None, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float | torch.Tensor]:
        """round(2 pi / theta_i) after length scaling (integer-valued float32), and the table factor."""
        freqs, factor = super().frequencies(dynamic_len, device)
        return torch.round(2 * math.pi / freqs), factor

    def frequencies(self, dynamic_len=None, device="cpu"):
        wavelengths, factor = self.wavelengths(dynamic_len, device)
        return 2 * math.pi / wavelengths, factor

    def tables(self, positions, dynamic_len):
        wavelengths, factor = self.wavelengths(dynamic_len, positions.device)
        angles = torch.remainder(positions[..., None], wavelengths) * (2 * math.pi / wavelengths)
        return (angles.cos() * factor).unsqueeze(-3), (angles.sin() * factor).unsqueeze(-3)
