"""An OpenAI-compatible HTTP server over the continuous-batching engine.

    python -m infer.serve --checkpoint DIR [--step N] [--host 127.0.0.1] [--port 8000] [--slots 16]
        [--max_len N] [--api_key KEY] [--dtype float32|bfloat16] [--mesh AXIS=N,...] [--decode_chunk 8]
        [--max_queue 256] [--max_body_bytes N] [--served_model_name NAME] [--drain_seconds 30]

`POST /v1/chat/completions` (streamed or not), `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus). Starlette routes, uvicorn serves, prometheus-client counts; the engine steps on its
own thread (`infer.continuous`) and hands each request's ids to its handler through an asyncio queue.
Bad requests get OpenAI's error body with status 400 (naming the field), 401 (wrong or missing key
with --api_key), 413 (body over --max_body_bytes), 429 (the waiting queue is full; Retry-After),
503 (shutting down, on a connection opened before). SIGTERM stops admitting (uvicorn stops
listening, so new connections are refused), lets running requests finish (at most --drain_seconds),
and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import sys
import time
from typing import Any

from absl import app, flags
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from infer import openai_api, rollout
from infer.continuous import ContinuousEngine, Draining, QueueFull, Request as EngineRequest, random_seed
from infer.openai_api import ApiError, ChatRequest, ReplyParser
from infer.rollout import Mode, Switch
from infer.sampling import prompt_think_open
from qwen3_jax.errors import DataError
from qwen3_jax.tokenizer import Tokenizer

log = logging.getLogger("infer.serve")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The server's Prometheus metrics, in their own registry (several apps may share a process)."""

    def __init__(self, engine: ContinuousEngine):
        self.registry = r = CollectorRegistry()
        Gauge("qwen3_requests_running", "Requests holding a cache row.", registry=r).set_function(lambda: engine.running)
        Gauge("qwen3_requests_waiting", "Requests queued for a cache row.", registry=r).set_function(lambda: engine.waiting)
        Gauge("qwen3_free_slots", "Cache rows free.", registry=r).set_function(lambda: engine.free_slots)
        Gauge("qwen3_generation_tokens_per_second", "Tokens generated per second over the last decode chunk.",
              registry=r).set_function(lambda: engine.tokens_per_second)
        self.tokens = Counter("qwen3_generation_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("qwen3_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.requests = Counter("qwen3_requests", "Requests answered, by HTTP status.", ["status"], registry=r)
        self.ttft = Histogram("qwen3_time_to_first_token_seconds", "From arrival to the first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("qwen3_inter_token_latency_seconds", "Between consecutive tokens of a reply "
                             "(a decode chunk's time over its tokens).", buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("qwen3_request_seconds", "From arrival to the last token.", buckets=LATENCY_BUCKETS,
                             registry=r)


@dataclasses.dataclass
class ServerState:
    engine: ContinuousEngine
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None
    max_body_bytes: int
    metrics: Metrics


@dataclasses.dataclass
class _Choice:
    """One choice's engine request and reply parser, and what its handler has seen of it."""

    request: EngineRequest
    parser: ReplyParser
    tokens: int = 0
    last_id: int | None = None
    finish: str | None = None


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _body(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the body has {length} bytes; the limit is {limit}", type="request_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise ApiError(413, f"the body exceeds the limit of {limit} bytes", type="request_too_large")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from e


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # The scheme is case-insensitive (RFC 9110, section 11.1); the key is compared in constant time.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
        raise ApiError(401, "a missing or wrong API key (send 'Authorization: Bearer KEY')",
                       type="authentication_error")


def _prompt(state: ServerState, req: ChatRequest) -> tuple[list[int], int]:
    """(prompt ids, max new tokens), checked against the context."""
    try:
        prompt = rollout.render_prompt(state.tokenizer, req.messages, Mode.THINK if req.enable_thinking
                                       else Mode.NO_THINK, Switch.HARD, tools=req.tools)
    except DataError as e:
        raise openai_api.bad("messages", str(e)) from e
    context = state.engine.context
    if len(prompt) >= context:
        raise openai_api.bad("messages", f"the prompt has {len(prompt)} tokens; the context holds {context}, "
                             "with room for at least one new token")
    room = context - len(prompt)
    if req.max_tokens is not None and req.max_tokens > room:
        raise openai_api.bad("max_tokens", f"{req.max_tokens} new tokens after a {len(prompt)}-token prompt exceed the "
                             f"context of {context} (at most {room})")
    return prompt, req.max_tokens or room


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.server
    arrival = time.perf_counter()
    try:
        _authorize(state, request)
        req = openai_api.parse_chat_request(await _body(request, state.max_body_bytes))
        prompt, max_new = _prompt(state, req)
        choices, queue = _submit(state, req, prompt, max_new)
    except ApiError as e:
        state.metrics.requests.labels(str(e.status)).inc()
        log.info("request rejected status=%d param=%s: %s", e.status, e.param, e.message)
        return _error(e)
    state.metrics.prompt_tokens.inc(len(prompt))
    rid = openai_api.completion_id()
    run = _Run(state, rid, req, prompt, choices, queue, arrival)
    if req.stream:
        return StreamingResponse(run.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await run.complete(request)


def _submit(state: ServerState, req: ChatRequest, prompt: list[int], max_new: int):
    """Queues the request's `n` choices; all or none (429 when the queue has no room for all)."""
    if req.n > state.engine.max_queue:  # a 429 would have the client retry what can never fit
        raise openai_api.bad("n", f"{req.n} choices cannot all wait in a queue of {state.engine.max_queue} "
                             "(the server's --max_queue)")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tok = state.tokenizer
    in_think = bool(prompt_think_open(prompt, think_id=tok.think_id or -1, end_think_id=tok.end_think_id or -1,
                                      turn_start_id=tok.token_to_id("<|im_start|>") or -1))
    budget = req.thinking_budget if req.mode is Mode.THINK else None
    choices = []
    for i in range(req.n):
        def on_tokens(ids, forced, done, i=i):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, ids, done, time.perf_counter()))
            except RuntimeError:  # the event loop has closed: nobody is waiting for this row
                return True

        seed = random_seed() if req.seed is None else (req.seed + i) % 2**32
        engine_request = EngineRequest(prompt, max_new, on_tokens, req.sampling, budget, seed)
        parser = ReplyParser(lambda ids: tok.decode(ids, skip_special_tokens=True), think_id=tok.think_id or -1,
                             end_think_id=tok.end_think_id or -1, in_think=in_think, parse_tools=bool(req.tools),
                             stop=req.stop)
        choices.append(_Choice(engine_request, parser))
    try:
        for c in choices:
            state.engine.submit(c.request)
    except (QueueFull, Draining, ValueError) as e:
        for c in choices:
            state.engine.cancel(c.request)
        if isinstance(e, QueueFull):
            raise ApiError(429, f"the server is busy ({e}); retry later", type="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from e
        if isinstance(e, Draining):
            raise ApiError(503, "the server is shutting down", type="service_unavailable") from e
        raise ApiError(400, str(e)) from e
    return choices, queue


class _Run:
    """One request's choices from the engine's callbacks to the reply, streamed or whole."""

    def __init__(self, state: ServerState, rid: str, req: ChatRequest, prompt: list[int], choices: list[_Choice],
                 queue: asyncio.Queue, arrival: float):
        self.state, self.rid, self.req, self.prompt = state, rid, req, prompt
        self.choices, self.queue, self.arrival = choices, queue, arrival
        self.model = req.model or state.model_name
        self.first_token: float | None = None
        self.last_time: dict[int, float] = {}

    def _open(self) -> int:
        return sum(c.finish is None for c in self.choices)

    def _take(self, item) -> tuple[int, list[dict[str, Any]]]:
        """Parses one callback's ids into deltas; sets the choice's finish reason when it ends."""
        i, ids, done, t = item
        c = self.choices[i]
        if c.finish is not None:
            return i, []
        m = self.state.metrics
        if ids:
            m.tokens.inc(len(ids))
            if self.first_token is None:
                self.first_token = t
                m.ttft.observe(t - self.arrival)
            if i in self.last_time:
                per_token = (t - self.last_time[i]) / len(ids)
                for _ in ids:
                    m.itl.observe(per_token)
            self.last_time[i] = t
        if c.parser.stop:  # token by token, so that usage counts only the tokens up to the stop string
            deltas, used = [], 0
            while used < len(ids) and not c.parser.stopped:
                deltas += c.parser.feed(ids[used:used + 1])
                used += 1
        else:
            deltas, used = c.parser.feed(ids), len(ids)
        c.tokens += used
        c.last_id = ids[used - 1] if used else c.last_id
        if c.parser.stopped:
            self.state.engine.cancel(c.request)
            c.finish = "stop"
        elif done:
            c.finish = "stop" if c.last_id in self.state.tokenizer.eos_ids else "length"
        if c.finish is not None:
            deltas += c.parser.finish()
            if c.parser.tool_calls and c.finish == "stop":
                c.finish = "tool_calls"
        return i, deltas

    def _usage(self) -> dict[str, Any]:
        return openai_api.usage(len(self.prompt), sum(c.tokens for c in self.choices),
                                sum(c.parser.reasoning_tokens for c in self.choices))

    def _log(self, status: int) -> None:
        self.state.metrics.requests.labels(str(status)).inc()
        seconds = time.perf_counter() - self.arrival
        self.state.metrics.e2e.observe(seconds)
        u = self._usage()
        log.info("%s status=%d prompt_tokens=%d completion_tokens=%d reasoning_tokens=%d seconds=%.3f finish=%s",
                 self.rid, status, u["prompt_tokens"], u["completion_tokens"],
                 u["completion_tokens_details"]["reasoning_tokens"], seconds,
                 ",".join(str(c.finish) for c in self.choices))

    def _failed(self) -> ApiError | None:
        """A 500 when the engine ended a choice by a failed step (its reply would be cut short)."""
        if any(c.request.failed for c in self.choices):
            return ApiError(500, "a decode step failed; this reply is incomplete (see the server's log)",
                            type="server_error")
        return None

    def _cancel(self) -> None:
        for c in self.choices:
            if c.finish is None:
                self.state.engine.cancel(c.request)

    def _cancel_all(self) -> None:
        """Ends every open choice (after a failure: no later 499 for them)."""
        self._cancel()
        for c in self.choices:
            c.finish = c.finish or "error"

    async def complete(self, request: Request) -> Response:
        deltas: list[list[dict[str, Any]]] = [[] for _ in self.choices]
        try:
            while self._open():
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    item = None
                # Checked at each decode chunk's tokens too: a reply that keeps coming must not hide
                # that its client has gone (its row would decode to the end).
                if await request.is_disconnected():
                    self._cancel()
                    self._log(499)
                    return Response(status_code=499)
                if item is None:
                    continue
                i, new = self._take(item)
                deltas[i] += new
        except asyncio.CancelledError:
            self._cancel()
            raise
        failed = self._failed()
        if failed:
            self._cancel_all()
            self._log(failed.status)
            return _error(failed)
        choices = [{"index": i, "message": openai_api.merge_deltas(d), "finish_reason": c.finish, "logprobs": None}
                   for i, (d, c) in enumerate(zip(deltas, self.choices))]
        self._log(200)
        return JSONResponse(openai_api.completion_body(self.rid, self.model, choices, self._usage()))

    async def stream(self):
        created = int(time.time())

        def event(choices, usage=None) -> str:
            body = openai_api.chunk_body(self.rid, self.model, created, choices, usage)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(len(self.choices))])
            while self._open():
                i, deltas = self._take(await self.queue.get())
                for d in deltas:
                    yield event([{"index": i, "delta": d, "finish_reason": None}])
                failed = self._failed()
                if failed:  # the status line has gone: the error travels as an event, as vLLM's does
                    self._cancel_all()
                    yield f"data: {json.dumps(failed.body())}\n\ndata: [DONE]\n\n"
                    self._log(failed.status)
                    return
                if self.choices[i].finish is not None:
                    yield event([{"index": i, "delta": {}, "finish_reason": self.choices[i].finish}])
            if self.req.include_usage:
                yield event([], self._usage())
            yield "data: [DONE]\n\n"
            self._log(200)
        finally:  # the client went away (the task is cancelled) or the reply ended
            if self._open():
                self._cancel()
                self._log(499)


def _server(request: Request) -> ServerState:
    return request.app.state.server


async def models(request: Request) -> Response:
    state = _server(request)
    try:
        _authorize(state, request)
    except ApiError as e:
        return _error(e)
    return JSONResponse({"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": 0, "owned_by": "qwen3-jax",
        "max_model_len": state.engine.context}]})


async def health(request: Request) -> Response:
    engine = _server(request).engine
    if engine.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ok", "running": engine.running, "waiting": engine.waiting,
                         "free_slots": engine.free_slots})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error")
    _server(request).metrics.requests.labels("500").inc()
    return _error(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (an unknown path, a wrong method) in OpenAI's error body."""
    return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                           headers=exc.headers))


def make_app(engine: ContinuousEngine, tokenizer: Tokenizer, *, model_name: str, api_key: str | None = None,
             max_body_bytes: int = 4 << 20) -> Starlette:
    """The ASGI app; its lifespan starts the engine's thread and, on shutdown, drains and stops it."""
    state = ServerState(engine, tokenizer, model_name, api_key, max_body_bytes, Metrics(engine))

    @contextlib.asynccontextmanager
    async def lifespan(_):
        engine.start()
        try:
            yield
        finally:
            engine.drain()
            engine.stop()

    application = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={Exception: _unexpected, HTTPException: _http_error}, lifespan=lifespan)
    application.state.server = state
    return application


# ---------------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
    from infer import cli_common

    cli_common.define_checkpoint_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback unless told otherwise).")
    flags.DEFINE_integer("port", 8000, "Port to bind.")
    flags.DEFINE_integer("slots", 16, "Requests decoded together (KV-cache rows).")
    flags.DEFINE_integer("max_len", None, "Positions per request, prompt + reply (default: the model's context).")
    flags.DEFINE_integer("decode_chunk", 8, "Decode steps between admissions of new requests.")
    flags.DEFINE_integer("max_queue", 256, "Requests that may wait for a row; past it, 429.")
    flags.DEFINE_integer("max_body_bytes", 4 << 20, "Largest request body; past it, 413.")
    flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' on /v1/ routes.")
    flags.DEFINE_string("served_model_name", None, "The model id replies carry (default: the checkpoint path).")
    flags.DEFINE_float("drain_seconds", 30.0, "On SIGTERM, how long running requests may take to finish.")


def _uvicorn_server(config, engine: ContinuousEngine):
    """A uvicorn.Server whose signal handling first stops the engine admitting (new requests get 503)
    and exits 0 after a SIGTERM's graceful shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.drain()
            if sig != signal.SIGTERM:
                return super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal after shutting down (exit status -15); a SIGTERM
            # is a requested stop, so drain and exit 0. A second one stops without waiting.
            self.force_exit = self.should_exit
            self.should_exit = True

    return Server(config)


def main(argv: list[str]) -> None:
    del argv
    import uvicorn

    from infer import cli_common

    handler = logging.StreamHandler(sys.stderr)  # absl's root handler shows warnings only
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    engine, tokenizer = cli_common.load()
    try:
        continuous = ContinuousEngine(engine, slots=FLAGS.slots, max_len=FLAGS.max_len, chunk=FLAGS.decode_chunk,
                                      max_queue=FLAGS.max_queue, stop_token_ids=tokenizer.eos_ids)
    except ValueError as e:
        sys.exit(f"error: {e}")
    application = make_app(continuous, tokenizer, model_name=FLAGS.served_model_name or FLAGS.checkpoint,
                           api_key=FLAGS.api_key, max_body_bytes=FLAGS.max_body_bytes)
    config = uvicorn.Config(application, host=FLAGS.host, port=FLAGS.port, log_level="warning",
                            timeout_graceful_shutdown=FLAGS.drain_seconds)
    mesh = "one device" if engine.mesh is None else f"mesh {dict(engine.mesh.shape)}"
    log.info("serving %s on http://%s:%d/v1 (%d slots, context %d, %s)", FLAGS.checkpoint, FLAGS.host, FLAGS.port,
             continuous.slots, continuous.context, mesh)
    _uvicorn_server(config, continuous).run()


if __name__ == "__main__":
    define_flags()
    app.run(main)
