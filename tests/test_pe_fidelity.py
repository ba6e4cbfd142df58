"""Fidelity of p-RoPE, FIRE, FoX with RoPE and the paper's optimizer settings to their references, each re-derived here.

References: google-deepmind/gemma `gemma/gm/math/_positional_embeddings.py` `apply_rope` and transformers
`modeling_rope_utils._compute_proportional_rope_parameters` (p-RoPE's kept pairs); mcleish7/arithmetic
`cramming/architectures/embeddings.py` `FIRE`; zhixuan-lin/forgetting-transformer `rope_base = 500000`
(`modeling_forgetting_transformer.py`, `rotary.py` `_compute_inv_freq`); the official FoPE repo's OLMo configs
(TsinghuaC3I/Fourier-Position-Embedding `configs/**/*.yaml`: `decay_norm_and_bias: true`, `decay_embeddings: true`).
"""

import pytest
import torch
from omegaconf import OmegaConf

from fope_lm.errors import ConfigError
from fope_lm.position import build_position_encoding
from fope_lm.position.base import apply_rotary

from conftest import REPO
from helpers.training import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def pe_options(name: str) -> dict:
    """configs/pe/<name>.yaml's options (everything but the name), as `+pe=<name>` passes them."""
    options = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "pe" / f"{name}.yaml"))
    assert isinstance(options, dict) and options.pop("name") == name
    return options


# --- p-RoPE --------------------------------------------------------------------------------------------------------
def proportional_rope(head_dim: int, p: float, theta: float) -> tuple[int, torch.Tensor]:
    """gemma's apply_rope / transformers' proportional RoPE: int(p * head_dim // 2) pairs at theta^(-2i/head_dim)
    (the full head_dim's exponents), then zeros (position-free pairs)."""
    rope_angles = int(p * head_dim // 2)
    exponents = torch.arange(0, 2 * rope_angles, 2, dtype=torch.int64).float() / head_dim
    rotated = 1.0 / (theta**exponents)
    return rope_angles, torch.cat((rotated, torch.zeros(head_dim // 2 - rope_angles)))


@pytest.mark.parametrize(
    "head_dim,p,kept",
    [(36, 0.75, 13), (64, 0.3, 9), (64, 0.75, 24), (32, 0.3, 4), (96, 0.6, 28), (128, 0.25, 16), (64, 1.0, 32), (64, 0.0, 0)],
)
def test_p_rope_keeps_the_references_pairs(head_dim, p, kept):
    """Rounded down as gemma and transformers do: round() would keep 14 at (36, 0.75), 10 at (64, 0.3), 5 at (32, 0.3)."""
    ref_kept, ref_freqs = proportional_rope(head_dim, p, 10000.0)
    assert ref_kept == kept
    pe = build_position_encoding("p_rope", head_dim=head_dim, n_heads=2, max_seq_len=64, p=p)
    assert pe.n_kept == kept
    # every pair, the dropped ones exactly 0 (atol=0); a float32 pow may differ from another by an ulp (vectorised tails)
    torch.testing.assert_close(pe.inv_freq(), ref_freqs, rtol=1e-6, atol=0)
    torch.testing.assert_close(pe.rotary_frequencies(), ref_freqs[:kept], rtol=1e-6, atol=0)
    theta = 500000.0  # the model's rope_theta is the base
    pe = build_position_encoding("p_rope", head_dim=head_dim, n_heads=2, max_seq_len=64, theta=theta, p=p)
    torch.testing.assert_close(pe.inv_freq(), proportional_rope(head_dim, p, theta)[1], rtol=1e-6, atol=0)


def test_p_rope_config_default():
    pe = build_position_encoding("p_rope", head_dim=36, n_heads=2, max_seq_len=64, **pe_options("p_rope"))
    assert (pe.p, pe.n_kept) == (0.75, 13)


# --- FIRE ----------------------------------------------------------------------------------------------------------
def fire_reference_bias(mlp: torch.nn.Sequential, seq_length: int) -> torch.Tensor:
    """The reference FIRE.forward in eval mode (positions 0..T-1) with its defaults init_c=0.1, init_L=512.0,
    L_multiplier=1.0, eps=1e-6, written out densely, its MLP (Linear(1, W), ReLU, Linear(W, H)) as matmuls: (H, T, T)."""
    c, init_L, L_multiplier, eps = torch.tensor(0.1), torch.tensor(512.0), torch.tensor(1.0), 1e-6
    positions = torch.arange(seq_length, dtype=torch.float)
    relative_distances = positions[:, None] - positions[None, :]
    threshold = torch.abs(L_multiplier * init_L)
    position_normalizer = torch.max(positions, threshold)[:, None]
    relative_distances = torch.log(torch.abs(c * relative_distances) + 1)
    position_normalizer = torch.log(torch.abs(c * position_normalizer) + 1)
    normalized = relative_distances / (position_normalizer + eps)  # (T, T)
    first, second = mlp[0], mlp[2]
    hidden = torch.relu(normalized[..., None] * first.weight[:, 0] + first.bias)  # (T, T, W)
    return (hidden @ second.weight.T + second.bias).permute(2, 0, 1)


@pytest.mark.parametrize("options", [{}, "config"])
def test_fire_default_matches_the_reference(options):
    """init_L is the reference's 512 at any training length (16 here); 600 positions cross it, so both sides of
    the normaliser's max(L, i) are checked."""
    options = pe_options("fire") if options == "config" else options
    torch.manual_seed(0)
    pe = build_position_encoding("fire", head_dim=8, n_heads=4, max_seq_len=16, **options)
    assert pe.init_length.item() == 512.0 and pe.length_multiplier.item() == 1.0 and pe.c.item() == torch.tensor(0.1).item()
    positions = torch.arange(600)
    with torch.no_grad():
        bias = pe.attention_bias(positions, positions)
        reference = fire_reference_bias(pe.mlp, 600)
    torch.testing.assert_close(bias, reference, rtol=1e-5, atol=1e-6)


def test_fire_init_length_options():
    assert build_position_encoding("fire", head_dim=8, n_heads=4, max_seq_len=16, init_length=64.0).init_length.item() == 64.0
    assert build_position_encoding("fire", head_dim=8, n_heads=4, max_seq_len=16, init_length=None).init_length.item() == 16.0


# --- FoX with RoPE -------------------------------------------------------------------------------------------------
def fox_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """The reference's RotaryEmbedding._compute_inv_freq: 1 / base^(arange(0, d, 2) / d), float32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def fox_rope(**options):
    torch.manual_seed(0)
    return build_position_encoding("fox_rope", head_dim=16, n_heads=4, max_seq_len=32, **options)


def test_fox_rope_uses_the_references_base():
    pe = fox_rope(theta=10000.0)  # the model's rope_theta, which FoX's own base replaces
    torch.testing.assert_close(pe.inv_freq(), fox_inv_freq(16, 500000.0), rtol=1e-6, atol=0)
    exact = 500000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)  # 500000^(-2i/d)
    torch.testing.assert_close(pe.inv_freq(), exact.float(), rtol=1e-6, atol=0)
    # the rotation uses it
    x, positions = torch.randn(2, 4, 40, 16), torch.arange(40)
    angles = positions[:, None].float() * fox_inv_freq(16, 500000.0)
    q, k = pe.rotate_qk(x, x.flip(0), positions)
    torch.testing.assert_close(q, apply_rotary(x, angles.cos(), angles.sin()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k, apply_rotary(x.flip(0), angles.cos(), angles.sin()), rtol=1e-6, atol=1e-6)
    # configs/pe/fox_rope.yaml shows the option with the reference's value
    assert pe_options("fox_rope")["rope_theta"] == 500000.0
    torch.testing.assert_close(fox_rope(**pe_options("fox_rope")).inv_freq(), fox_inv_freq(16, 500000.0), rtol=1e-6, atol=0)


def test_fox_rope_theta_option_overrides_and_scaling_composes():
    torch.testing.assert_close(fox_rope(rope_theta=10000.0).inv_freq(), fox_inv_freq(16, 10000.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(fox_rope(theta=20000.0, rope_theta=None).inv_freq(), fox_inv_freq(16, 20000.0), rtol=1e-6, atol=0)
    linear = fox_rope(scaling="linear", scale=4.0)
    torch.testing.assert_close(linear.inv_freq(), fox_inv_freq(16, 500000.0) / 4, rtol=1e-6, atol=0)
    ntk = fox_rope(scaling="ntk", scale=4.0)  # NTK-aware: the base 500000 * s^(d/(d-2))
    torch.testing.assert_close(ntk.inv_freq(), fox_inv_freq(16, 500000.0 * 4.0 ** (16 / 14)), rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="rope_theta"):  # plain FoX has no rotary part, so no base
        build_position_encoding("fox", head_dim=16, n_heads=4, max_seq_len=32, rope_theta=500000.0)


# --- the paper's optimizer settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["c4_60m_L512_fope", "books_180m_L1024_rope", "c4_1b_L1024_rope_to_yarn"])
def test_paper_runs_decay_norms_and_embeddings(experiment):
    """The official configs' decay_norm_and_bias and decay_embeddings (our model has no biases: norms only)."""
    config = compose_config([f"+experiment={experiment}"])
    assert config.optim.decay_norms is True and config.optim.decay_embeddings is True


def test_plain_config_keeps_olmos_defaults():
    for overrides in ([], ["+pe=fope"]):
        config = compose_config(overrides)
        assert config.optim.decay_norms is False and config.optim.decay_embeddings is False
