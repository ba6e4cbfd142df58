"""An OLMo-style decoder-only transformer, generic over position encodings.

Pre-norm blocks  x + attn(norm(x)),  x + mlp(norm(x));  RMSNorm (weight, eps 1e-6); fused QKV, optionally with
fewer key/value heads than query heads (grouped-query attention); SwiGLU MLP; no biases; final RMSNorm; untied LM
head by default. With n_kv_heads, ffn_hidden_size, tied embeddings and eps 1e-5 this is exactly a LlamaForCausalLM
(fope_lm/hf/llama.py converts both ways). Each attention layer owns a position-encoding module
and asks it to rotate q/k and for an attention bias; the model never looks at the encoding's name, and it
knows nothing about distribution (accelerate/DeepSpeed wrap it from outside).

Shapes: B batch, T sequence, D d_model, H heads, H_kv key/value heads, Dh head_dim, V padded vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fope_lm.errors import ConfigError
from fope_lm.nn.attention import KernelChoice, causal_attention, choose_kernel
from fope_lm.nn.documents import Documents, document_lengths, document_positions
from fope_lm.nn.kv_cache import KVCache
from fope_lm.position import EncodingSpec, PositionEncoding, Positions

VOCAB_MULTIPLE = 128  # embedding rows are padded to a multiple of this (50280 -> 50304): faster matmuls


@dataclass
class ModelConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: n_heads, the OLMo shape
    vocab_size: int = 50280  # the tokenizer's size; the embedding is padded up to `padded_vocab_size`
    max_seq_len: int = 512  # the training length L (sets FoPE's floor frequency, YaRN's default L0)
    mlp_ratio: int = 8  # SwiGLU input projection D -> mlp_ratio * D, split into value and gate halves
    ffn_hidden_size: int | None = None  # SwiGLU's hidden width, when set (Llama's intermediate_size); None: mlp_ratio * D / 2
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    rope_theta: float = 10000.0
    pe: str = "rope"
    pe_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head_dim {self.d_model // self.n_heads} must be even")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"n_kv_heads {self.n_kv_heads} must divide n_heads {self.n_heads} (query heads share key/value heads in groups)"
            )
        if self.ffn_hidden_size is not None and self.ffn_hidden_size < 1:
            raise ConfigError(f"ffn_hidden_size must be positive or null, got {self.ffn_hidden_size}")
        self.pe_options = dict(self.pe_options)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def pe_spec(self) -> EncodingSpec:
        """The position encoding, typed (fope_lm.position.spec): what every stage asks about it."""
        return EncodingSpec.of(self.pe, self.pe_options)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_size(self) -> int:
        """SwiGLU's hidden width."""
        return self.ffn_hidden_size or self.mlp_ratio * self.d_model // 2

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**values)


# Model sizes (name -> shape). The paper's 60M / 180M / 1.2B are `60m`, `180m`, `1b`.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4),
    "20m": dict(d_model=256, n_layers=8, n_heads=8),
    "60m": dict(d_model=512, n_layers=8, n_heads=8),
    "150m": dict(d_model=768, n_layers=12, n_heads=12),
    "180m": dict(d_model=1024, n_layers=8, n_heads=8),
    "300m": dict(d_model=1024, n_layers=16, n_heads=16),
    "700m": dict(d_model=1536, n_layers=16, n_heads=16),
    "1b": dict(d_model=2048, n_layers=16, n_heads=16),
    # SmolLM (HuggingFaceTB), a LlamaForCausalLM: grouped-query attention, tied embeddings, its SwiGLU width, vocab 49152
    "smollm-135m": dict(d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden_size=1536, tie_embeddings=True, norm_eps=1e-5),
    "smollm-360m": dict(d_model=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_hidden_size=2560, tie_embeddings=True, norm_eps=1e-5),
}


def preset_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[preset], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the variance in float32 whatever the activations' dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        # fused projection: the H query heads, then the H_kv key heads, then the H_kv value heads
        self.qkv = nn.Linear(config.d_model, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.flash: KernelChoice = choose_kernel("auto")  # looked up here, never in a traced forward; set_attention refines it
        self.pe: PositionEncoding = config.pe_spec.build(
            head_dim=config.head_dim, n_heads=config.n_heads, n_kv_heads=config.kv_heads, max_seq_len=config.max_seq_len,
            theta=config.rope_theta,
        )  # fmt: skip

    def rotated_qkv(self, x, positions: Positions | torch.Tensor, dynamic_len: int | None = None):
        """q (B, H, T, Dh), k and v (B, H_kv, T, Dh) of x (B, T, D), q and k after the position encoding."""
        B, T, D = x.shape
        heads = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = heads.split((self.n_heads, self.n_kv_heads, self.n_kv_heads), dim=1)
        return (*self.pe.rotate_qk(q, k, positions, dynamic_len), v)

    def forward(
        self,
        x,
        positions: Positions | torch.Tensor,
        kv_cache: KVCache | None = None,
        dynamic_len: int | None = None,
        documents: Documents | None = None,
    ):
        B, T, D = x.shape
        positions = Positions.of(positions)
        q, k, v = self.rotated_qkv(x, positions, dynamic_len)
        state = self.pe.token_state(x)
        q_index = k_index = torch.arange(positions.start, positions.end, device=x.device)  # the causal order
        per_token = positions.per_token  # the encoding's positions where they are not the indices
        if kv_cache is not None:  # the cached keys sit at 0 .. start - 1, the new ones after them
            k, v = kv_cache.update(self.layer, k, v)
            state = None if state is None else kv_cache.update_state(self.layer, state)
            k_index = torch.arange(k.shape[2], device=x.device)
        y = causal_attention(
            q, k, v, self.pe, q_index=q_index, k_index=k_index, q_positions=per_token,
            k_positions=per_token if kv_cache is None else None, documents=documents, k_state=state, flash=self.flash,
        )  # (B, H, T, Dh)  # fmt: skip
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.hidden_size
        self.up = nn.Linear(config.d_model, 2 * hidden, bias=False)  # value and gate halves, fused
        self.down = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x):
        value, gate = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, positions, kv_cache=None, dynamic_len=None, documents=None):
        x = x + self.attn(self.attn_norm(x), positions, kv_cache, dynamic_len, documents)
        return x + self.mlp(self.mlp_norm(x))


# The training loss never holds the whole (B*T, V) float32 logits: the LM head and the cross-entropy run on chunks of
# token rows, each chunk's logits at most this many elements (256 MiB of float32: 1334 rows at V = 50304)
# (`Transformer.forward`'s `loss_chunk_size`). Like attention's BIAS_CHUNK_ELEMENTS, a bound in bytes.
LOSS_CHUNK_ELEMENTS = 2**26


def default_loss_chunk_size(vocab_size: int) -> int:
    """Token rows per LM-head chunk when the caller names none: LOSS_CHUNK_ELEMENTS // V (at least 1)."""
    return max(1, LOSS_CHUNK_ELEMENTS // vocab_size)


def fused_linear_cross_entropy() -> Callable[..., torch.Tensor] | None:
    """liger-kernel's fused linear cross-entropy, fn(rows (N, D), weight (V, D), targets (N,), ignore_index=,
    reduction=) -> the loss, where CUDA is present and the optional extra is installed (`pip install -e .[liger]`);
    else None. Looked up by the model once, when it is built: nothing is imported while a forward is traced."""
    if not torch.cuda.is_available():  # Triton kernels: CUDA only, so never imported on a CPU machine
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of logits rows @ weight.T (rows (N, D), weight (V, D), targets (N,), -100 ignored),
    `chunk` rows at a time, with each chunk's gradients computed in forward right after its logits (softmax - one-hot,
    times the rows and the weight): backward then needs neither the logits nor their recomputation, only a scaling of
    what forward kept (the rows' gradient, N x D, and the weight's, V x D float32). The loss is F.cross_entropy's of
    each chunk; the matmuls run in the logits' dtype (autocast's, or the weight's)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        loss = rows.new_zeros((), dtype=torch.float32)
        grad_rows = torch.empty_like(rows)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, rows.shape[0], chunk):
            x, t = rows[start : start + chunk], targets[start : start + chunk]
            logits = F.linear(x, weight)
            dtype = logits.dtype
            log_probs = F.log_softmax(logits.float(), dim=-1)
            del logits
            loss = loss + F.nll_loss(log_probs, t, ignore_index=-100, reduction="sum")
            kept = (t != -100).to(log_probs.dtype)[:, None]
            grad = log_probs.exp_().scatter_add_(1, t.clamp(min=0)[:, None], -kept).mul_(kept).to(dtype)  # d loss / d logits
            grad_rows[start : start + chunk] = grad @ weight
            grad_weight += grad.T @ x
        ctx.save_for_backward(grad_rows, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_rows, grad_weight = ctx.saved_tensors
        return grad_rows * grad_loss.to(grad_rows.dtype), (grad_weight * grad_loss).to(ctx.weight_dtype), None, None


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V) float32; None when the loss was computed in chunks (or fused)
    loss: torch.Tensor | None  # float32 cross-entropy ("mean" or "sum" over target tokens)
    n_targets: torch.Tensor | None  # number of target tokens (labels != -100)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.checkpoint_every = 0  # activation checkpointing: a training-time choice (set_activation_checkpointing)
        self.fused_loss = fused_linear_cross_entropy()  # looked up once, here: never inside a traced forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) truncated at 3 sigma for every matrix; norms at one; PE state (its own layers included:
        FIRE's MLP, FoX's gate) initialised by the encoding, as its reference does."""
        std = self.config.init_std
        owned_by_pe = {id(inner) for pe in self.position_encodings() for inner in pe.modules()}
        for module in self.modules():
            if id(module) in owned_by_pe and not isinstance(module, PositionEncoding):
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, PositionEncoding):
                module.init_constants()
                module.reset_parameters()

    def set_attention(self, mode: str = "auto", device: torch.device | str | None = None) -> None:
        """The attention kernel of every layer, chosen once (fope_lm.nn.attention.choose_kernel): auto (flash-attn where
        it fits, else PyTorch SDPA; the default), flash (flash-attn or a one-line ConfigError, now for what the build
        knows, at the first call for the rest) or sdpa. device: where the model will run (default: its parameters')."""
        device = next(self.parameters()).device if device is None else device
        for block in self.blocks:
            attn = cast(Block, block).attn
            attn.flash = choose_kernel(mode, attn.pe, head_dim=attn.head_dim, device=device)

    def use_flash_attention(self, enabled: bool) -> None:
        """`set_attention("auto")` if enabled, else `set_attention("sdpa")`: the switch before `set_attention`, kept
        for code written against it."""
        self.set_attention("auto" if enabled else "sdpa")

    def use_fused_loss(self, enabled: bool) -> None:
        """liger-kernel's fused linear cross-entropy for CUDA training forwards where installed, the default; False:
        always the chunked LM head + loss of `forward`."""
        self.fused_loss = fused_linear_cross_entropy() if enabled else None

    def set_activation_checkpointing(self, every: int) -> None:
        """Recompute every `every`-th block (blocks 0, every, 2 every, ...) in backward instead of keeping its
        activations (non-reentrant, so it composes with torch.compile, DDP and DeepSpeed); 0 turns it off."""
        self.checkpoint_every = every

    def position_encodings(self) -> list[PositionEncoding]:
        return [cast(Block, block).attn.pe for block in self.blocks]

    def num_parameters(self, *, exclude_input_embedding: bool = False) -> int:
        """Trainable parameters (frozen FoPE coefficients are buffers, so they do not count)."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if exclude_input_embedding and not self.config.tie_embeddings:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 * n_layers * d_model * T (PaLM's estimate, attention included).

        N counts every trainable parameter except the input embedding (a lookup), LM head included.
        """
        n = self.num_parameters(exclude_input_embedding=True)
        return 6 * n + 12 * self.config.n_layers * self.config.d_model * seq_len

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        *,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        dynamic_len: int | None = None,
        doc_ids: Documents | torch.Tensor | None = None,
        document_mask: bool = True,
        restart_positions: bool = True,
    ) -> torch.Tensor:
        """The final norm's output (B, T, D): the forward without the LM head, which evaluation and generation
        apply to a few positions at a time (arguments as in `forward`)."""
        if kv_cache is not None and start_pos != kv_cache.length:
            raise ValueError(f"start_pos {start_pos} does not continue the KV cache of length {kv_cache.length}")
        documents = None if doc_ids is None else Documents.of(doc_ids)
        if documents is not None and kv_cache is not None:
            raise ValueError(
                "doc_ids describe packed rows for training and scoring; a KV cache continues one sequence: pass one or the other"
            )
        positions = Positions(start_pos, input_ids.shape[1])  # ints: static for the compiler, no host reads
        if documents is not None and restart_positions:  # dynamic scaling then scales each document for its own length
            positions = Positions(start_pos, input_ids.shape[1], document_positions(documents.ids), document_lengths(documents.ids))
        documents = documents if document_mask else None
        x = self.embed(input_ids)
        recompute = self.checkpoint_every and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, positions, None, dynamic_len, documents, use_reentrant=False)
            else:
                x = block(x, positions, kv_cache, dynamic_len, documents)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        dynamic_len: int | None = None,
        loss_chunk_size: int | None = None,
        reduction: str = "mean",
        doc_ids: Documents | torch.Tensor | None = None,
        document_mask: bool = True,
        restart_positions: bool = True,
    ) -> ModelOutput:
        """input_ids, labels: (B, T) int64; labels -100 are ignored.

        start_pos: absolute position of input_ids[:, 0] (the KV cache length when decoding).
        dynamic_len: the length dynamic YaRN scales for (default: the last position + 1).
        loss_chunk_size: with labels, the LM head + loss run on this many token rows (of the B * T) at a time, so
          that the whole (B * T, V) float32 logits never exist; None: `default_loss_chunk_size(V)`
          (LOSS_CHUNK_ELEMENTS // V rows). When every row fits one chunk the loss is computed at once and `logits`
          returned; else `logits` is None, and with gradients each chunk's are computed in forward
          (`ChunkedLinearCrossEntropy`; a head weight that is not all here, sharded outside lm_head's own call, is
          recomputed chunk by chunk in backward instead). On CUDA with liger-kernel installed, a training forward uses
          its fused linear cross-entropy (`use_fused_loss`), which chunks by itself.
        doc_ids: (B, T) int64, the document of each token of packed rows (non-decreasing along T;
          `fope_lm.nn.documents`), or `Documents`. With the defaults every token's logits are those of its document
          run alone: `document_mask` keeps attention within each document, `restart_positions` counts each
          document's positions from 0.
        """
        x = self.hidden_states(
            input_ids, start_pos=start_pos, kv_cache=kv_cache, dynamic_len=dynamic_len,
            doc_ids=doc_ids, document_mask=document_mask, restart_positions=restart_positions,
        )  # fmt: skip
        if labels is None:
            return ModelOutput(self.lm_head(x).float(), None, None)
        n_targets = (labels != -100).sum()
        rows, targets = x.flatten(0, 1), labels.flatten()  # (B * T, D), (B * T,)
        chunk = loss_chunk_size or default_loss_chunk_size(self.config.padded_vocab_size)
        logits, fused = None, self.fused_loss if self._fuses_loss(rows) else None
        if fused is not None:
            loss = fused(rows, self.lm_head.weight, targets, ignore_index=-100, reduction="sum")
        elif chunk >= rows.shape[0]:
            logits = self.lm_head(x).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets, ignore_index=-100, reduction="sum")
        elif torch.is_grad_enabled() and self._head_weight_is_here():
            loss = cast(torch.Tensor, ChunkedLinearCrossEntropy.apply(rows, self.lm_head.weight, targets, chunk))
        else:
            loss = rows.new_zeros((), dtype=torch.float32)
            for start in range(0, rows.shape[0], chunk):
                piece = (rows[start : start + chunk], targets[start : start + chunk])
                if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of storing them
                    loss = loss + checkpoint(self._loss_sum, *piece, use_reentrant=False)
                else:
                    loss = loss + self._loss_sum(*piece)
        if reduction == "mean":
            loss = loss / n_targets.clamp(min=1)
        elif reduction != "sum":
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        return ModelOutput(logits, loss, n_targets)

    def _loss_sum(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The summed cross-entropy of token rows (N, D) against targets (N,), -100 ignored."""
        return F.cross_entropy(self.lm_head(rows).float(), targets, ignore_index=-100, reduction="sum")

    def _fuses_loss(self, rows: torch.Tensor) -> bool:
        """Whether the loss of `rows` goes to the fused kernel: one is installed (CUDA), the rows are on CUDA, a
        gradient is wanted (without one, chunks cost no more), and the head's weight is all here."""
        return self.fused_loss is not None and rows.is_cuda and torch.is_grad_enabled() and self._head_weight_is_here()

    def _head_weight_is_here(self) -> bool:
        """Whether lm_head's weight can be used outside lm_head's own call: not a parameter sharded there and gathered
        only while its module runs (its shape is then not (V, D))."""
        return self.lm_head.weight.shape == (self.config.padded_vocab_size, self.config.d_model)


def build_model(preset: str | ModelConfig = "tiny", pe: str | None = None, **overrides) -> Transformer:
    """A Transformer from a preset name (or a full ModelConfig) with overrides, e.g. pe="fope",
    pe_options={"sigma": 0.3}, vocab_size=8192, max_seq_len=128. Build under `torch.device("meta")` to
    count parameters of large presets without allocating them."""
    if pe is not None:
        overrides["pe"] = pe
    config = dataclasses.replace(preset, **overrides) if isinstance(preset, ModelConfig) else preset_config(preset, **overrides)
    return Transformer(config)
