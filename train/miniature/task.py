"""A verifiable reasoning task with a difficulty knob, in Qwen3's thinking-mode fusion format.

A problem: a sequence mod 10 where each term is the sum of the two before it; given the first two
terms, the term `k` steps on (difficulty `k`). The thinking trace writes one addition per line, so
thinking helps more as `k` grows. Splits are disjoint by starting pair (60 / 20 / 20 of the 100,
by hash). Records follow the report's thinking-mode fusion (§4.3, Table 9); `verify` parses an answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qwen3_jax.chat import NO_THINK_FLAG, THINK_FLAG
from qwen3_jax.ids import END_THINK_TEXT, STOP_THINKING_TEXT

SPLITS = ("train", "validation", "test")
# What a split holds out: starting pairs at every difficulty, or whole questions (a pair at one
# difficulty, so a test question's pair starts training questions at other difficulties).
SPLIT_UNITS = ("question", "start")
MAX_DIFFICULTY = 32
# The numbers close the question, so the reply's first line and step count sit a fixed distance
# from what they are read from.
QUESTION = "Each term is the sum of the two before it, mod 10. What is the term {2} steps on from {0} {1}?"
ANSWER_RE = re.compile(r"answer is (-?\d+)")
SYSTEM_PROMPT = "You are a careful calculator."


@dataclasses.dataclass(frozen=True)
class Problem:
    start: tuple[int, int]  # the first two terms, digits
    difficulty: int  # k: the term asked for is k steps after the start

    @property
    def question(self) -> str:
        return QUESTION.format(*self.start, self.difficulty)

    def steps(self) -> list[tuple[int, int, int]]:
        """(t[n-2], t[n-1], t[n]) for each new term t[n], mod 10."""
        a, b = self.start
        out = []
        for _ in range(self.difficulty):
            a, b = b, (a + b) % 10
            out.append((out[-1][1] if out else self.start[0], a, b))
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][2]

    @property
    def trace(self) -> str:
        """The step-by-step reasoning: `j: a+b=c` for each new term c."""
        return "\n".join(f"{j}: {a}+{b}={c}" for j, (a, b, c) in enumerate(self.steps(), 1))

    @property
    def final(self) -> str:
        return f"The answer is {self.answer}."


STARTS = [(a, b) for a in range(10) for b in range(10)]


def _ranked(key: object) -> dict[tuple[int, int], str]:
    """Starting pairs ranked by a hash of (pair, key), then cut 60 / 20 / 20: exact split sizes."""
    ranked = sorted(STARTS, key=lambda s: hashlib.sha256(repr((s, key) if key is not None else s).encode()).digest())
    return {s: SPLITS[0] if i < 60 else SPLITS[1] if i < 80 else SPLITS[2] for i, s in enumerate(ranked)}


_SPLIT_OF = {"start": _ranked(None), "question": {d: _ranked(d) for d in range(1, MAX_DIFFICULTY + 1)}}


def split_of(start: tuple[int, int], difficulty: int, by: str = "start") -> str:
    """The split of the question (`start`, `difficulty`): by `question`, 60 / 20 / 20 of the pairs
    at each difficulty; by `start`, the pair's split at every difficulty."""
    if by not in SPLIT_UNITS:
        raise ValueError(f"split unit must be one of {SPLIT_UNITS}, got {by!r}")
    table = _SPLIT_OF["start"] if by == "start" else _SPLIT_OF["question"][difficulty]
    return table[tuple(start)]


def problems(split: str, difficulty: int, n: int, seed: int, by: str = "start") -> list[Problem]:
    """Up to `n` distinct problems of `split` at `difficulty`, drawn with `seed` (deterministic):
    the split's starting pairs in a seeded order. `by`: the split unit (`SPLIT_UNITS`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in [1, {MAX_DIFFICULTY}], got {difficulty}")
    mine = [s for s in STARTS if split_of(s, difficulty, by) == split]
    rng = np.random.default_rng([seed, difficulty, SPLITS.index(split)])
    return [Problem(mine[i], difficulty) for i in rng.permutation(len(mine))[:n]]


def verify(completion_answer: str, problem: Problem) -> bool:
    """True when the last 'answer is N' in the answer text states the right result."""
    found = ANSWER_RE.findall(completion_answer)
    return bool(found) and int(found[-1]) == problem.answer


# ------------------------------------------------------------------------------- chat records


def prompt_messages(problem: Problem, mode: str | None, *, system: bool = False) -> list[dict[str, str]]:
    """The evaluation prompt: the question with the `mode` soft switch ('think', 'no_think' or
    None for no flag) in the user message, or in a system message when `system`."""
    flag = {"think": THINK_FLAG, "no_think": NO_THINK_FLAG, None: None}[mode]
    if system and flag:
        return [{"role": "system", "content": f"{SYSTEM_PROMPT} {flag}"}, {"role": "user", "content": problem.question}]
    return [{"role": "user", "content": problem.question + (f" {flag}" if flag else "")}]


def reply(problem: Problem, thinking: bool) -> dict[str, str]:
    return {"role": "assistant", "content": problem.final, "reasoning_content": problem.trace if thinking else ""}


def cut_reply(problem: Problem, cut: int) -> dict[str, str]:
    """A thinking reply whose trace stops after `cut` >= 1 characters, followed by Qwen's
    stop-thinking text and the answer: rendered, `<think>\n` + trace[:cut] + STOP_THINKING_TEXT +
    answer, what a thinking budget of cut + 1 tokens forces when each character is a token (report
    §4.3; the `\n` after `<think>` is the budget's first token)."""
    return {"role": "assistant", "content": problem.final,
            "reasoning_content": problem.trace[:cut] + STOP_THINKING_TEXT.removesuffix(f"\n{END_THINK_TEXT}\n\n")}


@dataclasses.dataclass(frozen=True)
class FusionMix:
    """Shares of the thinking-mode fusion training data (each a probability)."""

    no_flag: float = 0.3  # a user message carries no flag
    system_flag: float = 0.2  # the conversation opens with a system message carrying a flag
    multi_turn: float = 0.3  # an earlier turn (question, flag, answer) precedes the final question
    stop_thinking: float = 0.0  # a single-turn thinking reply is cut at a random point by the stop-thinking text


def _user(problem: Problem, flag: str | None) -> dict[str, str]:
    text = {"think": THINK_FLAG, "no_think": NO_THINK_FLAG}.get(flag)
    return {"role": "user", "content": problem.question + (f" {text}" if text else "")}


def thinks(flags: Sequence[str | None]) -> bool:
    """The reply's mode under the report's rule: the last flag given wins; no flag means think."""
    given = [f for f in flags if f is not None]
    return not given or given[-1] == "think"


def fusion_conversation(rng: np.random.Generator, problems_: Sequence[Problem], mix: FusionMix,
                        no_think_problems: Sequence[Problem] | None = None) -> dict[str, Any]:
    """One conversation whose final reply follows the last flag: {messages, problem, mode}.

    The messages end with the user question (no reply); `fusion_records` adds it. The final
    question comes from `no_think_problems` when the reply does not think (the report curates its
    non-thinking data apart), else from `problems_`.
    """
    def flag(p_none: float) -> str | None:
        return None if rng.random() < p_none else ("think" if rng.random() < 0.5 else "no_think")

    system = flag(1.0 - mix.system_flag)
    messages: list[dict[str, str]] = []
    if system is not None:
        text = THINK_FLAG if system == "think" else NO_THINK_FLAG
        messages.append({"role": "system", "content": f"{SYSTEM_PROMPT} {text}"})
    flags = [system]
    if rng.random() < mix.multi_turn:
        earlier = problems_[rng.integers(len(problems_))]
        flags.append(flag(mix.no_flag))
        messages += [_user(earlier, flags[-1]), reply(earlier, thinks(flags))]
    flags.append(flag(mix.no_flag))
    pool = problems_ if thinks(flags) or no_think_problems is None else no_think_problems
    problem = pool[rng.integers(len(pool))]
    messages.append(_user(problem, flags[-1]))
    return {"messages": messages, "problem": problem, "mode": "think" if thinks(flags) else "no_think"}


def fusion_records(rng: np.random.Generator, train: Sequence[Problem], n: int, mix: FusionMix,
                   no_think_train: Sequence[Problem] | None = None) -> Iterator[dict[str, Any]]:
    """`n` SFT chat records of the ground-truth fusion data over `train` problems (non-thinking
    replies over `no_think_train` when given)."""
    for _ in range(n):
        c = fusion_conversation(rng, train, mix, no_think_train)
        p, mode = c["problem"], c["mode"]
        # Only single-turn replies are cut: the stop-thinking text would push the longest
        # multi-turn records past the rows they are trained in.
        single = sum(m["role"] == "user" for m in c["messages"]) == 1
        if mode == "think" and single and rng.random() < mix.stop_thinking:
            mode, answer = "stop_thinking", cut_reply(p, int(rng.integers(1, len(p.trace))))
        else:
            answer = reply(p, mode == "think")
        yield {"messages": [*c["messages"], answer], "mode": mode, "difficulty": p.difficulty}
