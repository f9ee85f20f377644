"""Chat rollouts: Qwen3's thinking mode, prompt rendering, per-row sampling, seeds and generation.

Distillation, `infer.batch`, evaluation and `infer.text` generate through this module, so the
thinking switch, Qwen's sampling defaults and seed derivation are written once. `Mode` is a StrEnum:
`Mode.THINK == "think"`, as records and configs spell it.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from infer import checks
from infer.sampling import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams
from qwen3_jax import chat
from qwen3_jax.errors import ConfigError, DataError, RequestError

if TYPE_CHECKING:  # annotations only
    from infer.engine import Engine
    from qwen3_jax.tokenizer import Tokenizer

Message = Mapping[str, Any]


class Mode(enum.StrEnum):
    """Whether a reply thinks first (Qwen3's hybrid thinking)."""

    THINK = "think"
    NO_THINK = "no_think"


MODES = tuple(Mode)


class Switch(enum.StrEnum):
    """How a rendered prompt asks for its mode (Qwen3 report §4.3)."""

    SOFT = "soft"  # '/think' or '/no_think' ends the last user message; the template's thinking stays on
    HARD = "hard"  # the template's enable_thinking: a no_think prompt ends with the empty think block
    BOTH = "both"  # the flag and the hard switch: records teach the flag, a no_think row cannot think


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "presence_penalty")
# Qwen's recommended settings for each mode (Qwen3 model cards, "Best Practices").
QWEN_SAMPLING: Mapping[Mode, Mapping[str, float]] = {
    Mode.THINK: THINKING_SAMPLING, Mode.NO_THINK: NON_THINKING_SAMPLING,
}


# ------------------------------------------------------------------------------------- modes


def last_soft_switch(messages: Sequence[Message]) -> str | None:
    """'/think' or '/no_think' as the model reads it: the last flag in user or system text."""
    for message in reversed(messages):
        if message.get("role") not in ("user", "system"):
            continue
        content = message.get("content") or ""
        positions = {flag: content.rfind(flag) for flag in (chat.THINK_FLAG, chat.NO_THINK_FLAG)}
        found = {f: p for f, p in positions.items() if p >= 0}
        if found:
            return max(found, key=found.get)
    return None


def mode_of(messages: Sequence[Message], enable_thinking: bool = True) -> Mode:
    """The mode a conversation asks for: the hard switch off wins, else its last soft switch
    (none: think)."""
    thinking = enable_thinking and last_soft_switch(messages) != chat.NO_THINK_FLAG
    return Mode.THINK if thinking else Mode.NO_THINK


def choose_modes(seed: int, step: int, n: int, think_fraction: float) -> list[Mode]:
    """A seeded mix of `n` modes, each think with probability `think_fraction`; a function of
    (seed, step) only."""
    draws = np.random.default_rng([seed, step, 1]).random(n)
    return [Mode.THINK if d < think_fraction else Mode.NO_THINK for d in draws]


# ---------------------------------------------------------------------------------- prompts


def with_switch(messages: Sequence[Message], mode: Mode, switch: Switch) -> list[Any]:
    """`messages` as `render_prompt` renders them: with the soft flag of `mode` for SOFT and
    BOTH (see `chat.with_soft_switch`; ValueError without a user message), a copy for HARD."""
    if Switch(switch) is Switch.HARD:
        return list(messages)
    return chat.with_soft_switch(messages, Mode(mode) is Mode.THINK)


def check_prompt(messages: Sequence[Message]) -> None:
    """Raises DataError when a (validated, non-empty) conversation ends with an assistant turn."""
    if messages[-1]["role"] == "assistant":
        raise DataError("a prompt must not end with an assistant turn (the model writes that turn)")


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message], mode: Mode, switch: Switch, *,
                  tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Token ids of `messages` + the generation prompt, asking for `mode` by `switch`.

    Raises:
      DataError: the chat template rejects the messages or tools, the conversation ends with an
        assistant turn (the model writes that turn), or SOFT/BOTH finds no user message.
    """
    mode, switch = Mode(mode), Switch(switch)
    try:
        chat.validate_messages(messages, tools)
    except ValueError as e:
        raise DataError(f"the chat template rejects the messages: {e}") from e
    check_prompt(messages)
    try:
        messages = with_switch(messages, mode, switch)
    except ValueError as e:  # no user message to carry the flag
        raise DataError(str(e)) from e
    text = chat.render(messages, tools=tools, add_generation_prompt=True,
                       enable_thinking=mode is Mode.THINK or switch is Switch.SOFT)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates no tokenizer encodes
        raise DataError(f"{_where(messages, tools, text[e.start])} is not Unicode text: it holds an unpaired "
                        f"surrogate {text[e.start]!r}") from None
    return tokenizer.encode(text)


def _where(messages: Sequence[Message], tools, char: str) -> str:
    """The first message (or the tools) whose JSON holds `char`."""
    for i, m in enumerate(messages):
        if char in json.dumps(m, ensure_ascii=False, default=str):
            return f"message {i}"
    return "tools" if tools and char in json.dumps(tools, ensure_ascii=False, default=str) else "the rendered prompt"


# --------------------------------------------------------------------------------- sampling


def mode_sampling(mode: Mode, overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Qwen's settings for `mode` with `overrides` (any of SAMPLING_KEYS) on top."""
    return {**QWEN_SAMPLING[Mode(mode)], **(overrides or {})}


def row_sampling(modes: Sequence[Mode], overrides: Mapping[str, float] | None = None) -> dict[str, list[float]]:
    """Per-row columns for `Engine.generate`: {setting: [each row's value]}, a row's values being
    `mode_sampling(mode, overrides)`."""
    rows = [mode_sampling(m, overrides) for m in modes]
    return {name: [row[name] for row in rows] for name in rows[0]} if rows else {}


def check_sampling(overrides: Mapping[str, float]) -> None:
    """Raises ConfigError for an unknown setting or a value `SamplingParams.make` rejects in
    either mode."""
    unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"unknown sampling settings {unknown}; known: {list(SAMPLING_KEYS)}")
    try:
        for mode in MODES:
            SamplingParams.check(1, **mode_sampling(mode, overrides))
    except ValueError as e:
        raise ConfigError(str(e)) from e


# ------------------------------------------------------------------------------------ seeds
# Two derivations, kept because each one's values are recorded in existing runs: a batch seed per
# training step (rows split their keys from it), and a row's own seed (independent of its batch).


def step_seed(seed: int, step: int) -> int:
    """One engine seed for a whole batch, a function of (seed, step) (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def row_seed(*key: Any) -> int:
    """A row's own engine seed in [0, 2**32), a function of `key` only (sha256 of the values'
    str joined by ':'), so a regenerated row has the same tokens whatever batch it lands in."""
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


# ------------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated reply.

    token_ids: the new ids, a stop token included when one ended the reply. forced: per id,
    whether the thinking budget forced it rather than the model sampling it. thinking / answer:
    the reply split at its last </think> (`chat.parse_completion_ids`). finished: a stop token
    ended it (else max_new_tokens cut it). thinking_closed: a </think> id is among the new ids.
    logprobs: per id, its float32 log-probability at the sampling temperature
    (`infer.engine.token_logprobs`), when `generate_chat` was asked for them.
    """

    token_ids: list[int]
    forced: list[bool]
    thinking: str
    answer: str
    finished: bool
    thinking_closed: bool
    logprobs: list[float] | None = None


def generate_chat(
    engine: Engine, tokenizer: Tokenizer, prompts: Sequence[Sequence[int]], modes: Sequence[Mode], *,
    max_new_tokens: int, thinking_budget: int | None = None, sampling: Mapping[str, float] | None = None,
    seed: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None, batch_size: int | None = None,
    after_batch: Callable[[], Any] | None = None, logprobs: bool = False,
) -> list[Completion]:
    """Replies to rendered `prompts` (`render_prompt`), one `Completion` each.

    Each row samples with `row_sampling(modes, sampling)`; `thinking_budget` (thinking tokens,
    None: no limit) applies to think rows only. `seed`: one int per engine call (the rows' keys
    are split from it, so a row depends on its batch; see `step_seed`) or one int in [0, 2**32)
    per prompt (see `row_seed`). `stop_token_ids`: default the tokenizer's. `batch_size`: rows
    per engine call, the last call padded by repeating its first row (a bounded number of compiled
    shapes); None: one call. `after_batch` is called after each engine call. `logprobs`: fill each
    `Completion.logprobs`.

    Raises:
      RequestError: `modes` or a per-row `seed` does not match `prompts` in length; and what
        `Engine.generate` raises for the other arguments.
    """
    prompts = checks.non_empty_list(prompts, "prompts")
    modes = [Mode(m) for m in modes]
    if len(modes) != len(prompts):
        raise RequestError(f"modes has {len(modes)} values for {len(prompts)} prompts")
    seeds = list(seed) if np.ndim(seed) > 0 else None
    if seeds is not None and len(seeds) != len(prompts):
        raise RequestError(f"seed has {len(seeds)} values for {len(prompts)} prompts")
    stop = tokenizer.eos_ids if stop_token_ids is None else stop_token_ids
    size = batch_size or len(prompts)
    out: list[Completion] = []
    for start in range(0, len(prompts), size):
        rows = list(range(start, min(start + size, len(prompts))))
        n = len(rows)
        if batch_size:
            rows += [rows[0]] * (batch_size - n)
        gen = engine.generate(
            [prompts[r] for r in rows], max_new_tokens=max_new_tokens, stop_token_ids=stop,
            thinking_budget=[thinking_budget if modes[r] is Mode.THINK else None for r in rows],
            seed=seed if seeds is None else [seeds[r] for r in rows], return_forced=True,
            **({"return_logprobs": True} if logprobs else {}), **row_sampling([modes[r] for r in rows], sampling),
        )
        lps = gen[2] if logprobs else [None] * len(rows)
        out += [_completion(i, f, lp, tokenizer, stop) for i, f, lp in zip(gen[0][:n], gen[1][:n], lps[:n])]
        if after_batch is not None:
            after_batch()
    return out


def stream_chat(
    engine: Engine, tokenizer: Tokenizer, rows: Iterable[tuple[Any, Sequence[int], Mode, int]], *, slots: int,
    max_new_tokens: int, thinking_budget: int | None = None, sampling: Mapping[str, float] | None = None,
    stop_token_ids: Sequence[int] | None = None, chunk: int = 8,
) -> Iterator[list[tuple[Any, Completion]]]:
    """Replies to rendered prompts through continuous batching (`infer.continuous`), as they finish.

    `rows`: (key, prompt ids, mode, seed) tuples, read lazily (at most `slots` wait beside the
    `slots` decoding; on a mesh `slots` is rounded up to the data-parallel degree). Each row
    samples as `generate_chat`'s would with a per-row seed, so its tokens are the same as there.
    Yields, after each decode chunk in which rows finished, their (key, Completion) pairs. The
    cache holds the longest prompt's bucket plus `max_new_tokens`: a longer prompt waits until the
    running rows finish, then the cache grows to it (a bounded number of times: prompt buckets are
    powers of two, then prefill-chunk multiples).

    Raises:
      RequestError: a row the engine cannot run (see `ContinuousEngine.check`), when it is read.
    """
    from infer.continuous import ContinuousEngine, Request  # here: this module stays free of jax for configs

    stop = tokenizer.eos_ids if stop_token_ids is None else stop_token_ids
    multiple = engine._batch_multiple()
    slots = -(-checks.positive_int(slots, "slots") // multiple) * multiple  # rows split over the data axes
    finished: list[tuple[Any, Completion]] = []

    def request(key, prompt: Sequence[int], mode: Mode, seed: int) -> Request:
        ids: list[int] = []
        forced: list[bool] = []

        def on_tokens(new: list[int], new_forced: list[bool], done: bool) -> None:
            ids.extend(new)
            forced.extend(new_forced)
            if done:
                finished.append((key, _completion(ids, forced, None, tokenizer, stop)))

        budget = thinking_budget if Mode(mode) is Mode.THINK else None
        return Request(list(prompt), max_new_tokens, on_tokens, mode_sampling(mode, sampling), budget, seed)

    source = iter(rows)
    continuous = None
    held = None  # a row too long for the current cache, admitted once the running rows finish
    exhausted = False
    while True:
        while not exhausted and (continuous is None or continuous.waiting < slots):
            row = held if held is not None else next(source, None)
            held = None
            if row is None:
                exhausted = True
                break
            if continuous is None or len(row[1]) + max_new_tokens > continuous.context:
                if continuous is not None and not continuous.idle():
                    held = row
                    break
                positions = min(engine.context, engine.prompt_positions(len(row[1])) + max_new_tokens)
                continuous = ContinuousEngine(engine, slots=slots, max_len=positions, chunk=chunk, max_queue=slots,
                                              stop_token_ids=stop)
            continuous.submit(request(*row))
        if continuous is None or (exhausted and continuous.idle()):
            return
        continuous.step()
        if finished:
            yield finished
            finished = []


def _completion(ids: list[int], forced: list[bool], logprobs: list[float] | None, tokenizer: Tokenizer,
                stop: Sequence[int]) -> Completion:
    thinking, answer = chat.parse_completion_ids(ids, tokenizer)
    end = tokenizer.end_think_id
    return Completion(ids, forced, thinking, answer, finished=bool(ids) and ids[-1] in stop,
                      thinking_closed=end is not None and end in ids, logprobs=logprobs)
