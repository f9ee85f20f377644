"""infer.serve through the official `openai` client on loopback, infer.continuous, infer.openai_api.

Two tiny models over the real Qwen3 vocabulary serve in this process (uvicorn on a thread): a random
one (greedy parity with `infer.text.complete` alone, seeds, bad input, the soak) and one scripted to
open <think> and think forever (budgets, streaming, a full queue, disconnects). The command line and
SIGTERM run as a subprocess.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx2
import jax
import numpy as np
import openai
import psutil
import pytest
import uvicorn

import qwen3_jax as q
from helpers.scripted import scripted_model
from infer import engine as engine_lib
from infer.cli_common import parse_mesh
from infer.continuous import ContinuousEngine, QueueFull, Request, bucket_rows
from infer.engine import Engine
from infer.openai_api import ReplyParser, merge_deltas, parse_chat_request
from infer.serve import make_app
from infer.text import complete
from qwen3_jax import chat
from qwen3_jax.ids import IM_END_ID, THINK_ID
from qwen3_jax.tokenizer import Tokenizer

CONTEXT = 256
KEY = "test-key"
A1, Z, NL, NLNL = 1001, 1000, 198, 271
HELLO_WORLD = [9707, 1879, 220]  # "Hello world "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine: ContinuousEngine, tokenizer: Tokenizer, **kwargs):
    """The app on uvicorn in a thread on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(engine, tokenizer, model_name="tiny", **kwargs),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def save(model, tokenizer, path) -> str:
    q.to_hf(model, path)
    tokenizer.save(path)
    return str(path)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.qwen3()


@pytest.fixture(scope="module")
def random_dir(tok, tmp_path_factory):
    cfg = q.preset("tiny-dense", vocab_size=151936, hidden_size=32, intermediate_size=48, num_layers=2,
                   max_position_embeddings=CONTEXT)
    return save(q.init_model(cfg, seed=5), tok, tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def random_engine(random_dir, tok):
    return Engine.for_tokenizer(q.load_any(random_dir), tok)


@pytest.fixture(scope="module")
def thinker_dir(tok, tmp_path_factory):
    """Opens <think> after the generation prompt and thinks forever; after the stop-thinking text
    (which ends in "\\n\\n") answers "Hello world " and ends its turn."""
    script = {NL: THINK_ID, THINK_ID: A1, A1: A1, NLNL: HELLO_WORLD[0], HELLO_WORLD[0]: HELLO_WORLD[1],
              HELLO_WORLD[1]: HELLO_WORLD[2], HELLO_WORLD[2]: IM_END_ID}
    return save(scripted_model(script, Z), tok, tmp_path_factory.mktemp("thinker"))


@pytest.fixture(scope="module")
def thinker_engine(thinker_dir, tok):
    return Engine.for_tokenizer(q.load_any(thinker_dir), tok, max_len=CONTEXT)


@pytest.fixture(scope="module")
def random_server(random_engine, tok):
    ce = ContinuousEngine(random_engine, slots=8, chunk=4, max_queue=64, stop_token_ids=tok.eos_ids)
    with serving(ce, tok, api_key=KEY, max_body_bytes=1 << 16) as url:
        yield url, ce


@pytest.fixture(scope="module")
def thinker_server(thinker_engine, tok):
    ce = ContinuousEngine(thinker_engine, slots=2, chunk=4, max_queue=2, stop_token_ids=tok.eos_ids)
    with serving(ce, tok) as url:
        yield url, ce


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, messages, **kwargs):
    return c.chat.completions.create(model="tiny", messages=messages, **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


MAX_TOKENS = 24


def mixed_cases() -> list[dict]:
    """16 requests: prompt lengths 10 to ~200 tokens, output lengths, modes (hard and soft switch), budgets, tools."""
    rng = np.random.default_rng(0)
    words = "the a sky blue why how many apples seven cats ocean river light fast".split()
    cases = []
    for i in range(16):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 50 if i % 5 == 0 else 20))))
        messages = ([{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []) + user(
            text + (" /no_think" if i % 4 == 1 else ""))
        if i % 7 == 2:
            messages = user("hi") + [{"role": "assistant", "content": "hello"}] + messages
        cases.append({"messages": messages, "max_tokens": int(rng.integers(2, MAX_TOKENS + 1)),
                      "thinking": i % 4 != 3, "budget": [None, 0, 4, 16][i % 4], "tools": [WEATHER] if i == 6 else None})
    return cases


def test_concurrent_greedy_requests_match_generate_alone_with_bounded_compilations(random_server, random_engine, tok):
    url, ce = random_server
    c = client(url)
    cases = mixed_cases()
    decode_before = engine_lib._decode._cache_size()

    def run(case):
        return ask(c, case["messages"], max_tokens=case["max_tokens"], temperature=0, tools=case["tools"] or openai.omit,
                   extra_body={"thinking_budget": case["budget"],
                               "chat_template_kwargs": {"enable_thinking": case["thinking"]}})

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(run, cases))
    counts = ce.compilations()
    decoded = engine_lib._decode._cache_size() - decode_before
    for case, reply in zip(cases, replies):
        # Greedy decoding is causal, so a request's reply is the first max_tokens of a longer one
        # (one max_new_tokens keeps the static engine to one compilation per prompt bucket).
        (alone,) = complete(random_engine, tok, [case["messages"]], max_new_tokens=MAX_TOKENS,
                            enable_thinking=case["thinking"], thinking_budget=case["budget"], tools=case["tools"],
                            temperature=0.0)
        ids = alone.token_ids[:case["max_tokens"]]
        choice = reply.choices[0]
        assert (choice.message.reasoning_content or "", choice.message.content) == chat.parse_completion_ids(ids, tok)
        assert choice.finish_reason == ("stop" if ids[-1] in tok.eos_ids else "length")
        assert reply.usage.completion_tokens == len(ids)
    prompt_buckets = {ce._padded(r.usage.prompt_tokens) for r in replies}
    row_buckets = {bucket_rows(n, ce.slots) for n in range(1, ce.slots + 1)}
    assert counts["admit"] <= len(prompt_buckets) * len(row_buckets)
    assert decoded <= 1 and counts["release"] <= 1 and counts["window"] == 1
    assert ce.free_slots == ce.slots


def test_new_settings_seeds_and_budgets_compile_nothing(random_engine, tok):
    ce = ContinuousEngine(random_engine, slots=4, chunk=4, stop_token_ids=tok.eos_ids)
    prompts = [[1, 2, 3], list(range(10, 30)), [5] * 9, list(range(40, 52))]
    ce.generate(prompts, max_new_tokens=[3, 9, 5, 7], temperature=0.0)
    before = ce.compilations()
    decode = engine_lib._decode._cache_size()
    ce.generate(prompts[::-1], max_new_tokens=[8, 2, 6, 4], seeds=[1, 2, 3, 4], temperature=1.3, top_k=0, top_p=0.9,
                min_p=0.05, presence_penalty=1.0, thinking_budget=2)
    assert ce.compilations() == before and engine_lib._decode._cache_size() == decode
    assert ce.free_slots == 4


def test_on_a_mesh_the_rows_are_the_one_device_rows_and_each_step_compiles_once(random_dir, random_engine, tok,
                                                                                caplog):
    mesh = q.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = Engine.for_tokenizer(q.load_any(random_dir, mesh=mesh), tok, mesh=mesh)
    with pytest.raises(ValueError, match="slots=3 is not a multiple of the mesh's data-parallel degree 4"):
        ContinuousEngine(sharded, slots=3)
    prompts = [[1, 2, 3], list(range(10, 30)), [5] * 9, list(range(40, 52)), [7] * 40]
    kw = dict(max_new_tokens=[3, 9, 5, 7, 6], seeds=[1, 2, 3, 4, 5], temperature=1.3, top_k=0, thinking_budget=2)
    single = ContinuousEngine(random_engine, slots=4, chunk=4, stop_token_ids=tok.eos_ids).generate(prompts, **kw)
    ce = ContinuousEngine(sharded, slots=4, chunk=4, stop_token_ids=tok.eos_ids)
    with jax.log_compiles(), caplog.at_level("WARNING", logger="jax._src.dispatch"):
        assert ce.generate(prompts, **kw) == single
        reverse = {k: v[::-1] for k, v in kw.items() if isinstance(v, list)}
        assert ce.generate(prompts[::-1], **{**kw, **reverse}) == single[::-1]
    compiled = re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)
    # jit's own _cache_size counts two entries per function on a mesh, so compilations are read off the log.
    assert {f: compiled.count(f) for f in ("_decode", "_release", "_window")} == dict.fromkeys(
        ("_decode", "_release", "_window"), 1)
    assert [len(o) for o in single] == kw["max_new_tokens"] and ce.free_slots == 4
    assert not jax.tree.leaves(ce._state.cache)[0].sharding.is_fully_replicated


def test_a_seeded_sampled_request_is_the_same_whatever_shares_its_batch(random_server, random_engine, tok):
    url, _ = random_server
    c = client(url)
    messages = user("tell me about the sea")
    kw = dict(max_tokens=16, temperature=1.0, seed=1234)
    alone = ask(c, messages, **kw).choices[0].message.content
    others = [(user(f"question {i} " * (i + 1)), dict(max_tokens=4 + 3 * i, temperature=0.8, seed=i)) for i in range(7)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, c, m, **k) for m, k in others[:4]]
        mine = pool.submit(ask, c, messages, **kw)
        futures += [pool.submit(ask, c, m, **k) for m, k in others[4:]]
        assert mine.result().choices[0].message.content == alone
        assert all(f.result().choices for f in futures)
    (static,) = complete(random_engine, tok, [messages], max_new_tokens=16, seed=[1234], temperature=1.0)
    assert static.answer == alone  # the static engine with the same per-row seed


def stream_message(stream) -> tuple[dict[int, dict], dict[int, str], object]:
    """Per choice, the deltas merged; per choice, the finish reason; the usage chunk's usage."""
    deltas: dict[int, list] = {}
    finish, usage = {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            d = ch.delta.model_dump(exclude_none=True)
            d.pop("role", None)
            for call in d.get("tool_calls", ()):
                call.setdefault("index", 0)
            deltas.setdefault(ch.index, []).append({k: v for k, v in d.items() if v != ""})
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    return {i: merge_deltas(d) for i, d in deltas.items()}, finish, usage


def test_streamed_chunks_concatenate_to_the_reply(thinker_server, random_server):
    url, _ = thinker_server
    c = client(url)
    kw = dict(max_tokens=60, extra_body={"thinking_budget": 5})
    whole = ask(c, user("Hello"), **kw)
    merged, finish, usage = stream_message(ask(c, user("Hello"), stream=True, stream_options={"include_usage": True}, **kw))
    m = whole.choices[0].message
    assert m.reasoning_content and m.content == "Hello world "
    assert merged[0]["reasoning_content"] == m.reasoning_content == m.reasoning
    assert merged[0]["content"] == m.content and finish[0] == whole.choices[0].finish_reason == "stop"
    assert usage.completion_tokens == whole.usage.completion_tokens
    # Two sampled choices (n=2) stream as the non-streamed reply gives them.
    url, _ = random_server
    c = client(url)
    kw = dict(max_tokens=12, n=2, seed=9, temperature=1.0)
    whole = ask(c, user("sing"), **kw)
    merged, finish, _ = stream_message(ask(c, user("sing"), stream=True, **kw))
    assert [merged[i]["content"] for i in range(2)] == [ch.message.content for ch in whole.choices]
    assert whole.choices[0].message.content != whole.choices[1].message.content


def test_two_budgets_in_flight_each_stop_thinking_at_their_own(thinker_server, thinker_engine, tok):
    url, _ = thinker_server
    c = client(url)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda b: ask(c, user("Hello"), max_tokens=100, extra_body={"thinking_budget": b}), (4, 32)))
    forced = tok.stop_thinking_ids
    for budget, reply in zip((4, 32), replies):
        m = reply.choices[0].message
        thinking = tok.decode([A1] * budget + list(forced[:forced.index(tok.end_think_id)])).strip("\n")
        assert m.reasoning_content == thinking and m.content == "Hello world "
        # <think>, the budget, the forced text through </think>; then "\n\n", the answer and <|im_end|>.
        assert reply.usage.completion_tokens_details.reasoning_tokens == 1 + budget + forced.index(tok.end_think_id) + 1
        assert reply.usage.completion_tokens == 1 + budget + len(forced) + 4
        (alone,) = complete(thinker_engine, tok, [user("Hello")], max_new_tokens=100, thinking_budget=budget)
        assert (alone.thinking, alone.answer) == (m.reasoning_content, m.content)
    # A stop string ends the reply and its usage at the token that completes it (" world" of "Hello world ").
    for stream in (False, True):
        kw = dict(max_tokens=100, stop=["world"], extra_body={"thinking_budget": 4})
        if stream:
            merged, finish, usage = stream_message(ask(c, user("Hello"), stream=True,
                                                       stream_options={"include_usage": True}, **kw))
            content = merged[0]["content"]
        else:
            reply = ask(c, user("Hello"), **kw)
            content, finish, usage = reply.choices[0].message.content, {0: reply.choices[0].finish_reason}, reply.usage
        assert (content, finish[0]) == ("Hello ", "stop")
        assert usage.completion_tokens == 1 + 4 + len(forced) + 2
        assert usage.completion_tokens_details.reasoning_tokens == 1 + 4 + forced.index(tok.end_think_id) + 1


BAD = [  # (body, param); each a 400
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages"),
    ({"messages": user("x"), "temperature": "hot"}, "temperature"),
    ({"messages": user("x"), "top_p": 1.5}, "top_p"),
    ({"messages": user("x"), "max_tokens": "10"}, "max_tokens"),
    ({"messages": user("x"), "max_tokens": 0}, "max_tokens"),
    ({"messages": user("x"), "max_tokens": 10_000}, "max_tokens"),
    ({"messages": user("word " * 400)}, "messages"),
    ({"messages": user("x"), "thinking_budget": -1}, "thinking_budget"),
    ({"messages": user("x"), "stop": [1]}, "stop"),
    ({"messages": user("x"), "n": 0}, "n"),
    ({"messages": user("x"), "seed": 1.5}, "seed"),
    ({"messages": user("x"), "stream": "yes"}, "stream"),
    ({"messages": user("x"), "chat_template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"messages": user("x"), "tools": [{"type": "function"}]}, "tools[0]"),
    ({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
     "tools[0].function.parameters"),
    ({"messages": user("x") + [{"role": "assistant", "content": "y", "reasoning_content": 5}] + user("z")},
     "messages[1].reasoning_content"),
    ({"messages": user("x") + [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}] + user("z")},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": user("x") + [{"role": "assistant", "content": None, "tool_calls": {"name": "f"}}] + user("z")},
     "messages[1].tool_calls"),
    # Past int32: these once failed the engine's step (every running request ended, this one hung).
    ({"messages": user("x"), "thinking_budget": 2**31}, "thinking_budget"),
    ({"messages": user("x"), "top_k": 2**31}, "top_k"),
]


def test_bad_input_gets_its_status_naming_the_field_and_the_server_stays_up(random_server):
    url, _ = random_server
    c = client(url)
    for body, param in BAD:
        extra = {k: v for k, v in body.items() if k != "messages"}
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=body["messages"], extra_body=extra, max_tokens=openai.omit)
        assert e.value.status_code == 400 and e.value.body["param"] == param, (body, e.value.body)
        assert e.value.body["message"].startswith(param)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = httpx2.post(url + "/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    for body, param in ((rb'{"messages": [{"role": "user", "content": "a\ud800"}]}', "messages[0].content"),
                        (rb'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", '
                         rb'"function": {"name": "f", "description": "\udfff"}}]}', "tools[0].function.description")):
        raw = httpx2.post(url + "/v1/chat/completions", content=body, headers=headers)  # valid JSON, not Unicode
        assert raw.status_code == 400 and raw.json()["error"]["param"] == param, raw.text
    raw = httpx2.get(url + "/v1/chat/completions", headers=headers)
    assert raw.status_code == 405 and raw.json()["error"]["message"].startswith("GET /v1/chat/completions")
    big = json.dumps({"messages": user("x" * 70_000)})
    raw = httpx2.post(url + "/v1/chat/completions", content=big, headers=headers)
    assert raw.status_code == 413 and raw.json()["error"]["type"] == "request_too_large"
    with pytest.raises(openai.AuthenticationError) as e:
        ask(client(url, "wrong"), user("x"), max_tokens=2)
    assert e.value.status_code == 401
    for path in ("/v1/models", "/v1/chat/completions"):
        assert httpx2.request("GET" if "models" in path else "POST", url + path, json={"messages": user("x")}).status_code == 401
    for scheme, status in (("bearer", 200), ("BEARER", 200), ("Basic", 401), ("Bearer" + KEY, 401)):
        assert httpx2.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == status, scheme
    ok = ask(c, user("still there?"), max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in c.models.list().data] == ["tiny"]


def test_a_full_queue_answers_429_with_retry_after(thinker_server):
    url, ce = thinker_server  # 2 rows, 2 waiting at most; each request thinks for 150 tokens
    c = client(url)

    def one(_):
        try:
            return ask(c, user("Hello"), max_tokens=150).choices[0].finish_reason
        except openai.RateLimitError as e:
            return e.response.status_code, e.response.headers.get("retry-after")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert (429, "1") in results and "length" in results
    assert set(results) <= {(429, "1"), "length"}
    assert ask(c, user("Hello"), max_tokens=40, extra_body={"thinking_budget": 1}).choices[0].finish_reason == "stop"
    assert ce.free_slots == ce.slots
    with pytest.raises(openai.BadRequestError) as e:  # more choices than the queue holds never fit: not a 429
        ask(c, user("Hello"), max_tokens=2, n=3)
    assert e.value.body["param"] == "n" and "--max_queue" in e.value.body["message"]


def metric(url: str, name: str) -> float:
    text = httpx2.get(url + "/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(thinker_server):
    url, ce = thinker_server
    c = client(url)
    gone = metric(url, 'qwen3_requests_total{status="499"}')
    stream = ask(c, user("Hello"), max_tokens=240, stream=True)  # thinks for 240 tokens
    next(iter(stream)), next(iter(stream))
    stream.close()
    deadline = time.time() + 20
    while (ce.free_slots != ce.slots or metric(url, 'qwen3_requests_total{status="499"}') != gone + 1) \
            and time.time() < deadline:
        time.sleep(0.05)
    assert ce.free_slots == ce.slots and metric(url, 'qwen3_requests_total{status="499"}') == gone + 1
    text = httpx2.get(url + "/metrics").text
    for name in ("qwen3_time_to_first_token_seconds_count", "qwen3_inter_token_latency_seconds_count",
                 "qwen3_requests_running", "qwen3_requests_waiting", "qwen3_generation_tokens_per_second"):
        assert name in text
    assert metric(url, "qwen3_time_to_first_token_seconds_count") > 0
    # A non-streamed request whose client leaves while its tokens keep coming is cancelled, not decoded to the end.
    answered = metric(url, 'qwen3_requests_total{status="200"}')
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(url + "/v1/chat/completions", json={"messages": user("Hello"), "max_tokens": 240}, timeout=1.0)
    deadline = time.time() + 20
    while metric(url, 'qwen3_requests_total{status="499"}') != gone + 2 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(url, 'qwen3_requests_total{status="499"}') == gone + 2
    assert metric(url, 'qwen3_requests_total{status="200"}') == answered
    while ce.free_slots != ce.slots and time.time() < deadline:
        time.sleep(0.05)
    assert ce.free_slots == ce.slots


def test_soak_500_requests_at_concurrency_16(random_server):
    url, ce = random_server
    c = client(url)
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 7, size=500)
    texts = [" ".join(["word"] * int(k)) for k in rng.integers(1, 20, size=500)]
    process = psutil.Process()
    rss = {}

    def one(i):
        reply = ask(c, user(texts[i]), max_tokens=int(lengths[i]), temperature=0.7, seed=i, stream=bool(i % 2))
        if i % 2:
            return stream_message(reply)[1][0]
        return reply.choices[0].finish_reason

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        warm = list(pool.map(one, range(100)))
        rss["warm"] = process.memory_info().rss
        rest = list(pool.map(one, range(100, 500)))
    seconds = time.perf_counter() - start
    rss["end"] = process.memory_info().rss
    assert len(warm + rest) == 500 and set(warm + rest) <= {"stop", "length"}
    assert ce.free_slots == ce.slots and ce.waiting == 0
    assert rss["end"] <= 1.10 * rss["warm"], rss
    assert seconds < 240, seconds


def test_command_line_serves_then_sigterm_finishes_in_flight_and_exits_0(thinker_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "infer.serve", "--checkpoint", thinker_dir, "--port", str(port), "--slots", "2",
         "--decode_chunk", "4", "--max_len", str(CONTEXT), "--served_model_name", "thinker", "--mesh", "data=2"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(url + "/health").status_code == 200:
                    break
            assert server.poll() is None, server.stderr.read()
            time.sleep(0.2)
        c = client(url)
        assert ask(c, user("Hello"), max_tokens=40, extra_body={"thinking_budget": 2}).choices[0].message.content \
            == "Hello world "
        stream = iter(ask(c, user("Hello"), max_tokens=200, stream=True))
        next(stream)
        server.send_signal(signal.SIGTERM)
        merged, finish, _ = stream_message(stream)  # the running request finishes
        assert finish == {0: "length"} and merged[0]["reasoning_content"]
        assert server.wait(60) == 0
        log = server.stderr.read()
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(url + "/health")
    finally:
        if server.poll() is None:
            server.kill()
    lines = [line for line in log.splitlines() if "status=200" in line]
    assert len(lines) == 2 and "prompt_tokens=" in lines[0] and "completion_tokens=31" in lines[0]
    assert "(2 slots, context 256, mesh {'data': 2})" in log


def test_command_line_names_a_bad_mesh(thinker_dir):
    run = subprocess.run([sys.executable, "-m", "infer.serve", "--checkpoint", thinker_dir, "--slots", "2",
                          "--mesh", "data=4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "slots=2 is not a multiple of the mesh's data-parallel degree 4" in run.stderr
    for text, message in (("data=2;tensor=2", "must be distinct axis=size pairs"),
                          ("data=2,data=2", "must be distinct axis=size pairs")):
        with pytest.raises(ValueError, match=message):
            parse_mesh(text)
    assert parse_mesh("data=2, tensor=-1") == {"data": 2, "tensor": -1}


# ------------------------------------------------------------------------- units without a model


def parse(tok, ids, step, **kwargs):
    p = ReplyParser(lambda i: tok.decode(i, skip_special_tokens=True), think_id=tok.think_id,
                    end_think_id=tok.end_think_id, **kwargs)
    deltas = []
    for k in range(0, len(ids), step):
        deltas += p.feed(ids[k:k + step])
    return merge_deltas(deltas + p.finish()), p


@pytest.mark.parametrize("text, in_think, want", [
    ("<think>\nLet me think.\n</think>\n\nIt is 4.<|im_end|>", False, ("Let me think.", "It is 4.", [])),
    ("still thinking\n</think>\n\nDone.\n", True, ("still thinking", "Done.", [])),
    ("<think>\n\n</think>\n\nNo thoughts.", False, (None, "No thoughts.", [])),
    ("Plain answer, ünïcödé 😀.\n\n", False, (None, "Plain answer, ünïcödé 😀.", [])),
    ("<think>\nunfinished", False, ("unfinished", "", [])),
    ('Calling.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", '
     '"arguments": {}}\n</tool_call>', False, (None, "Calling.", [("f", '{"x": 1}'), ("g", "{}")])),
    ("<tool_call>not json</tool_call> ok", False, (None, "<tool_call>not json</tool_call> ok", [])),
])
def test_reply_parser_splits_thinking_answer_and_tool_calls_whatever_the_chunking(tok, text, in_think, want):
    ids = tok.encode(text)
    for step in (1, 2, 3, len(ids)):
        message, _ = parse(tok, ids, step, in_think=in_think, parse_tools=True)
        calls = [(t["function"]["name"], t["function"]["arguments"]) for t in message.get("tool_calls", [])]
        assert (message["reasoning_content"], message["content"], calls) == want
    if "tool_call" not in text and in_think is False:
        thinking, answer = chat.parse_completion_ids(ids, tok)
        assert ((message["reasoning_content"] or ""), message["content"]) == (thinking, answer)


def test_reply_parser_stops_at_a_stop_string_in_the_answer_only(tok):
    ids = tok.encode("<think>\nthe END is near\n</think>\n\nAnswer: 42. END of it")
    for step in (1, 4, len(ids)):
        message, p = parse(tok, ids, step, in_think=False, stop=["END", "zzz"])
        assert message["reasoning_content"] == "the END is near" and message["content"] == "Answer: 42. "
        assert p.stopped
    # The newlines between </think> and the answer are trimmed, not matched: "\n" ends the answer's first line.
    ids = tok.encode("<think>\nabc\n</think>\n\nLine one.\nLine two.")
    for step in (1, 3, len(ids)):
        message, p = parse(tok, ids, step, in_think=False, stop=["\n"])
        assert (message["reasoning_content"], message["content"], p.stopped) == ("abc", "Line one.", True)


def test_request_defaults_follow_the_mode_and_budget_applies_when_thinking():
    think = parse_chat_request({"messages": user("x")})
    no_think = parse_chat_request({"messages": user("x /no_think"), "top_k": -1, "seed": -5})
    assert think.sampling["temperature"] == 0.6 and no_think.sampling["temperature"] == 0.7
    assert no_think.sampling["top_k"] == 0 and 0 <= no_think.seed < 2**32
    hard = parse_chat_request({"messages": user("x"), "chat_template_kwargs": {"enable_thinking": False}})
    assert str(hard.mode) == "no_think" and hard.enable_thinking is False


def test_a_tool_call_history_renders_as_qwens_template_does():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    messages = user("Weather?") + [{"role": "assistant", "content": None, "tool_calls": calls},
                                   {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    req = parse_chat_request({"messages": messages, "tools": [WEATHER]})
    text = chat.render(req.messages, tools=req.tools, add_generation_prompt=True)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in text and "sunny" in text


def test_submit_past_the_queue_raises_and_cancel_frees_rows(random_engine, tok):
    ce = ContinuousEngine(random_engine, slots=2, chunk=2, max_queue=3, stop_token_ids=tok.eos_ids)
    got: dict[int, list[int]] = {}
    requests = [Request([1, 2, 3], 50, lambda ids, f, d, i=i: got.setdefault(i, []).extend(ids), seed=i)
                for i in range(3)]
    for r in requests:
        ce.submit(r)
    with pytest.raises(QueueFull):
        ce.submit(Request([1], 5, lambda *a: None))
    ce.step()
    assert ce.running == 2 and ce.waiting == 1 and ce.free_slots == 0
    ce.cancel(requests[0])
    ce.step()  # the cancelled row is freed and the waiting request takes it
    assert ce.running == 2 and ce.waiting == 0 and 2 in got
    ce.cancel(requests[1]), ce.cancel(requests[2])
    ce.step()
    assert ce.free_slots == 2 and ce.idle()
    assert np.asarray(ce._state.done_B).all()  # a freed row stops decoding


def test_a_failed_admission_ends_the_requests_it_was_admitting(random_engine, tok):
    ce = ContinuousEngine(random_engine, slots=2, chunk=2, stop_token_ids=tok.eos_ids)
    admit, failed = ce.admit_fn, []

    def fails_once(*args):
        if not failed:
            failed.append(True)
            raise RuntimeError("an admission bug")
        return admit(*args)

    ce.admit_fn = fails_once
    ended, finished, got = threading.Event(), threading.Event(), []
    ce.submit(Request([1, 2, 3], 5, lambda ids, f, done: done and ended.set()))
    ce.start()
    try:
        assert ended.wait(60)  # taken off the queue, never active: it still hears that it ended
        ce.submit(Request([7, 8, 9], 3, lambda ids, f, done: (got.extend(ids), done and finished.set())[0] and None))
        assert finished.wait(60) and len(got) == 3 and ce.free_slots == 2 and ce.idle()
    finally:
        ce.stop(10)


def test_a_reply_a_failed_step_cut_short_is_a_500_not_a_short_reply(random_engine, tok):
    ce = ContinuousEngine(random_engine, slots=2, chunk=2, stop_token_ids=tok.eos_ids)
    decode, failures = ce.decode_fn, []

    def fails_twice(*args):
        if len(failures) < 2:
            failures.append(True)
            raise RuntimeError("a decode bug")
        return decode(*args)

    ce.decode_fn = fails_twice
    with serving(ce, tok) as url:
        c = client(url)
        with pytest.raises(openai.InternalServerError) as e:
            ask(c, user("hi"), max_tokens=5)
        assert e.value.body["type"] == "server_error"
        with httpx2.stream("POST", url + "/v1/chat/completions",
                           json={"messages": user("hi"), "max_tokens": 5, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert r.status_code == 200 and lines[-1] == "data: [DONE]"  # the status line went with the first event
        assert json.loads(lines[-2].removeprefix("data: "))["error"]["type"] == "server_error"
        assert ask(c, user("hi"), max_tokens=5, temperature=0).usage.completion_tokens == 5
        assert metric(url, 'qwen3_requests_total{status="500"}') == 2 and ce.free_slots == 2


def test_a_failed_step_ends_its_requests_and_the_engine_serves_on(random_engine, tok):
    ce = ContinuousEngine(random_engine, slots=2, chunk=2, stop_token_ids=tok.eos_ids)
    ended = threading.Event()

    def explode(ids, forced, done):
        raise RuntimeError("a callback bug")

    ce.submit(Request([1, 2, 3], 20, explode))
    ce.submit(Request([4, 5], 20, lambda ids, f, done: done and ended.set()))
    ce.start()
    try:
        assert ended.wait(60)  # the other request got its last callback
        got = []
        finished = threading.Event()
        ce.submit(Request([7, 8, 9], 3, lambda ids, f, done: (got.extend(ids), done and finished.set())[0] and None))
        assert finished.wait(60) and len(got) == 3 and ce.free_slots == 2
    finally:
        ce.stop(10)
