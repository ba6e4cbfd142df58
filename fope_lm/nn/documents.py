"""Documents of a packed row: which tokens belong together, and where each document's positions start.

Training rows are cut from the EOS-joined token stream, so one row holds the end of a document, whole documents
and the start of another. With `train.document_mask` attention stays within each document (block-diagonal causal),
and with restarting positions (`train.document_positions=restart`, the default when masking) every document counts
its positions from 0, so each token sees exactly what it would see if its document were run alone.

A document ends with its EOS: the EOS belongs to the document it closes, and the next token starts a new one. The
target after an EOS (the next document's first token) is kept, predicted from the EOS as OLMo does, so masking
changes what a token attends to, never which tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int64: for each token, the number of EOS tokens before it in its row (non-decreasing along T; an EOS
    shares the id of the document it ends)."""
    is_eos = (tokens == eos_id).long()
    return is_eos.cumsum(dim=-1) - is_eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each token's position within its document (0 at the document's first token in the row)."""
    first = torch.searchsorted(doc_ids, doc_ids)  # the first index of each id: the ids are sorted along T
    return torch.arange(doc_ids.shape[-1], device=doc_ids.device) - first


def document_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: the length of each token's document within its row (what dynamic length scaling scales for when
    each document is run as if alone)."""
    first = torch.searchsorted(doc_ids, doc_ids)
    past_last = torch.searchsorted(doc_ids, doc_ids, right=True)
    return past_last - first


def cumulative_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """(n_documents + 1,) int32: the offsets of every document in the flattened (B * T) tokens, each row starting a
    new one (flash-attn's `cu_seqlens`). Its length depends on the values, so build it where they are on the host."""
    batch, length = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = torch.nonzero(starts.flatten()).flatten()
    return torch.cat((offsets, offsets.new_tensor([batch * length]))).to(torch.int32)


@dataclass(frozen=True)
class Documents:
    """The documents of a batch, as the model's forward takes them (`doc_ids=`).

    ids: (B, T) int64 non-decreasing along T, one id per document. cu_seqlens: `cumulative_lengths(ids)` for
    flash-attn's varlen kernel, or None (then attention uses a block-diagonal mask with SDPA). Build it with
    `Documents.of_tokens` from a batch still on the host, so that no forward reads the device."""

    ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None

    @classmethod
    def of_tokens(cls, tokens: torch.Tensor, eos_id: int) -> Documents:
        ids = document_ids(tokens, eos_id)
        return cls(ids, cumulative_lengths(ids))

    @classmethod
    def of(cls, doc_ids: Documents | torch.Tensor) -> Documents:
        return doc_ids if isinstance(doc_ids, Documents) else cls(doc_ids)

    def to(self, device: torch.device | str) -> Documents:
        cu_seqlens = None if self.cu_seqlens is None else self.cu_seqlens.to(device, non_blocking=True)
        return Documents(self.ids.to(device, non_blocking=True), cu_seqlens)
