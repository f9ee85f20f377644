"""Distillation's side of a rollout (`infer.rollout` does the rest): its settings, prompt length, the update batch's masks."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from infer import rollout as rollout_lib
from infer.rollout import Mode, Switch
from qwen3_jax.errors import DataError
from qwen3_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the student samples (static for a run)."""

    max_prompt_len: int
    max_new_tokens: int
    think_fraction: float
    mode_switch: Switch
    thinking_budget: int | None
    sampling: tuple[tuple[str, float], ...]  # overrides of Qwen's per-mode settings

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    def row_sampling(self, mode: Mode) -> dict[str, float]:
        return rollout_lib.mode_sampling(mode, dict(self.sampling))


def biasing_settings(sampling: Mapping[str, float], temperature: float) -> list[str]:
    """The settings of `sampling` (`SamplingParams.make`'s keys) under which a drawn token is not a
    sample of softmax(logits / temperature) over the whole vocabulary, as 'key=value'; [] when none.

    Estimators built from sampled tokens and the sampler's probabilities (distillation's k1 / k3,
    RL's importance ratios) are unbiased only under that distribution (Schulman 2020).
    """
    exact = {"temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "presence_penalty": 0.0}
    return [f"{k}={v}" for k, v in sampling.items() if v != exact.get(k, v)]


def render_prompt(record: Mapping[str, Any], mode: Mode, tokenizer: Tokenizer, rollout: RolloutConfig) -> list[int]:
    """`infer.rollout.render_prompt` of a prompt record, in `mode`.

    Raises:
      DataError: what `infer.rollout.render_prompt` refuses, or a prompt longer than
        `rollout.max_prompt_len` tokens (never truncated).
    """
    ids = rollout_lib.render_prompt(tokenizer, record["messages"], mode, rollout.mode_switch, tools=record.get("tools"))
    if len(ids) > rollout.max_prompt_len:
        raise DataError(
            f"a prompt has {len(ids)} tokens, more than rollout.max_prompt_len={rollout.max_prompt_len} "
            f"(it starts {record['messages'][0].get('content', '')[:60]!r})"
        )
    return ids


def rollout_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int,
    forced: Sequence[Sequence[bool]] | None = None,
) -> dict[str, np.ndarray]:
    """The update's [B, seq_len] arrays for prompt + completion rows, right-padded.

    tokens, positions (0...), segment_ids (1 on real tokens, 0 on padding), targets (the next
    token) and loss_mask: 1 at position i exactly when token i + 1 is a completion token the
    student sampled (`forced[b][j]` marks completion tokens the thinking budget forced instead).
    Raises ValueError when a row does not fit.
    """
    B = len(prompts)
    batch = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids")}
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy()
    batch["loss_mask"] = np.zeros((B, seq_len), np.float32)
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        P, C = len(prompt), len(completion)
        if P + C > seq_len:
            raise ValueError(f"row {b}: {P} prompt + {C} completion tokens exceed seq_len={seq_len}")
        batch["tokens"][b, : P + C] = [*prompt, *completion]
        batch["segment_ids"][b, : P + C] = 1
        batch["targets"][b, : P + C - 1] = batch["tokens"][b, 1 : P + C]
        sampled = np.ones(C, bool) if forced is None else ~np.asarray(forced[b], bool).reshape(C)
        batch["loss_mask"][b, P - 1 : P + C - 1] = sampled
    return batch

