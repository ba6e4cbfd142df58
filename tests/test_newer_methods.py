"""FIRE, CoPE, FoX (with and without RoPE) and Resonance RoPE against their authors' code, re-derived densely here:
each reference below follows the public implementation line by line (all (T, T) logits at once), and the model's
chunked attention must match it at 16x the training length, where each method's length handling shows.

References: mcleish7/arithmetic `cramming/architectures/embeddings.py` (FIRE); facebookresearch/RAM
`projects/cope/src/cope/context_position.py` (CoPE); zhixuan-lin/forgetting-transformer
`modeling_forgetting_transformer.py` (FoX, `fgate_type="full"`); sheryc/resonance_rope `rotary_resonance.py`.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.modeling_rope_utils import _compute_yarn_parameters

from fope_lm.nn.attention import causal_attention
from fope_lm.position import build_position_encoding

from helpers.models import dense_attention

pytestmark = pytest.mark.usefixtures("one_thread")
L, HEADS, HEAD_DIM = 16, 4, 16
T = 16 * L  # 16x the training length


def encoding(name, **options):
    torch.manual_seed(0)
    return build_position_encoding(name, head_dim=HEAD_DIM, n_heads=HEADS, max_seq_len=L, **options)


def qkv(batch=2, length=T, scale=1.0):
    generator = torch.Generator().manual_seed(1)
    return [scale * torch.randn(batch, HEADS, length, HEAD_DIM, generator=generator) for _ in range(3)]


def chunked(q, k, v, pe, **kwargs):
    """The model's attention kernel with ragged query chunks (7 rows of 2 x 4 heads x T keys each)."""
    index = torch.arange(k.shape[2])
    return causal_attention(
        q, k, v, pe, q_index=index[-q.shape[2] :], k_index=index, bias_chunk_elements=7 * 2 * HEADS * k.shape[2] * pe.bias_memory, **kwargs
    )


# --- FIRE --------------------------------------------------------------------------------------------------------
def fire_reference_bias(pe, seq_length: int) -> torch.Tensor:
    """FIRE.forward of the reference, with our module's parameters: (1, H, T, T)."""
    positions = torch.arange(seq_length, dtype=torch.float)
    rel_distance = positions[:, None] - positions[None, :]
    threshold = torch.abs(pe.length_multiplier * pe.init_length)
    pos_normalizer = torch.max(positions, threshold)
    pos_normalizer = pos_normalizer[:, None]
    rel_distance = torch.log(torch.abs(pe.c * rel_distance) + 1)
    pos_normalizer = torch.log(torch.abs(pe.c * pos_normalizer) + 1) + pe.eps
    normalized_distance = rel_distance / pos_normalizer
    fire_bias = pe.mlp(normalized_distance.unsqueeze(-1))
    return fire_bias.unsqueeze(0).permute(0, 3, 1, 2)


def test_fire_matches_the_reference_and_learns_c_and_L():
    pe = encoding("fire", init_length=float(L))  # a threshold the T-token test crosses (the default, 512, it would not)
    assert (pe.c.item(), pe.length_multiplier.item(), pe.init_length.item()) == (pytest.approx(0.1), 1.0, L)  # float32 0.1
    with torch.no_grad():
        pe.c.fill_(0.3)  # away from the init, so that c's role is checked too
        pe.length_multiplier.fill_(1.5)
    reference = fire_reference_bias(pe, T)
    positions = torch.arange(T)
    torch.testing.assert_close(pe.attention_bias(positions, positions), reference[0], rtol=1e-5, atol=1e-6)
    q, k, v = qkv()
    torch.testing.assert_close(chunked(q, k, v, pe), dense_attention(q, k, v, reference[0]), rtol=1e-5, atol=1e-5)
    # per-token positions (B, T): each row's own bias
    rows = torch.stack((positions, positions.flip(0)))
    torch.testing.assert_close(pe.attention_bias(rows, rows)[0], reference[0], rtol=1e-5, atol=1e-6)
    chunked(q, k, v, pe).square().sum().backward()
    assert pe.c.grad.abs() > 0 and pe.length_multiplier.grad.abs() > 0 and pe.mlp[0].weight.grad.abs().sum() > 0


# --- CoPE --------------------------------------------------------------------------------------------------------
def cope_reference_attention(query, key, val, pos_emb, npos):
    """ContextPosSelfAttn.forward (cope_sep_key, cope_val_gates, cope_nodiv off) for (B*H, L, D) inputs and a
    causal (L, L) attn_mask of ones and zeros, as the reference's decoder builds it."""
    head_dim = query.shape[-1]
    attn_mask = torch.ones(query.shape[1], key.shape[1]).tril(key.shape[1] - query.shape[1])
    gate_logits = torch.bmm(query, key.transpose(-1, -2))
    gates = torch.sigmoid(gate_logits / math.sqrt(head_dim))
    gates = gates * attn_mask
    positions = gates.flip(-1).cumsum(dim=-1).flip(-1)
    positions = positions.clamp(max=npos - 1)
    pos_logits_fixed = torch.matmul(query, pos_emb)
    positions_ceil = positions.ceil().long()
    positions_floor = positions.floor().long()
    pos_logits_ceil = pos_logits_fixed.gather(-1, positions_ceil)
    pos_logits_floor = pos_logits_fixed.gather(-1, positions_floor)
    pos_ceil_weight = positions - positions_floor
    pos_logits = pos_logits_ceil * pos_ceil_weight + pos_logits_floor * (1 - pos_ceil_weight)
    attn_logits = gate_logits
    attn_logits += pos_logits
    attn_logits /= math.sqrt(head_dim)
    attn_logits += attn_mask.log()
    attn = torch.softmax(attn_logits, dim=-1)
    return torch.bmm(attn, val)


@pytest.mark.parametrize("npos_max", [None, 8])  # the default L + 1 (counts clamp far before 16 L), and a small cap
def test_cope_matches_the_reference_for_a_chunk_and_a_cached_tail(npos_max):
    pe = encoding("cope", npos_max=npos_max)
    assert pe.npos == (npos_max or L + 1) and not pe.pos_emb.any()  # zeros at init, as the reference
    with torch.no_grad():
        pe.pos_emb.normal_()
    q, k, v = qkv(scale=2.0)  # larger logits: gates away from 1/2
    flat = lambda x: x.flatten(0, 1)  # noqa: E731  # (B, H, T, D) -> the reference's (B*H, T, D)
    for queries in (T, 10):  # every query; the last 10 against all keys (a KV cache's block)
        expected = cope_reference_attention(flat(q[:, :, -queries:]), flat(k), flat(v), pe.pos_emb[None], pe.npos)
        ours = chunked(q[:, :, -queries:], k, v, pe)
        torch.testing.assert_close(flat(ours), expected, rtol=1e-5, atol=1e-5)
    chunked(q, k, v, pe).square().sum().backward()
    assert pe.pos_emb.grad.abs().sum() > 0


# --- FoX ---------------------------------------------------------------------------------------------------------
def fox_reference_attention(q, k, v, x, weight, bias):
    """The reference's attention with log_fgate = logsigmoid(fgate_proj(x)) and decay bias log_lambda_i -
    log_lambda_j, log_lambda = cumsum(log_fgate), densely (its `output_attentions` path, then the softmax)."""
    fgate_logit = F.linear(x, weight, bias).transpose(1, 2)  # b t h -> b h t
    log_fgate = F.logsigmoid(fgate_logit.float())
    log_lambda = torch.cumsum(log_fgate, dim=-1)
    decay_bias = log_lambda[:, :, :, None] - log_lambda[:, :, None, :]
    return dense_attention(q, k, v, decay_bias)


@pytest.mark.parametrize("name", ["fox", "fox_rope"])
def test_fox_matches_the_reference_attention(name):
    pe = encoding(name)
    gate = pe.forget_gate
    assert gate.in_features == HEADS * HEAD_DIM and gate.out_features == HEADS and not gate.bias.any()
    with torch.no_grad():
        gate.weight.normal_(std=0.3)  # gates spread over (0, 1), so that forgetting shows
        gate.bias.uniform_(-1.0, 3.0)
    q, k, v = qkv()
    x = torch.randn(2, T, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(2))
    q, k = pe.rotate_qk(q, k, torch.arange(T))  # fox: identity; fox_rope: RoPE
    expected = fox_reference_attention(q, k, v, x, gate.weight, gate.bias)
    state = pe.token_state(x)
    assert state.shape == (2, HEADS, T) and state.dtype == torch.float32 and bool((state < 0).all())
    torch.testing.assert_close(chunked(q, k, v, pe, k_state=state), expected, rtol=1e-5, atol=1e-5)
    tail = chunked(q[:, :, -10:], k, v, pe, k_state=state)  # a cached block: its gates are the keys' last ones
    torch.testing.assert_close(tail, expected[:, :, -10:], rtol=1e-5, atol=1e-5)
    chunked(q, k, v, pe, k_state=pe.token_state(x)).square().sum().backward()
    assert gate.weight.grad.abs().sum() > 0 and gate.bias.grad.abs().sum() > 0


# --- Resonance RoPE ----------------------------------------------------------------------------------------------
def resonance_reference_angles(inv_freq: torch.Tensor, seq_len: int) -> torch.Tensor:
    """_register_buffers + compute_freqs of the reference: (seq_len, D/2) angles, each a repeat of its rounded
    wavelength's first period where the sequence is longer than it."""
    r_wavelengths = torch.round(2 * math.pi / inv_freq)
    r_inv_freq = 2 * math.pi / r_wavelengths
    freqs_list = []
    for i in range(inv_freq.numel()):
        if seq_len >= r_wavelengths[i].item():
            t_i = torch.arange(r_wavelengths[i], dtype=r_inv_freq.dtype)
            current_freq = (t_i * r_inv_freq[i]).repeat(math.ceil(seq_len / r_wavelengths[i].item()))[:seq_len]
        else:
            current_freq = torch.arange(seq_len, dtype=r_inv_freq.dtype) * r_inv_freq[i]
        freqs_list.append(current_freq)
    return torch.stack(freqs_list, dim=1)


def test_resonance_rope_and_resonance_yarn_match_the_reference():
    positions = torch.arange(T)
    rope_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM))
    config = LlamaConfig(
        hidden_size=HEAD_DIM * HEADS, num_attention_heads=HEADS, max_position_embeddings=4 * L,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L, "rope_theta": 10000.0},
    )  # fmt: skip
    yarn_freq, yarn_factor = _compute_yarn_parameters(config, "cpu")  # Resonance YaRN rounds YaRN's frequencies
    for pe, inv_freq, factor in (
        (encoding("resonance_rope"), rope_freq, 1.0),
        (encoding("resonance_rope", scaling="yarn", scale=4.0), yarn_freq.float(), yarn_factor),
    ):
        angles = resonance_reference_angles(inv_freq, T)
        cos, sin = pe.cos_sin(positions, device=torch.device("cpu"), dtype=torch.float32)
        torch.testing.assert_close(cos[0], angles.cos() * factor, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[0], angles.sin() * factor, rtol=0, atol=1e-6)
        wavelengths = 2 * math.pi / pe.inv_freq()
        torch.testing.assert_close(wavelengths, wavelengths.round(), rtol=1e-6, atol=0)  # integer wavelengths
    # exactly periodic: the table at t + wavelength is the table at t, bit for bit
    pe = encoding("resonance_rope")
    cos, _ = pe.cos_sin(positions, device=torch.device("cpu"), dtype=torch.float32)
    for i, wavelength in enumerate(torch.round(2 * math.pi / rope_freq).long().tolist()):
        if wavelength < T:
            assert torch.equal(cos[0, wavelength:, i], cos[0, : T - wavelength, i])
