"""The Forgetting Transformer (Lin et al. 2025, "Forgetting Transformer: Softmax Attention with a Forget Gate").

A forget gate per head and token from the layer input, f_t = sigmoid(w_h . x_t + b_h), down-weights the past:
the logit bias of query i for key j is sum_{l=j+1..i} log f_l = c_i - c_j with c = cumsum(log f). It is data-
dependent but O(T) to compute: the log gates are the encoding's token state (`token_state`, cached beside the keys
when decoding), and each query chunk's bias is a difference of their prefix sums, chunked like ALiBi's.
`fox` has no other position signal (the paper's FoX); `fox_rope` adds RoPE (the paper's FoX with RoPE).
As in the reference (zhixuan-lin/forgetting-transformer, `fgate_type="full"`): a Linear(d_model, H) with a bias, its
weight normal(0, 0.02), its bias zero; log f in float32. `fox_rope`'s RoPE base defaults to the reference's 500000
(`rope_base: float = 500000.0` in `modeling_forgetting_transformer.py` and `configs/model/forgetting_transformer.py`,
passed to `RotaryEmbedding(self.head_dim, base=rope_base)`) instead of the model's `rope_theta`; its option
`rope_theta` sets another base (null: the model's `rope_theta`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from fope_lm.position.base import BiasInputs, PositionEncoding
from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


class ForgetGate:
    """The forget gate and its bias, for a position encoding class to inherit first (FoX, FoX with RoPE)."""

    n_heads: int
    head_dim: int

    def __init__(self, *, gate_init_std: float = 0.02, **options):
        super().__init__(**options)  # the position encoding's own constructor
        self.gate_init_std = float(gate_init_std)
        self.forget_gate = nn.Linear(self.n_heads * self.head_dim, self.n_heads, bias=True)  # d_model -> H
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # type: ignore[misc]
        with torch.no_grad():
            nn.init.normal_(self.forget_gate.weight, std=self.gate_init_std)
            nn.init.zeros_(self.forget_gate.bias)

    @property
    def has_attention_bias(self) -> bool:
        return True

    @property
    def bias_memory(self) -> int:
        return 2

    def token_state(self, x: torch.Tensor) -> torch.Tensor:
        """log f_t, (B, H, T) float32."""
        return F.logsigmoid(self.forget_gate(x).float()).transpose(1, 2)

    def logit_bias(self, inputs: BiasInputs) -> torch.Tensor:
        assert inputs.k_state is not None  # token_state is always computed for this encoding
        prefix = inputs.k_state.cumsum(-1)  # c_j = sum_{l <= j} log f_l over the keys, (B, H, Tk)
        return prefix[..., inputs.q_rows, None] - prefix[..., None, :]  # c_i - c_j, (B, H, Tq, Tk)


@register("fox")
class ForgettingPositionEncoding(ForgetGate, PositionEncoding):
    pass


FOX_ROPE_THETA = 500000.0  # the reference's rope_base


@register("fox_rope")
class ForgettingRotaryPositionEncoding(ForgetGate, RotaryPositionEncoding):
    def __init__(self, *, rope_theta: float | None = FOX_ROPE_THETA, **options):
        if rope_theta is not None:  # replaces the model's rope_theta, which the model passes to every encoding as `theta`
            options["theta"] = float(rope_theta)
        super().__init__(**options)
