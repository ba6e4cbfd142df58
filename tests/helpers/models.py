"""Small models for unit tests, and dense references to check the model's kernels against."""

import math

import torch
import torch.nn.functional as F

from fope_lm.nn.model import Transformer, build_model


def tiny(pe: str, **overrides) -> Transformer:
    """The `tiny` preset (2 layers, d_model 128) over a 256-token vocabulary at L = 32; overrides as build_model's,
    e.g. pe_options={"sigma": 0.3}."""
    return build_model("tiny", pe=pe, **{"vocab_size": 256, "max_seq_len": 32, **overrides})


def dense_attention(q, k, v, bias, q_positions=None, k_positions=None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with the causal mask by position, all (T, T) scores at once (positions
    default to 0..T-1)."""
    q_positions = torch.arange(q.shape[2]) if q_positions is None else q_positions
    k_positions = torch.arange(k.shape[2]) if k_positions is None else k_positions
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    scores = scores.masked_fill(k_positions[None, :] > q_positions[:, None], float("-inf"))
    return F.softmax(scores, -1) @ v


def rotate(pe, x: torch.Tensor, positions, dynamic_len: int | None = None) -> torch.Tensor:
    """x (B, H, T, Dh) rotated by a rotary encoding at `positions` (its query side of rotate_qk)."""
    return pe.rotate_qk(x, x, positions, dynamic_len)[0]
