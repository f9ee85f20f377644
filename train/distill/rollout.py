"""Distillation's rollout side: the seeded mode mix, prompt rendering, and the update batch's masks."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from infer.sampling import NON_THINKING_SAMPLING, THINKING_SAMPLING
from qwen3_jax import chat
from qwen3_jax.tokenizer import Tokenizer

THINK, NO_THINK = "think", "no_think"
MODE_SWITCHES = ("soft", "hard")


class PromptError(ValueError):
    """A prompt record the rollout cannot use (ends with an assistant turn, too long, malformed)."""


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the student samples (static for a run)."""

    max_prompt_len: int
    max_new_tokens: int
    think_fraction: float
    mode_switch: str
    thinking_budget: int | None
    sampling: tuple[tuple[str, float], ...]  # overrides of the per-mode defaults

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    def row_sampling(self, mode: str) -> dict[str, float]:
        base = THINKING_SAMPLING if mode == THINK else NON_THINKING_SAMPLING
        return {**base, **dict(self.sampling)}



def biasing_settings(sampling: Mapping[str, float], temperature: float) -> list[str]:
    """The settings of `sampling` (`SamplingParams.make`'s keys) under which a drawn token is not a
    sample of softmax(logits / temperature) over the whole vocabulary, as 'key=value'; [] when none.

    Estimators built from sampled tokens and the sampler's probabilities (distillation's k1 / k3,
    RL's importance ratios) are unbiased only under that distribution (Schulman 2020).
    """
    exact = {"temperature": temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "presence_penalty": 0.0}
    return [f"{k}={v}" for k, v in sampling.items() if v != exact.get(k, v)]


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of step `step`: a function of (seed, step), so resumed runs repeat."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def choose_modes(seed: int, step: int, n: int, think_fraction: float) -> list[str]:
    draws = np.random.default_rng([seed, step, 1]).random(n)
    return [THINK if d < think_fraction else NO_THINK for d in draws]


def render_prompt(record: dict[str, Any], mode: str, tokenizer: Tokenizer, rollout: RolloutConfig) -> list[int]:
    """Token ids of `record`'s conversation + the generation prompt, in `mode`.

    Raises PromptError when the conversation ends with an assistant turn, the chat template
    rejects it, or it is longer than `rollout.max_prompt_len` tokens (never truncated).
    """
    messages = record["messages"]
    if messages[-1].get("role") == "assistant":
        raise PromptError("a prompt must not end with an assistant turn (the student writes that turn)")
    thinking = mode == THINK
    try:
        if rollout.mode_switch == "soft":
            messages = chat.with_soft_switch(messages, thinking)
        text = chat.render(messages, tools=record.get("tools"), add_generation_prompt=True,
                           enable_thinking=thinking or rollout.mode_switch == "soft")
    except ValueError as e:
        raise PromptError(f"a prompt record the chat template rejects: {e}") from e
    ids = tokenizer.encode(text)
    if len(ids) > rollout.max_prompt_len:
        raise PromptError(
            f"a prompt has {len(ids)} tokens, more than rollout.max_prompt_len={rollout.max_prompt_len} "
            f"(it starts {messages[0].get('content', '')[:60]!r})"
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

