"""CoPE (Golovneva et al. 2024, "Contextual Position Encoding: Learning to Count What's Important").

Positions are counted by the content: a gate per (query, key) pair g_ij = sigmoid(q_i . k_j / sqrt(d)), and the
position of key j for query i is the number of gated keys between them, p_ij = sum_{t=j..i} g_it (fractional).
A learned embedding e[p] per integer position p < npos (shared by the heads of a layer, zeros at init) gives the
logit q_i . e[p_ij], interpolated linearly between floor(p_ij) and ceil(p_ij); positions are clamped at npos - 1.
As in the reference (facebookresearch/RAM `projects/cope/src/cope/context_position.py`, default settings: gates from
the keys, divided by sqrt(d)) the attention logit is (q_i . k_j + q_i . e[p_ij]) / sqrt(d), so this bias is the
interpolated position logit over sqrt(d). It is content-dependent: `logit_bias` reads the queries and keys of each
query chunk (`BiasInputs`), and the gates are masked like attention (causal, within documents).
Without a rotary part: CoPE replaces position embeddings (NoPE otherwise), as in the paper.
"""

import math

import torch
from torch import nn

from fope_lm.position.base import BiasInputs, PositionEncoding, autocast_off
from fope_lm.position.registry import register


@register("cope")
class ContextualPositionEncoding(PositionEncoding):
    def __init__(self, *, npos_max: int | None = None, **base):
        super().__init__(**base)
        self.npos = int(npos_max or self.max_seq_len + 1)  # the reference's default: block size + 1 (position 0 too)
        if self.npos < 2:
            raise ValueError(f"npos_max must be at least 2, got {self.npos}")
        self.pos_emb = nn.Parameter(torch.zeros(self.head_dim, self.npos))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_emb.zero_()

    @property
    def has_attention_bias(self) -> bool:
        return True

    @property
    def bias_memory(self) -> int:
        return 6  # logits, gates, positions, their floor and ceil, the interpolated bias

    def logit_bias(self, inputs: BiasInputs) -> torch.Tensor:
        with autocast_off(inputs.q.device.type):  # float32 (and on the meta device, where autocast does not exist)
            q, k = inputs.q.float(), inputs.k.float()
            scale = 1 / math.sqrt(self.head_dim)
            mask = inputs.mask if inputs.mask.dim() == 2 else inputs.mask[:, None]  # broadcast over heads
            gates = torch.sigmoid(q @ k.transpose(-1, -2) * scale) * mask  # (B, H, Tq, Tk)
            positions = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.npos - 1)  # p_ij = sum_{t >= j} g_it
            position_logits = q @ self.pos_emb.float()  # (B, H, Tq, npos): q_i . e[p] at every integer p
            floor, ceil = positions.floor(), positions.ceil()
            below = position_logits.gather(-1, floor.long())
            above = position_logits.gather(-1, ceil.long())
            weight = positions - floor  # differentiable in the gates: the gradient that trains them
            return (above * weight + below * (1 - weight)) * scale

    def extra_repr(self) -> str:
        return f"npos={self.npos}, gates=sigmoid(q.k/sqrt(d))"
