"""`transformers` config of an exported fope_lm model: the fields of `fope_lm.nn.model.ModelConfig`, as they are.

The exporter writes every ModelConfig field (d_model, n_layers, n_heads, vocab_size, max_seq_len, mlp_ratio,
tie_embeddings, norm_eps, init_std, rope_theta, pe, pe_options) into config.json, and the model rebuilds its
ModelConfig from them, which validates them; nothing is declared twice here. `transformers`' standard names
(hidden_size, num_hidden_layers, num_attention_heads, tie_word_embeddings) read the fields they stand for.

What tools read beside them is declared here, so that it exists (None) even in a config that lacks it:
max_position_embeddings, the longest context the export serves (lm-evaluation-harness's default max_length; the
model reads `max_seq_len`, its training length, and runs past it as its encoding does), and the tokenizer's
bos / eos / pad ids (`config.eos_token_id`).

Evaluation-time settings can be changed at load without touching the weights, as `fope_lm.checkpoint.load_model`
allows, e.g. `from_pretrained(dir, trust_remote_code=True, pe="yarn", pe_options={"scale": 4.0})` on a RoPE export.
"""

from transformers import PreTrainedConfig


class FopeConfig(PreTrainedConfig):
    model_type = "fope_lm"
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "tie_word_embeddings": "tie_embeddings",
    }

    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
