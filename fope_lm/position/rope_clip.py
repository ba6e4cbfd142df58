"""RoPE with FoPE's frequency clipping and nothing else: the control that separates clipping from mixing.

Every RoPE frequency below the floor, w_i < 2*pi/L (strictly: a period longer than the training length L,
so training never shows a full cycle of it), becomes zero frequency: cos 1, sin 0, so that pair is
position-free with weight 1 (NoPE on those channels). The kept pairs are plain RoPE: every kept frequency
is used, unmixed, with weight 1. FoPE keeps the same K frequencies but mixes them and pads differently.
"""

from fope_lm.position.base import keep_prefix
from fope_lm.position.fope import kept_frequencies
from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


@register("rope_clip")
class ClippedRotaryPositionEncoding(RotaryPositionEncoding):
    def __init__(self, **options):
        super().__init__(**options)
        self.n_kept = kept_frequencies(self.head_dim, self.theta, self.max_seq_len).numel()  # FoPE's K

    def unscaled_frequencies(self, theta, device="cpu"):
        freqs = super().unscaled_frequencies(theta, device)  # w_i = theta^(-2i/d_h), highest first
        return keep_prefix(freqs, self.n_kept)  # zero frequency beyond: t * 0 = 0 at every position

    def extra_repr(self) -> str:
        kept = f"kept {self.n_kept}/{self.head_dim // 2} pairs (w >= 2*pi/{self.max_seq_len})"
        return ", ".join(filter(None, [kept, super().extra_repr()]))
