"""A verifiable reasoning task with a difficulty knob, in Qwen3's thinking-mode fusion format.

Problems are chains of single-digit operations evaluated left to right modulo 10:

    user:      Start at 4, mod 10.
               A: +3
               B: *2
               C: -5
               D: +1
    thinking:  A: 4+3=7         (one line per operation: look up operation A, B, ... by its
               B: 7*2=4          label, apply it to the last result: one of 270 single-digit
               C: 4-5=9          facts)
               D: 9+1=0
    answer:    The answer is 0.

Difficulty is the number of operations. With the step-by-step trace every step is one of 300
single-digit facts; answering in one shot means composing all of them in a single forward pass,
which a small model does well for one operation and close to chance (10%) for many. So thinking
and non-thinking answers are close on the easiest level and far apart on the hardest, and a
thinking budget that cuts the trace short trades tokens for accuracy.

Splits are disjoint by construction: every distinct problem is assigned to train, validation or
test by a hash of its text, before sampling. `verify` parses the final answer of a completion.

Training samples follow the report's thinking-mode fusion (Qwen3 technical report §4.3, Table 9),
rendered by the Qwen3 chat template: thinking samples carry the trace in the think block,
non-thinking samples the empty think block; `/think` and `/no_think` soft switches sit in the
user or system message; multi-turn samples carry random flags and the reply follows the last one;
some thinking samples carry no flag at all (thinking is the default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qwen3_jax.chat import NO_THINK_FLAG, THINK_FLAG

OPS = ("+", "-", "*")
SPLITS = ("train", "validation", "test")
QUESTION = "Start at {start}, mod 10."
LABELS = "ABCDEFGHIJKLMNOP"  # operation labels: unique keys, so a step finds its operation by content
ANSWER_RE = re.compile(r"answer is (-?\d+)")
SYSTEM_PROMPT = "You are a careful calculator."


@dataclasses.dataclass(frozen=True)
class Problem:
    start: int  # 0-9
    ops: tuple[tuple[str, int], ...]  # (operator, digit 1-9) applied left to right, mod 10

    @property
    def difficulty(self) -> int:
        return len(self.ops)

    @property
    def question(self) -> str:
        return QUESTION.format(start=self.start) + "".join(f"\n{LABELS[j]}: {op}{d}" for j, (op, d) in enumerate(self.ops))

    def steps(self) -> list[tuple[int, str, int, int]]:
        """(value before, operator, operand, value after) for each operation."""
        out, value = [], self.start
        for op, d in self.ops:
            after = {"+": value + d, "-": value - d, "*": value * d}[op] % 10
            out.append((value, op, d, after))
            value = after
        return out

    @property
    def answer(self) -> int:
        return self.steps()[-1][3]

    @property
    def trace(self) -> str:
        """The step-by-step reasoning: one `L: a<op>b=c` line per operation L."""
        return "\n".join(f"{LABELS[j]}: {a}{op}{d}={c}" for j, (a, op, d, c) in enumerate(self.steps()))

    @property
    def final(self) -> str:
        return f"The answer is {self.answer}."


def split_of(problem: Problem, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """The split a problem belongs to: a hash of its question, so no problem is in two splits."""
    h = int.from_bytes(hashlib.sha256(problem.question.encode()).digest()[:8], "little") / 2**64
    return SPLITS[0] if h < fractions[0] else SPLITS[1] if h < fractions[0] + fractions[1] else SPLITS[2]


def random_problem(rng: np.random.Generator, difficulty: int) -> Problem:
    ops = tuple((OPS[rng.integers(len(OPS))], int(rng.integers(1, 10))) for _ in range(difficulty))
    return Problem(int(rng.integers(10)), ops)


def problems(split: str, difficulty: int, n: int, seed: int,
             fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[Problem]:
    """Up to `n` distinct problems of `split` at `difficulty`, drawn with `seed` (deterministic).

    Fewer than `n` only when the split holds fewer problems of that difficulty (difficulty 1 has
    270 problems in all); every one of them is returned then.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 1 <= difficulty <= len(LABELS):
        raise ValueError(f"difficulty must be in [1, {len(LABELS)}], got {difficulty}")
    rng = np.random.default_rng([seed, difficulty, SPLITS.index(split)])
    if _space(difficulty) <= 100_000:  # small: enumerate it
        every = [Problem(start, ops) for start in range(10)
                 for ops in itertools.product(*[[(op, d) for op in OPS for d in range(1, 10)]] * difficulty)]
        mine = [p for p in every if split_of(p, fractions) == split]
        return [mine[i] for i in rng.permutation(len(mine))[:n]]
    seen: dict[str, Problem] = {}
    while len(seen) < n:  # a huge space: rejection sampling ends quickly
        p = random_problem(rng, difficulty)
        if split_of(p, fractions) == split:
            seen.setdefault(p.question, p)
    return list(seen.values())


def _space(difficulty: int) -> int:
    return 10 * (len(OPS) * 9) ** difficulty


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


@dataclasses.dataclass(frozen=True)
class FusionMix:
    """Shares of the thinking-mode fusion training data (each a probability)."""

    no_flag: float = 0.3  # a user message carries no flag
    system_flag: float = 0.2  # the conversation opens with a system message carrying a flag
    multi_turn: float = 0.3  # an earlier turn (question, flag, answer) precedes the final question


def _user(problem: Problem, flag: str | None) -> dict[str, str]:
    text = {"think": THINK_FLAG, "no_think": NO_THINK_FLAG}.get(flag)
    return {"role": "user", "content": problem.question + (f" {text}" if text else "")}


def thinks(flags: Sequence[str | None]) -> bool:
    """The reply's mode under the report's rule: the last flag given wins; no flag means think."""
    given = [f for f in flags if f is not None]
    return not given or given[-1] == "think"


def fusion_conversation(rng: np.random.Generator, problems_: Sequence[Problem], mix: FusionMix) -> dict[str, Any]:
    """One conversation whose final reply follows the last flag: {messages, mode, difficulty}.

    The messages end with the user question (no reply); `conversation_record` adds it.
    """
    def flag(p_none: float) -> str | None:
        return None if rng.random() < p_none else ("think" if rng.random() < 0.5 else "no_think")

    problem = problems_[rng.integers(len(problems_))]
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
    messages.append(_user(problem, flags[-1]))
    return {"messages": messages, "problem": problem, "mode": "think" if thinks(flags) else "no_think"}


def fusion_records(rng: np.random.Generator, train: Sequence[Problem], n: int, mix: FusionMix) -> Iterator[dict[str, Any]]:
    """`n` SFT chat records of the ground-truth fusion data over `train` problems."""
    for _ in range(n):
        c = fusion_conversation(rng, train, mix)
        yield {"messages": [*c["messages"], reply(c["problem"], c["mode"] == "think")], "mode": c["mode"],
               "difficulty": c["problem"].difficulty}
