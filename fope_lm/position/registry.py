"""Name -> position-encoding class. Every module in this package registers itself on import."""

from __future__ import annotations

import inspect

from fope_lm.errors import ConfigError

_REGISTRY: dict[str, type] = {}


def register(name: str):
    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"position encoding {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_class(name: str) -> type:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown position encoding {name!r}; choose one of: {', '.join(available())}") from None


def option_names(cls: type) -> set[str]:
    """Keyword options a class accepts beyond the shared ones, collected along its constructor chain."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind is param.KEYWORD_ONLY:
                names.add(param.name)
    return names - {"head_dim", "n_heads", "n_kv_heads", "max_seq_len", "theta"}


def build_position_encoding(
    name: str, *, head_dim: int, n_heads: int, max_seq_len: int, theta: float = 10000.0, n_kv_heads: int | None = None, **options
):
    """Build the position encoding `name` for one attention layer. Unknown options are an error naming them."""
    cls = get_class(name)
    unknown = sorted(set(options) - option_names(cls))
    if unknown:
        known = ", ".join(sorted(option_names(cls))) or "none"
        raise ConfigError(f"position encoding {name!r} has no option(s) {', '.join(unknown)}; its options: {known}")
    return cls(head_dim=head_dim, n_heads=n_heads, max_seq_len=max_seq_len, theta=theta, n_kv_heads=n_kv_heads, **options)
