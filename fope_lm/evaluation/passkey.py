"""Passkey retrieval (Mohtashami & Jaggi 2023), with prompts of an exact length in the model's tokens.

A prompt is assembled from separately tokenized pieces: the task sentence, filler sentences repeated, the key
sentence at a random depth, and the question. Concatenating token lists (instead of re-tokenising a string)
makes the length exact: the filler is cut to the number of tokens left over.

Two scores per trial: greedy generation with a KV cache (correct if the first integer in the continuation is
the key), and a teacher-forced one (the log-likelihood of the key's tokens after the prompt, correct if the
true key outscores every distractor key; chance is 1 / (distractors + 1)).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from fope_lm.errors import ConfigError
from fope_lm.nn.generate import continuation_logprobs, greedy_generate, inference, prefill
from fope_lm.nn.model import Transformer

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50000


@dataclass(frozen=True)
class PasskeyPrompt:
    token_ids: list[int]
    key: int
    depth: float  # requested depth in [0, 1]: the fraction of the filler placed before the key sentence
    key_start: int  # index of the key sentence's first token


@dataclass(frozen=True)
class Trial:
    key: int
    depth: float
    distractors: tuple[int, ...]


def first_integer(text: str) -> int | None:
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def sample_trials(n_trials: int, seed: int, n_distractors: int) -> list[Trial]:
    """Keys in [1, MAX_KEY], uniform depths and distinct distractor keys; the same trials at every length."""
    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n_trials):
        key = int(rng.integers(1, MAX_KEY + 1))
        candidates = rng.choice(np.arange(1, MAX_KEY + 1), size=n_distractors + 1, replace=False)
        distractors = tuple(int(c) for c in candidates if c != key)[:n_distractors]
        trials.append(Trial(key, float(rng.uniform()), distractors))
    return trials


class PasskeyPrompts:
    """Builds prompts of an exact token length for one tokenizer (pieces are tokenized once)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Pieces after the first carry their leading space, as they would inside running text.
        # an EOS first: a document boundary, as before every document of the training stream
        start = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.prefix = start + self._encode(TASK)
        self.sentences = [self._encode(" " + sentence) for sentence in FILLER_SENTENCES]
        self.question = self._encode(" " + QUESTION)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def key_sentence(self, key: int) -> list[int]:
        return self._encode(" " + KEY_SENTENCE.format(key=key))

    def answer(self, key: int) -> list[int]:
        """The tokens that should follow the prompt: the key with its leading space."""
        return self._encode(f" {key}")

    def fixed_length(self, key: int) -> int:
        """The prompt's tokens other than filler: the task (after its EOS), the key sentence and the question."""
        return len(self.prefix) + len(self.key_sentence(key)) + len(self.question)

    def shortest_length(self, keys: Iterable[int]) -> int:
        """The shortest length whose prompts hold every one of `keys` (with no filler)."""
        return max(self.fixed_length(key) for key in keys)

    def build(self, length: int, key: int, depth: float) -> PasskeyPrompt:
        key_tokens = self.key_sentence(key)
        n_filler = length - self.fixed_length(key)
        if n_filler < 0:
            raise ConfigError(
                f"passkey length {length} is shorter than the prompt without filler ({self.fixed_length(key)} tokens): "
                "use longer passkey.lengths"
            )
        filler: list[int] = []
        boundaries = [0]
        for sentence in itertools.cycle(self.sentences):
            if len(filler) >= n_filler:
                break
            filler += sentence
            boundaries.append(min(len(filler), n_filler))
        filler = filler[:n_filler]  # the last sentence may be cut: the length is exact
        split = min(boundaries, key=lambda boundary: abs(boundary - depth * n_filler))  # nearest sentence boundary
        tokens = self.prefix + filler[:split] + key_tokens + filler[split:] + self.question
        return PasskeyPrompt(tokens, key, depth, len(self.prefix) + split)


def check_lengths(tokenizer, lengths: Sequence[int], *, trials: int, seed: int, distractors: int) -> None:
    """A one-line ConfigError, before any compute, when a passkey length is shorter than the prompts of these trials
    without filler (the task, the key sentence and the question, in this tokenizer's tokens); it names the shortest
    length that works. The answer is not part of the prompt: it follows it (generated, or scored as a continuation)."""
    shortest = PasskeyPrompts(tokenizer).shortest_length(trial.key for trial in sample_trials(trials, seed, distractors))
    too_short = sorted({length for length in lengths if length < shortest})
    if too_short:
        raise ConfigError(
            f"passkey.lengths {too_short} {'is' if len(too_short) == 1 else 'are'} shorter than the passkey prompt without "
            f"filler (task, key sentence, question): {shortest} tokens of this tokenizer for these trials, the shortest "
            f"length that works; use passkey.lengths of at least {shortest}, or passkey.enabled=false"
        )


def depth_bins(n_bins: int) -> list[tuple[float, float]]:
    return [(i / n_bins, (i + 1) / n_bins) for i in range(n_bins)]


def _accuracy(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


@torch.no_grad()
def evaluate_passkey(
    model: Transformer,
    tokenizer,
    lengths: list[int],
    *,
    trials: int = 50,
    seed: int = 0,
    distractors: int = 9,
    max_new_tokens: int = 10,
    depth_buckets: int = 5,
    tokens_per_batch: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> list[dict]:
    """Greedy and teacher-forced passkey accuracy per length and per depth bin (one dict per length).

    Prompts of one length all have that length, so they run in batches of max(1, tokens_per_batch // T)
    (tokens_per_batch defaults to the largest length). Dynamic YaRN scales for T + max_new_tokens on every
    forward of a prompt, cached or not.
    """
    check_lengths(tokenizer, lengths, trials=trials, seed=seed, distractors=distractors)  # before the first forward
    prompts = PasskeyPrompts(tokenizer)
    all_trials = sample_trials(trials, seed, distractors)
    tokens_per_batch = tokens_per_batch or max(lengths)
    device = next(model.parameters()).device
    results = []
    with inference(model, autocast_dtype):
        for length in lengths:
            started = time.perf_counter()
            batch_size = max(1, tokens_per_batch // length)
            greedy_correct, forced_correct, key_logprobs = [], [], []
            batches = range(0, trials, batch_size)
            for first in tqdm(batches, desc=f"passkey T={length}", disable=not progress, leave=False):
                batch = all_trials[first : first + batch_size]
                built = [prompts.build(length, trial.key, trial.depth) for trial in batch]
                input_ids = torch.tensor([prompt.token_ids for prompt in built], device=device)
                dynamic_len = length + max_new_tokens

                prefix = prefill(model, input_ids, dynamic_len=dynamic_len)  # the long prompt, run once for both scores
                generated = greedy_generate(model, input_ids, max_new_tokens, dynamic_len=dynamic_len, prefix=prefix)
                for trial, new_tokens in zip(batch, generated.tolist(), strict=True):
                    greedy_correct.append(first_integer(tokenizer.decode(new_tokens)) == trial.key)

                candidates = [[prompts.answer(key) for key in (trial.key, *trial.distractors)] for trial in batch]
                scores = continuation_logprobs(model, input_ids, candidates, dynamic_len=dynamic_len, prefix=prefix)
                forced_correct += (scores[:, 0] > scores[:, 1:].max(dim=1).values).tolist()
                key_logprobs += scores[:, 0].tolist()

            by_depth = []
            for low, high in depth_bins(depth_buckets):
                inside = [i for i, trial in enumerate(all_trials) if low <= trial.depth < high]
                by_depth.append(
                    {
                        "start": low,
                        "end": high,
                        "trials": len(inside),
                        "greedy_accuracy": _accuracy([greedy_correct[i] for i in inside]),
                        "teacher_forced_accuracy": _accuracy([forced_correct[i] for i in inside]),
                    }
                )
            results.append(
                {
                    "length": length,
                    "trials": trials,
                    "greedy_accuracy": _accuracy(greedy_correct),
                    "teacher_forced_accuracy": _accuracy(forced_correct),
                    "mean_key_logprob": float(np.mean(key_logprobs)),
                    "by_depth": by_depth,
                    "wall_time_s": round(time.perf_counter() - started, 3),
                }
            )
    return results
