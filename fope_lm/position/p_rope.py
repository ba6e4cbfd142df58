"""p-RoPE (Barbero et al. 2025, "Round and Round We Go! What makes Rotary Positional Encodings useful?").

Keep the highest-frequency fraction p of RoPE's pairs and make the rest position-free: with d_h the head dim,
the first `int(p * d_h // 2)` pairs keep w_i = theta^(-2i/d_h) (unchanged, not re-spread over fewer pairs) and
the others get w_i = 0 (cos 1, sin 0). p = 1 is RoPE, p = 0 is NoPE. Unlike `rope_clip` the cut is a
fixed fraction of the pairs, not the training length's floor frequency 2*pi/L.

The kept count rounds down, as gemma and transformers compute it (d_h 36, p 0.75 keeps 13 pairs, not 14):
google-deepmind/gemma `gemma/gm/math/_positional_embeddings.py` `apply_rope(..., rope_proportion)`:
`rope_angles = int(rope_proportion * head_dim // 2)`, and transformers `modeling_rope_utils.
_compute_proportional_rope_parameters` (rope_type "proportional", p = `partial_rotary_factor`): the same expression.
"""

from fope_lm.errors import ConfigError
from fope_lm.position.base import keep_prefix
from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


def kept_pairs(head_dim: int, p: float) -> int:
    """The number of pairs p-RoPE rotates: gemma's and transformers' `int(p * head_dim // 2)` (floor of p * d_h / 2)."""
    return int(p * head_dim // 2)


@register("p_rope")
class PartialFrequencyRotaryPositionEncoding(RotaryPositionEncoding):
    def __init__(self, *, p: float = 0.75, **options):
        super().__init__(**options)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"p_rope: p is the fraction of frequencies kept, in [0, 1]; got {p}")
        self.p = float(p)
        self.n_kept = kept_pairs(self.head_dim, self.p)

    def unscaled_frequencies(self, theta, device="cpu"):
        return keep_prefix(super().unscaled_frequencies(theta, device), self.n_kept)  # highest first: a prefix

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"p={self.p:g}, kept {self.n_kept}/{self.head_dim // 2} pairs", super().extra_repr()]))
