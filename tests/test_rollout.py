"""infer.rollout: modes, prompt rendering by switch, per-row sampling, seeds, generate_chat."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from infer import rollout
from infer.rollout import Mode, Switch
from qwen3_jax import chat
from qwen3_jax.errors import ConfigError, DataError
from qwen3_jax.ids import ENDOFTEXT_ID, IM_END_ID
from qwen3_jax.tokenizer import Tokenizer

# Qwen's recommended settings (Qwen3 model cards, "Best Practices"), written out here.
QWEN_THINKING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
QWEN_NON_THINKING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def _user(text):
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.qwen3()


def test_mode_is_the_string_records_store():
    assert rollout.MODES == (Mode.THINK, Mode.NO_THINK) == ("think", "no_think")
    assert f"{Mode.NO_THINK}" == str(Mode.NO_THINK) == "no_think" and Mode("think") is Mode.THINK


@pytest.mark.parametrize("messages, flag", [
    ([], None),
    ([_user("hi"), {"role": "user", "content": None}], None),
    ([_user("explain /think")], "/think"),
    ([_user("/think first, then /no_think")], "/no_think"),
    ([_user("/no_think first, then /think")], "/think"),
    ([_user("a /no_think"), _user("b /think")], "/think"),  # the latest message with a flag wins
    ([_user("a /think"), _user("b")], "/think"),  # a message without one leaves the earlier flag
    ([{"role": "system", "content": "/no_think"}, _user("hi")], "/no_think"),
    ([_user("/no_think"), {"role": "assistant", "content": "/think"}], "/no_think"),  # the model's text is not read
])
def test_last_soft_switch(messages, flag):
    assert rollout.last_soft_switch(messages) == flag


def test_mode_of_follows_the_hard_and_soft_switches():
    assert rollout.mode_of([_user("hi")]) is Mode.THINK
    assert rollout.mode_of([_user("hi /no_think")]) is Mode.NO_THINK
    assert rollout.mode_of([_user("hi /no_think"), _user("now /think")]) is Mode.THINK
    assert rollout.mode_of([_user("hi /think")], enable_thinking=False) is Mode.NO_THINK  # the hard switch wins


def test_sampling_defaults_are_qwens_per_mode():
    assert rollout.mode_sampling(Mode.THINK) == QWEN_THINKING
    assert rollout.mode_sampling("no_think", {"top_k": 5}) == {**QWEN_NON_THINKING, "top_k": 5}
    columns = rollout.row_sampling([Mode.THINK, Mode.NO_THINK, Mode.THINK], {"presence_penalty": 1.5})
    assert columns == {"temperature": [0.6, 0.7, 0.6], "top_p": [0.95, 0.8, 0.95], "top_k": [20] * 3,
                       "min_p": [0.0] * 3, "presence_penalty": [1.5] * 3}
    rollout.check_sampling({"temperature": 0.0})
    with pytest.raises(ConfigError, match=r"unknown sampling settings \['temprature'\]"):
        rollout.check_sampling({"temprature": 0.0})
    with pytest.raises(ConfigError, match=r"top_p must be in \(0, 1\]"):
        rollout.check_sampling({"top_p": 1.5})


@pytest.mark.parametrize("mode, switch, flag, thinking_on", [
    (Mode.THINK, Switch.SOFT, "/think", True),
    (Mode.NO_THINK, Switch.SOFT, "/no_think", True),  # the template's thinking stays on: the flag asks
    (Mode.THINK, Switch.HARD, None, True),
    (Mode.NO_THINK, Switch.HARD, None, False),
    (Mode.THINK, Switch.BOTH, "/think", True),
    (Mode.NO_THINK, Switch.BOTH, "/no_think", False),
])
def test_render_prompt_by_switch(tokenizer, mode, switch, flag, thinking_on):
    messages = [{"role": "system", "content": "Be brief."}, _user("1+1?")]
    tools = [{"type": "function", "function": {"name": "add"}}]
    flagged = [messages[0], _user("1+1? " + flag)] if flag else messages
    assert rollout.with_switch(messages, mode, switch) == flagged
    expected = chat.render(flagged, tools=tools, add_generation_prompt=True, enable_thinking=thinking_on)
    assert rollout.render_prompt(tokenizer, messages, mode, switch, tools=tools) == tokenizer.encode(expected)
    assert messages[1] == _user("1+1?")  # the caller's messages are not changed


def test_render_prompt_names_what_cannot_be_a_prompt(tokenizer):
    for messages, message in [
        ([_user("hi"), {"role": "assistant", "content": "hello"}], "must not end with an assistant turn"),
        ([_user(5)], r"the chat template rejects the messages: message 0 \(user\) needs a string 'content'"),
        ([], "the chat template rejects the messages: messages is empty"),
        ([{"role": "system", "content": "x"}], "a soft switch goes in a user message"),
    ]:
        with pytest.raises(DataError, match=message):
            rollout.render_prompt(tokenizer, messages, Mode.THINK, Switch.SOFT)


def test_seeds_keep_their_recorded_values():
    """Both derivations give the values earlier runs recorded (their formulas written out here)."""
    for seed, step in [(0, 0), (7, 123), (2**31, 5)]:
        assert rollout.step_seed(seed, step) == int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
    for key in [(0, 1, "think", 0), (5, 12, "no_think", 3)]:
        digest = hashlib.sha256("{}:{}:{}:{}".format(*key).encode()).digest()
        assert rollout.row_seed(*key) == int.from_bytes(digest[:4], "little")
        assert rollout.row_seed(key[0], key[1], Mode(key[2]), key[3]) == rollout.row_seed(*key)
    assert rollout.row_seed(0, 1, "think", 0) == 555370374  # infer.batch.sample_seed before the move
    assert (rollout.step_seed(0, 0), rollout.step_seed(7, 123)) == (2968811710, 682066301)  # distill.step_seed
    assert rollout.choose_modes(3, 4, 10, 0.5) == ["think"] * 6 + ["no_think"] * 2 + ["think"] * 2  # distill's
    modes = rollout.choose_modes(3, 4, 1000, 0.25)
    assert modes == rollout.choose_modes(3, 4, 1000, 0.25) and 200 < modes.count(Mode.THINK) < 300
    assert modes != rollout.choose_modes(3, 5, 1000, 0.25)


class RecordingEngine:
    """Stands in for Engine: records each call and replies `reply` to every prompt."""

    def __init__(self, reply):
        self.reply, self.calls = list(reply), []

    def generate(self, prompts, *, return_forced=False, **settings):
        self.calls.append((prompts, settings))
        ids = [list(self.reply) for _ in prompts]
        return (ids, [[False] * len(i) for i in ids]) if return_forced else ids


def test_generate_chat_sets_each_row_and_parses_the_reply(tokenizer):
    reply = tokenizer.encode("<think>\nhmm\n</think>\n\nok") + [IM_END_ID]
    engine = RecordingEngine(reply)
    prompts = [[1, 2], [3], [4, 5, 6]]
    modes = [Mode.THINK, Mode.NO_THINK, Mode.THINK]
    out = rollout.generate_chat(engine, tokenizer, prompts, modes, max_new_tokens=5, thinking_budget=3,
                                sampling={"top_k": 4}, seed=[7, 8, 9])
    (sent, settings), = engine.calls
    assert sent == prompts
    assert settings == {"max_new_tokens": 5, "stop_token_ids": (IM_END_ID, ENDOFTEXT_ID), "thinking_budget": [3, None, 3],
                        "seed": [7, 8, 9], **rollout.row_sampling(modes, {"top_k": 4})}
    assert out[0] == rollout.Completion(reply, [False] * len(reply), "hmm", "ok", finished=True, thinking_closed=True)

    engine = RecordingEngine(tokenizer.encode("<think>\nstill"))
    out = rollout.generate_chat(engine, tokenizer, prompts, modes, max_new_tokens=5, batch_size=2, seed=1)
    assert [p for p, _ in engine.calls] == [prompts[:2], [prompts[2]] * 2]  # the last call padded with its first row
    assert [s["seed"] for _, s in engine.calls] == [1, 1]
    assert len(out) == 3 and not out[2].finished and not out[2].thinking_closed and out[2].thinking == "still"
    with pytest.raises(ValueError, match="modes has 2 values for 3 prompts"):
        rollout.generate_chat(engine, tokenizer, prompts, modes[:2], max_new_tokens=5)
    with pytest.raises(ValueError, match="seed has 2 values for 3 prompts"):
        rollout.generate_chat(engine, tokenizer, prompts, modes, max_new_tokens=5, seed=[1, 2])


def test_stream_chat_replies_as_generate_chat_with_row_seeds_and_grows_its_cache(tokenizer, monkeypatch):
    """5 sampled rows of both modes through 2 slots, prompt buckets growing 16 -> 64 (so the cache
    is rebuilt once, after the running rows drain), equal to one static call."""
    import qwen3_jax as q
    from infer.engine import Engine

    cfg = q.preset("tiny-dense", vocab_size=151936, hidden_size=32, intermediate_size=48, num_layers=2,
                   max_position_embeddings=256)
    engine = Engine.for_tokenizer(q.init_model(cfg, seed=3), tokenizer)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 150000, size=n).tolist() for n in (5, 12, 9, 40, 3)]
    modes = [Mode.THINK, Mode.NO_THINK, Mode.THINK, Mode.NO_THINK, Mode.THINK]
    seeds = [11, 12, 13, 14, 15]
    kw = dict(max_new_tokens=8, thinking_budget=3, sampling={"top_k": 0})
    static = rollout.generate_chat(engine, tokenizer, prompts, modes, seed=seeds, **kw)
    contexts = []
    import infer.continuous as continuous_lib

    class Recording(continuous_lib.ContinuousEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            contexts.append(self.context)

    monkeypatch.setattr(continuous_lib, "ContinuousEngine", Recording)
    chunks = list(rollout.stream_chat(engine, tokenizer, zip(range(5), prompts, modes, seeds), slots=2, **kw))
    streamed = dict(pair for chunk in chunks for pair in chunk)
    assert [streamed[i] for i in range(5)] == static
    assert contexts == [16 + 8, 64 + 8] and len(chunks) > 1
