"""The one validation pattern of every config (train, eval, data): a dataclass holds each setting's type, and its
`__post_init__` the checks that types cannot express; `validated(schema, cfg)` merges a composed config into it.

Unknown keys, wrong types, missing values and failed checks all end as one-line `ConfigError`s naming the key.
Choices are `Choice` enums, which compare equal to (and print as) their names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from fope_lm.errors import ConfigError

T = TypeVar("T")


class Choice(str, Enum):
    """An option with a fixed set of values: `Precision.bf16 == "bf16"`, and f-strings print "bf16"."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def names(cls) -> str:
        return ", ".join(member.value for member in cls)


def validated(schema: type[T], cfg: DictConfig | Mapping | Any) -> T:
    """`cfg` merged into the dataclass `schema` (interpolations resolved), as an instance of it (its
    `__post_init__` checks run). An instance of `schema` is returned as it is."""
    if isinstance(cfg, schema):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigKeyError as exc:
        valid = sorted(f.name for f in dataclasses.fields(exc.object_type)) if dataclasses.is_dataclass(exc.object_type) else []
        hint = f"; valid keys: {', '.join(valid)}" if valid else ""
        raise ConfigError(f"unknown config key {exc.full_key}{hint}") from None
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, ConfigError):  # a __post_init__ check, raised while building the object
            raise exc.__cause__ from None
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config {exc.full_key}: {first_line}") from None
