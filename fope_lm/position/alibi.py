"""ALiBi (Press et al. 2022): logit bias -m_h * (i - j), with the paper's geometric slopes."""

import math

import torch

from fope_lm.position.base import LinearDistanceBias, PositionEncoding, relative_distance
from fope_lm.position.registry import register


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The reference code's slopes: 2^(-8h/H) for H a power of two, else interleaved from the 2p-head list."""

    def power_of_two_slopes(n: int) -> list[float]:
        return [2 ** (-8 * h / n) for h in range(1, n + 1)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two_slopes(n_heads)
    else:
        p = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two_slopes(p) + power_of_two_slopes(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")


@register("alibi")
class AlibiPositionEncoding(PositionEncoding):
    slopes: torch.Tensor  # (H,) float32

    def __init__(self, **base):
        super().__init__(**base)
        # a constant, not state: a non-persistent buffer, so it moves with the model and stays out of checkpoints
        self.register_buffer("slopes", torch.empty(self.n_heads), persistent=False)  # on the device the model is built on
        self.init_constants()

    def init_constants(self) -> None:
        with torch.no_grad():
            self.slopes.copy_(alibi_slopes(self.n_heads))

    def kernel_bias(self) -> LinearDistanceBias:
        return LinearDistanceBias(self.slopes)

    @property
    def has_attention_bias(self) -> bool:
        return True

    def attention_bias(self, q_positions, k_positions):
        distance = relative_distance(q_positions, k_positions)  # i - j, (1, Tq, Tk) or (B, 1, Tq, Tk)
        return -self.slopes[:, None, None] * distance
