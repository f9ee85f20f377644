"""Decode engine: parity with transformers' generate, sampling, thinking budgets, sharding, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qwen3_jax as q
from helpers.hf_fixtures import make_hf_model, save_hf_model
from helpers.scripted import scripted_model
from infer import engine as engine_lib
from infer.engine import Engine, generate
from infer.rollout import Completion
from infer.text import chat_turn, complete, incremental_text, stream_text
from qwen3_jax import chat
from qwen3_jax.errors import RequestError
from qwen3_jax.ids import END_THINK_ID, ENDOFTEXT_ID, IM_END_ID, IM_START_ID, STOP_THINKING_TEXT, THINK_ID
from qwen3_jax.tokenizer import Tokenizer, _byte_alphabet

PROMPTS = [[1, 2, 3, 4, 5], list(range(7, 30)), [5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]


@pytest.fixture(scope="module", params=["dense", "moe"])
def hf_and_model(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=21)
    return hf, q.from_hf(save_hf_model(hf, tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def qwen3_vocab_model():
    """Tiny layers over the real 151,936-row vocabulary, so the real think/stop ids exist."""
    return q.init_model(q.preset("tiny-dense", vocab_size=151936, hidden_size=32, intermediate_size=48, num_layers=2), seed=5)


@pytest.fixture(scope="module")
def forced_ids():
    return Tokenizer.qwen3().stop_thinking_ids


def test_greedy_matches_transformers_generate(hf_and_model):
    hf, model = hf_and_model
    stop = 5
    ours = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,))
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


def test_seeds_top_k_one_and_parameter_changes_do_not_recompile(hf_and_model):
    _, model = hf_and_model
    kw = dict(max_new_tokens=6, stop_token_ids=())
    greedy = generate(model, PROMPTS, temperature=0.0, **kw)
    before = engine_lib._decode._cache_size()
    a = generate(model, PROMPTS, temperature=1.0, top_k=0, top_p=1.0, seed=1, **kw)
    assert a == generate(model, PROMPTS, temperature=1.0, top_k=0, top_p=1.0, seed=1, **kw)
    assert a != generate(model, PROMPTS, temperature=1.0, top_k=0, top_p=1.0, seed=2, **kw)
    assert generate(model, PROMPTS, temperature=[0.7, 1.3, 0.2, 2.0], top_k=1, seed=3, **kw) == greedy
    generate(model, PROMPTS, temperature=0.9, top_p=[0.5, 0.9, 1.0, 0.7], min_p=0.1, presence_penalty=1.5, **kw)
    assert engine_lib._decode._cache_size() == before


def test_per_row_seeds_make_a_row_independent_of_its_batch(hf_and_model):
    _, model = hf_and_model
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=())
    rows = generate(model, PROMPTS, seed=[11, 12, 13, 14], **kw)
    order = [2, 0, 3, 1]  # each row beside other rows, at another position
    assert generate(model, [PROMPTS[i] for i in order], seed=[11 + i for i in order], **kw) == [rows[i] for i in order]
    changed = generate(model, PROMPTS, seed=[11, 12, 13, 99], **kw)
    assert changed[:3] == rows[:3] and changed[3] != rows[3]


def test_mixed_prompt_lengths_compile_a_bounded_number_of_times(hf_and_model):
    _, model = hf_and_model
    rng = np.random.RandomState(0)
    before = engine_lib._prefill._cache_size()
    for n in rng.randint(1, 60, size=12):
        generate(model, [list(rng.randint(0, 300, size=n)), [1, 2]], max_new_tokens=4, temperature=0.0,
                 stop_token_ids=())
    assert engine_lib._prefill._cache_size() - before <= 3  # prompt buckets 16, 32, 64


def test_stop_token_is_included_and_ends_the_row(hf_and_model):
    _, model = hf_and_model
    free = generate(model, PROMPTS[:2], max_new_tokens=8, temperature=0.0, stop_token_ids=())
    stop = free[1][3]
    out = generate(model, PROMPTS[:2], max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,))
    assert out[1] == free[1][: free[1].index(stop) + 1]
    cut = free[0].index(stop) + 1 if stop in free[0] else 8
    assert out[0] == free[0][:cut]


def test_thinking_budgets_force_the_stop_text_per_row(qwen3_vocab_model, forced_ids):
    open_think = [151644, 77091, 198, THINK_ID, 198]  # "<|im_start|>assistant\n<think>\n"
    thinking_off = [151644, 77091, 198, THINK_ID, 271, END_THINK_ID, 271]  # the empty block
    prompts = [open_think, open_think, open_think, open_think, thinking_off]
    budgets = [0, 3, 7, None, 0]
    out, was_forced = Engine(qwen3_vocab_model).generate(
        prompts, max_new_tokens=32, temperature=1.0, top_k=50, stop_token_ids=(), thinking_budget=budgets, seed=4,
        return_forced=True)
    assert out == generate(qwen3_vocab_model, prompts, max_new_tokens=32, temperature=1.0, top_k=50,
                           stop_token_ids=(), thinking_budget=budgets, seed=4)
    free = generate(qwen3_vocab_model, prompts, max_new_tokens=32, temperature=1.0, top_k=50, stop_token_ids=(),
                    seed=4)
    forced = list(forced_ids)
    assert len(forced) == 24 and END_THINK_ID in forced
    for row, free_row, flags, n in zip(out[:3], free[:3], was_forced[:3], budgets[:3]):
        assert row[:n] == free_row[:n]  # the budget changes nothing before it runs out
        assert row[n: n + 24] == forced, n
        assert len(row) == 32  # sampling resumes after the forced text
        assert flags == [False] * n + [True] * 24 + [False] * (32 - n - 24)  # exactly the forced ids are marked
    assert not any(was_forced[3]) and not any(was_forced[4])
    assert out[3] == free[3]  # unlimited: never forced
    assert out[4] == free[4]  # thinking off: budget 0 forces nothing
    # A prompt whose thinking is already closed by the model is never forced either.
    closed = open_think + [100, 200, END_THINK_ID, 271]
    again = generate(qwen3_vocab_model, [closed], max_new_tokens=30, temperature=1.0, top_k=50, stop_token_ids=(),
                     thinking_budget=0, seed=4)
    assert END_THINK_ID not in again[0]


def _hf_logprobs(hf, prompt, completion, temperature):
    """float64 log_softmax(logits / T) of transformers' float32 logits at each completion token."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1: -1].double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp[torch.arange(len(completion)), torch.tensor(completion)].numpy()


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_logprobs_match_transformers_log_softmax_at_the_temperature(hf_and_model, temperature):
    hf, model = hf_and_model
    kw = dict(max_new_tokens=7, temperature=temperature, top_k=0, top_p=1.0, stop_token_ids=(), seed=[3, 4, 5, 6])
    out = Engine(model).generate(PROMPTS, return_logprobs=True, **kw)
    assert isinstance(out, engine_lib.Generation)
    assert out.tokens == generate(model, PROMPTS, **kw) and out.forced == [[False] * 7] * 4
    for prompt, tokens, logprobs in zip(PROMPTS, out.tokens, out.logprobs):
        ref = _hf_logprobs(hf, prompt, tokens, temperature or 1.0)  # greedy reads as temperature 1
        np.testing.assert_allclose(logprobs, ref, rtol=0, atol=1e-5)
        assert np.all(np.asarray(logprobs) < 0)
    # A streamed run and return_forced are unaffected by the new field.
    assert Engine(model).generate(PROMPTS, return_forced=True, **kw) == (out.tokens, out.forced)


def test_forced_tokens_carry_the_models_logprob_and_are_marked(qwen3_vocab_model):
    open_think = [151644, 77091, 198, THINK_ID, 198]
    out = Engine(qwen3_vocab_model).generate(
        [open_think], max_new_tokens=30, temperature=1.3, top_k=0, top_p=1.0, stop_token_ids=(), thinking_budget=2,
        seed=1, return_logprobs=True)
    tokens, forced, logprobs = out.tokens[0], out.forced[0], out.logprobs[0]
    assert forced == [False] * 2 + [True] * 24 + [False] * 4
    logits = qwen3_vocab_model(jnp.asarray([open_think + tokens]))[0, len(open_think) - 1: -1]
    ref = jax.nn.log_softmax(logits.astype(jnp.float32) / 1.3)[jnp.arange(30), jnp.asarray(tokens)]
    np.testing.assert_allclose(logprobs, ref, rtol=0, atol=1e-5)


def test_budget_zero_forces_immediately_with_greedy(qwen3_vocab_model, forced_ids):
    out = generate(qwen3_vocab_model, [[151644, 77091, 198, THINK_ID, 198]], max_new_tokens=26, temperature=0.0,
                   stop_token_ids=(), thinking_budget=0)
    assert out[0][:24] == list(forced_ids)


# Scripted tokens (ordinary ids of the real vocabulary) for the tests below.
A1, A2, B2, C2, X1, X2, Z = 1001, 1002, 1003, 1004, 1005, 1006, 1000
NL, NLNL, F0 = 198, 271, 172  # "\n"; "\n\n", the last forced id; the byte 0xF0 (starts a 4-byte character)
HELLO_WORLD = [9707, 1879, 220]  # "Hello world "


@pytest.fixture(scope="module")
def scripted():
    """Greedy continuations: the reply to a chat generation prompt (ending in "\n") is "Hello world "
    then the first byte of an emoji, then <|im_end|>; after X1 the model thinks forever and would
    reopen <think> after every forced stop text; after X2 it thinks, closes, answers, reopens."""
    script = {NL: HELLO_WORLD[0], HELLO_WORLD[0]: HELLO_WORLD[1], HELLO_WORLD[1]: HELLO_WORLD[2],
              HELLO_WORLD[2]: F0, F0: IM_END_ID,
              X1: A1, A1: A1, NLNL: THINK_ID, THINK_ID: A1,
              X2: A2, A2: B2, B2: END_THINK_ID, END_THINK_ID: C2, C2: THINK_ID}
    return scripted_model(script, Z)


def test_budget_counts_the_whole_reply_and_only_the_turn_being_generated(scripted, forced_ids):
    """Issue 13, cases 4 and 5, through the engine on a model scripted to reopen <think>."""
    open_think = [151644, 77091, NL, THINK_ID, NL]  # "<|im_start|>assistant\n<think>\n"
    asks_about_think = Tokenizer.qwen3().encode(chat.render(
        [{"role": "user", "content": "What does the <think> tag do?"}], add_generation_prompt=True))
    assert THINK_ID in asks_about_think and asks_about_think[-1] == NL
    out = generate(scripted, [open_think + [X1], open_think + [X2], asks_about_think], max_new_tokens=60,
                   temperature=0.0, stop_token_ids=(), thinking_budget=[3, 4, 2])
    F = list(forced_ids)
    # Budget spent after 3 tokens: forced; the model's <think> after the stop text is masked (issue 27),
    # so the rest of the reply is answer.
    assert out[0][:27] == [A1] * 3 + F
    # 3 tokens in the first block, a natural close, then the reopened block counts on: forced after 1 more.
    assert out[1][:30] == [A2, B2, END_THINK_ID, C2, THINK_ID, A1] + F
    for row, answer_start in ((out[0], 27), (out[1], 30)):
        assert len(row) == 60 and not {THINK_ID, END_THINK_ID} & set(row[answer_start:])
    # The user's <think> is not the reply's: no block is open, nothing is forced.
    assert out[2] == HELLO_WORLD + [F0, IM_END_ID] + [Z] * 55


@pytest.mark.parametrize("kind, shape", [("dense", {"data": 2, "fsdp": 2, "tensor": 2}),
                                         ("moe", {"data": 2, "expert": 2, "tensor": 2}),
                                         ("dense", "jax.make_mesh")])
def test_sharded_decode_equals_unsharded(kind, shape, tmp_path):
    """The last case is issue 13, case 7: a mesh from jax.make_mesh (Explicit axes)."""
    hf = make_hf_model(kind, seed=22)
    path = save_hf_model(hf, tmp_path)
    prompts = PROMPTS[:3]  # 3 rows on a batch-sharding degree of 4: padded with finished rows
    if shape == "jax.make_mesh":
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    else:
        mesh = q.make_mesh(shape)
    single = q.from_hf(path)
    sharded = q.from_hf(path, mesh=mesh)
    for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=10, seed=9)):
        kw.update(max_new_tokens=8, stop_token_ids=())
        assert generate(sharded, prompts, mesh=mesh, **kw) == generate(single, prompts, **kw)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"thinking_budget": -3}, "thinking_budget must be None or an int >= 0"),
        ({"thinking_budget": 2**31}, "thinking_budget must be at most 2147483647"),  # was an OverflowError
        ({"thinking_budget": [1]}, "thinking_budget has 1 values for 4 prompts"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"seed": [1]}, "seed has 1 values for 4 prompts"),
        ({"seed": [0, 1, 2**32, 3]}, r"one int in \[0, 2\*\*32\) per prompt; prompt 2 has 4294967296"),
        ({"max_new_tokens": 600}, "exceeds the model's context of 512 positions"),
    ],
)
def test_bad_requests_are_named(hf_and_model, kwargs, message):
    _, model = hf_and_model
    args = {"max_new_tokens": 4, "stop_token_ids": (), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPTS, **args)


def test_yarn_extends_the_context_to_factor_times_original(tmp_path):
    """Issue 13, case 2: Qwen's 128K recipe (factor 4 over 32K, config left at 40K), scaled down."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    hf = make_hf_model("dense", seed=23, rope_scaling=yarn, max_position_embeddings=40)
    model = q.from_hf(save_hf_model(hf, tmp_path))
    assert model.cfg.context_length == 128
    prompt = list(np.random.RandomState(1).randint(0, 300, size=60))
    ours = generate(model, [prompt], max_new_tokens=8, temperature=0.0, stop_token_ids=())
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours[0] == ref[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="121 tokens; with max_new_tokens=8 that exceeds the model's context of 128"):
        generate(model, [[1] * 121], max_new_tokens=8)
    # A max_len the user chooses wins, below the derived context and above it.
    with pytest.raises(ValueError, match="60 tokens; with max_new_tokens=8 that exceeds max_len=64"):
        Engine(model, max_len=64).generate([prompt], max_new_tokens=8, temperature=0.0)
    longer = Engine(model, max_len=200).generate([[1] * 121], max_new_tokens=8, temperature=0.0,
                                                                 stop_token_ids=())
    assert len(longer[0]) == 8
    for bad in (0, -5, 2.5, "64"):
        with pytest.raises(ValueError, match="max_len must be a positive int"):
            Engine(model, max_len=bad)


def test_bad_prompts_are_named(hf_and_model):
    _, model = hf_and_model
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside \[0, 300\)"):
        generate(model, [[1], [2, 300]], max_new_tokens=2, stop_token_ids=())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], max_new_tokens=2, stop_token_ids=())


# Every public entry point checks a request alike, before anything runs. A prompt fault is given
# in each entry point's own terms: token-id prompts, or conversations / one conversation.
V = 151936
USER = {"role": "user", "content": "hi"}
PROMPT_FAULTS = {  # fault: ({entry kind: bad prompts}, error type, message)
    "empty_prompt_list": ({"ids": [], "conversations": [], "messages": []}, ValueError,
                          r"(prompts|conversations|messages) is empty"),
    "prompt_of_the_wrong_type": ({"ids": "hello", "conversations": "hello", "messages": "hello"}, ValueError,
                                 r"(prompts|conversations) must be a list, got str|messages must be a list of message dicts"),
    "element_of_the_wrong_type": ({"ids": [[1.5, 2]], "conversations": [[["user", "hi"]]], "messages": [["user", "hi"]]},
                                  ValueError, r"prompt 0 must be a list of token ids \(ints\), but it holds 1.5|"
                                              r"(conversation 0: )?message 0 is a list, expected a dict"),
}
ARGUMENT_FAULTS = {  # fault: (kwargs, error type, message)
    "nan_temperature": ({"temperature": float("nan")}, ValueError, r"temperature must be finite; row 0 has nan"),
    "nan_top_p": ({"top_p": [float("nan")]}, ValueError, r"top_p must be finite"),
    "stop_id_out_of_range": ({"stop_token_ids": [V + 5]}, RequestError,
                             rf"stop_token_ids has token ids outside \[0, {V}\): \[{V + 5}\]"),
    "negative_stop_id": ({"stop_token_ids": [2, -1]}, RequestError, r"stop_token_ids has token ids outside"),
    "stop_ids_not_a_list": ({"stop_token_ids": 7}, RequestError,
                            r"stop_token_ids must be a list of token ids \(ints\), got int 7"),
    "float_token_budget": ({"max_new_tokens": 4.0}, RequestError,
                           r"max_new_tokens must be a positive int, got float 4.0"),
    "bool_token_budget": ({"max_new_tokens": True}, RequestError,
                          r"max_new_tokens must be a positive int, got bool True"),
    "float_thinking_budget": ({"thinking_budget": 2.5}, RequestError,
                              r"thinking_budget(\[0\])? must be None or an int >= 0, got float 2.5"),
    "string_seed": ({"seed": "7"}, RequestError, r"seed must be an int or one int per prompt, got str"),
}


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_vocab_model, forced_ids):
    return Engine(qwen3_vocab_model, forced_ids=forced_ids), Tokenizer.qwen3()


ENTRY_POINTS = {  # name: (kind of prompts, call(model, engine, tokenizer, prompts, kwargs))
    "infer.generate": ("ids", lambda m, e, t, p, kw: generate(m, p, forced_ids=e.forced_ids, **kw)),
    "Engine.generate": ("ids", lambda m, e, t, p, kw: e.generate(p, **kw)),
    "Engine.stream": ("ids", lambda m, e, t, p, kw: next(e.stream(p, **kw))),
    "text.complete": ("conversations", lambda m, e, t, p, kw: complete(e, t, p, **kw)),
    "text.stream_text": ("messages", lambda m, e, t, p, kw: next(stream_text(e, t, p, **kw))),
}
GOOD_PROMPTS = {"ids": [[1, 2, 3]], "conversations": [[USER]], "messages": [USER]}


@pytest.mark.parametrize("fault", [*PROMPT_FAULTS, *ARGUMENT_FAULTS])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_names_a_bad_request(qwen3_vocab_model, qwen3_engine, entry, fault):
    kind, call = ENTRY_POINTS[entry]
    if fault in PROMPT_FAULTS:
        prompts, error, message = PROMPT_FAULTS[fault]
        prompts, kwargs = prompts[kind], {}
    else:
        prompts, (kwargs, error, message) = GOOD_PROMPTS[kind], ARGUMENT_FAULTS[fault]
        if kind != "ids":  # the text layer takes one sampling value for every conversation
            kwargs = {k: v[0] if k == "top_p" else v for k, v in kwargs.items()}
    engine, tokenizer = qwen3_engine
    with pytest.raises(error, match=message):
        call(qwen3_vocab_model, engine, tokenizer, prompts, {"max_new_tokens": 2, **kwargs})


def test_engine_arguments_of_the_wrong_kind_are_named(qwen3_vocab_model, qwen3_engine):
    engine, _ = qwen3_engine
    with pytest.raises(RequestError, match="chunk must be a positive int, got -1"):
        next(engine.stream([[1, 2]], max_new_tokens=2, chunk=-1))  # was an endless loop of empty chunks
    with pytest.raises(RequestError, match="forced_ids is empty"):
        Engine(qwen3_vocab_model, forced_ids=[])
    with pytest.raises(RequestError, match=r"forced_ids must be a list of token ids \(ints\), but it holds 3.7"):
        Engine(qwen3_vocab_model, forced_ids=[3.7])
    with pytest.raises(RequestError, match=r"thinking_budget\[1\] must be None or an int >= 0, got -2"):
        engine.generate([[1], [2]], max_new_tokens=2, thinking_budget=[None, -2])


def test_streaming_chunks_concatenate_to_the_full_generation(hf_and_model):
    _, model = hf_and_model
    engine = Engine(model)
    kw = dict(max_new_tokens=9, temperature=0.0, stop_token_ids=())
    chunks = list(engine.stream(PROMPTS, chunk=2, **kw))
    assert len(chunks) == 5
    joined = [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))]
    assert joined == engine.generate(PROMPTS, **kw)


# ----------------------------------------------------------------------------- streamed text


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return Tokenizer.qwen3()


def _stream_pieces(tokenizer, ids, sizes):
    chunks, at = [], 0
    for n in sizes:
        chunks.append(ids[at: at + n])
        at += n
    chunks.append(ids[at:])
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    return decode, chunks, list(incremental_text(decode, chunks))


_BYTE_TOKENS = None


def _token_ids(tokenizer):
    """Random ids of the real vocabulary, weighted towards the pieces that split characters."""
    global _BYTE_TOKENS
    if _BYTE_TOKENS is None:
        _BYTE_TOKENS = sorted(tokenizer.token_to_id(c) for c in _byte_alphabet().values())
    texts = ["😀👍🏽🇫🇷", "你好，世界", "e\u0301 café", "👨\u200d👩\u200d👧", "☺\ufe0f", "Hello world "]
    pieces = sorted({i for s in texts for i in tokenizer.encode(s)})
    specials = [ENDOFTEXT_ID, IM_START_ID, IM_END_ID, THINK_ID, END_THINK_ID]
    return st.one_of(
        st.integers(0, tokenizer.vocab_size - 1), st.sampled_from(_BYTE_TOKENS), st.sampled_from(pieces),
        st.sampled_from(specials),
    )


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_pieces_concatenate_to_the_decoded_reply(qwen3_tokenizer, data):
    """Issue 13, case 6. Siblings: ai-dynamo/dynamo#12630 (U+FFFD emitted and completed characters
    dropped at chunk boundaries), sgl-project/sglang#31598 (a character streamed twice when the
    sent offset retreats), ml-explore/mlx-swift-lm#612 (a combining scalar repeats the character
    before it), Blaizzy/mlx-vlm#1778 (an unfinished tail flushed as U+FFFD mid-stream)."""
    ids = data.draw(st.lists(_token_ids(qwen3_tokenizer), max_size=40), label="ids")
    sizes = data.draw(st.lists(st.integers(1, 9), max_size=40), label="chunk sizes")
    decode, chunks, pieces = _stream_pieces(qwen3_tokenizer, ids, sizes)
    assert "".join(pieces) == decode(ids)
    # While more may come, exactly the text up to one trailing U+FFFD has been shown.
    shown, seen = "", []
    it = incremental_text(decode, _Recorder(chunks, seen))
    for piece in it:
        shown += piece
        if len(seen) < len(chunks):  # not the final flush
            so_far = decode(sum(seen, []))
            assert shown == (so_far[:-1] if so_far.endswith("\ufffd") else so_far)


class _Recorder:
    """Iterates over `chunks`, appending each to `seen` as it is handed out."""

    def __init__(self, chunks, seen):
        self.chunks, self.seen = chunks, seen

    def __iter__(self):
        for c in self.chunks:
            self.seen.append(list(c))
            yield c


def test_issue_case_and_chat_history_keep_the_whole_reply(qwen3_tokenizer, scripted):
    """Issue 13, case 6 through the engine: "Hello world " then the first byte of an emoji."""
    tok = qwen3_tokenizer
    assert tok.encode("Hello world ") == HELLO_WORLD and tok.token_to_id(_byte_alphabet()[0xF0]) == F0
    engine = Engine(scripted, forced_ids=tok.stop_thinking_ids)
    messages = [{"role": "user", "content": "hi"}]
    for chunk in (1, 2, 8):
        pieces = list(stream_text(engine, tok, messages, max_new_tokens=10, chunk=chunk, temperature=0.0))
        assert "".join(pieces) == "Hello world \ufffd"
    written = []
    message = chat_turn(engine, tok, messages, max_new_tokens=10, temperature=0.0, write=written.append)
    assert "".join(written) == "Hello world \ufffd"
    assert message == {"role": "assistant", "content": "Hello world \ufffd", "reasoning_content": ""}


# ----------------------------------------------------------------------------- message layer


class _RecordingEngine:
    """Stands in for Engine: records each call's prompts and settings and replies `reply` to every
    prompt (in chunks of `chunk` when streaming), so the message layer is tested on its own."""

    def __init__(self, reply):
        self.reply, self.calls = list(reply), []

    def generate(self, prompts, return_forced=False, **settings):
        self.calls.append((prompts, settings))
        ids = [list(self.reply) for _ in prompts]
        return (ids, [[False] * len(i) for i in ids]) if return_forced else ids

    def stream(self, prompts, *, chunk, **settings):
        self.calls.append((prompts, {"chunk": chunk, **settings}))
        for at in range(0, len(self.reply), chunk):
            yield [self.reply[at: at + chunk] for _ in prompts]


# Qwen's recommended settings (Qwen3 model cards, "Best Practices"), written out here.
QWEN_THINKING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
QWEN_NON_THINKING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}


def _user(text):
    return {"role": "user", "content": text}


def test_complete_renders_each_conversation_and_parses_the_reply(qwen3_tokenizer):
    tok = qwen3_tokenizer
    reply = tok.encode("<think>\nhmm\n</think>\n\nok") + [IM_END_ID]
    engine = _RecordingEngine(reply)
    conversations = [[_user("hi")], [_user("and you? /no_think")]]
    results = complete(engine, tok, conversations, max_new_tokens=5, thinking_budget=3)
    assert results == [Completion(reply, [False] * len(reply), "hmm", "ok", finished=True, thinking_closed=True)] * 2
    (prompts, settings), = engine.calls
    assert prompts == [tok.encode(chat.render(c, add_generation_prompt=True)) for c in conversations]
    # Each conversation's mode sets its sampling defaults and whether the budget applies; the
    # tokenizer's stop ids end every reply.
    assert settings == {"max_new_tokens": 5, "stop_token_ids": (IM_END_ID, ENDOFTEXT_ID), "thinking_budget": [3, None],
                        "seed": 0, **{k: [QWEN_THINKING[k], QWEN_NON_THINKING[k]] for k in QWEN_THINKING}}

    engine = _RecordingEngine(reply)
    complete(engine, tok, conversations[::-1], max_new_tokens=5, enable_thinking=False, temperature=0.0,
             thinking_budget=3)
    (prompts, settings), = engine.calls
    assert prompts[0][-4:] == [THINK_ID, 271, END_THINK_ID, 271]  # the empty think block: thinking off
    assert settings == {"max_new_tokens": 5, "stop_token_ids": (IM_END_ID, ENDOFTEXT_ID), "thinking_budget": [None] * 2,
                        "seed": 0, **{k: [v] * 2 for k, v in {**QWEN_NON_THINKING, "temperature": 0.0}.items()}}


def test_stream_text_yields_the_decoded_reply_in_pieces(qwen3_tokenizer):
    tok = qwen3_tokenizer
    reply = tok.encode("<think>\nhmm\n</think>\n\nok 😀") + [IM_END_ID]
    engine = _RecordingEngine(reply)
    messages = [_user("hi /no_think")]
    pieces = list(stream_text(engine, tok, messages, max_new_tokens=9, chunk=3, top_k=5, thinking_budget=2))
    assert len(pieces) > 1 and "".join(pieces) == "<think>\nhmm\n</think>\n\nok 😀"
    (prompts, settings), = engine.calls
    assert prompts == [tok.encode(chat.render(messages, add_generation_prompt=True))]
    assert settings == {"chunk": 3, "max_new_tokens": 9, "seed": 0, "thinking_budget": None, **QWEN_NON_THINKING,
                        "top_k": 5, "stop_token_ids": (IM_END_ID, ENDOFTEXT_ID)}


# ----------------------------------------------------------------------------- command lines


def _run(args, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=600,
                          env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def thinker_checkpoint(tmp_path_factory):
    """A scripted model that opens <think> after the generation prompt and thinks forever; after the
    stop-thinking text (which ends in "\n\n") it answers "Hello world " and ends its turn."""
    script = {NL: THINK_ID, THINK_ID: A1, A1: A1, NLNL: HELLO_WORLD[0], HELLO_WORLD[0]: HELLO_WORLD[1],
              HELLO_WORLD[1]: HELLO_WORLD[2], HELLO_WORLD[2]: IM_END_ID}
    path = str(tmp_path_factory.mktemp("thinker"))
    q.to_hf(scripted_model(script, Z), path)
    Tokenizer.qwen3().save(path)
    return path


def test_generate_cli_prints_thinking_and_answer(thinker_checkpoint):
    """The budget is live: the reply opens <think> itself, and 3 thinking tokens in, the stop text
    is forced (without a budget this model never answers)."""
    r = _run(["infer.generate", "--checkpoint", thinker_checkpoint, "--prompt", "Hello", "--max_new_tokens", "40",
              "--thinking_budget", "3", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    tok = Tokenizer.qwen3()
    thinking = (tok.decode([A1] * 3) + STOP_THINKING_TEXT).split("</think>")[0].strip()
    assert r.stdout == f"=== thinking ===\n{thinking}\n=== answer ===\nHello world \n"
    assert "(32 tokens)" in r.stderr  # <think>, 3 thinking tokens, 24 forced, 3 of answer, <|im_end|>
    bad = _run(["infer.generate", "--checkpoint", thinker_checkpoint, "--prompt", "x", "--top_p", "1.5"])
    assert bad.returncode != 0 and "top_p must be in (0, 1]" in bad.stderr


def test_chat_cli_streams_multi_turn(thinker_checkpoint):
    r = _run(["infer.chat", "--checkpoint", thinker_checkpoint, "--max_new_tokens", "5", "--no_thinking"],
             stdin="first question /think\nsecond\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2 and r.stdout.count("Hello world") == 2


def test_chunked_prefill_matches_transformers_greedy(hf_and_model):
    """Prompts of 1 to 40 tokens prefilled 16 positions at a time (buckets of 16 and 64: one
    chunk, and four with rows ending in the first, second and third) decode as transformers does."""
    hf, model = hf_and_model
    prompts = [*PROMPTS, list(range(100, 140)), list(range(60, 78))]
    engine = engine_lib.Engine(model, prefill_chunk=16)
    ours = engine.generate(prompts, max_new_tokens=8, temperature=0.0, stop_token_ids=())
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="power of two"):
        engine_lib.Engine(model, prefill_chunk=24)


def test_lower_pads_a_chunked_prompt_and_checks_it_fits(hf_and_model):
    _, model = hf_and_model
    engine = engine_lib.Engine(model, prefill_chunk=64)
    prefill, _ = engine.lower(2, 100, 28, 128)  # 100 + 28 fit 128 slots; 100 pads to 2 chunks = 128
    assert [a.shape for a in jax.tree.leaves(prefill.args_info) if a.shape == (2, 128)]  # the tokens
    with pytest.raises(ValueError, match=r"padded to prefill_chunk=64 multiples \(192\) exceeds slots=140"):
        engine.lower(2, 129, 10, 140)


def test_engine_builds_no_tokenizer_and_refuses_a_budget_it_cannot_force(hf_and_model, monkeypatch, qwen3_tokenizer):
    """Qwen3's stop-thinking ids are a constant (checked here against the tokenizer); a 300-token
    vocabulary lacks them, so such an engine refuses a thinking budget instead of forcing ids."""
    assert engine_lib.QWEN3_STOP_THINKING_IDS == qwen3_tokenizer.stop_thinking_ids
    monkeypatch.setattr(Tokenizer, "qwen3", lambda *a, **k: pytest.fail("Engine built a tokenizer"))
    _, model = hf_and_model
    engine = Engine(model)
    assert engine.forced_ids is None
    with pytest.raises(RequestError, match="thinking_budget needs stop-thinking ids"):
        engine.generate(PROMPTS, max_new_tokens=2, thinking_budget=1)


def test_prefill_alone_gives_the_first_greedy_token(hf_and_model):
    _, model = hf_and_model
    engine = Engine(model)
    logits = engine.prefill(PROMPTS, max_new_tokens=4)
    assert logits.shape == (len(PROMPTS), model.cfg.vocab_size) and logits.dtype == jnp.float32
    first = [row[0] for row in engine.generate(PROMPTS, max_new_tokens=1, temperature=0.0, stop_token_ids=())]
    assert np.argmax(np.asarray(logits), axis=-1).tolist() == first
