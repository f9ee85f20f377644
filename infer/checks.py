"""The argument checks every generation entry point applies before anything runs.

Each raises `qwen3_jax.errors.RequestError` (a ValueError) naming the argument (and the prompt).
Sampling values (temperature, top_k, ...; NaN included) are checked by `infer.sampling.SamplingParams.make`.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from qwen3_jax.errors import RequestError


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def positive_int(value: Any, name: str) -> int:
    if not is_int(value):
        raise RequestError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise RequestError(f"{name} must be a positive int, got {value}")
    return int(value)


def non_empty_list(items: Any, name: str) -> list:
    """`items` (a list, tuple or array) as a list; not a string, mapping or scalar, not empty."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, (Sequence, np.ndarray)):
        raise RequestError(f"{name} must be a list, got {type(items).__name__} {items!r:.100}")
    if len(items) == 0:
        raise RequestError(f"{name} is empty: pass at least one")
    return list(items)


def token_ids(ids: Any, name: str, vocab_size: int) -> list[int]:
    """`ids` as a list of ints in [0, vocab_size); `name` says whose ids they are in errors."""
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, (Iterable, np.ndarray)):
        raise RequestError(f"{name} must be a list of token ids (ints), got {type(ids).__name__} {ids!r:.100}")
    out = list(ids)
    wrong = [t for t in out if not is_int(t)]
    if wrong:
        raise RequestError(f"{name} must be a list of token ids (ints), but it holds {wrong[0]!r:.50}")
    bad = [int(t) for t in out if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"{name} has token ids outside [0, {vocab_size}): {bad[:5]}")
    return [int(t) for t in out]


MAX_INT32 = 2**31 - 1  # budgets and top_k travel as int32 arrays


def optional_budget(value: Any, name: str) -> int | None:
    """None (no limit) or an int in [0, MAX_INT32]."""
    if value is None:
        return None
    if not is_int(value):
        raise RequestError(f"{name} must be None or an int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise RequestError(f"{name} must be None or an int >= 0, got {value}")
    if value > MAX_INT32:
        raise RequestError(f"{name} must be at most {MAX_INT32} (None: no limit), got {value}")
    return int(value)


def seed(value: Any, name: str = "seed") -> int:
    """One seed for a batch: any int a 64-bit key accepts."""
    if not is_int(value):
        raise RequestError(f"{name} must be an int or one int per prompt, got {type(value).__name__} {value!r}")
    if not -(2**63) <= value < 2**63:
        raise RequestError(f"{name} must fit in 64 bits, got {value}")
    return int(value)
