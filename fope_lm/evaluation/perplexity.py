"""Perplexity across context lengths (docs/eval.md), on a live model: eval.py's protocol and the trainer's in-loop eval.

Perplexity at length T: the same token prefix (a multiple of the largest T) is cut into non-overlapping
chunks of T tokens, each run from position 0; the mean next-token cross-entropy over all T-1 targets of every
chunk gives ppl = exp(loss). Batches hold max(1, tokens_per_batch // T) chunks. Losses are also summed per
position bucket [0, L), [L, 2L), [2L, 4L), ... of the predicting position (L the training length), so
in-distribution and extrapolated positions can be told apart. With `per_document` each document is scored alone
instead (`per_document_perplexity`), bucketed by position within its document.
"""

from __future__ import annotations

import functools
import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fope_lm.data import TokenData, ValidationTokens, ensure_prepared
from fope_lm.devices import AUTOCAST_DTYPES
from fope_lm.errors import ConfigError, DataError
from fope_lm.nn.documents import document_positions
from fope_lm.nn.generate import inference, lm_logits
from fope_lm.nn.model import Transformer

logger = logging.getLogger(__name__)

DEFAULT_LOSS_CHUNK_TOKENS = 4096


@torch.no_grad()
def token_losses(
    model: Transformer, input_ids: torch.Tensor, *, loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS, **forward_kwargs
) -> torch.Tensor:
    """Next-token cross-entropy (B, T-1) in float32: column p is the loss of predicting token p+1 from position p.

    The LM head runs on `loss_chunk_tokens` (batch x position) rows at a time, so at most that many rows of
    float32 logits exist at once, whatever B and T.
    """
    batch, length = input_ids.shape
    hidden = model.hidden_states(input_ids, **forward_kwargs)[:, :-1].flatten(0, 1)
    targets = input_ids[:, 1:].flatten()
    losses = []
    for rows in zip(hidden.split(loss_chunk_tokens), targets.split(loss_chunk_tokens), strict=True):
        losses.append(F.cross_entropy(lm_logits(model, rows[0]), rows[1], reduction="none"))
    return torch.cat(losses).view(batch, length - 1)


def position_buckets(train_len: int, n_positions: int) -> list[tuple[int, int]]:
    """[0, L), [L, 2L), [2L, 4L), ... until the buckets cover positions 0 .. n_positions - 1."""
    buckets, start, end = [], 0, train_len
    while start < n_positions:
        buckets.append((start, end))
        start, end = end, 2 * end
    return buckets


def _long_tokens(val_tokens) -> torch.Tensor:
    if not isinstance(val_tokens, torch.Tensor):  # numpy, e.g. a uint16 memmap
        val_tokens = torch.from_numpy(np.asarray(val_tokens, dtype=np.int64))
    return val_tokens.long().flatten()


def _same_text_prefix(tokens: torch.Tensor, longest: int) -> torch.Tensor:
    """The prefix every length evaluates: rounded down to a multiple of the largest length."""
    usable = tokens.numel() // longest * longest
    if usable == 0:
        raise DataError(f"{tokens.numel()} validation tokens are fewer than the largest eval length {longest}")
    return tokens[:usable]


def eval_chunks(val_tokens, lengths: list[int]) -> dict[int, torch.Tensor]:
    """The (n_chunks, T) chunks of each length, all cut from one prefix (a multiple of the largest length): every
    length that divides it sees exactly the same tokens; any other drops only the tail."""
    tokens = _same_text_prefix(_long_tokens(val_tokens), max(lengths))
    return {length: tokens[: tokens.numel() // length * length].view(-1, length) for length in lengths}


def perplexity_by_length(
    model: Transformer,
    val_tokens,
    lengths: list[int],
    tokens_per_batch: int | None = None,
    *,
    train_len: int | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Perplexity of non-overlapping chunks at each length, on the same token prefix for every length.

    val_tokens: a 1-D token stream (tensor or numpy array, e.g. `ValidationTokens.tokens`); it is cut to a
    multiple of max(lengths). tokens_per_batch defaults to max(lengths) (batch 1 at the top length);
    train_len (the bucket unit) defaults to the model's max_seq_len. Returns {T: {"loss", "ppl",
    "scored_tokens", "n_chunks", "batch_size", "buckets", "wall_time_s", "length"}} in the order of `lengths`.
    The model's training mode is restored afterwards, so the trainer can call this between steps.
    """
    tokens_per_batch = tokens_per_batch or max(lengths)
    train_len = train_len or model.config.max_seq_len
    device = next(model.parameters()).device
    results = {}
    with inference(model, autocast_dtype):
        for length, chunks in eval_chunks(val_tokens, lengths).items():
            started = time.perf_counter()
            batch_size = max(1, tokens_per_batch // length)
            loss_per_position = torch.zeros(length - 1, dtype=torch.float64)  # summed over chunks
            for batch in tqdm(chunks.split(batch_size), desc=f"ppl T={length}", disable=not progress, leave=False):
                losses = token_losses(model, batch.to(device), loss_chunk_tokens=loss_chunk_tokens)
                loss_per_position += losses.sum(dim=0).double().cpu()
            n_chunks = chunks.shape[0]
            scored = torch.full_like(loss_per_position, n_chunks)  # every chunk scores every position
            results[length] = length_result(length, batch_size, n_chunks, loss_per_position, scored, train_len=train_len, started=started)
            logger.info(f"T={length:>6}: loss {results[length]['loss']:.4f}  ppl {results[length]['ppl']:.2f}  ({n_chunks} chunks)")
    return results


def length_result(
    length: int, batch_size: int, n_chunks: int, loss_sum: torch.Tensor, scored: torch.Tensor, *, train_len: int, started: float
) -> dict:
    """One length's row of results: the loss over every scored target, and per position bucket (buckets no target
    reaches are left out). loss_sum, scored: float64 (length - 1,), by predicting position."""
    total = int(scored.sum().item())
    loss = loss_sum.sum().item() / total
    buckets = []
    for start, end in position_buckets(train_len, length - 1):
        in_bucket = int(scored[start:end].sum().item())
        if in_bucket:
            buckets.append({"start": start, "end": end, "scored_tokens": in_bucket, "loss": loss_sum[start:end].sum().item() / in_bucket})
    return {
        "length": length,
        "batch_size": batch_size,
        "n_chunks": n_chunks,
        "scored_tokens": total,
        "loss": loss,
        "ppl": math.exp(loss),
        "buckets": buckets,
        "wall_time_s": round(time.perf_counter() - started, 3),
    }


def split_documents(tokens: torch.Tensor, eos_id: int) -> list[torch.Tensor]:
    """The documents of a 1-D token stream, each with its closing EOS (the last may be cut by the stream's end);
    documents of one token (nothing to predict) are left out."""
    ends = (torch.nonzero(tokens == eos_id).flatten() + 1).tolist()
    if not ends or ends[-1] != tokens.numel():
        ends.append(tokens.numel())
    documents = torch.tensor_split(tokens, ends[:-1])
    return [document for document in documents if document.numel() > 1]


def pack_documents(documents: list[torch.Tensor], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (n, length) holding each document's first `length` tokens, in order, none split across rows, and their
    document ids (n, length): the document's index, and for a row's unused tail (padding) len(documents), so that
    the ids never decrease along a row."""
    rows: list[list[torch.Tensor]] = []
    ids: list[list[torch.Tensor]] = []
    row: list[torch.Tensor] = []
    row_ids: list[torch.Tensor] = []
    for number, document in enumerate(documents):
        document = document[:length]
        if sum(part.numel() for part in row) + document.numel() > length:
            rows.append(row)
            ids.append(row_ids)
            row, row_ids = [], []
        row.append(document)
        row_ids.append(torch.full_like(document, number))
    rows.append(row)
    ids.append(row_ids)
    padded_rows, padded_ids = [], []
    for row, row_ids in zip(rows, ids, strict=True):
        used = sum(part.numel() for part in row)
        padded_rows.append(torch.cat([*row, torch.full((length - used,), pad_id, dtype=torch.long)]))
        padded_ids.append(torch.cat([*row_ids, torch.full((length - used,), len(documents), dtype=torch.long)]))
    return torch.stack(padded_rows), torch.stack(padded_ids)


def per_document_perplexity(
    model: Transformer,
    val_tokens,
    lengths: list[int],
    tokens_per_batch: int | None = None,
    *,
    eos_id: int,
    train_len: int | None = None,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[int, dict]:
    """Each document scored alone, up to T tokens of it: the documents of the same token prefix as
    `perplexity_by_length`'s, each cut to its first T tokens, packed into rows of T with document masking and
    positions restarting at each document (so every token sees exactly its document's earlier tokens), and the
    loss bucketed by the predicting position within its document. Rows as perplexity_by_length's, plus
    n_documents; n_chunks counts the packed rows."""
    tokens_per_batch = tokens_per_batch or max(lengths)
    train_len = train_len or model.config.max_seq_len
    device = next(model.parameters()).device
    documents = split_documents(_same_text_prefix(_long_tokens(val_tokens), max(lengths)), eos_id)
    if not documents:
        raise DataError("the validation tokens hold no document of two or more tokens to score")
    results = {}
    with inference(model, autocast_dtype):
        for length in lengths:
            started = time.perf_counter()
            rows, ids = pack_documents(documents, length, pad_id=eos_id)
            batch_size = max(1, tokens_per_batch // length)
            loss_sum = torch.zeros(length - 1, dtype=torch.float64)  # by predicting position within the document
            scored = torch.zeros(length - 1, dtype=torch.float64)
            for batch, batch_ids in tqdm(
                zip(rows.split(batch_size), ids.split(batch_size), strict=True),
                desc=f"ppl/doc T={length}",
                disable=not progress,
                leave=False,
            ):
                losses = (
                    token_losses(model, batch.to(device), loss_chunk_tokens=loss_chunk_tokens, doc_ids=batch_ids.to(device)).double().cpu()
                )
                target_in_document = (batch_ids[:, 1:] == batch_ids[:, :-1]) & (batch_ids[:, :-1] < len(documents))
                position = document_positions(batch_ids)[:, :-1]
                loss_sum.index_add_(0, position[target_in_document], losses[target_in_document])
                scored.index_add_(0, position[target_in_document], torch.ones_like(losses[target_in_document]))
            row = length_result(length, batch_size, rows.shape[0], loss_sum, scored, train_len=train_len, started=started)
            results[length] = {**row, "n_documents": len(documents)}
            logger.info(
                f"T={length:>6}: loss {row['loss']:.4f}  ppl {row['ppl']:.2f}  ({len(documents)} documents alone, {rows.shape[0]} rows)"
            )
    return results


def sliding_window_perplexity(
    model: Transformer,
    val_tokens,
    window: int,
    stride: int,
    tokens_per_batch: int | None = None,
    *,
    loss_chunk_tokens: int = DEFAULT_LOSS_CHUNK_TOKENS,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Windows of `window` tokens every `stride` tokens; each scores only its last `stride` targets (the first
    window scores all of its window - 1), so every token after the first is scored once, with >= window - stride
    tokens of context."""
    if not 1 <= stride < window:
        raise ConfigError(f"sliding window stride must be in [1, window={window}), got {stride}")
    tokens = _same_text_prefix(_long_tokens(val_tokens), window)
    starts = list(range(0, tokens.numel() - window + 1, stride))
    batch_size = max(1, (tokens_per_batch or window) // window)
    device = next(model.parameters()).device
    started = time.perf_counter()
    total, scored = 0.0, 0
    with inference(model, autocast_dtype):
        batches = range(0, len(starts), batch_size)
        for first in tqdm(batches, desc=f"sliding window={window}", disable=not progress, leave=False):
            batch_starts = starts[first : first + batch_size]
            windows = torch.stack([tokens[start : start + window] for start in batch_starts]).to(device)
            losses = token_losses(model, windows, loss_chunk_tokens=loss_chunk_tokens).double().cpu()
            for start, row in zip(batch_starts, losses, strict=True):
                kept = row if start == 0 else row[-stride:]
                total += kept.sum().item()
                scored += kept.numel()
    return {
        "window": window,
        "stride": stride,
        "n_windows": len(starts),
        "scored_tokens": scored,
        "loss": total / scored,
        "ppl": math.exp(total / scored),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }


# --- the trainer's in-loop eval ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _validation_prefix(data_dir: str, tokens_total: int, max_len: int) -> torch.Tensor:
    return ValidationTokens(TokenData(data_dir), tokens_total, max_len).tokens


def length_eval_hook(
    *, model, accelerator, step: int, data, lengths: list[int], tokens_total: int = 2**18, tokens_per_batch: int | None = None
) -> dict[str, float]:
    """A trainer eval hook (train.eval_hooks, docs/eval.md): perplexity at several lengths, logged as
    eval/<name>/ppl@T and eval/<name>/loss@T. Every rank evaluates the same chunks (under ZeRO-3 every rank
    must take part in every forward)."""
    tokens = _validation_prefix(str(ensure_prepared(data)), tokens_total, max(lengths))
    autocast_dtype = AUTOCAST_DTYPES.get(str(accelerator.mixed_precision))
    model = accelerator.unwrap_model(model)
    results = perplexity_by_length(model, tokens, list(lengths), tokens_per_batch, autocast_dtype=autocast_dtype, progress=False)
    return {f"{metric}@{length}": row[metric] for length, row in results.items() for metric in ("loss", "ppl")}
