"""Running a trained model at evaluation time: final hidden states, greedy decoding, continuation scores.

Nothing here materialises (B, T, V) float32 logits for a long input: the LM head is applied only where a
caller needs it (the last position for decoding, a few continuation tokens for scoring, or chunks of
positions for the loss in `fope_lm.evaluation.runner`).

Dynamic YaRN and a KV cache: keys cached under one scale are wrong under another, so every function takes
`dynamic_len`, fixed once per prompt (prompt length + new tokens) and passed on every forward, cached or not.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fope_lm.nn.kv_cache import KVCache
from fope_lm.nn.model import Transformer


@contextlib.contextmanager
def inference(model: Transformer, autocast_dtype: torch.dtype | None = None):
    """Eval mode (restored afterwards, for in-loop evals), no autograd, optional autocast on the model's device.

    no_grad rather than inference_mode: an in-loop eval runs the model that training continues with, and tensors
    made under inference_mode can never enter autograd afterwards.
    """
    was_training = model.training
    device_type = next(model.parameters()).device.type
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            yield
    finally:
        model.train(was_training)


def lm_logits(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits in float32 for hidden states from `Transformer.hidden_states` (any leading shape)."""
    return model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()


def _next_tokens(model: Transformer, hidden: torch.Tensor) -> torch.Tensor:
    """Greedy choice at the last position, among real tokens only (padded vocab rows are never emitted)."""
    return lm_logits(model, hidden[:, -1])[:, : model.config.vocab_size].argmax(-1)


@torch.no_grad()
def prefill(model: Transformer, prompts: torch.Tensor, *, dynamic_len: int) -> KVCache:
    """The KV cache of prompts[:, :-1]. `greedy_generate` and `continuation_logprobs` both continue from the last
    prompt token, so one prefill (built for their common dynamic_len) can serve both."""
    cache = KVCache(model.config.n_layers)
    if prompts.shape[1] > 1:
        model.hidden_states(prompts[:, :-1], kv_cache=cache, dynamic_len=dynamic_len)
    return cache


@torch.no_grad()
def greedy_generate(
    model: Transformer,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    dynamic_len: int | None = None,
    prefix: KVCache | None = None,
) -> torch.Tensor:
    """Greedy continuations (B, max_new_tokens) of equal-length prompts (B, T).

    use_cache=False recomputes the whole sequence at every step (the reference the cache must match).
    dynamic_len defaults to T + max_new_tokens, the length dynamic YaRN scales for on both paths.
    prefix: `prefill(model, prompts, dynamic_len=...)` for the same dynamic_len, if already computed (left unchanged).
    """
    dynamic_len = dynamic_len or prompts.shape[1] + max_new_tokens
    new_tokens = []
    if use_cache:
        cache = (prefix if prefix is not None else prefill(model, prompts, dynamic_len=dynamic_len)).branch()
        step_input = prompts[:, -1:]
        for _ in range(max_new_tokens):
            hidden = model.hidden_states(step_input, start_pos=cache.length, kv_cache=cache, dynamic_len=dynamic_len)
            new_tokens.append(_next_tokens(model, hidden))
            step_input = new_tokens[-1][:, None]
    else:
        sequence = prompts
        for _ in range(max_new_tokens):
            new_tokens.append(_next_tokens(model, model.hidden_states(sequence, dynamic_len=dynamic_len)))
            sequence = torch.cat((sequence, new_tokens[-1][:, None]), dim=1)
    return torch.stack(new_tokens, dim=1)


@torch.no_grad()
def continuation_logprobs(
    model: Transformer,
    prompts: torch.Tensor,
    continuations: list[list[list[int]]],
    *,
    dynamic_len: int | None = None,
    prefix: KVCache | None = None,
) -> torch.Tensor:
    """Summed log-probability of each candidate continuation after its prompt (teacher forcing).

    prompts: (B, T) equal-length prompts; continuations[b][j]: the token ids of candidate j for prompt b
    (every prompt has the same number of candidates). Returns (B, n_candidates) float32.
    The prompt is run once into a KV cache (or `prefix`, as in `greedy_generate`); each candidate extends a branch of it.
    """
    batch, length = prompts.shape
    n_candidates = len(continuations[0])
    longest = max(len(tokens) for candidates in continuations for tokens in candidates)
    dynamic_len = dynamic_len or length + longest
    device = prompts.device

    cache = prefix if prefix is not None else prefill(model, prompts, dynamic_len=dynamic_len)
    # The last prompt token leads each candidate, so its logits predict the candidate's first token.
    scores = torch.empty(batch, n_candidates)
    for j in range(n_candidates):
        targets = torch.full((batch, longest), -100, dtype=torch.long)
        for b in range(batch):
            tokens = continuations[b][j]
            targets[b, : len(tokens)] = torch.tensor(tokens)
        targets = targets.to(device)
        step_input = torch.cat((prompts[:, -1:], targets.clamp(min=0)), dim=1)[:, :-1]  # padding: any token id
        branch = cache.branch()
        hidden = model.hidden_states(step_input, start_pos=length - 1, kv_cache=branch, dynamic_len=dynamic_len)
        logits = lm_logits(model, hidden)
        token_nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        scores[:, j] = -token_nll.sum(dim=1).cpu()
    return scores
