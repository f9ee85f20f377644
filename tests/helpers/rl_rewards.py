"""Reward functions for tests/test_rl.py, named as 'helpers.rl_rewards:<function>'."""

from __future__ import annotations

import math

from qwen3_jax import chat


def digits(record, completion_text: str) -> float:
    """A toy verifiable reward a tiny random policy can learn in a few dozen steps: the share of the
    answer's characters that are the record's digit."""
    _, answer = chat.parse_completion(completion_text)
    return answer.count(str(record["digit"])) / max(len(answer), 1)


def raises(record, completion_text: str) -> float:
    raise RuntimeError("verifier crashed")


def nan_on_second(record, completion_text: str) -> float:
    return math.nan if record.get("index") == 1 else 0.0


def answer_chars(record, completion_text: str) -> float:
    """A dense reward for checks that need every group to carry a signal: the answer's length."""
    return len(chat.parse_completion(completion_text)[1]) / 100
