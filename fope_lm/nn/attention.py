"""Causal attention kernels: flash-attn when installed on CUDA, PyTorch SDPA otherwise.

Position encodings with a logit bias (ALiBi, KERPLE, FIRE, CoPE, FoX) never need a dense (heads, T, T) bias: flash-
attn computes ALiBi in-kernel from its slopes, and the SDPA path builds the bias one query chunk at a time. Document
masking (attention only within each document of a packed row) uses flash-attn's varlen kernel when it can, and
otherwise a block-diagonal boolean mask, also one query chunk at a time.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fope_lm.nn.documents import Documents
from fope_lm.position.base import BiasInputs, PositionEncoding

# Upper bound on the elements of one (batch, heads, query-chunk, keys) block of bias or mask: 64 MiB in float32.
BIAS_CHUNK_ELEMENTS = 1 << 24


@functools.cache
def flash_attn_funcs():
    """(flash_attn_func, flash_attn_varlen_func), or None when the optional extra is not installed."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_func, flash_attn_varlen_func


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Key/value heads (B, H_kv, T, D) repeated for the n_heads query heads of their groups (query head h reads
    key/value head h // (n_heads / H_kv))."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def causal_mask(q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where the key's index in the sequence is <= the query's."""
    return k_index[None, :] <= q_index[:, None]


def attention_mask(q_index: torch.Tensor, k_index: torch.Tensor, doc_ids: torch.Tensor | None, q_rows: slice) -> torch.Tensor:
    """Causal (Tq, Tk), and within documents (B, Tq, Tk) when doc_ids (B, Tk) is given (the queries: its `q_rows`)."""
    mask = causal_mask(q_index, k_index)
    if doc_ids is None:
        return mask
    return mask & (doc_ids[:, q_rows, None] == doc_ids[:, None, :])


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: PositionEncoding,
    *,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    documents: Documents | None = None,
    k_state: torch.Tensor | None = None,
    flash=None,
    bias_chunk_elements: int = BIAS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, causal by index in the sequence, and within documents with `documents`.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D). With a KV cache the queries are the last Tq of the keys.
    q_index, k_index: int64 (Tq,), (Tk,) the tokens' indices in the sequence (the causal order). q_positions,
    k_positions: the position encoding's positions, (T,) or (B, T) (default: the indices; they differ when positions
    restart at each document). documents: the batch's documents (no KV cache). k_state: the encoding's token state
    of the keys (B, S, Tk). flash: `flash_attn_funcs()`, looked up by the caller once (at model build), so that
    nothing here imports or looks anything up while a forward is traced.
    """
    n_heads, tq, tk = q.shape[1], q.shape[2], k.shape[2]
    if flash is not None and _flash_fits(q, pe, documents, per_token_positions=q_positions is not None and q_positions.dim() == 2):
        return _flash_attention(q, k, v, pe, documents, flash)
    q_positions = q_index if q_positions is None else q_positions
    k_positions = k_index if k_positions is None else k_positions

    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)  # grouped-query attention: flash-attn takes them as they are
    doc_ids = None if documents is None else documents.ids
    if not pe.has_attention_bias and doc_ids is None:
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if tq == 1:  # one new token attends to the whole cache
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_index, k_index))

    chunk = max(1, bias_chunk_elements // (q.shape[0] * n_heads * tk * pe.bias_memory))
    outputs = []
    for start in range(0, tq, chunk):
        block = slice(start, start + chunk)
        keys_block = slice(tk - tq + start, tk - tq + start + chunk)  # the queries' rows among the keys
        mask = attention_mask(q_index[block], k_index, doc_ids, keys_block)
        q_block = q[:, :, block]
        if pe.has_attention_bias:
            inputs = BiasInputs(
                q_positions=q_positions[..., block], k_positions=k_positions, q=q_block, k=k, mask=mask,
                q_rows=keys_block, k_state=k_state,
            )  # fmt: skip
            bias = pe.logit_bias(inputs)
            assert bias is not None  # has_attention_bias
            mask = bias.masked_fill(~(mask if mask.dim() == 2 else mask[:, None]), float("-inf")).to(q.dtype)
        elif mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, Tq, Tk): broadcast over heads
        outputs.append(F.scaled_dot_product_attention(q_block, k, v, attn_mask=mask))
    return torch.cat(outputs, dim=2)


def _flash_fits(q: torch.Tensor, pe: PositionEncoding, documents: Documents | None, *, per_token_positions: bool) -> bool:
    """flash-attn runs 16-bit CUDA inputs, without a bias or with a bias it computes in-kernel (the encoding's
    `kernel_bias`: -slope * (i - j) from the tokens' indices, so only where distances by index are the encoding's:
    no per-token positions, or within documents), and documents only with their cu_seqlens (built on the host:
    `Documents.of_tokens`)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if pe.has_attention_bias and (pe.kernel_bias() is None or (per_token_positions and documents is None)):
        return False
    return documents is None or documents.cu_seqlens is not None


def _flash_attention(q, k, v, pe: PositionEncoding, documents: Documents | None, flash) -> torch.Tensor:
    dense, varlen = flash
    bias = pe.kernel_bias()
    slopes = None if bias is None else bias.slopes
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, heads, D)
    if documents is None:  # flash-attn aligns a shorter query block to the end of the keys, as a KV cache needs
        return dense(q, k, v, causal=True, alibi_slopes=slopes).transpose(1, 2)
    batch, length = q.shape[:2]
    cu_seqlens = documents.cu_seqlens
    # every document is one sequence of the flattened tokens; `length` bounds them all, with no host read
    out = varlen(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens, length, length,
        causal=True, alibi_slopes=slopes,
    )  # fmt: skip
    return out.view(batch, length, *out.shape[1:]).transpose(1, 2)
