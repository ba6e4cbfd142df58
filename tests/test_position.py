"""Every position encoding against its reference: the official code's fixtures, transformers' YaRN, the
ALiBi paper's slopes, FoPE's init and reduction-to-RoPE properties; and the ablation encodings and controls (FoPE
switches, rope_clip, p-RoPE, partial RoPE, KERPLE-log) against their reductions to RoPE/NoPE."""

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, _compute_yarn_parameters

from fope_lm.errors import ConfigError
from fope_lm.nn.attention import causal_attention
from fope_lm.nn.kv_cache import KVCache
from fope_lm.nn.model import build_model
from fope_lm.position import Positions, available, build_position_encoding
from fope_lm.position.base import apply_rotary, rope_inv_freq
from fope_lm.position.fope import kept_frequencies, step_eye
from fope_lm.position.scaling import ScalingOptions

from conftest import FIXTURES_DIR, REPO
from helpers.models import dense_attention, rotate, tiny

FIXTURES = sorted(glob.glob(os.path.join(FIXTURES_DIR, "*.json")))
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: OpenMP threads only slow them down


def rel_err(ours, ref):
    return float((ours - ref).norm() / ref.norm())


def test_fixtures_found():
    assert len(FIXTURES) >= 3, f"no parity fixtures under {FIXTURES_DIR}"


@pytest.mark.parametrize("fixture", FIXTURES, ids=[os.path.basename(f)[:-5] for f in FIXTURES])
def test_matches_official_fixture(fixture):
    meta = json.loads(Path(fixture).read_text())
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
        rotate(pe, x, positions)  # tables come from the coefficients at every forward: loading new ones must take effect
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
    assert rel_err(rotate(pe, x[:, :, at], at), ref) < 1e-4


def test_fope_tables_follow_an_in_place_coefficient_change():
    pe = build_position_encoding("fope", head_dim=64, n_heads=2, max_seq_len=128)
    x = torch.randn(1, 2, 300, 64)
    before = rotate(pe, x, torch.arange(300))
    with torch.no_grad():
        pe.cos_coef.mul_(2.0)
    after = rotate(pe, x, torch.arange(300))
    fresh = build_position_encoding("fope", head_dim=64, n_heads=2, max_seq_len=128)
    fresh.load_state_dict(pe.state_dict())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, rotate(fresh, x, torch.arange(300)))


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
    if d_out == K:
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
    assert rel_err(rotate(pe, x, torch.arange(T)), expected) < 1e-6
    # and on the kept pairs exactly RoPE: compare channel pairs j < 16 with plain RoPE
    rope = build_position_encoding("rope", head_dim=head_dim, n_heads=n_heads, max_seq_len=length)
    ours, theirs = rotate(pe, x, torch.arange(T)), rotate(rope, x, torch.arange(T))
    kept = torch.cat((torch.arange(16), torch.arange(32, 48)))
    torch.testing.assert_close(ours[..., kept], theirs[..., kept], rtol=1e-5, atol=1e-5)


def test_fope_pad_value_option():
    pe = build_position_encoding("fope", head_dim=64, n_heads=1, max_seq_len=512, pad_value=0.0)
    x = torch.randn(1, 1, 10, 64)
    y = rotate(pe, x, torch.arange(10))
    assert torch.count_nonzero(y[..., 16:32]) == 0 and torch.count_nonzero(y[..., 48:]) == 0


def test_fope_learnable_coefficients_get_gradients():
    pe = build_position_encoding("fope", head_dim=32, n_heads=2, max_seq_len=64, learnable=True)
    assert {name for name, _ in pe.named_parameters()} == {"cos_coef", "sin_coef"}
    x = torch.randn(1, 2, 40, 32)
    rotate(pe, x, torch.arange(40)).square().sum().backward()
    assert pe.cos_coef.grad.abs().sum() > 0 and pe.sin_coef.grad.abs().sum() > 0


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
    assert pe.frequencies()[1] == pytest.approx(ref_factor, rel=1e-9)
    # an explicit factor (the paper's runs use 1.0) is passed through
    ref_freq, ref_factor = hf_yarn(head_dim, 4, L0, scale, attention_factor=1.0)
    pe = build_position_encoding("yarn", head_dim=head_dim, n_heads=4, max_seq_len=L0, scale=scale, attention_factor=1.0)
    assert pe.frequencies()[1] == ref_factor == 1.0
    # and the table is cos/sin(t * w') times the factor
    cos, sin = pe.cos_sin(torch.arange(3 * L0), device=torch.device("cpu"), dtype=torch.float32)
    angles = torch.outer(torch.arange(3 * L0, dtype=torch.float32), ref_freq.float())
    torch.testing.assert_close(cos[0], angles.cos(), rtol=1e-5, atol=1e-5)


def hf_rope(rope_type: str, head_dim: int, L0: int, scale: float, seq_len: int | None = None, theta: float = 10000.0):
    """transformers' inverse frequencies and attention factor for a rope type, on a LlamaConfig."""
    params = {"rope_type": rope_type, "factor": scale, "rope_theta": theta}
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=L0, rope_parameters=params)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("head_dim,L0,scale", [(64, 512, 2.0), (64, 512, 16.0), (128, 1024, 4.0), (32, 128, 8.0)])
def test_linear_and_dynamic_ntk_match_transformers(head_dim, L0, scale):
    linear = build_position_encoding("rope", head_dim=head_dim, n_heads=4, max_seq_len=L0, scaling="linear", scale=scale)
    ref_freq, ref_factor = hf_rope("linear", head_dim, L0, scale)
    torch.testing.assert_close(linear.inv_freq(), ref_freq.float(), rtol=1e-6, atol=0)
    assert linear.frequencies()[1] == ref_factor == 1.0
    dynamic = build_position_encoding("rope", head_dim=head_dim, n_heads=4, max_seq_len=L0, scaling="dynamic_ntk", scale=scale)
    for seq_len in (L0 // 2, L0, 3 * L0, 16 * L0):  # transformers takes max(seq_len, L0), as we do
        ref_freq, _ = hf_rope("dynamic", head_dim, L0, scale, seq_len=seq_len)
        torch.testing.assert_close(dynamic.inv_freq(seq_len), ref_freq.float(), rtol=1e-5, atol=0)
    ntk = build_position_encoding("rope", head_dim=head_dim, n_heads=4, max_seq_len=L0, scaling="ntk", scale=scale)
    torch.testing.assert_close(ntk.inv_freq(), rope_inv_freq(head_dim, 10000.0 * scale ** (head_dim / (head_dim - 2))))
    abf = build_position_encoding("rope", head_dim=head_dim, n_heads=4, max_seq_len=L0, scaling="abf", base=500000.0)
    torch.testing.assert_close(abf.inv_freq(), rope_inv_freq(head_dim, 500000.0), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["rope_clip", "p_rope", "partial_rope", "fope"])
def test_every_rotary_encoding_takes_every_scaling(name):
    """The scaling acts on the encoding's own frequencies: the clipped / dropped pairs stay at zero, partial RoPE
    scales its rot_dim frequencies, FoPE its K kept ones."""
    plain = build_position_encoding(name, head_dim=64, n_heads=2, max_seq_len=128)
    own = plain.inv_freq()
    for method, options in (("linear", {"scale": 4.0}), ("yarn", {"scale": 4.0}), ("ntk", {"scale": 4.0}), ("abf", {"base": 1e6})):
        scaled = build_position_encoding(name, head_dim=64, n_heads=2, max_seq_len=128, scaling=method, **options)
        freqs = scaled.inv_freq()
        assert freqs.shape == own.shape and torch.equal(freqs == 0, own == 0), method
        assert (freqs <= own).all() and (freqs < own).any(), method  # every method lowers frequencies
    x = torch.randn(1, 2, 256, 64)
    scaled = build_position_encoding(name, head_dim=64, n_heads=2, max_seq_len=128, scaling="linear", scale=4.0)
    if name == "fope":
        scaled.load_state_dict(plain.state_dict())
    # position interpolation is RoPE at positions / s: rotating at 4t under PI equals rotating at t unscaled
    torch.testing.assert_close(rotate(scaled, x, torch.arange(256) * 4), rotate(plain, x, torch.arange(256)), rtol=1e-4, atol=1e-4)


def test_scaling_options_are_checked():
    for options, words in (
        ({"scaling": "rotate"}, "is not one of"),
        ({"scaling": "linear", "dynamic": True}, "dynamic=true is YaRN's"),
        ({"scaling": "abf"}, "takes the new base"),
        ({"scaling": "linear", "scale": 0.5}, "scale must be >= 1"),
    ):
        with pytest.raises(ValueError, match=words):
            build_position_encoding("rope", head_dim=64, n_heads=2, max_seq_len=128, **options)
    assert build_position_encoding("rope", head_dim=64, n_heads=2, max_seq_len=128, scale=4.0).scaling.method == "yarn"  # the default
    assert build_position_encoding("fope", head_dim=64, n_heads=2, max_seq_len=128).scaling.method == "none"


def test_yarn_dynamic_scale_per_length():
    L0 = 128
    pe = build_position_encoding("yarn", head_dim=64, n_heads=2, max_seq_len=L0, dynamic=True)
    rope = build_position_encoding("rope", head_dim=64, n_heads=2, max_seq_len=L0)
    x = torch.randn(1, 2, 512, 64)
    # within L0 the dynamic scale is 1: plain RoPE
    torch.testing.assert_close(rotate(pe, x[:, :, :100], torch.arange(100)), rotate(rope, x[:, :, :100], torch.arange(100)))
    # at T = 512 it is s = 4
    ref_freq, ref_factor = hf_yarn(64, 2, L0, 4.0)
    static = build_position_encoding("yarn", head_dim=64, n_heads=2, max_seq_len=L0, scale=4.0)
    torch.testing.assert_close(rotate(pe, x, torch.arange(512)), rotate(static, x, torch.arange(512)))
    # a cached decode step fixes s from the final length, not from its own position
    step = rotate(pe, x[:, :, 200:201], torch.tensor([200]), dynamic_len=512)
    torch.testing.assert_close(step, rotate(static, x, torch.arange(512))[:, :, 200:201])


def test_fope_yarn_rescales_kept_frequencies_and_whole_table():
    head_dim, L, L0, scale = 64, 1024, 512, 16.0
    pe = build_position_encoding("fope", head_dim=head_dim, n_heads=2, max_seq_len=L, scale=scale, original_max_seq_len=L0)
    freqs, factor = pe.frequencies()
    kept = kept_frequencies(head_dim, 10000.0, L)  # the floor uses the run's own L
    yarn = ScalingOptions(method="yarn", scale=scale, original_max_seq_len=L0).build(max_seq_len=L)
    expected, _ = yarn.rescale(kept, dim=head_dim, theta=10000.0, length=None)
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
        return (rotate(pe, q, torch.tensor([i])) * rotate(pe, k, torch.tensor([j]))).sum()

    torch.testing.assert_close(logit(10, 3), logit(1000, 993), rtol=1e-4, atol=1e-4)


def test_rotation_with_offset_equals_slice_of_full_sequence():
    for name in ("rope", "fope", "yarn"):
        pe = build_position_encoding(name, head_dim=32, n_heads=2, max_seq_len=64)
        x = torch.randn(1, 2, 200, 32)
        full = rotate(pe, x, torch.arange(200))
        torch.testing.assert_close(rotate(pe, x[:, :, 150:], torch.arange(150, 200)), full[:, :, 150:])


def test_bf16_tables_use_float32_angles():
    pe = build_position_encoding("rope", head_dim=64, n_heads=1, max_seq_len=64)
    x = torch.randn(1, 1, 4096, 64)
    exact = rotate(pe, x, torch.arange(4096))
    half = rotate(pe, x.bfloat16(), torch.arange(4096))
    assert half.dtype == torch.bfloat16
    # bf16 angles would be off by whole radians at t ~ 4000; float32 angles leave only bf16 rounding
    assert (half.float() - exact).abs().max() < 0.05


def test_tables_are_a_function_of_the_positions():
    """No table state: a KV step's table (positions 200..299 given as a range) is the slice of the full one, and a
    per-token (B, T) table gathers the same rows for each sequence."""
    for name in ("rope", "fope", "partial_rope"):
        pe = build_position_encoding(name, head_dim=32, n_heads=2, max_seq_len=64)
        full = pe.cos_sin(torch.arange(300), device=torch.device("cpu"), dtype=torch.float32)
        step = pe.cos_sin(Positions(200, 100), device=torch.device("cpu"), dtype=torch.float32)
        per_token = torch.stack((torch.arange(200, 300), torch.arange(100).flip(0)))
        gathered = pe.cos_sin(per_token, device=torch.device("cpu"), dtype=torch.float32)
        for table, step_table, gathered_table in zip(full, step, gathered, strict=True):
            torch.testing.assert_close(step_table, table[..., 200:, :], rtol=0, atol=0)
            torch.testing.assert_close(gathered_table[0], table[..., 200:, :], rtol=0, atol=0)
            torch.testing.assert_close(gathered_table[1], table[..., :100, :].flip(-2), rtol=0, atol=0)
        assert not list(pe.buffers()) or name == "fope"  # only FoPE's coefficients are state


def test_registry_errors_name_the_problem():
    assert set(available()) >= {"nope", "rope", "alibi", "yarn", "fope"}
    with pytest.raises(ConfigError, match="unknown position encoding 'ropee'; choose one of: " + ", ".join(available())):
        build_position_encoding("ropee", head_dim=32, n_heads=2, max_seq_len=64)
    with pytest.raises(ConfigError, match="'rope' has no option.*sigma"):
        build_position_encoding("rope", head_dim=32, n_heads=2, max_seq_len=64, sigma=0.3)
    with pytest.raises(ConfigError, match="'fope' has no option.*scael"):
        build_position_encoding("fope", head_dim=32, n_heads=2, max_seq_len=64, scael=2)


# --- the ablation encodings and controls: FoPE switches, rope_clip, p-RoPE, partial RoPE, KERPLE-log ---------
NEW_PES = ["rope_clip", "p_rope", "partial_rope", "kerple_log", "fire", "cope", "fox", "fox_rope", "resonance_rope"]


NEW_CONFIGS = NEW_PES + ["fope_noclip", "fope_nomix", "fope_learnable", "fope_pad0", "fope_nocap"]


def pe(name, head_dim=64, n_heads=2, max_seq_len=512, **options):
    return build_position_encoding(name, head_dim=head_dim, n_heads=n_heads, max_seq_len=max_seq_len, **options)


def pair_channels(pairs, head_dim):
    """Channel indices of half-split pairs j: (j, j + head_dim/2)."""
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    return torch.cat((pairs, pairs + head_dim // 2))


def logits(encoding, q, k):
    positions = torch.arange(q.shape[2])
    q, k = encoding.rotate_qk(q, k, positions)
    return q @ k.transpose(-1, -2)


@pytest.mark.parametrize(
    "length,options",
    [(512, {}), (1024, {}), (512, {"clip": False}), (1024, {"slot_cap": False})],
    ids=["K=d_out", "step-eye", "noclip", "nocap"],
)
def test_fope_nomix_equals_fope_with_E_loaded(length, options):
    nomix = pe("fope", max_seq_len=length, mix=False, **options)
    mixed = pe("fope", max_seq_len=length, **options)
    eye = step_eye(nomix.n_freqs, nomix.n_slots)
    assert torch.equal(nomix.cos_coef, eye.expand_as(nomix.cos_coef)) and torch.equal(nomix.sin_coef, nomix.cos_coef)
    assert not torch.allclose(mixed.cos_coef, nomix.cos_coef)  # the default mixes
    x, positions = torch.randn(2, 2, 1200, 64), torch.arange(1200)
    rotate(mixed, x, positions)  # the random init's tables must not outlive the load
    mixed.load_state_dict({"cos_coef": eye.expand_as(mixed.cos_coef).clone(), "sin_coef": eye.expand_as(mixed.sin_coef).clone()})
    torch.testing.assert_close(rotate(nomix, x, positions), rotate(mixed, x, positions), rtol=0, atol=0)
    # padding kept: the pairs beyond the slots get c = s = 1, i.e. x + rot(x)
    pad = pair_channels(range(nomix.n_slots, 32), 64)
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(rotate(nomix, x, positions)[..., pad], torch.cat((x1 - x2, x2 + x1), -1)[..., pad])


def test_fope_nomix_step_eye_leaves_slots_without_a_frequency_dead():
    # head_dim 64 at L = 1024: K = 18, d_out = 16, step ceil(18/16) = 2, so E[2j, j] = 1 only for j < 9
    nomix = pe("fope", max_seq_len=1024, mix=False)
    assert (nomix.n_freqs, nomix.n_slots) == (18, 16)
    cos, sin = nomix.cos_sin(torch.arange(100), device=torch.device("cpu"), dtype=torch.float32)
    angles = torch.outer(torch.arange(100, dtype=torch.float32), kept_frequencies(64, 10000.0, 1024))
    torch.testing.assert_close(cos[0, :, :9], angles[:, 0:18:2].cos())
    assert torch.count_nonzero(cos[:, :, 9:16]) == 0 and torch.count_nonzero(sin[:, :, 9:16]) == 0


@pytest.mark.parametrize("head_dim,length", [(64, 512), (64, 2048), (128, 512)])
def test_fope_noclip_keeps_every_frequency_and_the_slot_cap(head_dim, length):
    noclip = pe("fope", head_dim=head_dim, max_seq_len=length, clip=False)
    assert noclip.n_freqs == head_dim // 2  # K
    assert noclip.n_slots == min(noclip.n_freqs, head_dim // 4)  # d_out
    assert noclip.cos_coef.shape == (2, head_dim // 2, head_dim // 4)
    torch.testing.assert_close(noclip.frequencies()[0], rope_inv_freq(head_dim, 10000.0), rtol=0, atol=0)
    assert noclip.rotary_frequencies().min() < 2 * math.pi / length  # sub-floor frequencies are in the series
    nocap = pe("fope", head_dim=head_dim, max_seq_len=length, clip=False, slot_cap=False)
    assert nocap.n_slots == nocap.n_freqs == head_dim // 2
    capped = pe("fope", head_dim=head_dim, max_seq_len=length, slot_cap=False)
    assert capped.n_slots == capped.n_freqs == kept_frequencies(head_dim, 10000.0, length).numel()
    assert "no-clip" in repr(noclip) and "no-slot-cap" in repr(capped)


def test_fope_with_every_switch_off_is_rope():
    # all frequencies, identity coefficients, one slot per pair (no padding): exactly RoPE
    fope = pe("fope", n_heads=3, clip=False, mix=False, slot_cap=False)
    x = torch.randn(1, 3, 700, 64)
    torch.testing.assert_close(rotate(fope, x, torch.arange(700)), rotate(pe("rope", n_heads=3), x, torch.arange(700)))


def test_fope_pad0_and_learnable_switches():
    x = torch.randn(1, 2, 50, 64)
    pad0 = pe("fope", max_seq_len=1024, pad_value=0.0)  # d_out = 16 of 32 pairs
    assert torch.count_nonzero(rotate(pad0, x, torch.arange(50))[..., pair_channels(range(16, 32), 64)]) == 0
    learnable = pe("fope", learnable=True, mix=False)
    assert torch.equal(learnable.cos_coef.detach(), torch.eye(16).expand(2, 16, 16))
    rotate(learnable, x, torch.arange(50)).sum().backward()
    assert learnable.cos_coef.grad.abs().sum() > 0


@pytest.mark.parametrize("length", [64, 512, 1024])
def test_rope_clip_is_rope_on_kept_pairs_and_nope_on_the_others(length):
    clip, rope = pe("rope_clip", max_seq_len=length), pe("rope", max_seq_len=length)
    w = rope_inv_freq(64, 10000.0)
    n_kept = int((w >= 2 * math.pi / length).sum())
    assert n_kept == kept_frequencies(64, 10000.0, length).numel() and 0 < n_kept < 32
    x, positions = torch.randn(2, 2, 3 * length, 64), torch.arange(3 * length)
    ours, theirs = rotate(clip, x, positions), rotate(rope, x, positions)
    for j in range(32):  # channel pair by channel pair
        channels = pair_channels([j], 64)
        reference = theirs if j < n_kept else x
        torch.testing.assert_close(ours[..., channels], reference[..., channels], rtol=0, atol=0, msg=f"pair {j}")
    torch.testing.assert_close(clip.rotary_frequencies(), w[:n_kept], rtol=0, atol=0)


def test_p_rope_interpolates_between_nope_and_rope():
    q, k = torch.randn(2, 2, 300, 64), torch.randn(2, 2, 300, 64)
    torch.testing.assert_close(logits(pe("p_rope", p=1.0), q, k), logits(pe("rope"), q, k), rtol=0, atol=0)
    torch.testing.assert_close(logits(pe("p_rope", p=0.0), q, k), q @ k.transpose(-1, -2), rtol=0, atol=0)
    half = pe("p_rope", p=0.75)
    assert half.n_kept == 24  # round(0.75 * 32)
    assert pe("p_rope", head_dim=32, p=0.3).n_kept == 4  # int(0.3 * 32 // 2), as gemma and transformers keep them
    out, rope = rotate(half, q, torch.arange(300)), rotate(pe("rope"), q, torch.arange(300))
    kept, free = pair_channels(range(24), 64), pair_channels(range(24, 32), 64)
    torch.testing.assert_close(out[..., kept], rope[..., kept], rtol=0, atol=0)
    torch.testing.assert_close(out[..., free], q[..., free], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="p_rope"):
        pe("p_rope", p=1.5)


def test_partial_rope_rotates_a_prefix_with_its_own_frequencies():
    x = torch.randn(2, 2, 400, 64)
    positions = torch.arange(400)
    full = pe("partial_rope", fraction=1.0)
    torch.testing.assert_close(rotate(full, x, positions), rotate(pe("rope"), x, positions), rtol=0, atol=0)
    quarter = pe("partial_rope", fraction=0.25)
    assert quarter.rot_dim == 16 and pe("partial_rope", fraction=0.3).rot_dim == 18  # int(19.2) rounded down to even
    out = rotate(quarter, x, positions)
    assert torch.equal(out[..., 16:], x[..., 16:])  # the last 3/4 of the dims untouched
    # the first 16 dims: RoPE of a 16-dim head, w_i = theta^(-2i/16), pairs (i, i + 8)
    angles = torch.outer(positions.float(), 10000.0 ** (-torch.arange(0, 16, 2) / 16))
    torch.testing.assert_close(out[..., :16], apply_rotary(x[..., :16], angles.cos(), angles.sin()))
    q, k = quarter.rotate_qk(x, x.flip(0), positions)
    torch.testing.assert_close(k, rotate(quarter, x.flip(0), positions))
    assert torch.equal(rotate(pe("partial_rope", fraction=0.0), x, positions), x)


def test_rotary_frequencies_hook():
    assert pe("nope").rotary_frequencies().numel() == 0 and pe("alibi").rotary_frequencies().numel() == 0
    assert pe("kerple_log").rotary_frequencies().numel() == 0
    torch.testing.assert_close(pe("rope").rotary_frequencies(), rope_inv_freq(64, 10000.0))
    torch.testing.assert_close(pe("fope").rotary_frequencies(), kept_frequencies(64, 10000.0, 512))
    torch.testing.assert_close(pe("partial_rope").rotary_frequencies(), rope_inv_freq(16, 10000.0))


def test_kerple_bias_formula_and_monotone_in_distance():
    kerple = pe("kerple_log", head_dim=16, n_heads=4)
    bias = kerple.attention_bias(torch.arange(60), torch.arange(60))
    assert bias.dtype == torch.float32 and bias.shape == (4, 60, 60)
    r1, r2 = kerple.r1.detach(), kerple.r2.detach()
    d = torch.arange(60.0)
    torch.testing.assert_close(bias[:, 59, :].detach(), (-r1[:, None] * torch.log(1 + r2[:, None] * (59 - d))))
    row = bias[:, 59, :].detach()  # keys 0..59 for query 59: the bias never decreases towards the query
    assert bool((row[:, 1:] >= row[:, :-1]).all()) and torch.equal(row[:, -1], torch.zeros(4))
    assert bool((row[:, 1:] > row[:, :-1]).all())  # r1, r2 > 0: strictly


def test_kerple_init_matches_the_reference_distribution():
    kerple = pe("kerple_log", head_dim=16, n_heads=4000)
    r1, r2 = kerple.r1.detach(), kerple.r2.detach()
    assert r1.min() >= 1e-2 - 1e-6 and r1.max() <= 2 + 1e-5 and r2.min() >= 1e-2 - 1e-6 and r2.max() <= 1 + 1e-5
    assert abs(r1.mean().item() - 1.0) < 0.05 and abs(r2.mean().item() - 0.5) < 0.025  # U(0, 2), U(0, 1)


def test_kerple_parameters_get_gradients_and_stay_positive():
    model = build_model("tiny", pe="kerple_log", vocab_size=256, max_seq_len=32)
    ids = torch.randint(0, 256, (2, 33))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    for layer in model.position_encodings():
        assert layer.rho_r1.grad.abs().min() > 0 and layer.rho_r2.grad.abs().min() > 0
    kerple = pe("kerple_log", head_dim=16, n_heads=4)
    optimizer = torch.optim.Adam(kerple.parameters(), lr=1.0)  # steps of ~1 in rho: r alone would turn negative
    for _ in range(20):
        optimizer.zero_grad()
        (kerple.r1 + kerple.r2).sum().backward()  # push r1, r2 down
        optimizer.step()
    # far below the init floor 1e-2, where the same steps on r itself would have ended near r0 - 20 < 0
    assert bool((kerple.r1 < 1e-3).all() and (kerple.r2 < 1e-3).all())
    assert bool((kerple.r1 > 0).all() and (kerple.r2 > 0).all())
    bias = kerple.attention_bias(torch.arange(10), torch.arange(10))
    assert torch.isfinite(bias).all() and bool((bias[:, 9, :-1] < 0).all())


def test_kerple_chunked_attention_equals_dense_reference():
    kerple = pe("kerple_log", head_dim=16, n_heads=4)
    q, k, v = (torch.randn(2, 4, 70, 16) for _ in range(3))
    positions = torch.arange(70)
    expected = dense_attention(q, k, v, kerple.attention_bias(positions, positions), positions, positions)
    chunked = causal_attention(q, k, v, kerple, q_index=positions, k_index=positions, bias_chunk_elements=2 * 4 * 70 * 3)  # ragged chunks
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    # a query block at the end of a KV cache
    tail = positions[50:]
    expected = dense_attention(q[:, :, 50:], k, v, kerple.attention_bias(tail, positions), tail, positions)
    chunked = causal_attention(q[:, :, 50:], k, v, kerple, q_index=tail, k_index=positions, bias_chunk_elements=2 * 4 * 70 * 4)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


def pe_config(name):
    values = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "pe" / f"{name}.yaml"))
    return values.pop("name"), values


@pytest.mark.parametrize("config", NEW_CONFIGS)
def test_config_builds_a_causal_tiny_model(config):
    name, options = pe_config(config)
    model = tiny(name, pe_options=options).eval()
    T = 4 * 32 + 5  # well beyond the training length
    ids = torch.randint(0, 256, (2, T))
    changed = ids.clone()
    changed[:, 70:] = torch.randint(0, 256, (2, T - 70))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :70], b[:, :70])
    assert not torch.allclose(a[:, 70:], b[:, 70:])


@pytest.mark.parametrize("name", NEW_PES)
def test_kv_cache_decoding_matches_the_full_forward(name):
    model = tiny(name).eval()
    ids = torch.randint(0, 256, (2, 90))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(model.config.n_layers)
        parts = [model(ids[:, :40], kv_cache=cache).logits, model(ids[:, 40:41], start_pos=40, kv_cache=cache).logits]
        parts.append(model(ids[:, 41:], start_pos=41, kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
