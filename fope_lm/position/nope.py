"""NoPE: no positional signal at all; the causal mask alone breaks permutation symmetry."""

from fope_lm.position.base import PositionEncoding
from fope_lm.position.registry import register


@register("nope")
class NoPositionEncoding(PositionEncoding):
    pass
