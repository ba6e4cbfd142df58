"""fope_lm.evaluation.spectrum: the logit spectrum by distance against synthetic curves and dense references, and
scripts/analyze_spectrum.py on tiny checkpoints."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fope_lm.checkpoint import save_model
from fope_lm.errors import DataError
from fope_lm.evaluation import spectrum
from fope_lm.nn.model import build_model
from fope_lm.position import BiasInputs
from fope_lm.position.fope import kept_frequencies

from conftest import REPO
from helpers.models import dense_attention, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


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


def dense_bias(attn, x, q, k):
    """The layer's whole (H or B x H, T, T) logit bias at once (0 without one), content-dependent ones included."""
    if not attn.pe.has_attention_bias:
        return torch.zeros(())
    T = x.shape[1]
    positions = torch.arange(T)
    causal = positions[None, :] <= positions[:, None]
    inputs = BiasInputs(positions, positions, q, k, causal, slice(0, T), attn.pe.token_state(x))
    return attn.pe.logit_bias(inputs)


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
        scores = scores + dense_bias(attn, x, q, k).double()
        curves.append(torch.stack([scores.diagonal(-dist, -2, -1).mean((0, -1)) for dist in range(T)], -1))
    return torch.stack(curves).detach().numpy(), captured


@pytest.mark.parametrize("name", ["fope", "kerple_log", "cope", "fox"])  # rotary, a position bias, content-dependent
def test_mean_logit_by_distance_matches_dense_reference_and_the_models_attention(name):
    model = tiny(name).eval()
    if name == "cope":  # its position embeddings start at zero: give them values, so that the bias counts
        for pe in model.position_encodings():
            torch.nn.init.normal_(pe.pos_emb)
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
        y = dense_attention(q, k, v, dense_bias(attn, x, q, k), positions, positions)
        torch.testing.assert_close(attn.out(y.transpose(1, 2).reshape(B, T, D)), attn(x, positions), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
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
