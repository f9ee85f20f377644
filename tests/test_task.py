"""The miniature's task: generator, verifier, splits and the thinking-mode fusion records."""

from __future__ import annotations

import re

import numpy as np
import pytest

from infer.rollout import last_soft_switch
from qwen3_jax import chat
from qwen3_jax.ids import STOP_THINKING_TEXT
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
        assert len(starts[s]) == len(ps) and all(task.split_of(p.start, level) == s for p in ps)
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


@pytest.mark.parametrize("by", task.SPLIT_UNITS)
def test_each_split_unit_holds_out_what_it_says(by):
    test = {d: {p.start for p in task.problems("test", d, 1000, seed=0, by=by)} for d in LEVELS}
    train = {d: {p.start for p in task.problems("train", d, 1000, seed=0, by=by)} for d in LEVELS}
    for d in LEVELS:
        assert len(test[d]) == 20 and len(train[d]) == 60 and not test[d] & train[d]
        assert all(task.split_of(s, d, by) == "test" for s in test[d])
    if by == "start":  # a test pair starts no training question at any step count
        assert all(test[d] == test[LEVELS[0]] for d in LEVELS)
        assert not test[LEVELS[0]] & set().union(*train.values())
    else:  # a test question's pair starts training questions at other step counts
        assert len({frozenset(s) for s in test.values()}) == len(LEVELS)
        other = {d: set().union(*(train[e] for e in LEVELS if e != d)) for d in LEVELS}
        assert sum(len(test[d] & other[d]) for d in LEVELS) > 0.9 * 20 * len(LEVELS)
    with pytest.raises(ValueError, match="split unit must be one of"):
        task.split_of((1, 2), 1, "pair")


@pytest.mark.parametrize("cut", [1, 5, 20])
def test_a_cut_reply_renders_as_a_spent_budget_does(cut):
    p = task.Problem((2, 3), 6)
    text = chat.render([*task.prompt_messages(p, "think"), task.cut_reply(p, cut)])
    reply = text[text.rindex("<|im_start|>assistant\n") + len("<|im_start|>assistant\n"):]
    assert reply == "<think>\n" + p.trace[:cut] + STOP_THINKING_TEXT + p.final + "<|im_end|>\n"


def test_fusion_records_cut_the_asked_share_of_single_turn_thinking_replies():
    rng = np.random.default_rng(0)
    train = task.problems("train", 4, 100, seed=0)
    records = list(task.fusion_records(rng, train, 1000, task.FusionMix(stop_thinking=0.5)))
    cut = [r for r in records if r["mode"] == "stop_thinking"]
    single_think = [r for r in records if r["mode"] != "no_think"
                    and sum(m["role"] == "user" for m in r["messages"]) == 1]
    assert all(sum(m["role"] == "user" for m in r["messages"]) == 1 for r in cut)
    assert 0.4 < len(cut) / len(single_think) < 0.6
    for r in cut:
        reasoning = r["messages"][-1]["reasoning_content"]
        assert reasoning.endswith("directly now.") and not reasoning.startswith("\n")
        assert r["messages"][-1]["content"] == task.Problem(*_parse(r["messages"][-2]["content"])).final


def _parse(question: str) -> tuple[tuple[int, int], int]:
    k, a, b = map(int, re.search(r"What is the term (\d+) steps on from (\d) (\d)\?", question).groups())
    return (a, b), k
