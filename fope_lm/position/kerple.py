"""KERPLE, logarithmic variant (Chi et al. 2022): a learned distance kernel added to the attention logits.

Logit for query i, key j <= i:  q_i.k_j / sqrt(d_h) - r1_h * log(1 + r2_h * |i - j|),  r1_h, r2_h > 0 per head
(the bias is not scaled by sqrt(d_h), as in the reference code). It decays with distance like ALiBi, but
logarithmically, so far keys keep more weight. The bias comes through `attention_bias`, one query chunk at
a time: no dense (H, T, T) bias at long lengths.

Positivity: r = softplus(rho), with rho the trained Parameters. The reference (chijames/KERPLE,
`ParallelKerpleLog`) trains r itself and clamps r.data to >= 1e-2 at every forward: an in-place write to
Parameters inside forward, which does not compose with sharded (ZeRO-3) or compiled models; softplus keeps
r > 0 without it. Initial values are the reference's: r1 ~ U(0, 2), r2 ~ U(0, 1), floored at its 1e-2.
The optimizer then steps on rho, not on r, so training trajectories differ from the reference's.
"""

import torch
import torch.nn.functional as F
from torch import nn

from fope_lm.position.base import PositionEncoding, relative_distance
from fope_lm.position.registry import register

INIT_FLOOR = 1e-2  # the reference's clamp, applied here to the initial values only


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """rho with softplus(rho) = y, for y > 0: log(exp(y) - 1) = y + log(1 - exp(-y))."""
    return y + torch.log(-torch.expm1(-y))


@register("kerple_log")
class KerpleLogPositionEncoding(PositionEncoding):
    def __init__(self, **base):
        super().__init__(**base)
        self.rho_r1 = nn.Parameter(torch.empty(self.n_heads))
        self.rho_r2 = nn.Parameter(torch.empty(self.n_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for rho, high in ((self.rho_r1, 2.0), (self.rho_r2, 1.0)):
                rho.uniform_(0.0, high).clamp_(min=INIT_FLOOR)
                rho.copy_(inverse_softplus(rho))

    @property
    def r1(self) -> torch.Tensor:
        """Per-head kernel weight r1 > 0, float32, shape (H,)."""
        return F.softplus(self.rho_r1.float())

    @property
    def r2(self) -> torch.Tensor:
        """Per-head distance scale r2 > 0, float32, shape (H,)."""
        return F.softplus(self.rho_r2.float())

    @property
    def has_attention_bias(self) -> bool:
        return True

    def attention_bias(self, q_positions, k_positions):
        distance = relative_distance(q_positions, k_positions).abs()  # |i - j|, (1, Tq, Tk) or (B, 1, Tq, Tk)
        r1, r2 = self.r1[:, None, None], self.r2[:, None, None]
        return -r1 * torch.log1p(r2 * distance)  # (H, Tq, Tk)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, bias=-r1*log(1+r2*|i-j|), r=softplus(rho)"
