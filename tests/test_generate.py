"""Decode engine: parity with transformers' generate, sampling, thinking budgets, sharding, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import qwen3_jax as q
from hf_fixtures import make_hf_model, save_hf_model
from infer import engine as engine_lib
from infer import request as engine_request
from infer.messages import complete, stream_text
from infer.engine import Engine, generate
from qwen3_jax.tokenizer import END_THINK_ID, THINK_ID, Tokenizer

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
    ours = generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, stop_token_ids=(stop,), forced_ids=[0])
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=stop, pad_token_id=0)
        assert got == ref[0, len(prompt):].tolist()


def test_seeds_top_k_one_and_parameter_changes_do_not_recompile(hf_and_model):
    _, model = hf_and_model
    kw = dict(max_new_tokens=6, stop_token_ids=(), forced_ids=[0])
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
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=(), forced_ids=[0])
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
        generate(model, [list(rng.randint(0, 300, size=n)), [1, 2]], max_new_tokens=4, temperature=0.0, forced_ids=[0],
                 stop_token_ids=())
    assert engine_lib._prefill._cache_size() - before <= 3  # prompt buckets 16, 32, 64


def test_stop_token_is_included_and_ends_the_row(hf_and_model):
    _, model = hf_and_model
    free = generate(model, PROMPTS[:2], max_new_tokens=8, temperature=0.0, stop_token_ids=(), forced_ids=[0])
    stop = free[1][3]
    out = generate(model, PROMPTS[:2], max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,), forced_ids=[0])
    assert out[1] == free[1][: free[1].index(stop) + 1]
    cut = free[0].index(stop) + 1 if stop in free[0] else 8
    assert out[0] == free[0][:cut]


def test_thinking_budgets_force_the_stop_text_per_row(qwen3_vocab_model, forced_ids):
    open_think = [151644, 77091, 198, THINK_ID, 198]  # "<|im_start|>assistant\n<think>\n"
    thinking_off = [151644, 77091, 198, THINK_ID, 271, END_THINK_ID, 271]  # the empty block
    prompts = [open_think, open_think, open_think, open_think, thinking_off]
    budgets = [0, 3, 7, None, 0]
    out = generate(qwen3_vocab_model, prompts, max_new_tokens=32, temperature=1.0, top_k=50, stop_token_ids=(),
                   thinking_budget=budgets, seed=4)
    forced = list(forced_ids)
    assert len(forced) == 24 and END_THINK_ID in forced
    for row, n in zip(out[:3], budgets[:3]):
        assert END_THINK_ID not in row[:n]
        assert row[n: n + 24] == forced, n
        assert len(row) == 32  # sampling resumes after the forced text
    assert out[3][:24] != forced[:24] and END_THINK_ID not in out[3]  # unlimited: never forced
    assert forced[:5] != out[4][:5]  # thinking off: budget 0 forces nothing
    # A prompt whose thinking is already closed by the model is never forced either.
    closed = open_think + [100, 200, END_THINK_ID, 271]
    again = generate(qwen3_vocab_model, [closed], max_new_tokens=30, temperature=1.0, top_k=50, stop_token_ids=(),
                     thinking_budget=0, seed=4)
    assert END_THINK_ID not in again[0]


def test_budget_zero_forces_immediately_with_greedy(qwen3_vocab_model, forced_ids):
    out = generate(qwen3_vocab_model, [[151644, 77091, 198, THINK_ID, 198]], max_new_tokens=26, temperature=0.0,
                   stop_token_ids=(), thinking_budget=0)
    assert out[0][:24] == list(forced_ids)


@pytest.mark.parametrize("kind, shape", [("dense", {"data": 2, "fsdp": 2, "tensor": 2}),
                                         ("moe", {"data": 2, "expert": 2, "tensor": 2})])
def test_sharded_decode_equals_unsharded(kind, shape, tmp_path):
    hf = make_hf_model(kind, seed=22)
    path = save_hf_model(hf, tmp_path)
    prompts = PROMPTS[:3]  # 3 rows on a batch-sharding degree of 4: padded with finished rows
    single, mesh = q.from_hf(path), q.make_mesh(shape)
    sharded = q.from_hf(path, mesh=mesh)
    for kw in (dict(temperature=0.0), dict(temperature=0.8, top_k=10, seed=9)):
        kw.update(max_new_tokens=8, stop_token_ids=(), forced_ids=[0])
        assert generate(sharded, prompts, mesh=mesh, **kw) == generate(single, prompts, **kw)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be an int >= 0"),
        ({"thinking_budget": -3}, "thinking_budget must be None or an int >= 0"),
        ({"thinking_budget": [1]}, "thinking_budget has 1 values for 4 prompts"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ({"seed": [1]}, "seed has 1 values for 4 prompts"),
        ({"seed": [0, 1, 2**32, 3]}, r"one int in \[0, 2\*\*32\) per prompt; prompt 2 has 4294967296"),
        ({"max_new_tokens": 600}, "exceeds the model's context of 512 positions"),
    ],
)
def test_bad_requests_are_named(hf_and_model, kwargs, message):
    _, model = hf_and_model
    args = {"max_new_tokens": 4, "forced_ids": [0], "stop_token_ids": (), **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, PROMPTS, **args)


def test_bad_prompts_are_named(hf_and_model):
    _, model = hf_and_model
    with pytest.raises(ValueError, match=r"prompt 1 has token ids outside \[0, 300\)"):
        generate(model, [[1], [2, 300]], max_new_tokens=2, forced_ids=[0], stop_token_ids=())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(model, [[]], max_new_tokens=2, forced_ids=[0], stop_token_ids=())


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
    "stop_id_out_of_range": ({"stop_token_ids": [V + 5]}, engine_request.RequestError,
                             rf"stop_token_ids has token ids outside \[0, {V}\): \[{V + 5}\]"),
    "negative_stop_id": ({"stop_token_ids": [2, -1]}, engine_request.RequestError, r"stop_token_ids has token ids outside"),
    "stop_ids_not_a_list": ({"stop_token_ids": 7}, engine_request.RequestTypeError,
                            r"stop_token_ids must be a list of token ids \(ints\), got int 7"),
    "float_token_budget": ({"max_new_tokens": 4.0}, engine_request.RequestTypeError,
                           r"max_new_tokens must be a positive int, got float 4.0"),
    "bool_token_budget": ({"max_new_tokens": True}, engine_request.RequestTypeError,
                          r"max_new_tokens must be a positive int, got bool True"),
    "float_thinking_budget": ({"thinking_budget": 2.5}, engine_request.RequestTypeError,
                              r"thinking_budget must be None or an int >= 0, got float 2.5"),
    "string_seed": ({"seed": "7"}, engine_request.RequestTypeError, r"seed must be an int or one int per prompt, got str"),
}


@pytest.fixture(scope="module")
def qwen3_engine(qwen3_vocab_model, forced_ids):
    return Engine(qwen3_vocab_model, forced_ids=forced_ids), Tokenizer.qwen3()


ENTRY_POINTS = {  # name: (kind of prompts, call(model, engine, tokenizer, prompts, kwargs))
    "infer.generate": ("ids", lambda m, e, t, p, kw: generate(m, p, forced_ids=e.forced_ids, **kw)),
    "Engine.generate": ("ids", lambda m, e, t, p, kw: e.generate(p, **kw)),
    "Engine.stream": ("ids", lambda m, e, t, p, kw: next(e.stream(p, **kw))),
    "messages.complete": ("conversations", lambda m, e, t, p, kw: complete(e, t, p, **kw)),
    "messages.stream_text": ("messages", lambda m, e, t, p, kw: next(stream_text(e, t, p, **kw))),
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
    engine, tokenizer = qwen3_engine
    with pytest.raises(error, match=message):
        call(qwen3_vocab_model, engine, tokenizer, prompts, {"max_new_tokens": 2, **kwargs})


def test_engine_arguments_of_the_wrong_kind_are_named(qwen3_vocab_model, qwen3_engine):
    engine, _ = qwen3_engine
    with pytest.raises(engine_request.RequestError, match="chunk must be a positive int, got -1"):
        next(engine.stream([[1, 2]], max_new_tokens=2, chunk=-1))  # was an endless loop of empty chunks
    with pytest.raises(engine_request.RequestError, match="forced_ids is empty"):
        Engine(qwen3_vocab_model, forced_ids=[])
    with pytest.raises(engine_request.RequestTypeError, match=r"forced_ids must be a list of token ids \(ints\), but it holds 3.7"):
        Engine(qwen3_vocab_model, forced_ids=[3.7])
    with pytest.raises(engine_request.RequestError, match=r"thinking_budget\[1\] must be None or an int >= 0, got -2"):
        engine.generate([[1], [2]], max_new_tokens=2, thinking_budget=[None, -2])


def test_streaming_chunks_concatenate_to_the_full_generation(hf_and_model):
    _, model = hf_and_model
    engine = Engine(model, forced_ids=[0])
    kw = dict(max_new_tokens=9, temperature=0.0, stop_token_ids=())
    chunks = list(engine.stream(PROMPTS, chunk=2, **kw))
    assert len(chunks) == 5
    joined = [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))]
    assert joined == engine.generate(PROMPTS, **kw)


# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory, qwen3_vocab_model):
    path = str(tmp_path_factory.mktemp("cli"))
    q.to_hf(qwen3_vocab_model, path)
    Tokenizer.qwen3().save(path)
    return path


def _run(args, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, text=True, timeout=600,
                          env=env, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_generate_cli_prints_thinking_and_answer(cli_checkpoint):
    r = _run(["infer.generate", "--checkpoint", cli_checkpoint, "--prompt", "Hello /no_think", "--max_new_tokens", "6",
              "--thinking_budget", "3", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    assert "=== thinking ===" in r.stdout and "=== answer ===" in r.stdout
    assert "(6 tokens)" in r.stderr
    bad = _run(["infer.generate", "--checkpoint", cli_checkpoint, "--prompt", "x", "--top_p", "1.5"])
    assert bad.returncode != 0 and "top_p must be in (0, 1]" in bad.stderr


def test_chat_cli_streams_multi_turn(cli_checkpoint):
    r = _run(["infer.chat", "--checkpoint", cli_checkpoint, "--max_new_tokens", "5", "--no_thinking"],
             stdin="first question /think\nsecond\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
