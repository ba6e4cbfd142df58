"""p-RoPE (Barbero et al. 2025, "Round and Round We Go! What makes Rotary Positional Encodings useful?").

Keep the highest-frequency fraction p of RoPE's pairs and make the rest position-free: with P = d_h/2
pairs, the first round(p * P) keep w_i = theta^(-2i/d_h) (unchanged, not re-spread over fewer pairs) and
the others get w_i = 0 (cos 1, sin 0). p = 1 is RoPE, p = 0 is NoPE. Unlike `rope_clip` the cut is a
fixed fraction of the pairs, not the training length's floor frequency 2*pi/L.
"""

from fope_lm.errors import ConfigError
from fope_lm.position.base import keep_prefix
from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


@register("p_rope")
class PartialFrequencyRotaryPositionEncoding(RotaryPositionEncoding):
    def __init__(self, *, p: float = 0.75, **options):
        super().__init__(**options)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p_rope: p is the fraction of frequencies kept, in [0, 1]; got {p}")
        self.p = float(p)
        self.n_kept = round(self.p * self.head_dim / 2)

    def unscaled_frequencies(self, theta, device="cpu"):
        return keep_prefix(super().unscaled_frequencies(theta, device), self.n_kept)  # highest first: a prefix

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"p={self.p:g}, kept {self.n_kept}/{self.head_dim // 2} pairs", super().extra_repr()]))
