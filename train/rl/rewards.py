"""Reward functions: loading one named 'module:function', scoring a rollout with it, and the miniature task's verifier.

A reward function is `function(record, completion_text) -> float`: the prompt record (its
`messages` and any other fields, e.g. a reference answer) and the completion decoded with special
tokens ('</think>' included, see `qwen3_jax.chat.parse_completion`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from qwen3_jax import chat
from qwen3_jax.errors import ConfigError, TrainingError

RewardFn = Callable[[Mapping[str, Any], str], float]


def load_reward(spec: str) -> RewardFn:
    """The function `spec` ('module:function') names.

    Raises:
      ConfigError: naming `reward` when the module does not import or holds no such callable.
    """
    module_name, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward={spec!r} does not name a function ('module:function'): {e}") from e
    if not callable(fn):
        raise ConfigError(f"reward={spec!r} is not callable")
    return fn


def score(fn: RewardFn, records: Sequence[Mapping[str, Any]], texts: Sequence[str], samples: int, *,
          first_prompt: int, step: int) -> np.ndarray:
    """float64 rewards of this process's rows (`samples` adjacent texts per record), all-gathered
    into the global batch's [prompts x samples] rewards (process order), on every process.

    `first_prompt` is this process's first prompt's index in the global batch. Every process learns
    of a failure on any process, so all stop together, before any update on the step.

    Raises:
      TrainingError: the function raised or returned a value that is not a finite real number,
        naming the step, the prompt's index in the global batch and the sample.
    """
    local = np.zeros(len(texts), np.float64)
    failed = np.zeros(len(texts), np.int32)  # 0 ok, 1 raised, 2 not a finite number
    first_error = None
    for i, text in enumerate(texts):
        record = records[i // samples]
        try:
            value = fn(record, text)
        except Exception as e:  # noqa: BLE001  (any failure of user code is reported, named)
            failed[i] = 1
            first_error = first_error or (i, f"raised {type(e).__name__}: {e}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            failed[i] = 2
            first_error = first_error or (i, f"returned {value!r}, not a finite number")
            continue
        local[i] = float(value)
    if jax.process_count() > 1:
        # float64 travels as int32 pairs: the gather would cast it to float32 (x64 is off).
        bits, codes = multihost_utils.process_allgather((local.view(np.int32), failed), tiled=True)
        rewards, codes = np.asarray(bits, np.int32).view(np.float64), np.asarray(codes)
    else:
        rewards, codes = local, failed
    bad = np.flatnonzero(codes)
    if bad.size:
        row = int(bad[0])
        prompt, sample = row // samples, row % samples
        detail = (first_error[1] if first_error is not None and first_error[0] + first_prompt * samples == row
                  else "raised" if codes[row] == 1 else "returned a non-finite value")
        raise TrainingError(
            f"the reward function {detail} for prompt {prompt} of step {step}'s batch (sample {sample}); "
            "stopping before the update")
    return rewards


def miniature_answer(record: Mapping[str, Any], completion_text: str) -> float:
    """1.0 when the reply's answer (after its last '</think>') ends its last 'answer is N' with the
    record's `answer`, else 0.0: the miniature task's verifier (`train.miniature.task.verify`)."""
    from train.miniature.task import ANSWER_RE  # the task's own answer format

    _, answer = chat.parse_completion(completion_text)
    found = ANSWER_RE.findall(answer)
    return float(bool(found) and int(found[-1]) == int(record["answer"]))
