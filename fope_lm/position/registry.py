"""Name -> position-encoding class. Every module in this package registers itself on import."""

from __future__ import annotations

import inspect
import typing
from typing import Any

from fope_lm.errors import ConfigError
from fope_lm.position.base import PositionEncoding

_REGISTRY: dict[str, type[PositionEncoding]] = {}
SHARED_ARGUMENTS = {"head_dim", "n_heads", "n_kv_heads", "max_seq_len", "theta"}  # from the model's shape, not options


def register(name: str):
    def decorator(cls):
        if name in _REGISTRY:
            raise ValueError(f"position encoding {name!r} registered twice")
        cls.name = name
        # exactness with Llama's rotary is never inherited: a subclass of rope that changes anything must not export as rope
        cls.llama_equivalent = cls.__dict__.get("llama_equivalent", False)
        _REGISTRY[name] = cls
        return cls

    return decorator


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_class(name: str) -> type[PositionEncoding]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown position encoding {name!r}; choose one of: {', '.join(available())}") from None


def option_parameters(cls: type) -> dict[str, tuple[Any, Any]]:
    """name -> (type hint, default) of the keyword options a class accepts beyond the shared ones, collected along its
    constructor chain (the most derived class's default wins: yarn's scaling="yarn")."""
    options: dict[str, tuple[Any, Any]] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        for param in inspect.signature(init).parameters.values():
            if param.kind is param.KEYWORD_ONLY and param.name not in SHARED_ARGUMENTS and param.name not in options:
                options[param.name] = (hints.get(param.name, Any), param.default)
    return options


def option_names(cls: type) -> set[str]:
    return set(option_parameters(cls))
