"""Causal attention kernels: flash-attn when installed on CUDA, PyTorch SDPA otherwise.

Position encodings with a logit bias (ALiBi, KERPLE, ...) never need a dense (heads, T, T) bias: flash-attn
computes ALiBi in-kernel from its slopes, and the SDPA path builds the bias one query chunk at a time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fope_lm.position.base import PositionEncoding

# Upper bound on the elements of one (heads, query-chunk, keys) bias block: 64 MiB in float32.
BIAS_CHUNK_ELEMENTS = 1 << 24


@functools.cache
def flash_attn_func():
    """flash_attn.flash_attn_func, or None when the optional extra is not installed."""
    try:
        from flash_attn import flash_attn_func as func
    except ImportError:
        return None
    return func


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Key/value heads (B, H_kv, T, D) repeated for the n_heads query heads of their groups (query head h reads
    key/value head h // (n_heads / H_kv))."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def causal_mask(q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where key position <= query position."""
    return k_positions[None, :] <= q_positions[:, None]


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    pe: PositionEncoding,
    *,
    flash=None,
    bias_chunk_elements: int = BIAS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with a causal mask by absolute position.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); positions: int64 (Tq,) and (Tk,) on q's device. With a KV cache the
    queries are the last Tq positions of the keys. flash: `flash_attn_func()`, looked up by the caller once (at
    model build), so that nothing here imports or looks anything up while a forward is traced.
    """
    n_heads, tq, tk = q.shape[1], q.shape[2], k.shape[2]
    flash_fits = flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    if flash_fits and (not pe.has_attention_bias or pe.alibi_slopes is not None):
        slopes = pe.alibi_slopes
        # flash-attn aligns a shorter query block to the end of the keys, as a KV cache needs
        out = flash(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=True,
            alibi_slopes=None if slopes is None else slopes.to(q.device, torch.float32),
        )
        return out.transpose(1, 2)

    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)  # grouped-query attention: flash-attn takes them as they are
    if not pe.has_attention_bias:
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if tq == 1:  # one new token attends to the whole cache
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_positions, k_positions))

    chunk = max(1, bias_chunk_elements // (n_heads * tk))
    outputs = []
    for start in range(0, tq, chunk):
        q_pos = q_positions[start : start + chunk]
        bias = pe.attention_bias(q_pos, k_positions)  # (H, c, Tk) float32
        assert bias is not None  # has_attention_bias
        bias = bias.masked_fill(~causal_mask(q_pos, k_positions), float("-inf"))
        outputs.append(F.scaled_dot_product_attention(q[:, :, start : start + chunk], k, v, attn_mask=bias.to(q.dtype)[None]))
    return torch.cat(outputs, dim=2)
