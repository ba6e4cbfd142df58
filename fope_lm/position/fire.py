"""FIRE (Li et al. 2024, "Functional Interpolation for Relative Positions Improves Long Context Transformers").

A learned additive bias per head:  b_h(i, j) = f_h( psi(i - j) / psi(max(L, i)) ),  psi(x) = log(|c x| + 1),
f: R -> R^H a small MLP (1 -> width -> H, ReLU). Normalising by the query's position maps every distance into
[0, 1], so a longer context interpolates between distances seen in training rather than extrapolating. c and L
are learned (L = |L_multiplier * init_L|, the threshold below which the normaliser is the constant psi(L)).
Defaults as in the reference, mcleish7/arithmetic `cramming/architectures/embeddings.py`
`FIRE(num_heads=12, mlp_width=32, init_c=0.1, init_L=512.0, eps=1e-6)`: c = 0.1, L_multiplier = 1, eps = 1e-6
added to the normaliser, and init_L = 512 whatever the training length (its model never sets init_L; the DAPE
authors' FIRE, chuanyang-Zheng/DAPE `megatron/model/positional_embeddings.py`, has the same default).
`init_length=None` takes the training length instead. The bias is built per query chunk, never (T, T).
"""

import math

import torch
from torch import nn

from fope_lm.position.base import PositionEncoding, relative_distance
from fope_lm.position.registry import register


@register("fire")
class FirePositionEncoding(PositionEncoding):
    def __init__(self, *, mlp_width: int = 32, init_c: float = 0.1, init_length: float | None = 512.0, eps: float = 1e-6, **base):
        super().__init__(**base)
        self.init_c, self.eps, self.mlp_width = float(init_c), float(eps), int(mlp_width)
        self.mlp = nn.Sequential(nn.Linear(1, mlp_width), nn.ReLU(), nn.Linear(mlp_width, self.n_heads))
        self.c = nn.Parameter(torch.empty(()))
        self.length_multiplier = nn.Parameter(torch.empty(()))
        # init_L: a constant the learned multiplier scales (the reference's non-trainable parameter); kept in checkpoints
        self.init_length: torch.Tensor
        self.register_buffer("init_length", torch.tensor(float(self.max_seq_len if init_length is None else init_length)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()  # PyTorch's default init, as the reference's nn.Linear
            self.c.fill_(self.init_c)
            self.length_multiplier.fill_(1.0)

    @property
    def has_attention_bias(self) -> bool:
        return True

    @property
    def bias_memory(self) -> int:
        return 2 + math.ceil(self.mlp_width / self.n_heads)  # the MLP's hidden layer per (query, key) pair

    def normalized_distance(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """psi(i - j) / psi(max(L, i)) in float32: (1, Tq, Tk), or (B, 1, Tq, Tk) for per-token positions."""
        c = self.c.float()
        threshold = (self.length_multiplier.float() * self.init_length).abs()
        normalizer = torch.maximum(q_positions.to(torch.float32), threshold)[..., None, :, None]
        distance = torch.log((c * relative_distance(q_positions, k_positions)).abs() + 1)
        return distance / (torch.log((c * normalizer).abs() + 1) + self.eps)

    def attention_bias(self, q_positions, k_positions):
        with torch.autocast(q_positions.device.type, enabled=False):  # a float32 bias, as every encoding's
            x = self.normalized_distance(q_positions, k_positions).squeeze(-3)  # (..., Tq, Tk)
            return self.mlp(x[..., None]).movedim(-1, -3)  # (..., H, Tq, Tk)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, mlp 1->{self.mlp_width}->{self.n_heads}, init_L={float(self.init_length):g}"
