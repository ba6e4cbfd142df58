"""This project's architecture and Hugging Face's `LlamaForCausalLM` are the same network: pre-norm RMSNorm with
weights, SwiGLU, no biases, half-split rotary, grouped-query attention, tied or untied head. This module converts
between them exactly, and refuses what it cannot represent exactly (never an approximation), naming what is missing:

  import  a local LlamaForCausalLM directory (or a MistralForCausalLM without a sliding window, which is a Llama)
          -> a checkpoint dir that load_model, eval.py and init_from= accept,
          optionally swapping the rotary part for another position encoding (`--pe fope`: RoPE's frequencies below
          2 pi / L clipped, FoPE's coefficients identity + noise), with the tokenizer copied beside it;
  export  a checkpoint whose encoding transformers has natively (rope; YaRN, linear and dynamic-NTK scaling as
          `rope_parameters`, and as transformers 4.x's `rope_scaling` + `rope_theta`) -> a LlamaForCausalLM directory
          with no Python files.

Weights: q, k, v projections are our fused `qkv` (queries, then keys, then values); gate and up projections our
fused `up` (value half first: up_proj, then gate_proj); names otherwise map one to one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

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

# model_type -> (architecture, config class, model class): the Llama-architecture models, whose weights have a
# Llama's names and compute a Llama's function (Mistral: a Llama with an optional sliding window, refused when set)
IMPORTABLE: dict[str, tuple[str, type[LlamaConfig | MistralConfig], type[LlamaForCausalLM | MistralForCausalLM]]] = {
    "llama": ("LlamaForCausalLM", LlamaConfig, LlamaForCausalLM),
    "mistral": ("MistralForCausalLM", MistralConfig, MistralForCausalLM),
}
SUPPORTED = (
    "only Llama-architecture models import exactly (LlamaForCausalLM, model_type llama; MistralForCausalLM without a sliding window)"
)
NEAREST = "a Llama-architecture model (SmolLM, TinyLlama, Llama 2/3) imports; --pe does not help (it replaces only the rotary part)"


class LlamaConversionError(FopeError):
    """A model, directory or option that has no exact equivalent on the other side."""


# --- import --------------------------------------------------------------------------------------------------
def missing_features(raw: dict) -> list[str]:
    """What fope_lm's architecture lacks for the known near-Llama architectures of a config.json (empty for others,
    which are refused by name)."""
    model_type, found = raw.get("model_type"), []
    if model_type == "qwen2":  # Qwen2Attention: q/k/v projections with bias=True whatever the config says
        found.append("biases on its q/k/v projections (Qwen2 always has them)")
    if model_type == "qwen3":  # Qwen3Attention: an RMSNorm over each head's queries and keys
        found.append("q/k normalisation (an RMSNorm on each head's queries and keys)")
    if model_type == "qwen3" and raw.get("attention_bias"):
        found.append("attention_bias=true (biases on q/k/v/o)")
    if model_type in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        found.append(f"a sliding window (use_sliding_window=true, sliding_window={raw.get('sliding_window')})")
    return found


def read_llama_config(source: Path) -> LlamaConfig | MistralConfig:
    """The config of a local Llama-architecture model directory (LlamaConfig, or MistralConfig), or a one-line error
    naming what is missing, what the model has that fope_lm cannot represent, and what imports instead."""
    if not source.is_dir():
        raise LlamaConversionError(f"{source} is not a directory: pass a local Hugging Face model directory (config.json + weights)")
    if not (source / CONFIG_FILE_HF).is_file():
        raise LlamaConversionError(f"{source} has no {CONFIG_FILE_HF}: it is not a Hugging Face model directory")
    raw = json.loads((source / CONFIG_FILE_HF).read_text())
    model_type = raw.get("model_type")
    importable = IMPORTABLE.get(model_type)
    if importable is None or importable[0] not in raw.get("architectures", [importable[0]]):
        kind = model_type or raw.get("architectures")
        architectures = f" ({', '.join(raw['architectures'])})" if isinstance(raw.get("architectures"), list) else ""
        if missing := missing_features(raw):
            raise LlamaConversionError(
                f"{source} holds a {kind!r} model{architectures} with {' and '.join(missing)}, which fope_lm's architecture "
                f"cannot represent: {SUPPORTED}; {NEAREST}"
            )
        raise LlamaConversionError(f"{source} holds a {kind!r} model{architectures}: {SUPPORTED}; {NEAREST}")
    config = importable[1].from_pretrained(str(source), trust_remote_code=False)
    try:  # what the architecture cannot represent, refused before the weights are looked at
        model_config_from_llama(config)
    except LlamaConversionError as exc:
        raise LlamaConversionError(f"{source}: {exc}") from None
    if not any(source.glob("*.safetensors")):
        if pickles := sorted(path.name for pattern in PICKLE_WEIGHTS for path in source.glob(pattern)):
            raise LlamaConversionError(
                f"{source} has only pickle weights ({', '.join(pickles[:3])}): only safetensors weights are loaded, since "
                "unpickling a file can run any code; convert them where you trust the file: "
                f"LlamaForCausalLM.from_pretrained({str(source)!r}).save_pretrained({str(source)!r}, safe_serialization=True)"
            )
        raise LlamaConversionError(f"{source} has no weights (*.safetensors)")
    return config


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


def model_config_from_llama(llama: LlamaConfig | MistralConfig, *, max_seq_len: int | None = None) -> ModelConfig:
    """Our ModelConfig of a LlamaConfig (or a MistralConfig), with RoPE (and its rope scaling) as the position encoding;
    a one-line error naming what the architecture cannot represent."""
    unsupported = [
        what
        for what, present in (
            ("attention_bias=true (biases on q/k/v/o)", getattr(llama, "attention_bias", False)),
            ("mlp_bias=true (biases in the MLP)", getattr(llama, "mlp_bias", False)),
            (f"hidden_act={llama.hidden_act!r} (SwiGLU needs silu)", llama.hidden_act != "silu"),
            (f"head_dim={getattr(llama, 'head_dim', None)} != hidden_size / num_attention_heads", _custom_head_dim(llama)),
            (
                f"a sliding window (sliding_window={getattr(llama, 'sliding_window', None)})",
                getattr(llama, "sliding_window", None) is not None,
            ),
        )
        if present
    ]
    if unsupported:
        fix = "; only a Mistral trained without one (sliding_window null) is a Llama and imports" if llama.model_type == "mistral" else ""
        raise LlamaConversionError(
            f"this {llama.model_type} model has {', '.join(unsupported)}, which fope_lm's architecture cannot represent{fix}; {NEAREST}"
        )
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


def _custom_head_dim(llama: LlamaConfig | MistralConfig) -> bool:
    head_dim = getattr(llama, "head_dim", None)
    return head_dim is not None and head_dim != llama.hidden_size // llama.num_attention_heads


def import_llama(source: str | Path, out_dir: str | Path, *, pe: str | None = None, pe_options: dict | None = None,
                 max_seq_len: int | None = None, seed: int = 0, overwrite: bool = False) -> Path:  # fmt: skip
    """Convert a local LlamaForCausalLM directory (or a MistralForCausalLM without a sliding window) into a checkpoint
    dir (model.safetensors, model_config.json, the source's config.json as source_config.json, tokenizer/). Without
    `pe` the model is RoPE with the source's base
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
    _, _, model_class = IMPORTABLE[llama_config.model_type]
    try:
        llama = model_class.from_pretrained(str(source), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
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


def native_max_position_embeddings(config: ModelConfig, serving_length: int, *, requested: bool) -> int:
    """The max_position_embeddings of a native export that serves `serving_length` tokens: that length, except where
    transformers' rope_type reads max_position_embeddings as the original length (dynamic NTK: L0), which it must
    then hold; a length asked for (`requested`) that it cannot hold is a one-line error."""
    native = config.pe_spec.llama_native(theta=config.rope_theta, max_seq_len=config.max_seq_len)
    if native is None or not native.reads_max_position_embeddings:
        return serving_length
    if requested and serving_length != native.max_position_embeddings:
        raise LlamaConversionError(
            f"--max-position-embeddings {serving_length}: a native export of pe {config.pe!r} {config.pe_options} must hold "
            f"max_position_embeddings={native.max_position_embeddings}, the original length transformers' rope_type "
            f"{native.rope_parameters['rope_type']!r} scales from; pass the length to serve to lm_eval instead "
            f"(--model_args ...,max_length={serving_length}), or export with --format remote"
        )
    return native.max_position_embeddings


def llama_config_of(config: ModelConfig, *, max_position_embeddings: int | None = None, token_ids: dict | None = None) -> LlamaConfig:
    """The LlamaConfig of a model whose encoding has a native equivalent (LlamaConversionError otherwise).

    max_position_embeddings: what the config declares (default: what the encoding serves, `EncodingSpec.serving_length`;
    dynamic NTK: L0, which transformers reads); token_ids: bos/eos/pad ids (`special_token_ids`; default: none)."""
    native = config.pe_spec.llama_native(theta=config.rope_theta, max_seq_len=config.max_seq_len)
    if native is None:
        raise LlamaConversionError(
            f"pe {config.pe!r} with options {config.pe_options} has no native transformers equivalent: export it with --format remote"
        )
    requested = max_position_embeddings is not None
    serving = max_position_embeddings or config.pe_spec.serving_length(max_seq_len=config.max_seq_len)
    return LlamaConfig(
        vocab_size=config.padded_vocab_size,  # the padded rows stay (generation suppresses them)
        hidden_size=config.d_model,
        intermediate_size=config.hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=native_max_position_embeddings(config, serving, requested=requested),
        rms_norm_eps=config.norm_eps,
        initializer_range=config.init_std,
        tie_word_embeddings=config.tie_embeddings,
        rope_parameters=native.rope_parameters,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        architectures=["LlamaForCausalLM"],
        **(token_ids if token_ids is not None else special_token_ids(None)),  # never LlamaConfig's own 1 / 2
    )


def transformers4_keys(config: ModelConfig) -> dict:
    """The keys transformers 4.x reads in place of `rope_parameters`: `rope_scaling` (null when unscaled) and
    `rope_theta`. transformers 5 reads them too, `rope_scaling` over `rope_parameters`: they say the same. Exact from
    4.43 for linear and dynamic NTK, from 4.51 for YaRN (4.43 to 4.50 ignore its original_max_position_embeddings and
    read max_position_embeddings as the original length instead): docs/hf_export.md."""
    native = config.pe_spec.llama_native(theta=config.rope_theta, max_seq_len=config.max_seq_len)
    if native is None:
        return {}
    return {"rope_scaling": native.rope_scaling, "rope_theta": native.rope_theta}


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


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """bos_token_id, eos_token_id and pad_token_id of a tokenizer (pad: EOS where it has none), as config.json and
    generation_config.json hold them; all None without a tokenizer."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def generation_config_for(config: ModelConfig, tokenizer) -> GenerationConfig:
    """The tokenizer's special ids (`special_token_ids`), and the padded vocabulary rows (never real tokens)
    suppressed. Without a tokenizer, only the suppressed rows."""
    padding_rows = list(range(config.vocab_size, config.padded_vocab_size))
    ids = {name: value for name, value in special_token_ids(tokenizer).items() if value is not None}
    return GenerationConfig(**ids, suppress_tokens=padding_rows or None)


def export_llama(model: Transformer, out_dir: Path, tokenizer, *, max_position_embeddings: int | None = None) -> Path:
    """Write `model` as a native LlamaForCausalLM directory (no Python files) with `tokenizer` (or none) into `out_dir`, a
    fresh directory (export_hf stages it: fope_lm.hf.outputs). config.json holds the tokenizer's bos/eos/pad ids,
    `max_position_embeddings` (`llama_config_of`), and transformers 4.x's `rope_scaling` and `rope_theta` beside
    transformers 5's `rope_parameters`."""
    config = llama_config_of(model.config, max_position_embeddings=max_position_embeddings, token_ids=special_token_ids(tokenizer))
    with torch.device("meta"):
        llama = LlamaForCausalLM(config)
    llama.load_state_dict(state_to_llama(model), strict=True, assign=True)
    if model.config.tie_embeddings:
        llama.tie_weights()
    llama.generation_config = generation_config_for(model.config, tokenizer)
    llama.save_pretrained(out_dir)
    config_file = out_dir / CONFIG_FILE_HF
    written = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**written, **transformers4_keys(model.config)}, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
        portable_tokenizer_class(out_dir)
    return out_dir


def portable_tokenizer_class(directory: Path) -> None:
    """transformers 5 saves a tokenizer.json-only tokenizer as class `TokenizersBackend`, which transformers 4.x has no
    class of (AutoTokenizer refuses it); `PreTrainedTokenizerFast` loads the same tokenizer.json in both."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return
    settings = json.loads(path.read_text())
    if settings.get("tokenizer_class") == "TokenizersBackend":
        path.write_text(json.dumps({**settings, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2, sort_keys=True) + "\n")
