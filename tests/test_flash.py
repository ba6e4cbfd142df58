"""flash-attn's path, run on the CPU by a stand-in for flash-attn 2.8 that enforces its input contract, and the attention
setting (auto | flash | sdpa): chosen once at build, described in one line, enforced.

The stand-in (`FakeFlashAttn`) is installed as the `flash_attn` module, so the code's own lazy import
(`fope_lm.nn.attention.load_flash_attn`) finds it. Its two kernels check what flash-attn 2.8.3 checks
(flash_attn/flash_attn_interface.py, and csrc/flash_attn/flash_api.cpp's `mha_fwd`, `mha_varlen_fwd` and
`set_params_alibi`: the messages below are theirs), then compute softmax(q k^T * scale + bias) v densely in float32:
the causal mask aligned to the end of the keys, query head h reading key/value head h // (H / H_kv), ALiBi's bias
-slope * |i + Tk - Tq - j|, every varlen sequence on its own. The real kernel runs on CUDA only; the tests declare the
CPU a capable device through `fope_lm.nn.attention.device_capability`, the one function attention asks what a device
can do, so the code under test hands the stand-in exactly the tensors it would hand flash-attn on a GPU.
"""

import logging
import math
import re
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fope_lm.bench.graphs import graph_breaks
from fope_lm.errors import ConfigError
from fope_lm.nn import attention
from fope_lm.nn.attention import attention_kernels, causal_attention, choose_kernel
from fope_lm.nn.attention import device_capability as real_device_capability
from fope_lm.nn.documents import Documents, document_lengths, document_positions
from fope_lm.nn.kv_cache import KVCache
from fope_lm.nn.model import build_model
from fope_lm.position import Positions

from helpers.models import tiny

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = torch.device("cpu")  # the stand-in's CUDA device
EOS = 0
LENGTHS = [[17, 23], [5, 30, 5]]  # two packed rows of 40 tokens: documents of these lengths, restarting positions
PES = ["rope", "fope", "alibi", "nope"]
HEADS = {"mha": None, "gqa": 2}  # n_kv_heads of the tiny model's 4 query heads
NO_KERNEL_BIAS = ["fire", "cope", "fox", "kerple_log"]  # an attention bias flash-attn cannot compute in-kernel


# --- the stand-in ---------------------------------------------------------------------------------------------------
class FlashContractError(RuntimeError):
    """What flash-attn's TORCH_CHECK raises (a RuntimeError) when an input breaks its contract."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise FlashContractError(message)


@dataclass
class Call:
    kind: str  # "dense" or "varlen"
    q_shape: tuple
    k_shape: tuple
    alibi_slopes: torch.Tensor | None
    cu_seqlens: torch.Tensor | None = None


class FakeFlashAttn:
    """flash_attn_func and flash_attn_varlen_func of flash-attn 2.8.3 (their signatures, their checks), with a dense
    float32 reference for the math; `calls` records what each call received."""

    version = "2.8.3"

    def __init__(self):
        self.calls: list[Call] = []

    def module(self) -> types.ModuleType:
        module = types.ModuleType("flash_attn")
        module.__version__ = self.version  # type: ignore[attr-defined]
        module.flash_attn_func = self.flash_attn_func  # type: ignore[attr-defined]
        module.flash_attn_varlen_func = self.flash_attn_varlen_func  # type: ignore[attr-defined]
        return module

    def flash_attn_func(
        self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
        deterministic=False, return_attn_probs=False,
    ):  # fmt: skip
        unused_options(dropout_p, window_size, softcap, return_attn_probs)
        check(q.dim() == 4, "q: (batch_size, seqlen, nheads, headdim)")
        check_qkv(q, k, v)
        batch_size, _, num_heads, head_size = q.shape
        seqlen_k, num_heads_k = k.shape[1], k.shape[2]
        check(batch_size > 0, "batch size must be positive")
        check(k.shape == (batch_size, seqlen_k, num_heads_k, head_size), "k must have shape (batch_size, seqlen_k, num_heads_k, head_size)")
        check(v.shape == (batch_size, seqlen_k, num_heads_k, head_size), "v must have shape (batch_size, seqlen_k, num_heads_k, head_size)")
        check_alibi(alibi_slopes, batch_size, num_heads)
        self.calls.append(Call("dense", tuple(q.shape), tuple(k.shape), alibi_slopes))
        scale = head_size**-0.5 if softmax_scale is None else softmax_scale  # the size before padding to a multiple of 8
        return torch.stack([reference(q[b], k[b], v[b], causal, slopes_of(alibi_slopes, b), scale) for b in range(batch_size)])

    def flash_attn_varlen_func(
        self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None,
    ):  # fmt: skip
        unused_options(dropout_p, window_size, softcap, return_attn_probs)
        check(block_table is None, "paged KV (block_table) is not used by fope-lm")
        check(q.dim() == 3, "q: (total_q, nheads, headdim)")
        check_qkv(q, k, v)
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            check(isinstance(cu, torch.Tensor) and cu.dtype == torch.int32, f"{name} must have dtype int32")
            check(cu.device == DEVICE, f"{name} must be on CUDA")
            check(cu.is_contiguous(), f"{name} must be contiguous")
        batch_size = cu_seqlens_q.numel() - 1
        check(batch_size > 0, "batch size must be positive")
        check(cu_seqlens_q.shape == (batch_size + 1,), "cu_seqlens_q must have shape (batch_size + 1)")
        check(cu_seqlens_k.shape == (batch_size + 1,), "cu_seqlens_k must have shape (batch_size + 1)")
        # the custom op's schema (`int max_seqlen_q`): a tensor or a float is refused before the kernel
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
            check(type(value) is int, f"{name} must be a Python int, got {type(value).__name__}")
        total_q, num_heads, head_size = q.shape
        total_k, num_heads_k = k.shape[0], k.shape[1]
        check(k.shape == (total_k, num_heads_k, head_size), "k must have shape (total_k, num_heads_k, head_size)")
        check(v.shape == (total_k, num_heads_k, head_size), "v must have shape (total_k, num_heads_k, head_size)")
        check_alibi(alibi_slopes, batch_size, num_heads)
        self.calls.append(Call("varlen", tuple(q.shape), tuple(k.shape), alibi_slopes, cu_seqlens_q))
        # what the kernel assumes without checking (it reads out of bounds or truncates otherwise)
        outputs = []
        scale = head_size**-0.5 if softmax_scale is None else softmax_scale
        for cu, total, longest in ((cu_seqlens_q, total_q, max_seqlen_q), (cu_seqlens_k, total_k, max_seqlen_k)):
            offsets = cu.tolist()
            check(offsets[0] == 0 and offsets[-1] == total, "cu_seqlens must run from 0 to the total tokens")
            check(all(0 <= b - a <= longest for a, b in zip(offsets[:-1], offsets[1:], strict=True)), "a sequence exceeds max_seqlen")
        bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(batch_size):
            rows, keys = slice(bounds_q[b], bounds_q[b + 1]), slice(bounds_k[b], bounds_k[b + 1])
            outputs.append(reference(q[rows], k[keys], v[keys], causal, slopes_of(alibi_slopes, b), scale))
        return torch.cat(outputs)


def unused_options(dropout_p, window_size, softcap, return_attn_probs) -> None:
    check(dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0, "dropout, windows and softcap: unused by fope-lm")
    check(not return_attn_probs, "return_attn_probs is for testing only")


def check_qkv(q, k, v) -> None:
    """mha_fwd / mha_varlen_fwd's checks of q, k and v, after the Python interface's head-size padding."""
    check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    check(k.dtype == q.dtype, "query and key must have the same dtype")
    check(v.dtype == q.dtype, "query and value must have the same dtype")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.device == DEVICE, f"{name} must be on CUDA")  # CHECK_DEVICE
        # flash_api.cpp's check; the Python interface would first copy such a tensor (maybe_contiguous): refusing it here
        # makes a hidden copy per call show
        check(t.stride(-1) == 1, "Input tensor must have contiguous last dimension")
        check(t.dim() == q.dim(), f"{name} must have as many dims as q")
    # FlashAttnFunc pads the head size to a multiple of 8 (head_size_og % 8 != 0: F.pad), then mha_fwd checks it
    padded = math.ceil(q.shape[-1] / 8) * 8
    check(padded <= 256, "FlashAttention forward only supports head dimension at most 256")
    check(q.shape[-2] % k.shape[-2] == 0, "Number of heads in key/value must divide number of heads in query")


def check_alibi(slopes, batch_size: int, num_heads: int) -> None:
    """set_params_alibi."""
    if slopes is None:
        return
    check(slopes.dtype == torch.float32, "ALiBi slopes must have dtype fp32")
    check(slopes.device == DEVICE, "alibi_slopes must be on CUDA")
    check(slopes.stride(-1) == 1, "ALiBi slopes tensor must have contiguous last dimension")
    check(tuple(slopes.shape) in ((num_heads,), (batch_size, num_heads)), "alibi_slopes must be (nheads,) or (batch_size, nheads)")


def slopes_of(slopes, b: int):
    return None if slopes is None else slopes if slopes.dim() == 1 else slopes[b]


def reference(q, k, v, causal: bool, slopes, scale: float) -> torch.Tensor:
    """One sequence in float32 (autocast off: a kernel's math does not follow it): q (Tq, H, D), k and v (Tk, H_kv, D)
    -> (Tq, H, D) in q's dtype."""
    with torch.autocast(q.device.type, enabled=False):
        return _reference(q, k, v, causal, slopes, scale)


def _reference(q, k, v, causal: bool, slopes, scale: float) -> torch.Tensor:
    tq, heads, _ = q.shape
    tk, kv_heads, _ = k.shape
    qf = q.float().transpose(0, 1)  # (H, Tq, D)
    kf, vf = (t.float().transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    row = torch.arange(tq, device=q.device)[:, None] + tk - tq  # the query's index among the keys (bottom-right aligned)
    col = torch.arange(tk, device=q.device)[None, :]
    if slopes is not None:
        scores = scores - slopes[:, None, None] * (row - col).abs()
    if causal:
        scores = scores.masked_fill(col > row, float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # "If the row of the mask is all zero, the output will be zero."
    return (probs @ vf).transpose(0, 1).to(q.dtype)


@pytest.fixture
def fresh_import():
    """The flash-attn import runs again in the test (it is cached per process), and again after it."""
    attention.load_flash_attn.cache_clear()
    yield
    attention.load_flash_attn.cache_clear()


@pytest.fixture
def flash(monkeypatch, fresh_import) -> FakeFlashAttn:
    """The stand-in installed as flash-attn, and the CPU declared an sm90 device."""
    fake = FakeFlashAttn()
    monkeypatch.setitem(sys.modules, "flash_attn", fake.module())
    monkeypatch.setattr(attention, "device_capability", lambda device: (9, 0) if device.type == DEVICE.type else None)
    return fake


def packed_rows(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in LENGTHS:
        documents = [torch.randint(1, 256, (n,), generator=generator) for n in lengths]
        for document in documents[:-1]:
            document[-1] = EOS
        rows.append(torch.cat(documents))
    return torch.stack(rows)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)  # as training runs: q, k and v in bf16


def close_in_bf16(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=atol)


# --- the stand-in against known answers ------------------------------------------------------------------------------
def test_the_stand_in_computes_flash_attn_math_and_refuses_what_it_refuses(flash):
    """The reference is right (SDPA in float32 on the same inputs: causal, GQA, a KV-cache block at the end of the
    keys, ALiBi), and each contract check fires."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    expected_k, expected_v = (t.transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
    mask = torch.arange(9)[None, :] <= torch.arange(4, 9)[:, None]  # the 5 queries are the last 5 keys
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    bias = -slopes[:, None, None] * (torch.arange(4, 9)[:, None] - torch.arange(9)[None, :]).abs()
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), expected_k, expected_v, attn_mask=bias.masked_fill(~mask, -math.inf))
    out = flash.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, alibi_slopes=slopes)
    close_in_bf16(out.transpose(1, 2), expected, atol=3e-2)
    good = (q.bfloat16(), k.bfloat16(), v.bfloat16())
    refused = {
        "FlashAttention only support fp16 and bf16": ((q, k, v), {}),
        "query and key must have the same dtype": ((good[0], k.half(), good[2]), {}),
        "contiguous last dimension": ((good[0].transpose(-1, -2).contiguous().transpose(-1, -2), *good[1:]), {}),
        "head dimension at most 256": (tuple(torch.zeros(1, 2, 2, 264, dtype=torch.bfloat16) for _ in range(3)), {}),
        "must divide number of heads": ((torch.zeros(2, 5, 3, 16, dtype=torch.bfloat16), *good[1:]), {}),
        "ALiBi slopes must have dtype fp32": (good, {"alibi_slopes": slopes.bfloat16()}),
        "(nheads,) or (batch_size, nheads)": (good, {"alibi_slopes": slopes[:2]}),
    }
    for message, (args, kwargs) in refused.items():
        with pytest.raises(FlashContractError, match=re.escape(message)):
            flash.flash_attn_func(*args, causal=True, **kwargs)
    cu = torch.tensor([0, 2, 9], dtype=torch.int32)  # two sequences: 2 and 7 tokens
    qkv = (torch.randn(9, 4, 16).bfloat16(), torch.randn(9, 2, 16).bfloat16(), torch.randn(9, 2, 16).bfloat16())
    assert flash.flash_attn_varlen_func(*qkv, cu, cu, 7, 7, causal=True).shape == (9, 4, 16)
    for message, args in {
        "cu_seqlens_q must have dtype int32": (cu.long(), cu, 7, 7),
        "max_seqlen_q must be a Python int": (cu, cu, torch.tensor(7), 7),
        "a sequence exceeds max_seqlen": (cu, cu, 6, 6),
        "cu_seqlens must run from 0 to the total tokens": (cu[:-1], cu[:-1], 7, 7),
    }.items():
        with pytest.raises(FlashContractError, match=message):
            flash.flash_attn_varlen_func(*qkv, *args, causal=True)
    with pytest.raises(FlashContractError, match="cu_seqlens_q must be contiguous"):
        flash.flash_attn_varlen_func(*qkv, torch.tensor([0, 0, 2, 2, 9, 9], dtype=torch.int32)[::2], cu, 7, 7, causal=True)


# --- the flash path equals the SDPA path --------------------------------------------------------------------------------
def documents_and_positions(rows: torch.Tensor) -> tuple[Documents, Positions]:
    documents = Documents.of_tokens(rows, EOS)  # as the trainer builds them: cu_seqlens on the host, int32
    ids = documents.ids
    return documents, Positions(0, rows.shape[1], document_positions(ids), document_lengths(ids))


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "documents"])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("pe", PES)
def test_flash_path_equals_sdpa_on_the_same_bf16_inputs(flash, pe, heads, packed):
    """One layer's q, k, v as training makes them (bf16 autocast; packed rows with positions restarting at each
    document): the flash path (the stand-in: float32 math, rounded to bf16 once) equals SDPA on the same bf16 inputs
    within bf16 rounding (a few units in the last place: 2^-8 relative), and takes the kernel it should."""
    torch.manual_seed(0)
    model = tiny(pe, n_kv_heads=HEADS[heads], init_std=0.1)  # q.k of order 1: attention far from uniform
    model.set_attention("flash")
    attn = model.blocks[0].attn
    rows = packed_rows()
    documents, positions = documents_and_positions(rows) if packed else (None, Positions(0, rows.shape[1]))
    x = torch.randn(*rows.shape, 128)
    index = torch.arange(rows.shape[1])
    with torch.no_grad(), bf16():
        q, k, v = attn.rotated_qkv(x, positions)
        assert q.dtype == k.dtype == v.dtype == torch.bfloat16
        run = dict(q_index=index, k_index=index, q_positions=positions.per_token, k_positions=positions.per_token, documents=documents)
        out = causal_attention(q, k, v, attn.pe, flash=attn.flash, **run)
        assert [call.kind for call in flash.calls] == ["varlen" if packed else "dense"]
        sdpa = causal_attention(q, k, v, attn.pe, flash=choose_kernel("sdpa"), **run)
    exact = causal_attention(q.float(), k.float(), v.float(), attn.pe, **run)  # SDPA in float32 on the same inputs
    assert len(flash.calls) == 1
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and exact.abs().amax() < 8  # |out| < 8: ulp <= 2^-5
    close_in_bf16(out, sdpa, atol=2**-5)  # two rounded results: one ulp apart at most (measured: 2^-6)
    close_in_bf16(out, exact, atol=2**-6)  # float32 math rounded once: half an ulp (measured: 2^-7)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("pe", PES)
def test_model_with_flash_equals_model_with_sdpa_under_bf16_autocast(flash, pe, heads):
    """The whole model, packed rows with the documents masked and positions restarting, then plain rows: flash-attn's
    logits equal SDPA's within the spread of bf16 rounding over two layers. Measured over 4 seeds x 1 and 2 threads x
    this grid: at most 0.07 apart on logits up to 5.2 (the ulp there: 2^-5), while dropping the document mask moves
    them by 5 or more; the bounds, 0.125 and 1, keep a margin of 1.8x and 5x."""
    torch.manual_seed(0)
    model = tiny(pe, n_kv_heads=HEADS[heads], init_std=0.1).eval()
    rows = packed_rows(2)
    documents = Documents.of_tokens(rows, EOS)
    logits = {}
    with torch.no_grad(), bf16():
        for mode in ("flash", "sdpa"):
            model.set_attention(mode)
            logits[mode] = (model(rows, doc_ids=documents).logits, model(rows).logits)
        unmasked = model(rows, doc_ids=documents, document_mask=False).logits
    assert [call.kind for call in flash.calls] == ["varlen", "varlen", "dense", "dense"]
    for flash_logits, sdpa_logits in zip(*logits.values(), strict=True):
        close_in_bf16(flash_logits, sdpa_logits, atol=0.125)
    assert (unmasked - logits["sdpa"][0]).abs().amax() > 1


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_kv_cached_decoding_goes_through_the_dense_kernel(flash, pe, heads):
    """A prefill, one new token, then a block of three: the dense kernel gets queries shorter than the keys (aligned to
    their end, ALiBi's distances too) and the logits equal the full forward's."""
    torch.manual_seed(0)
    model = tiny(pe, n_kv_heads=HEADS[heads], init_std=0.1).eval()
    model.set_attention("flash")
    ids = torch.randint(1, 256, (2, 24))
    with torch.no_grad(), bf16():
        full = model(ids).logits
        cache = KVCache(model.config.n_layers)
        steps = [model(ids[:, :20], kv_cache=cache).logits]
        steps.append(model(ids[:, 20:21], start_pos=20, kv_cache=cache).logits)
        steps.append(model(ids[:, 21:], start_pos=21, kv_cache=cache).logits)
    shapes = [(call.kind, call.q_shape[1], call.k_shape[1]) for call in flash.calls]
    assert shapes == [("dense", 24, 24)] * 2 + [("dense", 20, 20)] * 2 + [("dense", 1, 21)] * 2 + [("dense", 3, 24)] * 2
    assert all(call.k_shape[2] == (HEADS[heads] or 4) for call in flash.calls)  # key/value heads as they are: no repeat
    close_in_bf16(torch.cat(steps, dim=1), full, atol=5e-2)


# --- no host tensor per call ---------------------------------------------------------------------------------------------
def test_the_flash_path_passes_the_encodings_buffers_and_the_batchs_offsets_as_they_are(flash):
    """ALiBi's slopes reach flash-attn as the encoding's own buffer (no copy per call), also in float32 when the model
    was cast to bf16 (then a cast on the device, refused by flash-attn otherwise); cu_seqlens are the batch's."""
    torch.manual_seed(0)
    model = tiny("alibi").eval()
    model.set_attention("flash")
    rows = packed_rows()
    documents = Documents.of_tokens(rows, EOS)
    with torch.no_grad(), bf16():
        model(rows, doc_ids=documents)
    buffers = [pe.slopes for pe in model.position_encodings()]
    assert [call.alibi_slopes for call in flash.calls] == buffers  # the same tensors (identity, no copy)
    assert all(call.cu_seqlens is documents.cu_seqlens for call in flash.calls)
    flash.calls.clear()
    model.bfloat16()  # casts the buffers too
    with torch.no_grad():
        model(rows)
    assert all(call.alibi_slopes.dtype == torch.float32 for call in flash.calls) and len(flash.calls) == 2


class CpuTensorUse(TorchDispatchMode):
    """Records every op that reads a CPU tensor: on a model on another device, a host tensor copied in per call."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))
        if any(isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" for leaf in leaves):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("pe", ["alibi", "nope", "kerple_log"])
def test_the_sdpa_path_reads_no_host_tensor(pe):
    """A forward of a model moved to the meta device (packed rows, then plain rows, then a KV-cache step) never touches
    a CPU tensor: every mask, bias and index is made on the model's device, nothing is copied in from the host per
    call. (Rotary encodings and FIRE cannot run on meta: they turn autocast off, which meta does not have.)"""
    model = tiny(pe, n_kv_heads=2).eval().to("meta")
    rows = packed_rows()
    documents = Documents.of_tokens(rows, EOS).to("meta")
    rows = rows.to("meta")
    with torch.no_grad(), CpuTensorUse() as used:
        model(rows, doc_ids=documents)
        model(rows)
        cache = KVCache(model.config.n_layers)
        model(rows[:, :8], kv_cache=cache)
        model(rows[:, 8:9], start_pos=8, kv_cache=cache)
    assert used.ops == []


# --- the setting: chosen once, enforced, described ------------------------------------------------------------------------
def test_flash_without_flash_attn_is_a_one_line_error_naming_the_install(monkeypatch, fresh_import, caplog):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed: ModuleNotFoundError for flash_attn itself
    with caplog.at_level(logging.DEBUG, logger="fope_lm.nn.attention"):
        model = tiny("rope")
    assert [r.levelname for r in caplog.records] == ["DEBUG"] and "flash-attn is not installed" in caplog.text
    with pytest.raises(ConfigError) as error:
        model.set_attention("flash")
    message = str(error.value)
    assert "\n" not in message and "flash-attn is not installed" in message
    assert "pip install flash-attn --no-build-isolation" in message
    model.set_attention("auto")
    assert attention_kernels(model) == "SDPA (dense, documents by mask, KV decode) [flash-attn is not installed]"
    with pytest.raises(ConfigError, match="attention='fast' is not a kernel choice: use one of auto, flash, sdpa"):
        model.set_attention("fast")


def test_a_broken_flash_attn_warns_once_with_the_first_line(monkeypatch, fresh_import, caplog, tmp_path):
    """Installed but failing to import (a build for another torch or CUDA): one warning with the error's first line,
    however many layers and models look it up; `flash` says so and how to reinstall."""
    package = tmp_path / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(
        'raise ImportError("libcudart.so.11.0: cannot open shared object file: No such file or directory\\n  more detail")\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    with caplog.at_level(logging.INFO, logger="fope_lm.nn.attention"):
        model = tiny("rope")
        tiny("alibi").set_attention("auto")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and len(caplog.records) == 1
    assert warnings[0].getMessage().endswith("libcudart.so.11.0: cannot open shared object file: No such file or directory")
    with pytest.raises(ConfigError, match=r"fails to import \(libcudart.so.11.0: .*\): reinstall it .*--no-build-isolation"):
        model.set_attention("flash")


@pytest.mark.parametrize("pe", NO_KERNEL_BIAS)
def test_flash_with_a_bias_flash_attn_cannot_compute_fails_at_build(flash, pe):
    model = tiny(pe)
    with pytest.raises(ConfigError, match=rf"^attention=flash but {pe}'s attention bias has no form flash-attn computes in-kernel"):
        model.set_attention("flash")
    model.set_attention("auto")  # the same choice in auto: SDPA, and the log line says why
    assert attention_kernels(model).startswith(f"SDPA (dense, documents by mask, KV decode; {pe} bias in query chunks) [{pe}'s")
    with torch.no_grad(), bf16():
        model(packed_rows())
    assert flash.calls == []


def test_flash_checks_the_device_at_build(flash, monkeypatch):
    """Not CUDA, or a GPU before Ampere, or a head dim above 256: errors at build in `flash`, SDPA in `auto`."""
    model = tiny("rope")
    monkeypatch.setattr(attention, "device_capability", real_device_capability)  # the CPU as it is
    with pytest.raises(ConfigError, match=r"^attention=flash but flash-attn runs on CUDA and the model runs on cpu: run on a GPU"):
        model.set_attention("flash")
    model.set_attention("auto")
    assert attention_kernels(model).endswith("[flash-attn runs on CUDA and the model runs on cpu]")
    monkeypatch.setattr(attention, "device_capability", lambda device: (7, 5))
    with pytest.raises(ConfigError, match="needs an Ampere \\(sm80\\) or newer GPU and cpu is sm75"):
        model.set_attention("flash")
    with torch.device("meta"):
        wide = build_model("tiny", d_model=576, n_heads=2)  # head_dim 288
    with pytest.raises(ConfigError, match="head_dim 288 is above flash-attn's 256"):
        wide.set_attention("flash", device="cpu")


def test_flash_checks_each_call_before_its_kernel_runs(flash):
    """What only a call knows: its dtype (float32 without autocast), documents without cu_seqlens, an in-kernel bias
    with per-token positions and no documents. `flash` raises (no kernel has run), `auto` takes SDPA."""
    rows = packed_rows()
    rope, alibi = tiny("rope").eval(), tiny("alibi").eval()
    cases = [
        (rope, dict(), False, "flash-attn takes fp16 or bf16 and q is torch.float32: run under 16-bit autocast"),
        (rope, dict(doc_ids=document_ids_of(rows)), True, "documents without cu_seqlens: build them on the host with Documents.of_tokens"),
        (alibi, dict(doc_ids=Documents.of_tokens(rows, EOS), document_mask=False), True, "alibi's in-kernel bias is by token index"),
    ]
    for model, kwargs, autocast, message in cases:
        with torch.no_grad(), bf16() if autocast else torch.autocast("cpu", enabled=False):
            model.set_attention("flash")
            with pytest.raises(ConfigError, match=rf"^attention=flash but {message}"):
                model(rows, **kwargs)
            assert flash.calls == []
            model.set_attention("auto")
            model(rows, **kwargs)  # SDPA
            assert flash.calls == []


def document_ids_of(rows: torch.Tensor) -> torch.Tensor:
    return Documents.of_tokens(rows, EOS).ids  # doc_ids as a tensor: no cu_seqlens


def test_attention_kernels_names_each_path_in_one_line(flash):
    model = tiny("alibi")
    assert attention_kernels(model) == (  # the constructor's choice: auto, device not yet known (CUDA assumed)
        "flash-attn 2.8.3 on cuda (dense, varlen, KV decode; alibi in-kernel) | SDPA (fp32 inputs, documents without "
        "cu_seqlens; alibi bias in query chunks for per-token positions without documents)"
    )
    model.set_attention("flash")
    assert attention_kernels(model) == "flash-attn 2.8.3 on cpu (dense, varlen, KV decode; alibi in-kernel) [attention=flash: nothing else]"
    model.set_attention("sdpa")
    assert attention_kernels(model) == "SDPA (dense, documents by mask, KV decode; alibi bias in query chunks) [attention=sdpa]"
    rope = tiny("rope")
    rope.set_attention("auto")
    assert attention_kernels(torch.nn.ModuleList([rope])) == (  # through wrappers (DDP, torch.compile) too
        "flash-attn 2.8.3 on cpu (dense, varlen, KV decode) | SDPA (fp32 inputs, documents without cu_seqlens)"
    )
    model.use_flash_attention(True)  # the earlier switch: auto
    assert attention_kernels(model).startswith("flash-attn 2.8.3 on cpu")


def test_the_chosen_kernel_compiles_into_one_graph(flash):
    """The choice is made before tracing: an `auto` forward that falls back to SDPA (float32) and a `flash` forward
    through the (traceable) dense kernel each trace into one graph without breaks."""
    model = tiny("rope", n_kv_heads=2)
    ids = torch.randint(1, 256, (2, 33))
    model.set_attention("auto")
    assert graph_breaks(model, ids[:, :-1], ids[:, 1:]) == {"graphs": 1, "breaks": 0, "reasons": []}
    assert flash.calls == []
    model.set_attention("flash")
    with bf16():
        assert graph_breaks(model, ids[:, :-1], ids[:, 1:]) == {"graphs": 1, "breaks": 0, "reasons": []}
    assert [call.kind for call in flash.calls] == ["dense", "dense"]
