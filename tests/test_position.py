"""Every position encoding against its reference: the official code's fixtures, transformers' YaRN, the
ALiBi paper's slopes, and FoPE's init and reduction-to-RoPE properties."""

import glob
import json
import math
import os

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import _compute_yarn_parameters

from fope_lm.errors import ConfigError
from fope_lm.position import available, build_position_encoding
from fope_lm.position.base import apply_rotary, rope_inv_freq, yarn_frequencies
from fope_lm.position.fope import kept_frequencies, step_eye

from conftest import FIXTURES_DIR

FIXTURES = sorted(glob.glob(os.path.join(FIXTURES_DIR, "*.json")))


def rel_err(ours, ref):
    return float((ours - ref).norm() / ref.norm())


def test_fixtures_found():
    assert len(FIXTURES) >= 3, f"no parity fixtures under {FIXTURES_DIR}"


@pytest.mark.parametrize("fixture", FIXTURES, ids=[os.path.basename(f)[:-5] for f in FIXTURES])
def test_matches_official_fixture(fixture):
    meta = json.load(open(fixture))
    arrays = np.load(fixture[:-5] + ".npz")
    pe = build_position_encoding(
        meta["method"],
        head_dim=meta["head_dim"],
        n_heads=meta["n_heads"],
        max_seq_len=meta["train_max_seq_len"],
        theta=float(meta["rope_theta"]),
    )
    T = meta["eval_seq_len"]
    q_base = torch.from_numpy(arrays["q_base"])
    x = q_base[:, :, torch.arange(T) % meta["input_period"]]
    positions = torch.arange(T)
    if meta["method"] == "fope":
        assert (pe.n_freqs, pe.n_slots) == (meta["n_nonzero_freqs"], meta["n_fourier_slots"])
        pe.rotate(x, positions)  # fill the table cache with the random init; loading must invalidate it
        pe.load_state_dict({"cos_coef": torch.from_numpy(arrays["cos_coef"]), "sin_coef": torch.from_numpy(arrays["sin_coef"])})
        inv_freq = kept_frequencies(meta["head_dim"], meta["rope_theta"], meta["train_max_seq_len"])
    else:
        inv_freq = rope_inv_freq(meta["head_dim"], meta["rope_theta"])
    torch.testing.assert_close(inv_freq, torch.from_numpy(arrays["inv_freq"]), rtol=0, atol=0)

    at = torch.from_numpy(arrays["positions"])
    ref = torch.from_numpy(arrays["out_at_positions"])
    assert int(at.max()) >= 2 * meta["train_max_seq_len"] - 1  # far beyond the training length
    q_rot, k_rot = pe.rotate_qk(x, x.clone(), positions)
    assert rel_err(q_rot[:, :, at], ref) < 1e-4
    assert rel_err(k_rot[:, :, at], ref) < 1e-4
    # gathered (non-contiguous) positions give the same rows as the sliced full table
    assert rel_err(pe.rotate(x[:, :, at], at), ref) < 1e-4


def test_fope_cache_follows_in_place_coefficient_change():
    pe = build_position_encoding("fope", head_dim=64, n_heads=2, max_seq_len=128)
    x = torch.randn(1, 2, 300, 64)
    before = pe.rotate(x, torch.arange(300))
    with torch.no_grad():
        pe.cos_coef.mul_(2.0)
    after = pe.rotate(x, torch.arange(300))
    fresh = build_position_encoding("fope", head_dim=64, n_heads=2, max_seq_len=128)
    fresh.load_state_dict(pe.state_dict())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh.rotate(x, torch.arange(300)))


@pytest.mark.parametrize("head_dim,length,expected", [(64, 512, 16), (64, 1024, 18), (128, 512, 31), (128, 1024, 36)])
def test_fope_kept_frequencies(head_dim, length, expected):
    freqs = kept_frequencies(head_dim, 10000.0, length)
    assert freqs.numel() == expected
    assert bool((freqs >= 2 * math.pi / length).all())
    assert freqs.numel() == rope_inv_freq(head_dim, 10000.0).numel() or rope_inv_freq(head_dim, 10000.0)[expected] < 2 * math.pi / length


@pytest.mark.parametrize("preset_shape,sigma", [((64, 8), 0.3), ((128, 8), 0.4), ((128, 16), 0.6)], ids=["60m", "180m", "1b"])
@pytest.mark.parametrize("length", [512, 1024])
def test_fope_init_statistics(preset_shape, sigma, length):
    head_dim, n_heads = preset_shape
    torch.manual_seed(1)
    layers = [build_position_encoding("fope", head_dim=head_dim, n_heads=n_heads, max_seq_len=length, sigma=sigma) for _ in range(4)]
    K, d_out = layers[0].n_freqs, layers[0].n_slots
    assert d_out == min(K, head_dim // 4)
    eye = step_eye(K, d_out)
    if K == d_out:
        torch.testing.assert_close(eye, torch.eye(K))
    else:
        step = math.ceil(K / d_out)
        assert all(eye[j * step, j] == 1 for j in range(d_out) if j * step < K)
        assert eye.sum() == sum(1 for j in range(d_out) if j * step < K)
    expected_std = sigma * math.sqrt(2 / (d_out * (K + n_heads)))
    noise = torch.stack([layer.cos_coef - eye for layer in layers] + [layer.sin_coef - eye for layer in layers])
    assert abs(noise.std().item() / expected_std - 1) < 0.05  # ~16k samples: std error ~0.6%
    assert abs(noise.mean().item()) < 3 * expected_std / math.sqrt(noise.numel()) * 3
    # independent draws per layer and per tensor; frozen buffers, saved in the state_dict
    assert not torch.equal(layers[0].cos_coef, layers[1].cos_coef)
    assert not torch.equal(layers[0].cos_coef, layers[0].sin_coef)
    assert set(layers[0].state_dict()) == {"cos_coef", "sin_coef"}
    assert list(layers[0].parameters()) == []


def test_fope_identity_coefficients_reduce_to_rope_on_kept_frequencies():
    head_dim, n_heads, length, T = 64, 3, 512, 1500
    pe = build_position_encoding("fope", head_dim=head_dim, n_heads=n_heads, max_seq_len=length)
    assert pe.n_freqs == pe.n_slots == 16
    pe.load_state_dict(
        {"cos_coef": torch.eye(16).expand(n_heads, 16, 16).clone(), "sin_coef": torch.eye(16).expand(n_heads, 16, 16).clone()}
    )
    x = torch.randn(2, n_heads, T, head_dim)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), kept_frequencies(head_dim, 10000.0, length))
    pad = torch.ones(T, head_dim // 2 - 16)
    expected = apply_rotary(x, torch.cat((angles.cos(), pad), -1), torch.cat((angles.sin(), pad), -1))
    assert rel_err(pe.rotate(x, torch.arange(T)), expected) < 1e-6
    # and on the kept pairs exactly RoPE: compare channel pairs j < 16 with plain RoPE
    rope = build_position_encoding("rope", head_dim=head_dim, n_heads=n_heads, max_seq_len=length)
    ours, theirs = pe.rotate(x, torch.arange(T)), rope.rotate(x, torch.arange(T))
    kept = torch.cat((torch.arange(16), torch.arange(32, 48)))
    torch.testing.assert_close(ours[..., kept], theirs[..., kept], rtol=1e-5, atol=1e-5)


def test_fope_pad_value_option():
    pe = build_position_encoding("fope", head_dim=64, n_heads=1, max_seq_len=512, pad_value=0.0)
    x = torch.randn(1, 1, 10, 64)
    y = pe.rotate(x, torch.arange(10))
    assert torch.count_nonzero(y[..., 16:32]) == 0 and torch.count_nonzero(y[..., 48:]) == 0


def test_fope_learnable_coefficients_get_gradients_and_skip_the_cache():
    pe = build_position_encoding("fope", head_dim=32, n_heads=2, max_seq_len=64, learnable=True)
    assert {name for name, _ in pe.named_parameters()} == {"cos_coef", "sin_coef"}
    x = torch.randn(1, 2, 40, 32)
    pe.rotate(x, torch.arange(40)).square().sum().backward()
    assert pe.cos_coef.grad.abs().sum() > 0 and pe.sin_coef.grad.abs().sum() > 0
    assert pe._cache is None


def test_fope_transfer_state_copies_corner_and_warns_on_zero_filled_slots():
    src = build_position_encoding("fope", head_dim=64, n_heads=4, max_seq_len=512)  # K=16, d_out=16
    dst = build_position_encoding("fope", head_dim=64, n_heads=4, max_seq_len=1024)  # K=18, d_out=16
    notes = dst.transfer_state(src.state_dict())
    assert dst.cos_coef.shape == (4, 18, 16)
    torch.testing.assert_close(dst.cos_coef[:, :16, :16], src.cos_coef)
    assert torch.count_nonzero(dst.cos_coef[:, 16:]) == 0
    assert notes and not any("zero-filled" in n for n in notes)  # d_out did not grow: no dead pairs
    # head_dim 128: d_out grows from 31 (L=512) to 32 (L=1024): slot 31 would become c = s = 0
    src = build_position_encoding("fope", head_dim=128, n_heads=2, max_seq_len=512)
    dst = build_position_encoding("fope", head_dim=128, n_heads=2, max_seq_len=1024)
    with pytest.warns(UserWarning, match="zero-filled"):
        dst.transfer_state(src.state_dict())
    assert torch.count_nonzero(dst.sin_coef[:, :, 31]) == 0
    expanded = build_position_encoding("fope", head_dim=128, n_heads=2, max_seq_len=1024)
    fresh_col = expanded.sin_coef[:, :, 31].clone()
    expanded.transfer_state(src.state_dict(), expand=True)
    torch.testing.assert_close(expanded.sin_coef[:, :31, :31], src.sin_coef)
    torch.testing.assert_close(expanded.sin_coef[:, :, 31], fresh_col)


def hf_yarn(head_dim, n_heads, L0, scale, attention_factor=None, theta=10000.0):
    params = {"rope_type": "yarn", "factor": scale, "original_max_position_embeddings": L0, "rope_theta": theta}
    if attention_factor is not None:
        params["attention_factor"] = attention_factor
    config = LlamaConfig(
        hidden_size=head_dim * n_heads,
        num_attention_heads=n_heads,
        max_position_embeddings=int(scale * L0),
        rope_parameters=params,
    )
    return _compute_yarn_parameters(config, "cpu")


@pytest.mark.parametrize("head_dim,L0,scale", [(64, 512, 2.0), (64, 512, 16.0), (128, 1024, 4.0), (32, 128, 8.0), (128, 2048, 32.0)])
def test_yarn_matches_transformers(head_dim, L0, scale):
    ref_freq, ref_factor = hf_yarn(head_dim, 4, L0, scale)
    pe = build_position_encoding("yarn", head_dim=head_dim, n_heads=4, max_seq_len=L0, scale=scale)
    torch.testing.assert_close(pe.inv_freq(), ref_freq.float(), rtol=1e-6, atol=0)
    assert pe.attention_factor() == pytest.approx(ref_factor, rel=1e-9)
    # an explicit factor (the paper's runs use 1.0) is passed through
    ref_freq, ref_factor = hf_yarn(head_dim, 4, L0, scale, attention_factor=1.0)
    pe = build_position_encoding("yarn", head_dim=head_dim, n_heads=4, max_seq_len=L0, scale=scale, attention_factor=1.0)
    assert pe.attention_factor() == ref_factor == 1.0
    # and the table is cos/sin(t * w') times the factor
    cos, sin = pe.cos_sin(torch.arange(3 * L0), device=torch.device("cpu"), dtype=torch.float32)
    angles = torch.outer(torch.arange(3 * L0, dtype=torch.float32), ref_freq.float())
    torch.testing.assert_close(cos[0], angles.cos(), rtol=1e-5, atol=1e-5)


def test_yarn_dynamic_scale_per_length():
    L0 = 128
    pe = build_position_encoding("yarn", head_dim=64, n_heads=2, max_seq_len=L0, dynamic=True)
    rope = build_position_encoding("rope", head_dim=64, n_heads=2, max_seq_len=L0)
    x = torch.randn(1, 2, 512, 64)
    # within L0 the dynamic scale is 1: plain RoPE
    torch.testing.assert_close(pe.rotate(x[:, :, :100], torch.arange(100)), rope.rotate(x[:, :, :100], torch.arange(100)))
    # at T = 512 it is s = 4
    ref_freq, ref_factor = hf_yarn(64, 2, L0, 4.0)
    static = build_position_encoding("yarn", head_dim=64, n_heads=2, max_seq_len=L0, scale=4.0)
    torch.testing.assert_close(pe.rotate(x, torch.arange(512)), static.rotate(x, torch.arange(512)))
    # a cached decode step fixes s from the final length, not from its own position
    step = pe.rotate(x[:, :, 200:201], torch.tensor([200]), dynamic_len=512)
    torch.testing.assert_close(step, static.rotate(x, torch.arange(512))[:, :, 200:201])


def test_fope_yarn_rescales_kept_frequencies_and_whole_table():
    head_dim, L, L0, scale = 64, 1024, 512, 16.0
    pe = build_position_encoding("fope", head_dim=head_dim, n_heads=2, max_seq_len=L, scale=scale, original_max_seq_len=L0)
    freqs, factor = pe.frequencies()
    kept = kept_frequencies(head_dim, 10000.0, L)  # the floor uses the run's own L
    expected = yarn_frequencies(kept, head_dim=head_dim, theta=10000.0, scale=scale, original_max_seq_len=L0)
    torch.testing.assert_close(freqs, expected)
    assert factor == pytest.approx(0.1 * math.log(scale) + 1)
    cos, sin = pe.cos_sin(torch.arange(10), device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(cos[..., pe.n_slots :], torch.full_like(cos[..., pe.n_slots :], factor))  # pads scaled too


def test_alibi_slopes_match_the_paper():
    def slopes(n):
        return build_position_encoding("alibi", head_dim=16, n_heads=n, max_seq_len=64).slopes.tolist()

    assert slopes(8) == pytest.approx([2.0**-h for h in range(1, 9)])
    assert slopes(16) == pytest.approx([2.0 ** (-h / 2) for h in range(1, 17)])
    assert slopes(12) == pytest.approx([2.0**-h for h in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5])


def test_alibi_bias_favours_near_keys():
    pe = build_position_encoding("alibi", head_dim=16, n_heads=4, max_seq_len=64)
    bias = pe.attention_bias(torch.arange(10), torch.arange(10))
    assert bias.dtype == torch.float32 and bias.shape == (4, 10, 10)
    row = bias[:, 9, :]  # query 9 over keys 0..9: strictly increasing towards the query
    assert bool((row[:, 1:] > row[:, :-1]).all())
    assert torch.equal(row[:, 9], torch.zeros(4))
    torch.testing.assert_close(bias[0, 9, 0], torch.tensor(-9 * 0.25))  # 4 heads: m_1 = 2^-2


def test_rope_logits_depend_only_on_relative_position():
    pe = build_position_encoding("rope", head_dim=32, n_heads=1, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def logit(i, j):
        return (pe.rotate(q, torch.tensor([i])) * pe.rotate(k, torch.tensor([j]))).sum()

    torch.testing.assert_close(logit(10, 3), logit(1000, 993), rtol=1e-4, atol=1e-4)


def test_rotation_with_offset_equals_slice_of_full_sequence():
    for name in ("rope", "fope", "yarn"):
        pe = build_position_encoding(name, head_dim=32, n_heads=2, max_seq_len=64)
        x = torch.randn(1, 2, 200, 32)
        full = pe.rotate(x, torch.arange(200))
        torch.testing.assert_close(pe.rotate(x[:, :, 150:], torch.arange(150, 200)), full[:, :, 150:])


def test_bf16_tables_use_float32_angles():
    pe = build_position_encoding("rope", head_dim=64, n_heads=1, max_seq_len=64)
    x = torch.randn(1, 1, 4096, 64)
    exact = pe.rotate(x, torch.arange(4096))
    half = pe.rotate(x.bfloat16(), torch.arange(4096))
    assert half.dtype == torch.bfloat16
    # bf16 angles would be off by whole radians at t ~ 4000; float32 angles leave only bf16 rounding
    assert (half.float() - exact).abs().max() < 0.05


def test_tables_are_cached_and_grow():
    pe = build_position_encoding("rope", head_dim=32, n_heads=1, max_seq_len=64)
    x = torch.randn(1, 1, 64, 32)
    pe.rotate(x, torch.arange(64))
    first = pe._cache[2]
    pe.rotate(x, torch.arange(64))
    assert pe._cache[2] is first  # reused, not rebuilt
    pe.rotate(torch.randn(1, 1, 300, 32), torch.arange(300))
    assert pe._cache[1] >= 300


def test_registry_errors_name_the_problem():
    assert set(available()) >= {"nope", "rope", "alibi", "yarn", "fope"}
    with pytest.raises(ConfigError, match="unknown position encoding 'ropee'; choose one of: " + ", ".join(available())):
        build_position_encoding("ropee", head_dim=32, n_heads=2, max_seq_len=64)
    with pytest.raises(ConfigError, match="'rope' has no option.*sigma"):
        build_position_encoding("rope", head_dim=32, n_heads=2, max_seq_len=64, sigma=0.3)
    with pytest.raises(ConfigError, match="'fope' has no option.*scael"):
        build_position_encoding("fope", head_dim=32, n_heads=2, max_seq_len=64, scael=2)
