"""Position encodings, one module per method, behind one interface (`base.PositionEncoding`).

Adding a method: drop a module in this package that registers its class with `@register("name")`, and a
`configs/pe/name.yaml`. Modules are discovered automatically.
"""

import importlib
import pkgutil

from fope_lm.position.base import BiasInputs, PositionEncoding, Positions, RotaryEncoding
from fope_lm.position.registry import available, build_position_encoding, get_class, option_names

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "registry"}:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BiasInputs",
    "PositionEncoding",
    "Positions",
    "RotaryEncoding",
    "available",
    "build_position_encoding",
    "get_class",
    "option_names",
]
