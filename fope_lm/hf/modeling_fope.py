"""`transformers` causal-LM wrapper around fope_lm's Transformer, for directories written by `fope_lm.hf.export`.

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

The weights are those of `fope_lm.nn.model.Transformer` under `model.`; forward runs that same module (every position
encoding, FoPE coefficients and YaRN settings included), so logits equal fope_lm's. In an export directory this
file's `fope_lm` imports read `from .fope_core import ...`: the exporter bundles fope_lm's model sources there, so
the directory needs torch and transformers only.

- Logits cover the padded vocabulary (`Transformer` pads rows up to a multiple of 128), exactly fope_lm's
  distribution; the export's generation_config.json suppresses the padding rows, so generate() never emits them.
- generate() decodes with a transformers `DynamicCache`: it stores the same rotated (B, H, T, Dh) keys and values
  as fope_lm's KVCache, through `CacheView`.
- No padding masks: every sequence is attended causally from its first token, so a batch is one length (right
  padding is harmless for loglikelihoods, as lm-evaluation-harness pads); an `attention_mask` with zeros raises.
- Dynamic YaRN: pass `dynamic_len=prompt_len + max_new_tokens` to generate() for a scale that is fixed over the
  whole continuation, as `fope_lm.nn.generate` does; without it every forward scales for its own length.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from fope_lm.hf.configuration_fope import FopeConfig
from fope_lm.nn.generate import lm_logits
from fope_lm.nn.model import ModelConfig, Transformer
from fope_lm.position import PositionEncoding

# transformers 5.2x renamed the cache argument and output field `past_key_values` to `cache`; take either
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def model_config(config: FopeConfig) -> ModelConfig:
    """The fope_lm ModelConfig that a FopeConfig carries (validated by ModelConfig)."""
    names = [field.name for field in dataclasses.fields(ModelConfig)]
    missing = [name for name in names if not hasattr(config, name)]
    if missing:
        raise ValueError(f"config has no fope_lm model field(s) {', '.join(missing)}: export it with scripts/export_hf.py")
    return ModelConfig.from_dict({name: getattr(config, name) for name in names})


class CacheView:
    """fope_lm's KV-cache interface (`length`, `update(layer, k, v)`, `update_state(layer, state)`) over a
    transformers DynamicCache. A position encoding's token state (FoX's forget gates) has no slot in a DynamicCache,
    so it rides along on the cache object, one tensor per layer."""

    STATES = "fope_token_states"

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        if not hasattr(cache, self.STATES):
            setattr(cache, self.STATES, {})

    def update_state(self, layer: int, state: torch.Tensor) -> torch.Tensor:
        states = getattr(self.cache, self.STATES)
        states[layer] = state if layer not in states else torch.cat((states[layer], state), dim=-1)
        return states[layer]

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)


class FopeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FopeConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # applied only with tie_embeddings
    _keep_in_fp32_modules_strict = ["pe"]  # position-encoding state (FoPE coefficients) stays float32, as trained

    def __init__(self, config: FopeConfig):
        super().__init__(config)
        self.model = Transformer(model_config(config))
        self.post_init()

    def _init_weights(self, module):
        """Transformer initialises itself as fope_lm does and an export carries every tensor, but not a position
        encoding's constant buffers (ALiBi's slopes), which from_pretrained materialises empty: recompute those."""
        if isinstance(module, PositionEncoding):
            module.init_constants()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        dynamic_len: int | None = None,
        past_key_values: DynamicCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T); labels as input_ids (shifted inside, -100 ignored); logits_to_keep: the last n positions
        (0: all) or a 1-D tensor of positions; dynamic_len: the length dynamic YaRN scales for (fope_lm's).

        use_cache: return a DynamicCache to continue from (generate() asks for it; a plain forward, such as a
        loglikelihood's, does not keep every layer's keys and values)."""
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            raise ValueError(
                "this model takes no padding mask (it attends causally from each sequence's first token): "
                "batch sequences of one length, or run them one at a time (lm_eval: batch_size=1 for generation)"
            )
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"{type(cache).__name__} is not supported (it pads keys to a fixed length): use DynamicCache")

        start_pos = cache.get_seq_length() if cache is not None else 0
        kv_cache = CacheView(cache) if cache is not None else None
        hidden = self.model.hidden_states(input_ids, start_pos=start_pos, kv_cache=kv_cache, dynamic_len=dynamic_len)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = lm_logits(self.model, hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})  # type: ignore[arg-type]  # the cache field's name differs by version
