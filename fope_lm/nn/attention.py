"""Causal attention kernels: flash-attn on CUDA where it fits, PyTorch SDPA otherwise.

Position encodings with a logit bias (ALiBi, KERPLE, FIRE, CoPE, FoX) never need a dense (heads, T, T) bias: flash-
attn computes ALiBi in-kernel from its slopes, and the SDPA path builds the bias one query chunk at a time. Document
masking (attention only within each document of a packed row) uses flash-attn's varlen kernel when it can, and
otherwise a block-diagonal boolean mask, also one query chunk at a time.

The kernel is chosen once, when the model is built (`attention` = auto | flash | sdpa: `choose_kernel`, which
`Transformer.set_attention` calls for every layer), and what each call can only know then is checked per call:
  - at build: whether flash-attn imports (`load_flash_attn`, the only import of it, never inside a traced forward),
    the position encoding (no bias, or one flash-attn computes in-kernel: `kernel_bias()`), the head dim (<= 256)
    and the device (CUDA, Ampere or newer: `device_capability`);
  - per call (all static under torch.compile: dtypes, devices, which arguments are given): the dtype (fp16/bf16 and
    the same for q, k, v; under autocast they are the autocast dtype), documents (the varlen kernel needs their
    cu_seqlens on the inputs' device) and positions (an in-kernel bias is by token index, so per-token positions
    need documents, within which the two agree).
`auto` runs flash-attn where both fit and SDPA elsewhere; `flash` makes a misfit a one-line ConfigError, raised by
`choose_kernel` for what the build knows and by the first attention call, before its kernel runs, for the rest;
`sdpa` never uses flash-attn. `attention_kernels(model)` says in one line which kernel runs each path, for the log.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fope_lm.errors import ConfigError
from fope_lm.nn.documents import Documents
from fope_lm.position.base import BiasInputs, PositionEncoding

log = logging.getLogger(__name__)

# Upper bound on the elements of one (batch, heads, query-chunk, keys) block of bias or mask: 64 MiB in float32.
BIAS_CHUNK_ELEMENTS = 1 << 24

ATTENTION_MODES = ("auto", "flash", "sdpa")
FLASH_INSTALL = "pip install flash-attn --no-build-isolation"  # its setup.py imports torch: build isolation fails
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2: Ampere or newer

# A reason flash-attn does not fit: (the problem, the fix), joined into one line.
Misfit = tuple[str, str]


class FlashAttn(NamedTuple):
    """flash-attn's two kernels that attention calls, and its version."""

    func: Callable[..., torch.Tensor]
    varlen_func: Callable[..., torch.Tensor]
    version: str


@functools.cache
def load_flash_attn() -> FlashAttn | str:
    """flash-attn's kernels, or why they are not available. Imported here only, once per process: absent, it says so
    at DEBUG level (the run log names the kernel anyway); present but failing to import (a build for another torch or
    CUDA), it warns once with the error's first line."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception as error:  # a broken build raises ImportError, OSError or RuntimeError: all mean "not usable"
        if isinstance(error, ModuleNotFoundError) and error.name == "flash_attn":
            log.debug("flash-attn is not installed: attention uses PyTorch SDPA (%s adds it)", FLASH_INSTALL)
            return "flash-attn is not installed"
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        log.warning("flash-attn is installed but fails to import, attention uses PyTorch SDPA: %s", first_line)
        return f"flash-attn fails to import ({first_line})"
    version = getattr(flash_attn, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("flash-attn")
        except importlib.metadata.PackageNotFoundError:
            version = "(unknown version)"
    return FlashAttn(flash_attn_func, flash_attn_varlen_func, str(version))


def flash_attn_funcs() -> FlashAttn | None:
    """flash-attn's (flash_attn_func, flash_attn_varlen_func, version), or None when it is not installed or does not
    import (`load_flash_attn`)."""
    found = load_flash_attn()
    return found if isinstance(found, FlashAttn) else None


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, or None for a device flash-attn does not run on (any but CUDA). The one
    place attention asks what a device can do: the tests declare the CPU capable here to run the flash path with a
    stand-in for flash-attn."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


@dataclass(frozen=True)
class KernelChoice:
    """One attention layer's kernel, chosen once at build (`choose_kernel`). flash: flash-attn's kernels (None: SDPA
    always, for `reason`); device_type: the device they run on; mode `flash` makes a call they cannot take an error,
    `auto` sends it to SDPA."""

    mode: str = "auto"
    flash: FlashAttn | None = None
    device_type: str = "cuda"
    reason: str = ""

    @property
    def enforced(self) -> bool:
        return self.mode == "flash"


def choose_kernel(
    mode: str = "auto", pe: PositionEncoding | None = None, *, head_dim: int | None = None, device: torch.device | str | None = None
) -> KernelChoice:
    """The kernel of an attention layer for `attention=mode`, from what is known at build: the encoding `pe`, the
    `head_dim` and the `device` the model runs on. Each left None is checked per call instead (the model's constructor
    chooses `auto` before it knows its device). mode `flash` raises a one-line ConfigError where flash-attn cannot
    run; the dtype and the documents are only known per call (the module docstring)."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"attention={mode!r} is not a kernel choice: use one of {', '.join(ATTENTION_MODES)}")
    if mode == "sdpa":
        return KernelChoice(mode, reason="attention=sdpa")
    found = load_flash_attn()
    device = None if device is None else torch.device(device)
    misfit = _build_misfit(found, pe, head_dim, device)
    if misfit is None and isinstance(found, FlashAttn):
        return KernelChoice(mode, found, "cuda" if device is None else device.type)
    assert misfit is not None
    if mode == "flash":
        raise ConfigError(f"attention=flash but {misfit[0]}: {misfit[1]}")
    return KernelChoice(mode, reason=misfit[0])


def _build_misfit(found: FlashAttn | str, pe: PositionEncoding | None, head_dim: int | None, device: torch.device | None) -> Misfit | None:
    if isinstance(found, str):
        if found.endswith("not installed"):
            return found, f"{FLASH_INSTALL} (CUDA only), or attention=auto or sdpa"
        return found, f"reinstall it for this torch and CUDA (pip uninstall flash-attn, then {FLASH_INSTALL} --no-cache-dir)"
    if pe is not None and pe.has_attention_bias and pe.kernel_bias() is None:
        return _no_kernel_bias(pe)
    if head_dim is not None and head_dim > FLASH_MAX_HEAD_DIM:
        return _head_dim_too_large(head_dim)
    if device is not None:
        capability = device_capability(device)
        if capability is None:
            return f"flash-attn runs on CUDA and the model runs on {device}", "run on a GPU, or use attention=auto or sdpa"
        if capability < FLASH_MIN_CAPABILITY:
            return (
                f"flash-attn 2 needs an Ampere (sm80) or newer GPU and {device} is sm{capability[0]}{capability[1]}",
                "use attention=auto or sdpa",
            )
    return None


def _no_kernel_bias(pe: PositionEncoding) -> Misfit:
    return (
        f"{pe.name}'s attention bias has no form flash-attn computes in-kernel (its kernel_bias() is None)",
        "use attention=auto or sdpa (SDPA adds the bias one query chunk at a time)",
    )


def _head_dim_too_large(head_dim: int) -> Misfit:
    return f"head_dim {head_dim} is above flash-attn's {FLASH_MAX_HEAD_DIM}", "use attention=auto or sdpa, or more heads"


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Key/value heads (B, H_kv, T, D) repeated for the n_heads query heads of their groups (query head h reads
    key/value head h // (n_heads / H_kv))."""
    return x if x.shape[1] == n_heads else x.repeat_interleave(n_heads // x.shape[1], dim=1)


def causal_mask(q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where the key's index in the sequence is <= the query's."""
    return k_index[None, :] <= q_index[:, None]


def attention_mask(q_index: torch.Tensor, k_index: torch.Tensor, doc_ids: torch.Tensor | None, q_rows: slice) -> torch.Tensor:
    """Causal (Tq, Tk), and within documents (B, Tq, Tk) when doc_ids (B, Tk) is given (the queries: its `q_rows`)."""
    mask = causal_mask(q_index, k_index)
    if doc_ids is None:
        return mask
    return mask & (doc_ids[:, q_rows, None] == doc_ids[:, None, :])


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pe: PositionEncoding,
    *,
    q_index: torch.Tensor,
    k_index: torch.Tensor,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    documents: Documents | None = None,
    k_state: torch.Tensor | None = None,
    flash: KernelChoice | None = None,
    bias_chunk_elements: int = BIAS_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v, causal by index in the sequence, and within documents with `documents`.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D). With a KV cache the queries are the last Tq of the keys.
    q_index, k_index: int64 (Tq,), (Tk,) the tokens' indices in the sequence (the causal order). q_positions,
    k_positions: the position encoding's positions, (T,) or (B, T) (default: the indices; they differ when positions
    restart at each document). documents: the batch's documents (no KV cache). k_state: the encoding's token state
    of the keys (B, S, Tk). flash: the layer's `choose_kernel(...)`, made once (at model build), so that nothing here
    imports or looks anything up while a forward is traced; None: SDPA.
    """
    n_heads, tq, tk = q.shape[1], q.shape[2], k.shape[2]
    if flash is not None and flash.flash is not None:
        per_token = q_positions is not None and q_positions.dim() == 2
        misfit = _flash_misfit(q, pe, documents, per_token_positions=per_token, device_type=flash.device_type)
        misfit = misfit or _flash_tensor_misfit(q, k, v, documents)
        if misfit is None:
            return _flash_attention(q, k, v, pe, documents, flash.flash)
        if flash.enforced:
            raise ConfigError(f"attention=flash but {misfit[0]}: {misfit[1]}")
    q_positions = q_index if q_positions is None else q_positions
    k_positions = k_index if k_positions is None else k_positions

    k, v = expand_kv(k, n_heads), expand_kv(v, n_heads)  # grouped-query attention: flash-attn takes them as they are
    doc_ids = None if documents is None else documents.ids
    if not pe.has_attention_bias and doc_ids is None:
        if tq == tk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if tq == 1:  # one new token attends to the whole cache
            return F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q_index, k_index))

    chunk = max(1, bias_chunk_elements // (q.shape[0] * n_heads * tk * pe.bias_memory))
    outputs = []
    for start in range(0, tq, chunk):
        block = slice(start, start + chunk)
        keys_block = slice(tk - tq + start, tk - tq + start + chunk)  # the queries' rows among the keys
        mask = attention_mask(q_index[block], k_index, doc_ids, keys_block)
        q_block = q[:, :, block]
        if pe.has_attention_bias:
            inputs = BiasInputs(
                q_positions=q_positions[..., block], k_positions=k_positions, q=q_block, k=k, mask=mask,
                q_rows=keys_block, k_state=k_state,
            )  # fmt: skip
            bias = pe.logit_bias(inputs)
            assert bias is not None  # has_attention_bias
            mask = bias.masked_fill(~(mask if mask.dim() == 2 else mask[:, None]), float("-inf")).to(q.dtype)
        elif mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, Tq, Tk): broadcast over heads
        outputs.append(F.scaled_dot_product_attention(q_block, k, v, attn_mask=mask))
    return torch.cat(outputs, dim=2)


def _flash_fits(
    q: torch.Tensor, pe: PositionEncoding, documents: Documents | None, *, per_token_positions: bool, device_type: str = "cuda"
) -> bool:
    """Whether flash-attn takes a call of queries like `q` (`_flash_misfit`)."""
    return _flash_misfit(q, pe, documents, per_token_positions=per_token_positions, device_type=device_type) is None


def _flash_misfit(
    q: torch.Tensor, pe: PositionEncoding, documents: Documents | None, *, per_token_positions: bool, device_type: str = "cuda"
) -> Misfit | None:
    """Why flash-attn cannot take a call, or None: it runs 16-bit inputs on its device (CUDA), without a bias or with a
    bias it computes in-kernel (the encoding's `kernel_bias`: -slope * (i - j) from the tokens' indices, so only
    where distances by index are the encoding's: no per-token positions, or within documents), and documents only
    with their cu_seqlens (built on the host: `Documents.of_tokens`)."""
    on_device = q.is_cuda if device_type == "cuda" else q.device.type == device_type
    if not on_device:
        problem = f"the inputs are on {q.device} and flash-attn was chosen for {device_type}"
        return problem, "call set_attention with the device the model runs on"
    if q.dtype not in FLASH_DTYPES:
        return f"flash-attn takes fp16 or bf16 and q is {q.dtype}", "run under 16-bit autocast (bf16 precision), or use attention=auto"
    if pe.has_attention_bias:
        if pe.kernel_bias() is None:
            return _no_kernel_bias(pe)
        if per_token_positions and documents is None:
            return (
                f"{pe.name}'s in-kernel bias is by token index and these positions are per token, without documents",
                "mask documents with restarting positions (or keep row positions), or use attention=auto",
            )
    if documents is not None and documents.cu_seqlens is None:
        return "documents without cu_seqlens", "build them on the host with Documents.of_tokens, or use attention=auto"
    return None


def _flash_tensor_misfit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: Documents | None) -> Misfit | None:
    """What flash-attn checks of the tensors themselves beyond `_flash_misfit`'s: one dtype for q, k and v, the head
    dim, and cu_seqlens on the inputs' device (never copied here: that is the batch's `Documents.to`)."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v have dtypes {q.dtype}, {k.dtype}, {v.dtype}", "use attention=auto"
    if q.shape[-1] > FLASH_MAX_HEAD_DIM:
        return _head_dim_too_large(q.shape[-1])
    cu_seqlens = None if documents is None else documents.cu_seqlens
    if cu_seqlens is not None and cu_seqlens.device != q.device:
        return f"the documents' cu_seqlens are on {cu_seqlens.device} and q on {q.device}", "move the batch's Documents with .to(device)"
    return None


def _flash_attention(q, k, v, pe: PositionEncoding, documents: Documents | None, flash) -> torch.Tensor:
    """flash-attn on (B, H, T, D) q and (B, H_kv, T, D) k, v. flash: `FlashAttn`, or any (func, varlen_func) pair."""
    dense, varlen = flash[0], flash[1]
    bias = pe.kernel_bias()
    # the encoding's buffer, already on the model's device: no host tensor per call (float() returns it as it is in
    # float32, flash-attn's dtype for slopes, and casts it on its device in a model cast to 16 bits)
    slopes = None if bias is None else bias.slopes.float()
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, heads, D): the last dim stays contiguous
    if documents is None:  # flash-attn aligns a shorter query block to the end of the keys, as a KV cache needs
        return dense(q, k, v, causal=True, alibi_slopes=slopes).transpose(1, 2)
    batch, length = q.shape[:2]
    cu_seqlens = documents.cu_seqlens
    # every document is one sequence of the flattened tokens; `length` (a Python int) bounds them all, with no host read
    out = varlen(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens, cu_seqlens, length, length,
        causal=True, alibi_slopes=slopes,
    )  # fmt: skip
    return out.view(batch, length, *out.shape[1:]).transpose(1, 2)


def describe_kernel(choice: KernelChoice, pe: PositionEncoding) -> str:
    """One line: which kernel runs each path of a layer with encoding `pe` (dense causal, documents, its bias, KV
    decoding), and why flash-attn does not where it does not."""
    bias = pe.has_attention_bias
    sdpa = "SDPA (dense, documents by mask, KV decode" + (f"; {pe.name} bias in query chunks)" if bias else ")")
    if choice.flash is None:
        return f"{sdpa} [{choice.reason}]"
    misfit = _build_misfit(choice.flash, pe, pe.head_dim, None)  # a choice made before the encoding was known
    if misfit is not None:
        return f"{sdpa} [{misfit[0]}]"
    in_kernel = f"; {pe.name} in-kernel" if bias else ""
    flash = f"flash-attn {choice.flash.version} on {choice.device_type} (dense, varlen, KV decode{in_kernel})"
    if choice.enforced:
        return f"{flash} [attention=flash: nothing else]"
    per_token = f"; {pe.name} bias in query chunks for per-token positions without documents" if bias else ""
    return f"{flash} | SDPA (fp32 inputs, documents without cu_seqlens{per_token})"


def attention_kernels(model: nn.Module) -> str:
    """One line for the run's log: the kernel of each attention path of the model's layers (`describe_kernel`), e.g.
    "flash-attn 2.8.3 on cuda (dense, varlen, KV decode) | SDPA (fp32 inputs, documents without cu_seqlens)". Works
    through wrappers (DDP, torch.compile): it walks the modules for layers holding a `KernelChoice` and an encoding."""
    lines: list[str] = []
    for module in model.modules():
        choice, pe = getattr(module, "flash", None), getattr(module, "pe", None)
        if isinstance(choice, KernelChoice) and isinstance(pe, PositionEncoding):
            line = describe_kernel(choice, pe)
            lines += [] if line in lines else [line]
    return "; ".join(lines) or "no attention layers"
