"""This project's architecture and Hugging Face's `LlamaForCausalLM` are the same network: pre-norm RMSNorm with
weights, SwiGLU, no biases, half-split rotary, grouped-query attention, tied or untied head. This module converts
between them exactly, and refuses what it cannot represent exactly (never an approximation):

  import  a local LlamaForCausalLM directory -> a checkpoint dir that load_model, eval.py and init_from= accept,
          optionally swapping the rotary part for another position encoding (`--pe fope`: RoPE's frequencies below
          2 pi / L clipped, FoPE's coefficients identity + noise), with the tokenizer copied beside it;
  export  a checkpoint whose encoding transformers has natively (rope; YaRN, linear and dynamic-NTK scaling as
          `rope_parameters`) -> a LlamaForCausalLM directory with no Python files.

Weights: q, k, v projections are our fused `qkv` (queries, then keys, then values); gate and up projections our
fused `up` (value half first: up_proj, then gate_proj); names otherwise map one to one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from fope_lm.checkpoint import SOURCE_CONFIG, save_model
from fope_lm.data.format import TOKENIZER_DIR
from fope_lm.errors import ConfigError, FopeError
from fope_lm.hf.outputs import check_output_dir, staged_output
from fope_lm.nn.model import ModelConfig, Transformer
from fope_lm.position import EncodingSpec

log = logging.getLogger(__name__)
IMPORT_EXAMPLE = "runs/NAME"  # where an import's output dir goes, in error messages

CONFIG_FILE_HF = "config.json"
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")  # torch.save / pickle files, never loaded


class LlamaConversionError(FopeError):
    """A model, directory or option that has no exact equivalent on the other side."""


# --- import --------------------------------------------------------------------------------------------------
def read_llama_config(source: Path) -> LlamaConfig:
    """The LlamaConfig of a local model directory, or a one-line error naming what is missing or not Llama."""
    if not source.is_dir():
        raise LlamaConversionError(f"{source} is not a directory: pass a local Hugging Face model directory (config.json + weights)")
    if not (source / CONFIG_FILE_HF).is_file():
        raise LlamaConversionError(f"{source} has no {CONFIG_FILE_HF}: it is not a Hugging Face model directory")
    raw = json.loads((source / CONFIG_FILE_HF).read_text())
    if raw.get("model_type") != "llama" or "LlamaForCausalLM" not in raw.get("architectures", ["LlamaForCausalLM"]):
        kind = raw.get("model_type") or raw.get("architectures")
        raise LlamaConversionError(f"{source} holds a {kind!r} model: only LlamaForCausalLM (model_type llama) imports exactly")
    if not any(source.glob("*.safetensors")):
        if pickles := sorted(path.name for pattern in PICKLE_WEIGHTS for path in source.glob(pattern)):
            raise LlamaConversionError(
                f"{source} has only pickle weights ({', '.join(pickles[:3])}): only safetensors weights are loaded, since "
                "unpickling a file can run any code; convert them where you trust the file: "
                f"LlamaForCausalLM.from_pretrained({str(source)!r}).save_pretrained({str(source)!r}, safe_serialization=True)"
            )
        raise LlamaConversionError(f"{source} has no weights (*.safetensors)")
    return LlamaConfig.from_pretrained(str(source), trust_remote_code=False)


def remote_code(directory: Path) -> list[str]:
    """The classes a tokenizer dir asks transformers to import from its own .py files (`auto_map` in
    tokenizer_config.json, or an AutoTokenizer entry of config.json's): code that would run at load."""
    found: list[str] = []
    for name, key in (("tokenizer_config.json", None), (CONFIG_FILE_HF, "AutoTokenizer")):
        path = directory / name
        try:
            auto_map = json.loads(path.read_text()).get("auto_map") if path.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: transformers' own error (remote code stays off) says what is wrong
        if not isinstance(auto_map, dict):
            continue
        entries = auto_map.items() if key is None else [(key, auto_map[key])] if key in auto_map else []
        for _, value in entries:
            values = value if isinstance(value, list) else [value]
            found += [f"{name} auto_map -> {entry}" for entry in values if isinstance(entry, str)]
    return found


def refuse_remote_code(directory: Path, what: str, fix: str, error: type[FopeError] | None = None) -> None:
    """A one-line error (LlamaConversionError by default) when `directory`'s tokenizer would run the directory's own code."""
    if found := remote_code(directory):
        message = f"{what} {directory} asks to run its own code ({'; '.join(found)}), which fope_lm never does: {fix}"
        raise (error or LlamaConversionError)(message)


def load_tokenizer(directory: Path):
    """AutoTokenizer of a local dir, remote code off (`trust_remote_code=False`: never a prompt, never its .py)."""
    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)


def model_config_from_llama(llama: LlamaConfig, *, max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig of a LlamaConfig, with RoPE (and its rope scaling) as the position encoding."""
    unsupported = [
        what
        for what, present in (
            ("attention_bias=true (biases on q/k/v/o)", getattr(llama, "attention_bias", False)),
            ("mlp_bias=true (biases in the MLP)", getattr(llama, "mlp_bias", False)),
            (f"hidden_act={llama.hidden_act!r} (SwiGLU needs silu)", llama.hidden_act != "silu"),
            (f"head_dim={getattr(llama, 'head_dim', None)} != hidden_size / num_attention_heads", _custom_head_dim(llama)),
            ("a sliding window", getattr(llama, "sliding_window", None) is not None),
        )
        if present
    ]
    if unsupported:
        raise LlamaConversionError(f"this Llama model has {', '.join(unsupported)}, which fope_lm's architecture cannot represent")
    rope = dict(getattr(llama, "rope_parameters", None) or {})
    try:  # the position encoding asks for what it can represent exactly
        encoding = EncodingSpec.of_rope_parameters(rope, max_position_embeddings=llama.max_position_embeddings)
    except ConfigError as exc:
        raise LlamaConversionError(str(exc)) from None
    heads, kv_heads = llama.num_attention_heads, llama.num_key_value_heads or llama.num_attention_heads
    return ModelConfig(
        d_model=llama.hidden_size,
        n_layers=llama.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=None if kv_heads == heads else kv_heads,
        vocab_size=llama.vocab_size,
        max_seq_len=max_seq_len or llama.max_position_embeddings,
        ffn_hidden_size=llama.intermediate_size,
        tie_embeddings=bool(llama.tie_word_embeddings),
        norm_eps=float(llama.rms_norm_eps),
        init_std=float(llama.initializer_range),
        rope_theta=float(rope.get("rope_theta", getattr(llama, "rope_theta", 10000.0))),
        pe=encoding.name,
        pe_options=encoding.options,
    )


def _custom_head_dim(llama: LlamaConfig) -> bool:
    head_dim = getattr(llama, "head_dim", None)
    return head_dim is not None and head_dim != llama.hidden_size // llama.num_attention_heads


def import_llama(source: str | Path, out_dir: str | Path, *, pe: str | None = None, pe_options: dict | None = None,
                 max_seq_len: int | None = None, seed: int = 0, overwrite: bool = False) -> Path:  # fmt: skip
    """Convert a local LlamaForCausalLM directory into a checkpoint dir (model.safetensors, model_config.json, the
    source's config.json as source_config.json, tokenizer/). Without `pe` the model is RoPE with the source's base
    and scaling, and its logits equal the source's; with `pe` the rotary part is that encoding (its own state freshly
    initialised: FoPE's coefficients identity + noise, clipped at 2 pi / max_seq_len), everything else carried.

    Only safetensors weights are read and none of the source's code runs (a tokenizer that asks for its own code is
    refused). `out_dir` follows fope_lm.hf.outputs: never a checkpoint or run, replaced only with `overwrite`, written
    whole or not at all."""
    source, out_dir = Path(source), Path(out_dir)
    check_output_dir(out_dir, overwrite=overwrite, sources=[source], example=IMPORT_EXAMPLE)
    llama_config = read_llama_config(source)
    refuse_remote_code(
        source, "the tokenizer of", 'read that code, then import a copy of the dir without "auto_map" in its tokenizer_config.json '
        "(a standard tokenizer.json loads without it) or without its tokenizer files"
    )  # fmt: skip
    config = model_config_from_llama(llama_config, max_seq_len=max_seq_len)
    if pe is not None:
        carried = config.pe_options if EncodingSpec.of(pe).is_rotary else {}  # the source's scaling carries over
        config = ModelConfig.from_dict({**config.to_dict(), "pe": pe, "pe_options": {**carried, **(pe_options or {})}})
    torch.manual_seed(seed)
    with torch.device("meta"):
        Transformer(config)  # options checked before the weights are read
    try:
        llama = LlamaForCausalLM.from_pretrained(str(source), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LlamaConversionError(f"cannot load the weights of {source}: {_first_line(exc)}") from None
    model = Transformer(config)  # PE state (FoPE's coefficients) initialised here, from `seed`
    model.load_state_dict(state_from_llama(llama.state_dict(), model), strict=True)
    config_json = (source / CONFIG_FILE_HF).read_bytes()
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as exc:  # weights without a tokenizer import too
        if "trust_remote_code" in str(exc):  # custom code that remote_code() did not spot: refused, never run
            raise LlamaConversionError(
                f"the tokenizer of {source} asks to run its own code, which fope_lm never does: {_first_line(exc)}"
            ) from None
        tokenizer = None
        reason = _first_line(exc)
        log.warning("%s has no loadable tokenizer (%s): prepare data with the tokenizer the model was trained with", source, reason)
    with staged_output(out_dir, overwrite=overwrite, sources=[source], example=IMPORT_EXAMPLE) as staging:
        save_model(staging, model, metadata={
            "imported_from": str(source.resolve()),
            "source_config_sha256": hashlib.sha256(config_json).hexdigest(),
            "train_seq_len": config.max_seq_len,
        })  # fmt: skip
        (staging / SOURCE_CONFIG).write_bytes(config_json)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging / TOKENIZER_DIR)
    return out_dir


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def state_from_llama(llama_state: dict[str, torch.Tensor], model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict from a LlamaForCausalLM's: projections fused, padded vocabulary rows zero, PE state our own."""
    ours = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # PE state (FoPE coefficients) stays
    padded = model.config.padded_vocab_size

    def pad_rows(weight: torch.Tensor) -> torch.Tensor:
        return torch.cat((weight, weight.new_zeros(padded - weight.shape[0], weight.shape[1])))

    ours["embed.weight"] = pad_rows(llama_state["model.embed_tokens.weight"])
    ours["norm.weight"] = llama_state["model.norm.weight"]
    ours["lm_head.weight"] = ours["embed.weight"] if model.config.tie_embeddings else pad_rows(llama_state["lm_head.weight"])
    for i in range(model.config.n_layers):
        layer, block = f"model.layers.{i}.", f"blocks.{i}."
        attention = (llama_state[f"{layer}self_attn.{p}_proj.weight"] for p in "qkv")
        ours[block + "attn.qkv.weight"] = torch.cat(tuple(attention))
        ours[block + "attn.out.weight"] = llama_state[f"{layer}self_attn.o_proj.weight"]
        ours[block + "mlp.up.weight"] = torch.cat((llama_state[f"{layer}mlp.up_proj.weight"], llama_state[f"{layer}mlp.gate_proj.weight"]))
        ours[block + "mlp.down.weight"] = llama_state[f"{layer}mlp.down_proj.weight"]
        ours[block + "attn_norm.weight"] = llama_state[f"{layer}input_layernorm.weight"]
        ours[block + "mlp_norm.weight"] = llama_state[f"{layer}post_attention_layernorm.weight"]
    return ours


# --- export ------------------------------------------------------------------------------------------------
def native_rope_parameters(config: ModelConfig) -> dict | None:
    """transformers' rope_parameters for an exact native equivalent of this model's encoding, or None."""
    native = config.pe_spec.llama_rope(theta=config.rope_theta, max_seq_len=config.max_seq_len)
    return None if native is None else native[0]


def llama_config_of(config: ModelConfig) -> LlamaConfig:
    """The LlamaConfig of a model whose encoding has a native equivalent (LlamaConversionError otherwise)."""
    native = config.pe_spec.llama_rope(theta=config.rope_theta, max_seq_len=config.max_seq_len)
    if native is None:
        raise LlamaConversionError(
            f"pe {config.pe!r} with options {config.pe_options} has no native transformers equivalent: export it with --format remote"
        )
    rope, max_position_embeddings = native
    return LlamaConfig(
        vocab_size=config.padded_vocab_size,  # the padded rows stay (generation suppresses them)
        hidden_size=config.d_model,
        intermediate_size=config.hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=config.norm_eps,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
    )


def state_to_llama(model: Transformer) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict of our model (the inverse of state_from_llama, padded rows kept)."""
    config, state = model.config, model.state_dict()
    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    llama = {
        "model.embed_tokens.weight": state["embed.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["lm_head.weight"],
    }
    for i in range(config.n_layers):
        layer, block = f"model.layers.{i}.", f"blocks.{i}."
        q, k, v = state[block + "attn.qkv.weight"].split((q_rows, kv_rows, kv_rows))
        value, gate = state[block + "mlp.up.weight"].chunk(2)
        llama |= {
            f"{layer}self_attn.q_proj.weight": q, f"{layer}self_attn.k_proj.weight": k, f"{layer}self_attn.v_proj.weight": v,
            f"{layer}self_attn.o_proj.weight": state[block + "attn.out.weight"],
            f"{layer}mlp.up_proj.weight": value, f"{layer}mlp.gate_proj.weight": gate,
            f"{layer}mlp.down_proj.weight": state[block + "mlp.down.weight"],
            f"{layer}input_layernorm.weight": state[block + "attn_norm.weight"],
            f"{layer}post_attention_layernorm.weight": state[block + "mlp_norm.weight"],
        }  # fmt: skip
    return {name: tensor.contiguous() for name, tensor in llama.items()}


def generation_config_for(config: ModelConfig, tokenizer) -> GenerationConfig:
    """The tokenizer's special ids, and the padded vocabulary rows (never real tokens) suppressed."""
    padding_rows = list(range(config.vocab_size, config.padded_vocab_size))
    return GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        suppress_tokens=padding_rows or None,
    )


def export_llama(model: Transformer, out_dir: Path, tokenizer) -> Path:
    """Write `model` as a native LlamaForCausalLM directory (no Python files) with `tokenizer` into `out_dir`, a fresh
    directory (export_hf stages it: fope_lm.hf.outputs)."""
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_config_of(model.config))
    llama.load_state_dict(state_to_llama(model), strict=True, assign=True)
    if model.config.tie_embeddings:
        llama.tie_weights()
    llama.generation_config = generation_config_for(model.config, tokenizer)
    llama.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
