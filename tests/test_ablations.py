"""The ablation encodings and controls (FoPE switches, rope_clip, p-RoPE, partial RoPE, KERPLE-log) against
their reductions to RoPE/NoPE, and the logit-spectrum analysis against synthetic curves and dense references."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fope_lm import spectrum
from fope_lm.attention import causal_attention
from fope_lm.checkpoint import save_model
from fope_lm.errors import ConfigError, DataError
from fope_lm.model import KVCache, build_model
from fope_lm.position import build_position_encoding
from fope_lm.position.base import apply_rotary, rope_inv_freq
from fope_lm.position.fope import kept_frequencies, step_eye

REPO = Path(__file__).resolve().parents[1]
NEW_PES = ["rope_clip", "p_rope", "partial_rope", "kerple_log"]
NEW_CONFIGS = NEW_PES + ["fope_noclip", "fope_nomix", "fope_learnable", "fope_pad0", "fope_nocap"]


pytestmark = pytest.mark.usefixtures("one_thread")


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


# --- FoPE switches ------------------------------------------------------------------------------------------------
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
    mixed.rotate(x, positions)  # a cached table of the random init must not survive the load
    mixed.load_state_dict({"cos_coef": eye.expand_as(mixed.cos_coef).clone(), "sin_coef": eye.expand_as(mixed.sin_coef).clone()})
    torch.testing.assert_close(nomix.rotate(x, positions), mixed.rotate(x, positions), rtol=0, atol=0)
    # padding kept: the pairs beyond the slots get c = s = 1, i.e. x + rot(x)
    pad = pair_channels(range(nomix.n_slots, 32), 64)
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(nomix.rotate(x, positions)[..., pad], torch.cat((x1 - x2, x2 + x1), -1)[..., pad])


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
    torch.testing.assert_close(fope.rotate(x, torch.arange(700)), pe("rope", n_heads=3).rotate(x, torch.arange(700)))


def test_fope_pad0_and_learnable_switches():
    x = torch.randn(1, 2, 50, 64)
    pad0 = pe("fope", max_seq_len=1024, pad_value=0.0)  # d_out = 16 of 32 pairs
    assert torch.count_nonzero(pad0.rotate(x, torch.arange(50))[..., pair_channels(range(16, 32), 64)]) == 0
    learnable = pe("fope", learnable=True, mix=False)
    assert torch.equal(learnable.cos_coef.detach(), torch.eye(16).expand(2, 16, 16))
    learnable.rotate(x, torch.arange(50)).sum().backward()
    assert learnable.cos_coef.grad.abs().sum() > 0


# --- rope_clip, p-RoPE, partial RoPE -----------------------------------------------------------------------------
@pytest.mark.parametrize("length", [64, 512, 1024])
def test_rope_clip_is_rope_on_kept_pairs_and_nope_on_the_others(length):
    clip, rope = pe("rope_clip", max_seq_len=length), pe("rope", max_seq_len=length)
    w = rope_inv_freq(64, 10000.0)
    n_kept = int((w >= 2 * math.pi / length).sum())
    assert n_kept == kept_frequencies(64, 10000.0, length).numel() and 0 < n_kept < 32
    x, positions = torch.randn(2, 2, 3 * length, 64), torch.arange(3 * length)
    ours, theirs = clip.rotate(x, positions), rope.rotate(x, positions)
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
    assert pe("p_rope", head_dim=32, p=0.3).n_kept == 5  # round(4.8)
    out, rope = half.rotate(q, torch.arange(300)), pe("rope").rotate(q, torch.arange(300))
    kept, free = pair_channels(range(24), 64), pair_channels(range(24, 32), 64)
    torch.testing.assert_close(out[..., kept], rope[..., kept], rtol=0, atol=0)
    torch.testing.assert_close(out[..., free], q[..., free], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="p_rope"):
        pe("p_rope", p=1.5)


def test_partial_rope_rotates_a_prefix_with_its_own_frequencies():
    x = torch.randn(2, 2, 400, 64)
    positions = torch.arange(400)
    full = pe("partial_rope", fraction=1.0)
    torch.testing.assert_close(full.rotate(x, positions), pe("rope").rotate(x, positions), rtol=0, atol=0)
    quarter = pe("partial_rope", fraction=0.25)
    assert quarter.rot_dim == 16 and pe("partial_rope", fraction=0.3).rot_dim == 18  # int(19.2) rounded down to even
    out = quarter.rotate(x, positions)
    assert torch.equal(out[..., 16:], x[..., 16:])  # the last 3/4 of the dims untouched
    # the first 16 dims: RoPE of a 16-dim head, w_i = theta^(-2i/16), pairs (i, i + 8)
    angles = torch.outer(positions.float(), 10000.0 ** (-torch.arange(0, 16, 2) / 16))
    torch.testing.assert_close(out[..., :16], apply_rotary(x[..., :16], angles.cos(), angles.sin()))
    q, k = quarter.rotate_qk(x, x.flip(0), positions)
    torch.testing.assert_close(k, quarter.rotate(x.flip(0), positions))
    assert torch.equal(pe("partial_rope", fraction=0.0).rotate(x, positions), x)


def test_rotary_frequencies_hook():
    assert pe("nope").rotary_frequencies().numel() == 0 and pe("alibi").rotary_frequencies().numel() == 0
    assert pe("kerple_log").rotary_frequencies().numel() == 0
    torch.testing.assert_close(pe("rope").rotary_frequencies(), rope_inv_freq(64, 10000.0))
    torch.testing.assert_close(pe("fope").rotary_frequencies(), kept_frequencies(64, 10000.0, 512))
    torch.testing.assert_close(pe("partial_rope").rotary_frequencies(), rope_inv_freq(16, 10000.0))


# --- KERPLE-log ---------------------------------------------------------------------------------------------------
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


def dense_reference(q, k, v, bias, q_positions, k_positions):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    scores = scores.masked_fill(k_positions[None, :] > q_positions[:, None], float("-inf"))
    return F.softmax(scores, -1) @ v


def test_kerple_chunked_attention_equals_dense_reference():
    kerple = pe("kerple_log", head_dim=16, n_heads=4)
    q, k, v = (torch.randn(2, 4, 70, 16) for _ in range(3))
    positions = torch.arange(70)
    expected = dense_reference(q, k, v, kerple.attention_bias(positions, positions), positions, positions)
    chunked = causal_attention(q, k, v, positions, positions, kerple, bias_chunk_elements=4 * 70 * 3)  # ragged chunks
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    # a query block at the end of a KV cache
    tail = positions[50:]
    expected = dense_reference(q[:, :, 50:], k, v, kerple.attention_bias(tail, positions), tail, positions)
    chunked = causal_attention(q[:, :, 50:], k, v, tail, positions, kerple, bias_chunk_elements=4 * 70 * 4)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


# --- configs and tiny models --------------------------------------------------------------------------------------
def pe_config(name):
    values = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "pe" / f"{name}.yaml"))
    return values.pop("name"), values


def tiny(name, **options):
    return build_model("tiny", pe=name, pe_options=options, vocab_size=256, max_seq_len=32)


@pytest.mark.parametrize("config", NEW_CONFIGS)
def test_config_builds_a_causal_tiny_model(config):
    name, options = pe_config(config)
    model = tiny(name, **options).eval()
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


# --- the logit spectrum -------------------------------------------------------------------------------------------
def test_spectrum_recovers_known_frequencies_and_the_low_frequency_split():
    L = 64
    n = spectrum.SPAN * L
    d = np.arange(n)
    curve = 5.0 + 3.0 * np.cos(2 * np.pi * 2 * d / n) + 1.0 * np.sin(2 * np.pi * 37 * d / n + 0.3)
    omega, energy = spectrum.logit_spectrum(curve[None])
    assert omega.shape == energy[0].shape == (n // 2 + 1,)
    assert sorted(np.argsort(energy[0])[-2:]) == [2, 37]
    np.testing.assert_allclose(omega[[2, 37]], [2 * np.pi * 2 / n, 2 * np.pi * 37 / n])
    np.testing.assert_allclose(energy[0, [2, 37]], [4.5, 0.5], rtol=1e-10)  # a^2 / 2: each one's variance
    np.testing.assert_allclose(energy.sum(), curve.var(), rtol=1e-10)  # Parseval, the constant removed
    assert spectrum.below_floor(n, L).nonzero()[0].tolist() == [1, 2, 3]
    np.testing.assert_allclose(spectrum.low_frequency_fraction(energy, n, L), [0.9], rtol=1e-10)
    # exactly at 2*pi/L is not below it; the Nyquist bin counts once
    at_floor = np.cos(2 * np.pi * 4 * d / n) + np.cos(np.pi * d)
    omega, energy = spectrum.logit_spectrum(at_floor)
    assert spectrum.low_frequency_fraction(energy, n, L) < 1e-12
    np.testing.assert_allclose(energy[[4, n // 2]], [0.5, 1.0], rtol=1e-10)
    assert np.isnan(spectrum.low_frequency_fraction(spectrum.logit_spectrum(np.ones(n))[1], n, L))


def dense_layer_curves(model, ids):
    """Reference a_h(d): every layer's dense (B, H, T, T) logits, averaged along each diagonal."""
    captured = []
    hooks = [b.attn.register_forward_pre_hook(lambda attn, args: captured.append((attn, args[0]))) for b in model.blocks]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    curves = []
    T = ids.shape[1]
    positions = torch.arange(T)
    for attn, x in captured:
        q, k, _ = attn.rotated_qkv(x, positions)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).double()
        if attn.pe.has_attention_bias:
            scores = scores + attn.pe.attention_bias(positions, positions).double()
        curves.append(torch.stack([scores.diagonal(-dist, -2, -1).mean((0, -1)) for dist in range(T)], -1))
    return torch.stack(curves).detach().numpy(), captured


@pytest.mark.parametrize("name", ["fope", "kerple_log"])
def test_mean_logit_by_distance_matches_dense_reference_and_the_models_attention(name):
    model = tiny(name).eval()
    ids = torch.randint(0, 256, (3, 128))
    ours, _ = spectrum.mean_logit_by_distance(model, ids, batch_size=2, chunk_elements=4 * 128 * 7)
    reference, captured = dense_layer_curves(model, ids)
    assert ours.shape == (2, 4, 128)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    # the re-run q, k are the model's own: softmax over them reproduces the layer's output
    attn, x = captured[0]
    B, T, D = x.shape
    positions = torch.arange(T)
    with torch.no_grad():
        q, k, _ = attn.rotated_qkv(x, positions)
        v = attn.qkv(x).view(B, T, 3, attn.n_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
        bias = attn.pe.attention_bias(positions, positions) if attn.pe.has_attention_bias else 0.0
        y = dense_reference(q, k, v, bias, positions, positions)
        torch.testing.assert_close(attn.out(y.transpose(1, 2).reshape(B, T, D)), attn(x, positions), rtol=1e-5, atol=1e-5)


def test_analyze_spectrum_script_on_a_tiny_checkpoint(tmp_path):
    checkpoint = tmp_path / "ckpt"
    save_model(checkpoint, tiny("fope"))
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 256, 3 * 128 + 17).astype(np.uint16))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "analyze_spectrum.py"),
            str(checkpoint),
            "--tokens",
            str(tokens),
            "--out",
            str(tmp_path / "out"),
            "--sequences",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    png = (tmp_path / "out" / "spectrum.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    summary = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    fractions = summary["low_frequency_fraction"]
    assert len(fractions) == 2 and all(0.0 <= f <= 1.0 for f in fractions)
    assert summary["n_distances"] == 128 and summary["n_sequences"] == 2 and summary["low_frequency_bins"] == [1, 2, 3]
    np.testing.assert_allclose(summary["pe_frequencies"], kept_frequencies(32, 10000.0, 32).double().numpy())
    arrays = np.load(tmp_path / "out" / "spectrum.npz")
    assert arrays["mean_logit"].shape == (2, 4, 128) and arrays["energy"].shape == (2, 4, 65)


def test_analyze_finds_the_runs_data_or_asks_for_text(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000010"
    save_model(checkpoint, tiny("alibi"), metadata={"data_fingerprint": "f" * 64})
    with pytest.raises(DataError, match="--data-dir"):
        spectrum.analyze_checkpoint(checkpoint, tmp_path / "out")
    (tmp_path / "run" / "run_info.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    assert spectrum.checkpoint_data(checkpoint) == {"dir": str(tmp_path / "gone"), "fingerprint": "f" * 64}
    with pytest.raises(DataError, match="gone"):  # the recorded dir is the one opened
        spectrum.analyze_checkpoint(checkpoint, tmp_path / "out")
    np.save(tmp_path / "short.npy", np.zeros(100, dtype=np.int64))
    with pytest.raises(DataError, match="fewer than one sequence"):
        spectrum.analyze_checkpoint(checkpoint, tmp_path / "out", tokens=tmp_path / "short.npy")


def test_analyze_reads_the_validation_split_the_run_records(tmp_path):
    from fope_lm.data import TokenData, prepare

    data_cfg = OmegaConf.merge(OmegaConf.load(REPO / "configs" / "data" / "embedded.yaml"), {"root": str(tmp_path / "data")})
    data = TokenData(prepare(data_cfg))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000010"
    model = build_model("tiny", pe="rope_clip", vocab_size=data.vocab_size, max_seq_len=32)
    save_model(checkpoint, model, metadata={"data_fingerprint": data.fingerprint})
    (tmp_path / "run" / "run_info.json").write_text(json.dumps({"data_dir": str(data.dir)}))
    summary = spectrum.analyze_checkpoint(checkpoint, tmp_path / "out", n_sequences=3)
    assert summary["data"]["fingerprint"] == data.fingerprint and summary["data"]["matches_checkpoint"] is True
    assert summary["n_sequences"] == 3 and len(summary["low_frequency_fraction"]) == 2
    assert summary["loss"] == pytest.approx(math.log(model.config.padded_vocab_size), abs=0.5)  # untrained
    save_model(checkpoint, model, metadata={"data_fingerprint": "0" * 64})  # the data changed since training
    with pytest.raises(DataError, match="fingerprint"):
        spectrum.analyze_checkpoint(checkpoint, tmp_path / "out")
