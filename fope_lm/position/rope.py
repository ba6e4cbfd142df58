"""RoPE (Su et al. 2021), half-split (GPT-NeoX) layout, as OLMo computes it; every length-scaling option of
`RotaryEncoding` (YaRN, PI, NTK, dynamic NTK, ABF) applies."""

from fope_lm.position.base import RotaryEncoding
from fope_lm.position.registry import register


@register("rope")
class RotaryPositionEncoding(RotaryEncoding):
    llama_equivalent = True  # exactly LlamaForCausalLM's rotary (with the scalings transformers computes)
