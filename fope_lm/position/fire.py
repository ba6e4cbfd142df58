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

The bias is float32 whatever the weights' dtype (bf16 under DeepSpeed) and the autocast around it: the MLP runs on
float32 copies of its weights. c and L_multiplier are 1-element Parameters, shape (1,) (DeepSpeed's ZeRO flattening
cannot view a 0-dim tensor), and checkpoints store them as (1,); checkpoints of older code, with 0-dim ones, still load.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from fope_lm.position.base import PositionEncoding, autocast_off, relative_distance
from fope_lm.position.registry import register


@register("fire")
class FirePositionEncoding(PositionEncoding):
    def __init__(self, *, mlp_width: int = 32, init_c: float = 0.1, init_length: float | None = 512.0, eps: float = 1e-6, **base):
        super().__init__(**base)
        self.init_c, self.eps, self.mlp_width = float(init_c), float(eps), int(mlp_width)
        self.mlp = nn.Sequential(nn.Linear(1, mlp_width), nn.ReLU(), nn.Linear(mlp_width, self.n_heads))
        self.c = nn.Parameter(torch.empty(1))
        self.length_multiplier = nn.Parameter(torch.empty(1))
        # init_L: a constant the learned multiplier scales (the reference's non-trainable parameter); kept in checkpoints
        self.init_length_value = float(self.max_seq_len if init_length is None else init_length)
        self.init_length: torch.Tensor
        self.register_buffer("init_length", torch.tensor(self.init_length_value))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.reset_parameters()  # PyTorch's default init, as the reference's nn.Linear
            self.c.fill_(self.init_c)
            self.length_multiplier.fill_(1.0)
            self.init_length.fill_(self.init_length_value)  # a meta-device build leaves it without a value

    SCALARS = ("c", "length_multiplier")  # (1,) Parameters (DeepSpeed flattens no 0-dim ones); 0-dim in older checkpoints

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Takes c and L_multiplier (1,)-shaped, or 0-dim as checkpoints of older code hold them."""
        for name in self.SCALARS:
            tensor = state_dict.get(prefix + name)
            if tensor is not None and tensor.dim() == 0:
                state_dict[prefix + name] = tensor.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_attention_bias(self) -> bool:
        return True

    @property
    def bias_memory(self) -> int:
        return 2 + math.ceil(self.mlp_width / self.n_heads)  # the MLP's hidden layer per (query, key) pair

    def normalized_distance(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """psi(i - j) / psi(max(L, i)) in float32: (1, Tq, Tk), or (B, 1, Tq, Tk) for per-token positions."""
        c = self.c.float()
        threshold = (self.length_multiplier.float() * self.init_length.float()).abs()
        normalizer = torch.maximum(q_positions.to(torch.float32), threshold)[..., None, :, None]
        distance = torch.log((c * relative_distance(q_positions, k_positions)).abs() + 1)
        return distance / (torch.log((c * normalizer).abs() + 1) + self.eps)

    def attention_bias(self, q_positions, k_positions):
        first, second = self.mlp[0], self.mlp[2]
        with autocast_off(q_positions.device.type):  # a float32 bias, as every encoding's, from float32 weights
            x = self.normalized_distance(q_positions, k_positions).squeeze(-3)[..., None]  # (..., Tq, Tk, 1)
            hidden = F.relu(F.linear(x, first.weight.float(), first.bias.float()))
            return F.linear(hidden, second.weight.float(), second.bias.float()).movedim(-1, -3)  # (..., H, Tq, Tk)

    def extra_repr(self) -> str:
        return f"heads={self.n_heads}, mlp 1->{self.mlp_width}->{self.n_heads}, init_L={self.init_length_value:g}"
