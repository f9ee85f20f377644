"""The miniature's task: generator, verifier, splits and the thinking-mode fusion records."""

from __future__ import annotations

import re

import numpy as np
import pytest

from infer.rollout import last_soft_switch
from qwen3_jax import chat
from train.miniature import task

LEVELS = (1, 2, 3, 4, 6)


def solve(question: str) -> int:
    """The answer recomputed from the question's text alone (not from `Problem`)."""
    k, a, b = map(int, re.search(r"What is the term (\d+) steps on from (\d) (\d)\?", question).groups())
    terms = [a, b]
    for _ in range(k):
        terms.append((terms[-1] + terms[-2]) % 10)
    return terms[-1]


@pytest.mark.parametrize("level", LEVELS)
def test_every_generated_answer_verifies_and_a_wrong_one_does_not(level):
    for p in task.problems("train", level, 200, seed=0):
        assert p.difficulty == level
        assert solve(p.question) == p.answer
        lines = p.trace.split("\n")
        assert len(lines) == level and lines[-1].endswith(f"={p.answer}")
        assert task.verify(p.final, p)
        assert task.verify(f"Let me see. {p.final}", p)
        assert not task.verify(f"The answer is {(p.answer + 1) % 10}.", p)
        assert not task.verify("I do not know.", p)
        # The last stated answer counts: a corrected wrong one does not verify.
        assert not task.verify(f"{p.final} No, the answer is {(p.answer + 3) % 10}.", p)


@pytest.mark.parametrize("level", LEVELS)
def test_splits_are_disjoint_and_deterministic(level):
    splits = {s: task.problems(s, level, 1000, seed=0) for s in task.SPLITS}
    starts = {s: {p.start for p in ps} for s, ps in splits.items()}
    assert sum(map(len, starts.values())) == 100  # every starting pair, in exactly one split
    assert [len(starts[s]) for s in task.SPLITS] == [60, 20, 20]
    for s, ps in splits.items():
        assert len(starts[s]) == len(ps) and all(task.split_of(p.start) == s for p in ps)
    assert not starts["train"] & starts["validation"] and not starts["train"] & starts["test"]
    assert not starts["validation"] & starts["test"]
    # A starting pair is in the same split at every difficulty: no test problem's numbers start
    # a training problem of another difficulty.
    assert starts["test"] == {p.start for p in task.problems("test", LEVELS[0], 1000, seed=0)}
    assert [p.question for p in task.problems("test", level, 10, seed=0)] == [p.question for p in splits["test"][:10]]
    assert [p.question for p in task.problems("test", level, 10, seed=1)] != [p.question for p in splits["test"][:10]]
    with pytest.raises(ValueError, match="difficulty must be in"):
        task.problems("train", 0, 1, seed=0)
    with pytest.raises(ValueError, match="split must be one of"):
        task.problems("dev", 1, 1, seed=0)


def test_fusion_records_reply_to_the_last_flag_as_the_chat_layer_reads_it():
    rng = np.random.default_rng(0)
    train = task.problems("train", 3, 100, seed=0)
    records = list(task.fusion_records(rng, train, 500, task.FusionMix()))
    kinds = {"system": 0, "multi_turn": 0, "no_flag_thinking": 0, "think": 0}
    for r in records:
        messages, reply = r["messages"][:-1], r["messages"][-1]
        flag = last_soft_switch(messages)  # the chat layer's own reading of the switches
        assert r["mode"] == ("no_think" if flag == "/no_think" else "think")
        assert reply["role"] == "assistant" and bool(reply["reasoning_content"]) == (r["mode"] == "think")
        text = chat.render(r["messages"])
        think_block = text[text.rindex("<|im_start|>assistant"):]
        assert ("<think>\n\n</think>" in think_block) == (r["mode"] == "no_think")
        kinds["system"] += messages[0]["role"] == "system"
        kinds["multi_turn"] += sum(m["role"] == "user" for m in messages) > 1
        kinds["no_flag_thinking"] += flag is None
        kinds["think"] += r["mode"] == "think"
    # Every kind of sample the report's fusion data has is there, in roughly the asked shares.
    assert 50 < kinds["system"] < 150 and 100 < kinds["multi_turn"] < 200 and kinds["no_flag_thinking"] > 30
    assert 0.5 < kinds["think"] / len(records) < 0.8
