"""Helpers shared by the eval tests: a small tokenizer, a briefly trained tiny checkpoint and a prepared dataset.

Plain functions (the test modules wrap them in fixtures), so nothing here runs at import.
"""

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast

from fope_lm.data import prepare
from fope_lm.evaluation.passkey import FILLER_SENTENCES, KEY_SENTENCE, QUESTION, TASK, PasskeyPrompts
from fope_lm.nn.model import Transformer, build_model

TRAIN_LEN = 128
EOS = "<|endoftext|>"


@functools.cache
def passkey_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (like the embedded corpus's) trained on the passkey sentences. Its corpus has no digits,
    so every digit stays one token: keys are short sequences over 10 tokens, which a tiny model learns to copy."""
    corpus = [TASK, *FILLER_SENTENCES, KEY_SENTENCE.format(key=""), QUESTION] * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, clean_up_tokenization_spaces=False)


def passkey_documents(n: int, seed: int, length: int = TRAIN_LEN + 1) -> list[list[int]]:
    """Passkey prompts followed by their answer, `length` tokens each, with random keys and depths."""
    prompts, rng = PasskeyPrompts(passkey_tokenizer()), np.random.default_rng(seed)
    documents = []
    for _ in range(n):
        key = int(rng.integers(1, 50001))
        answer = prompts.answer(key)
        documents.append(prompts.build(length - len(answer), key, float(rng.uniform())).token_ids + answer)
    return documents


def train_passkey_model(pe: str = "rope", steps: int = 150, batch_size: int = 16, seed: int = 0) -> Transformer:
    """A tiny model trained at length TRAIN_LEN on passkey documents: the language-model loss plus the mean loss of
    the answer tokens. The filler is learned in a few steps; the extra answer term is what makes copying (the skill
    under test) appear within a couple of hundred steps."""
    torch.manual_seed(seed)
    model = build_model("tiny", pe=pe, vocab_size=len(passkey_tokenizer()), max_seq_len=TRAIN_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    n_answer = len(PasskeyPrompts(passkey_tokenizer()).answer(50000))  # the longest answer: a space and 5 digits
    for step in range(steps):
        documents = torch.tensor(passkey_documents(batch_size, seed=seed * 100_000 + step))
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20)  # short warmup
        logits = model(documents[:, :-1]).logits
        token_losses = F.cross_entropy(logits.transpose(1, 2), documents[:, 1:], reduction="none")  # (B, T)
        loss = token_losses.mean() + token_losses[:, -n_answer:].mean()  # the answer (short keys: + the question's end)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def prepare_passkey_data(root: Path, tokenizer_dir: Path | None = None) -> dict:
    """A prepared dataset (the data layer's format) of passkey documents in the tokenizer above (or a saved copy of
    it, e.g. an imported model's tokenizer/); returns its data config, as configs/data/*.yaml would give it."""
    tokenizer = passkey_tokenizer()
    if tokenizer_dir is None:
        tokenizer_dir = root / "tokenizer-src"
        tokenizer.save_pretrained(tokenizer_dir)
    paths = {}
    for split, n, seed in (("train", 40, 1), ("validation", 60, 2)):
        path = root / f"{split}.jsonl"
        documents = passkey_documents(n, seed, length=300)
        texts = [tokenizer.decode(document, skip_special_tokens=True) for document in documents]
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        paths[split] = [str(path)]
    data_cfg = {"name": "passkey-text", "source": "files", "root": str(root), "paths": paths}
    data_cfg["tokenizer"] = str(tokenizer_dir)
    prepare(data_cfg)
    return data_cfg


class InductionOracle(nn.Module):
    """A stand-in for a model in the evaluation code (hidden_states + lm_head): at each position it predicts, with
    certainty, the token that followed the previous occurrence of the current token, and is uniform when the token
    has not occurred before in its window. On a sequence that repeats a block of distinct tokens, its loss is
    exactly ln(V) on a block's first sight and ~0 after: longer context lowers the loss by construction, on any
    hardware, with no training."""

    def __init__(self, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, padded_vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.lm_head = nn.Linear(vocab_size, vocab_size, bias=False)
        nn.init.eye_(self.lm_head.weight)

    def hidden_states(self, input_ids: torch.Tensor, **_) -> torch.Tensor:
        T = input_ids.shape[1]
        earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)  # s < t
        same = (input_ids[:, :, None] == input_ids[:, None, :]) & earlier  # (B, t, s): token t seen at s
        last = torch.where(same, torch.arange(T), -1).amax(-1)  # the latest such s, or -1
        follower = input_ids.gather(1, (last + 1).clamp(max=T - 1))
        return 50.0 * F.one_hot(follower, self.config.vocab_size).float() * (last >= 0)[..., None]


def repeated_block(block: int, repeats: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """`repeats` copies of one block of `block` distinct random tokens."""
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))[:block].repeat(repeats)
