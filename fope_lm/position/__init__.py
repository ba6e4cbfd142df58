"""Position encodings, one module per method, behind one interface (`base.PositionEncoding`), and the one place that
decides anything encoding-specific (`spec.EncodingSpec`, with the length scaling of `scaling`).

Adding a method: drop a module in this package that registers its class with `@register("name")`, and a
`configs/pe/name.yaml`. Modules are discovered automatically.
"""

import importlib
import pkgutil

from fope_lm.position.base import BiasInputs, LinearDistanceBias, PositionEncoding, Positions, RotaryEncoding
from fope_lm.position.registry import available, get_class, option_names
from fope_lm.position.scaling import Scaling, ScalingOptions
from fope_lm.position.spec import EncodingSpec, build_position_encoding, llama_native_summary

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "registry", "scaling", "spec"}:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BiasInputs",
    "EncodingSpec",
    "LinearDistanceBias",
    "PositionEncoding",
    "Positions",
    "RotaryEncoding",
    "Scaling",
    "ScalingOptions",
    "available",
    "build_position_encoding",
    "get_class",
    "llama_native_summary",
    "option_names",
]
