"""YaRN (Peng et al. 2023): RoPE with NTK-by-parts frequency interpolation and an attention temperature.

Static scale s, or dynamic s = max(1, T / L0) per evaluated length (for generation, the caller fixes T
once per prompt via `dynamic_len`, so cached and uncached decoding agree).
"""

from fope_lm.position.base import YarnScaling
from fope_lm.position.registry import register
from fope_lm.position.rope import RotaryPositionEncoding


@register("yarn")
class YarnPositionEncoding(RotaryPositionEncoding):
    def __init__(
        self,
        *,
        scale: float = 16.0,
        original_max_seq_len: int | None = None,
        dynamic: bool = False,
        attention_factor: float | None = None,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
        **base,
    ):
        super().__init__(**base)
        self.yarn = YarnScaling(
            scale=scale,
            original_max_seq_len=original_max_seq_len or self.max_seq_len,
            dynamic=dynamic,
            attention_factor=attention_factor,
            beta_fast=beta_fast,
            beta_slow=beta_slow,
        )

    def table_key(self, dynamic_len):
        return (self.yarn.effective_scale(dynamic_len),)

    def _scaled(self, dynamic_len):
        scale = self.yarn.effective_scale(dynamic_len)
        return self.yarn.apply(super().inv_freq(), self.head_dim, self.theta, scale)

    def inv_freq(self, dynamic_len=None):
        return self._scaled(dynamic_len)[0]

    def attention_factor(self, dynamic_len=None):
        return self._scaled(dynamic_len)[1]

    def extra_repr(self) -> str:
        return self.yarn.describe()
