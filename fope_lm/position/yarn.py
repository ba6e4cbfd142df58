"""YaRN (Peng et al. 2023) as a config name: RoPE with `scaling=yarn` (NTK-by-parts interpolation and an attention
temperature) and the paper's continuation scale 16 by default. Static scale s, or dynamic s = max(1, T / L0) per
evaluated length (for generation the caller fixes T once per prompt via `dynamic_len`, so cached and uncached
decoding agree). The scaling itself is fope_lm.position.scaling's, which every rotary encoding takes."""

from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


@register("yarn")
class YarnPositionEncoding(RotaryPositionEncoding):
    llama_equivalent = True  # RoPE with YaRN: transformers' rope_type yarn (static)

    def __init__(self, *, scaling: str | None = "yarn", scale: float = 16.0, **options):
        super().__init__(scaling=scaling, scale=scale, **options)
