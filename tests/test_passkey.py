"""Passkey prompts (exact token length, key at the requested depth) and the decoding they rely on: KV-cached
greedy generation equals full recomputation for every PE, and branched-cache continuation scores equal a
direct forward."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fope_lm.errors import ConfigError
from fope_lm.evaluation.passkey import MAX_KEY, PasskeyPrompts, evaluate_passkey, first_integer, sample_trials
from fope_lm.nn.generate import continuation_logprobs, greedy_generate, prefill
from fope_lm.nn.model import build_model
from fope_lm.position import available

from helpers.evaluation import passkey_tokenizer

DECODING_PES = [
    ("nope", {}),
    ("rope", {}),
    ("alibi", {}),
    ("yarn", {"scale": 4.0}),
    ("yarn", {"dynamic": True}),
    ("fope", {}),
    ("fope", {"dynamic": True}),
]


@pytest.mark.parametrize("length", [80, 128, 333, 1024])
@pytest.mark.parametrize("key", [7, 4242, 50000])
def test_prompt_has_exact_length_and_the_key_at_its_depth(length, key):
    prompts = PasskeyPrompts(passkey_tokenizer())
    longest_sentence = max(len(sentence) for sentence in prompts.sentences)
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        prompt = prompts.build(length, key, depth)
        assert len(prompt.token_ids) == length
        key_tokens = prompts.key_sentence(key)
        assert prompt.token_ids[prompt.key_start : prompt.key_start + len(key_tokens)] == key_tokens
        n_filler = length - prompts.fixed_length(key)
        filler_before = prompt.key_start - len(prompts.prefix)
        assert abs(filler_before - depth * n_filler) <= longest_sentence / 2 + 1  # the nearest sentence boundary
        assert prompt.token_ids[: len(prompts.prefix)] == prompts.prefix
        assert prompt.token_ids[-len(prompts.question) :] == prompts.question


def test_prompt_text_reads_as_the_task():
    tokenizer = passkey_tokenizer()
    prompts = PasskeyPrompts(tokenizer)
    prompt = prompts.build(160, 31337, 0.5)
    text = tokenizer.decode(prompt.token_ids, skip_special_tokens=True)
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert " The grass is green. The sky is blue." in text
    assert "The pass key is 31337. Remember it. 31337 is the pass key." in text
    assert text.endswith("What is the pass key? The pass key is")
    # the answer's tokens are the key's tokens inside the key sentence: teacher forcing scores the same pieces
    answer = prompts.answer(31337)
    sentence = prompts.key_sentence(31337)
    assert any(sentence[i : i + len(answer)] == answer for i in range(len(sentence)))
    assert first_integer(tokenizer.decode(answer) + ". Remember") == 31337


def test_prompt_too_short_is_a_config_error():
    prompts = PasskeyPrompts(passkey_tokenizer())
    with pytest.raises(ConfigError, match="shorter than the prompt"):
        prompts.build(prompts.fixed_length(123) - 1, 123, 0.5)


def test_trials_are_seeded_and_distractors_distinct():
    trials = sample_trials(50, seed=3, n_distractors=9)
    assert trials == sample_trials(50, seed=3, n_distractors=9)
    assert trials != sample_trials(50, seed=4, n_distractors=9)
    for trial in trials:
        assert 1 <= trial.key <= MAX_KEY and 0 <= trial.depth < 1
        assert len(set(trial.distractors)) == 9 and trial.key not in trial.distractors
    depths = np.array([trial.depth for trial in trials])
    assert 0.3 < depths.mean() < 0.7


def test_first_integer():
    assert first_integer(" 123. Remember it") == 123
    assert first_integer(" the key is 0042 or 7") == 42
    assert first_integer(" no digits") is None


@pytest.mark.parametrize("pe,options", DECODING_PES, ids=["-".join([pe, *options]) for pe, options in DECODING_PES])
def test_kv_cache_generation_equals_full_recompute(pe, options):
    # max_seq_len 16 < prompt 24 + 10 new tokens: dynamic YaRN scales (s = 34/16) on both paths
    model = build_model("tiny", pe=pe, pe_options=options, vocab_size=300, max_seq_len=16).eval()
    prompts = torch.randint(0, 300, (3, 24))
    cached = greedy_generate(model, prompts, 10, use_cache=True)
    recomputed = greedy_generate(model, prompts, 10, use_cache=False)
    assert cached.shape == (3, 10)
    # argmax of two computations of the same logits: they differ by <= 3.3e-7, and the smallest top-2 gap of these
    # 30 choices is 7.0e-5 (nope; 1.5e-3+ for the others), measured with 1 and 2 threads
    assert torch.equal(cached, recomputed)
    assert cached.max() < 300  # padded vocab rows (300..383) are never emitted


@pytest.mark.parametrize("length", [24, 1])
def test_one_prefill_serves_generation_and_scoring(length):
    # passkey runs the long prompt once: both consumers branch the shared prefix and leave it as it was
    model = build_model("tiny", pe="fope", vocab_size=300, max_seq_len=16).eval()
    prompts = torch.randint(0, 300, (2, length))
    continuations = [[[5, 6], [7]], [[8], [9, 10, 11]]]
    prefix = prefill(model, prompts, dynamic_len=length + 10)
    cached = greedy_generate(model, prompts, 10, dynamic_len=length + 10, prefix=prefix)
    scores = continuation_logprobs(model, prompts, continuations, dynamic_len=length + 10, prefix=prefix)
    assert prefix.length == length - 1
    assert torch.equal(cached, greedy_generate(model, prompts, 10, use_cache=False, dynamic_len=length + 10))
    assert torch.equal(scores, continuation_logprobs(model, prompts, continuations, dynamic_len=length + 10))


def test_dynamic_yarn_scale_is_fixed_per_prompt():
    # Decoding with the default per-step dynamic_len (the growing length) would rescale cached keys: the
    # fixed prompt + new tokens length is what both paths use.
    model = build_model("tiny", pe="yarn", pe_options={"dynamic": True}, vocab_size=300, max_seq_len=16).eval()
    prompts = torch.randint(0, 300, (2, 30))
    hidden_fixed = model.hidden_states(prompts, dynamic_len=40)
    hidden_default = model.hidden_states(prompts)  # dynamic_len 30
    assert not torch.allclose(hidden_fixed, hidden_default)


@pytest.mark.parametrize("pe", available())
def test_continuation_logprobs_equal_a_direct_forward(pe):
    """Every encoding: candidates of unequal lengths, each scored on a branch of one cached prompt, score exactly what
    a fresh forward of prompt + candidate gives (FoX's cached forget gates included: the cache branches all it holds)."""
    model = build_model("tiny", pe=pe, vocab_size=300, max_seq_len=32).eval()
    if pe == "cope":  # its position embeddings start at zero: give them values, so that the cache matters
        for encoding in model.position_encodings():
            torch.nn.init.normal_(encoding.pos_emb)
    prompts = torch.randint(0, 300, (2, 20))
    continuations = [[[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]]
    scores = continuation_logprobs(model, prompts, continuations)
    assert scores.shape == (2, 2)
    for b in range(2):
        for j in range(2):
            tokens = torch.cat((prompts[b], torch.tensor(continuations[b][j])))[None]
            with torch.no_grad():
                logprobs = F.log_softmax(model(tokens).logits[0, :-1], dim=-1)
            targets = tokens[0, 1:]
            expected = logprobs[torch.arange(len(targets)), targets][-len(continuations[b][j]) :].sum()
            assert scores[b, j].item() == pytest.approx(expected.item(), abs=1e-4)


def test_a_branch_extends_its_prefix_without_touching_it():
    model = build_model("tiny", pe="fox", vocab_size=300, max_seq_len=32).eval()
    prefix = prefill(model, torch.randint(0, 300, (1, 12)), dynamic_len=20)
    held = [list(layer) for layer in (prefix.keys, prefix.values, prefix.states)]
    branch = prefix.branch()
    model.hidden_states(torch.randint(0, 300, (1, 3)), start_pos=prefix.length, kv_cache=branch, dynamic_len=20)
    assert branch.length == prefix.length + 3 and branch.states[0].shape[-1] == prefix.length + 3
    assert all(
        a is b
        for before, now in zip(held, (prefix.keys, prefix.values, prefix.states), strict=True)
        for a, b in zip(before, now, strict=True)
    )


def test_passkey_runs_on_a_fox_model():
    tokenizer = passkey_tokenizer()
    model = build_model("tiny", pe="fox", vocab_size=len(tokenizer), max_seq_len=64).eval()
    (row,) = evaluate_passkey(model, tokenizer, [96], trials=3, distractors=2, max_new_tokens=4, depth_buckets=1, progress=False)
    assert row["trials"] == 3 and 0 <= row["teacher_forced_accuracy"] <= 1 and math.isfinite(row["mean_key_logprob"])
