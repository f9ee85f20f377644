"""Distillation's side of a rollout (`infer.rollout` does the rest): the prompt length check, the update batch's masks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from infer import rollout as rollout_lib
from infer.rollout import Mode
from qwen3_jax.errors import DataError
from qwen3_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from train.distill.config import RolloutConfig


def render_prompt(record: Mapping[str, Any], mode: Mode, tokenizer: Tokenizer, rollout: "RolloutConfig") -> list[int]:
    """`infer.rollout.render_prompt` of a prompt record, in `mode`.

    Raises:
      DataError: what `infer.rollout.render_prompt` refuses, or a prompt longer than
        `rollout.max_prompt_len` tokens (never truncated).
    """
    ids = rollout_lib.render_prompt(tokenizer, record["messages"], mode, rollout.switch, tools=record.get("tools"))
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

