"""Typed job configs: frozen dataclasses are the schema, and this is their one bridge to ml_collections.

`config_dict(Schema)` gives the ConfigDict a `configs/*.py` file starts from (every field, with its
default; an unset optional field is a typed placeholder the command line can still set), and
`from_config_dict(Schema, cd)` builds the validated dataclass back, naming an unknown field with the
closest known one. A schema validates itself in `__post_init__` (raising ConfigError), so every
instance that exists is valid; nested sections are dataclass-typed fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict as cd_lib

from qwen3_jax.errors import ConfigError


def need(cond: bool, msg: str) -> None:
    """Raises ConfigError(msg) unless `cond`."""
    if not cond:
        raise ConfigError(msg)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else object), len(args) < len(typing.get_args(tp))
    return tp, False


def _placeholder_type(tp: Any) -> type:
    base = typing.get_origin(tp) or tp
    return base if base in (int, float, str, bool) else object


def _is_schema(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def config_dict(schema: Any) -> ml_collections.ConfigDict:
    """Every field of `schema` (a dataclass type, or an instance whose values become the defaults)."""
    cls = schema if isinstance(schema, type) else type(schema)
    out = ml_collections.ConfigDict()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(_hints(cls)[f.name])
        if isinstance(schema, type):
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = None
        else:
            value = getattr(schema, f.name)
        if _is_schema(tp) and value is not None:
            out[f.name] = config_dict(value if dataclasses.is_dataclass(value) else tp)
        elif _is_schema(tp):
            out[f.name] = config_dict(tp)
        elif value is None:
            out[f.name] = cd_lib.placeholder(_placeholder_type(tp))
        else:
            out[f.name] = value
    return out


def _convert(value: Any, tp: Any, where: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        need(optional or tp is object, f"{where} must be set")
        return None
    if _is_schema(tp):
        return from_config_dict(tp, value, where=where + ".")
    origin = typing.get_origin(tp)
    if origin is tuple or tp is tuple:
        need(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else object
        return tuple(_convert(v, item, where) for v in value)
    if origin is dict or tp is dict:
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        need(isinstance(value, tp) and not (tp is int and isinstance(value, bool)),
             f"{where} must be {tp.__name__}, got {value!r}")
    return value


def from_config_dict(schema: type, cfg: Mapping[str, Any] | ml_collections.ConfigDict, *, where: str = ""):
    """The dataclass `schema` built from `cfg` (nested sections included); ConfigError names an
    unknown field (with the closest known one), a value of the wrong type, or what validation rejects."""
    values = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg)
    names = [f.name for f in dataclasses.fields(schema) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean {where}{close[0]}?" if close else f"; known: {', '.join(names)}"
        raise ConfigError(f"unknown config field {where}{unknown[0]}{hint}")
    hints = _hints(schema)
    kwargs = {name: _convert(values[name], hints[name], where + name) for name in names if name in values}
    try:
        return schema(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where.rstrip('.') + ': ' if where else ''}{e}") from None
