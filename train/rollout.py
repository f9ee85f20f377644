"""Rollouts for the trainers that learn from the model's own samples (on-policy distillation, RL).

One place for what both loops do each step: render the step's prompts in a seeded mix of thinking
modes, let the current policy complete them with `infer.engine`'s compiled decode (K samples per
prompt, each with its log-probability), and build the update batch whose loss mask holds exactly
the sampled completion tokens (never the prompt, padding or tokens the thinking budget forced).

Rollouts on every host: each process renders its own share of the prompts (train.data's prompt
stream shards records per process); the rendered prompts are all-gathered, every process runs the
same generate on the whole global batch (one engine on the global mesh; rows are sharded over its
data axes), and each process keeps its own rows for its part of the update batch
(`train.loop.global_batch`). Modes and sampling keys are functions of (seed, step, global row), so
2 processes x 4 devices sample what 1 process x 8 devices samples.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from infer import rollout as rollout_lib
from infer.engine import Engine
from infer.rollout import Completion, Mode, Switch
from qwen3_jax.errors import ConfigError, DataError
from qwen3_jax.tokenizer import Tokenizer
from train.objectives import Params, model_at
from train.schema import need


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the policy samples its completions (static for a run)."""

    max_prompt_len: int = 256  # longer prompts are an error, never truncated
    max_new_tokens: int = 256
    think_fraction: float = 0.5  # share of prompts the policy answers in thinking mode
    # soft: '/think' or '/no_think' appended to the last user message (the report's switches);
    # hard: thinking on, or the template's empty think block (enable_thinking=False).
    mode_switch: str = "soft"
    thinking_budget: int | None = None  # thinking tokens per reply; None: no limit
    # Sampling; unset values follow Qwen's recommendation for each row's mode (infer.rollout).
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        for name in ("max_prompt_len", "max_new_tokens"):
            need(getattr(self, name) >= 1, f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        need(0.0 <= self.think_fraction <= 1.0, f"rollout.think_fraction must be in [0, 1], got {self.think_fraction}")
        switches = tuple(s.value for s in Switch)
        need(self.mode_switch in switches, f"rollout.mode_switch must be one of {switches}, got {self.mode_switch!r}")
        need(self.thinking_budget is None or self.thinking_budget >= 0,
             f"rollout.thinking_budget must be None or >= 0, got {self.thinking_budget}")
        try:
            rollout_lib.check_sampling(self.sampling)
        except ConfigError as e:
            raise ConfigError(f"rollout: {e}") from None

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    @property
    def switch(self) -> Switch:
        return Switch(self.mode_switch)

    @property
    def sampling(self) -> dict[str, float]:
        """The sampling fields the config sets (overrides of the per-mode defaults)."""
        return {k: getattr(self, k) for k in rollout_lib.SAMPLING_KEYS if getattr(self, k, None) is not None}

    def row_sampling(self, mode: Mode) -> dict[str, float]:
        return rollout_lib.mode_sampling(mode, self.sampling)

    def modes_used(self) -> list[Mode]:
        """The modes `think_fraction` can draw."""
        return [m for m, used in ((Mode.THINK, self.think_fraction > 0), (Mode.NO_THINK, self.think_fraction < 1))
                if used]


def biasing_settings(sampling: dict[str, float], temperature: float) -> list[str]:
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
    ids = rollout_lib.render_prompt(tokenizer, record["messages"], mode, rollout.switch, tools=record.get("tools"))
    if len(ids) > rollout.max_prompt_len:
        raise DataError(
            f"a prompt has {len(ids)} tokens, more than rollout.max_prompt_len={rollout.max_prompt_len} "
            f"(it starts {record['messages'][0].get('content', '')[:60]!r})"
        )
    return ids


def rollout_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int,
    forced: Sequence[Sequence[bool]] | None = None, logprobs: Sequence[Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """The update's [B, seq_len] arrays for prompt + completion rows, right-padded.

    tokens, positions (0...), segment_ids (1 on real tokens, 0 on padding), targets (the next
    token) and loss_mask: 1 at position i exactly when token i + 1 is a completion token the
    policy sampled (`forced[b][j]` marks completion tokens the thinking budget forced instead).
    With `logprobs`, also old_logp: at position i, the sampler's log-probability of token i + 1
    (0 off the completion). Raises ValueError when a row does not fit.
    """
    B = len(prompts)
    batch = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids")}
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy()
    batch["loss_mask"] = np.zeros((B, seq_len), np.float32)
    if logprobs is not None:
        batch["old_logp"] = np.zeros((B, seq_len), np.float32)
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        P, C = len(prompt), len(completion)
        if P + C > seq_len:
            raise ValueError(f"row {b}: {P} prompt + {C} completion tokens exceed seq_len={seq_len}")
        batch["tokens"][b, : P + C] = [*prompt, *completion]
        batch["segment_ids"][b, : P + C] = 1
        batch["targets"][b, : P + C - 1] = batch["tokens"][b, 1 : P + C]
        sampled = np.ones(C, bool) if forced is None else ~np.asarray(forced[b], bool).reshape(C)
        batch["loss_mask"][b, P - 1 : P + C - 1] = sampled
        if logprobs is not None:
            batch["old_logp"][b, P - 1 : P + C - 1] = np.asarray(logprobs[b], np.float32).reshape(C)
    return batch


@dataclasses.dataclass
class Rollout:
    """One step's rollout. Rows are prompts x samples, a prompt's samples adjacent (row r is prompt
    r // samples); `local` is the slice of global rows this process's prompts own."""

    prompts: list[list[int]]  # per global row
    modes: list[Mode]  # per global row
    completions: list[Completion]  # per global row
    samples: int
    local: slice
    seconds: float  # the rollout's wall time (rendering excluded)
    render_seconds: float

    def local_batch(self, seq_len: int) -> dict[str, np.ndarray]:
        """`rollout_batch` of this process's rows, with old_logp when the rollout kept log-probs."""
        rows = self.completions[self.local]
        logprobs = None if rows and rows[0].logprobs is None else [c.logprobs for c in rows]
        return rollout_batch(self.prompts[self.local], [c.token_ids for c in rows], seq_len,
                             [c.forced for c in rows], logprobs)

    def metrics(self, tokenizer: Tokenizer) -> dict[str, float]:
        """Completion length, forced tokens, the think share, rollout seconds and tokens/s, and the
        fraction of thinking replies that closed their block, over the global batch."""
        n = len(self.completions)
        generated = sum(len(c.token_ids) for c in self.completions)
        think = [c for c, m in zip(self.completions, self.modes) if m is Mode.THINK]
        out = dict(
            completion_len=generated / n,
            forced_tokens=sum(sum(c.forced) for c in self.completions) / n,
            think_rows=len(think) / n,
            rollout_time=self.seconds,
            rollout_tokens_per_s=generated / self.seconds,
        )
        if think and tokenizer.end_think_id is not None:
            out["closed_thinking"] = sum(c.thinking_closed for c in think) / len(think)
        return out


def allgather_prompts(local: Sequence[Sequence[int]], max_len: int) -> list[list[int]]:
    """Every process's prompts, in process order (the global batch's row order); `local` alike on
    every process in count. One process: `local` itself."""
    if jax.process_count() == 1:
        return [list(p) for p in local]
    ids = np.zeros((len(local), max_len), np.int32)
    lengths = np.asarray([len(p) for p in local], np.int32)
    for i, p in enumerate(local):
        ids[i, : len(p)] = p
    ids, lengths = multihost_utils.process_allgather((ids, lengths), tiled=True)
    return [row[:n].tolist() for row, n in zip(np.asarray(ids), np.asarray(lengths))]


class Roller:
    """Renders a step's prompts and samples completions from the policy at given parameters.

    The engine is rebuilt from the parameters it is given at every call, so a rollout never samples
    from stale weights; its compiled prefill and decode are cached by shape and reused (building it
    costs a cast of the parameters, measured in benchmarks/rl.py).
    """

    def __init__(self, rollout: RolloutConfig, *, seed: int, tokenizer: Tokenizer, mesh: jax.sharding.Mesh,
                 graphdef: nnx.GraphDef, dtype: Any, samples: int = 1, logprobs: bool = False):
        self.cfg, self.seed, self.tokenizer, self.mesh = rollout, seed, tokenizer, mesh
        self.graphdef, self.dtype, self.samples, self.logprobs = graphdef, dtype, samples, logprobs

    def engine(self, params: Params) -> Engine:
        """The decode engine of the policy at `params`, in its compute dtype."""
        return Engine.for_tokenizer(model_at(self.graphdef, params, self.dtype), self.tokenizer, mesh=self.mesh)

    def __call__(self, params: Params, records: Sequence[Mapping[str, Any]], step: int) -> Rollout:
        """This process's `records` (an equal share on every process) and the others', each
        rendered in its seeded mode and sampled `samples` times by the policy at `params`.

        Raises DataError (from `render_prompt`) for a prompt that does not render or fit.
        """
        t0 = time.perf_counter()
        n_local, r = len(records), self.cfg
        first = jax.process_index() * n_local
        modes = rollout_lib.choose_modes(self.seed, step, n_local * jax.process_count(), r.think_fraction)
        local = [render_prompt(rec, m, self.tokenizer, r) for rec, m in zip(records, modes[first: first + n_local])]
        prompts = allgather_prompts(local, r.max_prompt_len)
        K = self.samples
        rows, row_modes = [p for p in prompts for _ in range(K)], [m for m in modes for _ in range(K)]
        t1 = time.perf_counter()
        completions = rollout_lib.generate_chat(
            self.engine(params), self.tokenizer, rows, row_modes, max_new_tokens=r.max_new_tokens,
            thinking_budget=r.thinking_budget, sampling=r.sampling, seed=rollout_lib.step_seed(self.seed, step),
            logprobs=self.logprobs)
        t2 = time.perf_counter()
        return Rollout(rows, row_modes, completions, K, slice(first * K, (first + n_local) * K), t2 - t1, t1 - t0)
