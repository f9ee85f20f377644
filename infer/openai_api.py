"""OpenAI chat-completions protocol: request validation, reply parsing, response and chunk bodies.

Pure functions and small classes with no server in them (`infer.serve` wires them to HTTP), so
each rule is tested without a socket. Field names and formats follow OpenAI's chat completions API;
`reasoning_content` (and the same text as `reasoning`, vLLM's newer name), `thinking_budget`,
`top_k`, `min_p` and `chat_template_kwargs` are the extensions vLLM and SGLang clients already send.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from infer import checks
from infer.rollout import Mode, mode_of, mode_sampling
from infer.text import IncrementalDecoder
from qwen3_jax import chat

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_N = 16
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


class ApiError(Exception):
    """An error reply: HTTP `status`, OpenAI's error `type`, and `param`, the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": None}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param)


# ------------------------------------------------------------------------------------ requests


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request. `sampling` holds Qwen's settings for `mode` with the
    request's overrides on top; `max_tokens` None means up to the context."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    mode: Mode
    enable_thinking: bool
    sampling: dict[str, float]
    max_tokens: int | None
    thinking_budget: int | None
    seed: int | None
    stop: list[str]
    n: int
    stream: bool
    include_usage: bool
    model: str | None


def _number(body: Mapping, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"must be a number, got {json.dumps(value)[:80]}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise bad(name, f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}")
    return float(value)


def _int(body: Mapping, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not checks.is_int(value):
        raise bad(name, f"must be an integer, got {json.dumps(value)[:80]}")
    if value < low or (high is not None and value > high):
        raise bad(name, f"must be an integer >= {low}" + (f" and <= {high}" if high is not None else "") + f", got {value}")
    return int(value)


def _bool(body: Mapping, name: str, default: bool, where: str | None = None) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(where or name, f"must be true or false, got {json.dumps(value)[:80]}")
    return value


def _content(value: Any, where: str) -> str | None:
    """A message's content: a string, null, or a list of text parts (joined)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where}.content", f"must be a string or a list of text parts, got {type(value).__name__}")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise bad(where, f"must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in chat.ROLES:
            raise bad(f"{where}.role", f"must be one of {list(chat.ROLES)} (or developer), got {json.dumps(role)[:80]}")
        message = {"role": role, "content": _content(m.get("content"), where)}
        if role == "assistant":
            for key in ("reasoning_content", "reasoning"):
                if m.get(key) is not None and not isinstance(m[key], str):
                    raise bad(f"{where}.{key}", f"must be a string or null, got {type(m[key]).__name__}")
                if isinstance(m.get(key), str):
                    message["reasoning_content"] = m[key]
            if m.get("tool_calls") is not None:
                message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        if message["content"] is None and not message.get("tool_calls"):
            raise bad(f"{where}.content", "must be a string")
        out.append(message)
    return out


def _tool_calls(value: Any, where: str) -> list[Any]:
    """An assistant message's earlier tool calls: each {"function": {"name": str, "arguments": a
    JSON object, or a string holding one}}, as the chat template renders them."""
    if not isinstance(value, list):
        raise bad(where, f"must be a list of tool calls, got {type(value).__name__}")
    for j, call in enumerate(value):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise bad(f"{where}[{j}]", "must be {\"function\": {\"name\": ..., \"arguments\": ...}}")
        args = function.get("arguments", {})
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, Mapping):
            raise bad(f"{where}[{j}].function.arguments", "must be a JSON object or a string holding one")
    return value


def _tools(body: Mapping) -> list[dict[str, Any]] | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice", "only \"auto\" and \"none\" are supported")
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list):
        raise bad("tools", "must be a list of tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), Mapping) or not isinstance(tool["function"].get("name"), str):
            raise bad(f"tools[{i}]", "must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}")
        if not isinstance(tool["function"].get("parameters", {}), Mapping):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON Schema object")
    return [dict(t) for t in tools] or None


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them")
    return list(stops)


def _unpaired_surrogate(value: Any, where: str) -> str | None:
    """The first field under `value` whose text holds a lone UTF-16 surrogate (JSON lets "\\ud800"
    through; no tokenizer can encode it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(value, Mapping):
        for k, v in value.items():
            if _unpaired_surrogate(k, where) is not None:  # the key itself: name the object holding it
                return where or "body"
            found = _unpaired_surrogate(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _unpaired_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def parse_chat_request(body: Any) -> ChatRequest:
    """Validates a decoded JSON body. Raises ApiError (400) naming the first field at fault;
    unknown fields are ignored, as OpenAI-compatible servers do."""
    if not isinstance(body, Mapping):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    where = _unpaired_surrogate(body, "")
    if where:
        raise bad(where, "holds an unpaired UTF-16 surrogate (a lone \\ud800-\\udfff escape), which is not Unicode text")
    messages = _messages(body.get("messages"))
    tools = _tools(body)
    try:
        chat.validate_messages(messages, tools)
    except ValueError as e:
        raise bad("messages", str(e)) from e
    if messages[-1]["role"] == "assistant":
        raise bad("messages", "must not end with an assistant message (the reply is that turn)")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise bad("chat_template_kwargs", "must be an object")
    enable_thinking = _bool(kwargs, "enable_thinking", True, "chat_template_kwargs.enable_thinking")
    mode = mode_of(messages, enable_thinking)

    overrides = {
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1, low_open=True),
        "min_p": _number(body, "min_p", 0, 1, high_open=True),
        "presence_penalty": _number(body, "presence_penalty", -2, 2),
    }
    top_k = _int(body, "top_k", -1, checks.MAX_INT32)
    overrides["top_k"] = None if top_k is None else max(top_k, 0)  # vLLM spells "off" as -1
    for name in ("frequency_penalty", "repetition_penalty"):
        if body.get(name) not in (None, 0, 0.0, 1.0 if name == "repetition_penalty" else 0):
            raise bad(name, "is not supported (use presence_penalty)")
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs", "is not supported")
    sampling = mode_sampling(mode, {k: v for k, v in overrides.items() if v is not None})

    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad("stream_options", "must be an object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", "must be a string")
    return ChatRequest(
        messages=messages, tools=tools, mode=mode, enable_thinking=enable_thinking, sampling=sampling,
        max_tokens=max_tokens, thinking_budget=_int(body, "thinking_budget", 0, checks.MAX_INT32), seed=None if seed is None else seed % 2**32,
        stop=_stop(body.get("stop")), n=_int(body, "n", 1, MAX_N) or 1, stream=_bool(body, "stream", False),
        include_usage=_bool(options, "include_usage", False, "stream_options.include_usage"), model=model,
    )


# --------------------------------------------------------------------------------------- replies


class _Part:
    """One channel's text with newlines trimmed at both ends, as it streams: leading newlines are
    dropped and trailing ones held until more text follows (`chat.parse_completion` strips both)."""

    def __init__(self):
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        body = text.rstrip("\n")
        if not body:
            self.held += text
            return ""
        out = self.held + body
        self.held = text[len(body):]
        return out

    def reset(self) -> None:
        self.started, self.held = False, ""


class ReplyParser:
    """Turns a reply's ids, as they stream, into OpenAI deltas: thinking, answer and tool calls apart.

    Ids inside a <think> block (from `in_think`, whether the prompt left one open, and the reply's own
    <think> / </think> ids, which are not shown) are thinking; the rest is the answer. Each block's and
    each answer stretch's text is trimmed of newlines at both ends. With `parse_tools`, each
    `<tool_call>{"name": ..., "arguments": ...}</tool_call>` in the answer becomes a tool call (one
    that is not that JSON stays answer text). `stop` strings end the answer before them (`stopped`);
    they apply to the answer only, so a stop string in the thinking does not end a reply before its
    answer. Non-streamed replies are the concatenation of the same deltas, so both agree exactly.
    """

    def __init__(self, decode: Callable[[list[int]], str], *, think_id: int, end_think_id: int, in_think: bool,
                 parse_tools: bool = False, stop: Sequence[str] = ()):
        self.decode, self.think_id, self.end_think_id = decode, think_id, end_think_id
        self.in_think, self.parse_tools, self.stop = in_think, parse_tools, list(stop)
        self.decoder = IncrementalDecoder(decode)
        self.parts = {True: _Part(), False: _Part()}
        self.pending = ""  # answer text held for a stop string or a tool call that may be starting
        self.stopped = False
        self.tool_calls = 0
        self.reasoning_tokens = 0

    def feed(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        run: list[int] = []
        for i in ids:
            if self.stopped:
                break
            if i in (self.think_id, self.end_think_id):
                self._text(self.decoder.feed(run) + self.decoder.flush(), out)
                run = []
                self.reasoning_tokens += 1
                if self.in_think != (i == self.think_id):
                    if not self.in_think:  # the answer stretch ends: nothing more can complete a marker
                        self._answer(self.pending, out, final=True)
                        self.pending = ""
                    self.in_think = i == self.think_id
                    for part in self.parts.values():  # each block and answer stretch trims its own newlines
                        part.reset()
                continue
            self.reasoning_tokens += self.in_think
            run.append(i)
        if run and not self.stopped:
            self._text(self.decoder.feed(run), out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.stopped:
            self._text(self.decoder.flush(), out)
            if not self.in_think:
                self._answer(self.pending, out, final=True)
                self.pending = ""
        return out

    def _text(self, text: str, out: list) -> None:
        if not text:
            return
        if self.in_think:
            piece = self.parts[True].feed(text)
            if piece:
                out.append({"reasoning_content": piece, "reasoning": piece})
        else:
            self._answer(self.pending + text, out, final=False)

    def _answer(self, text: str, out: list, final: bool) -> None:
        """Emits answer text, holding back what a stop string or a tool call may still claim."""
        # The newlines before an answer are trimmed (below), so no stop string may match them.
        text = text if self.parts[False].started else text.lstrip("\n")
        for s in self.stop:
            k = text.find(s)
            if k >= 0:
                text, final, self.stopped = text[:k], True, True
        while self.parse_tools:
            k = text.find(TOOL_OPEN)
            if k < 0:
                break
            end = text.find(TOOL_CLOSE, k)
            if end < 0:
                if final:
                    break
                self._content(text[:k], out)
                self.pending = text[k:]
                return
            call = _tool_call(text[k + len(TOOL_OPEN): end], self.tool_calls)
            if call is None:  # not a call: answer text as written
                self._content(text[: end + len(TOOL_CLOSE)], out)
            else:
                self._content(text[:k], out)
                out.append({"tool_calls": [call]})
                self.tool_calls += 1
            text = text[end + len(TOOL_CLOSE):]
        hold = 0 if final else _held(text, self.stop + ([TOOL_OPEN] if self.parse_tools else []))
        self._content(text[: len(text) - hold], out)
        self.pending = text[len(text) - hold:]

    def _content(self, text: str, out: list) -> None:
        piece = self.parts[False].feed(text)
        if piece:
            out.append({"content": piece})


def _held(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `markers`."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if m.startswith(text[-n:]):
                best = n
                break
    return best


def _tool_call(text: str, index: int) -> dict[str, Any] | None:
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def merge_deltas(deltas: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The non-streamed message of a reply's deltas: texts concatenated, tool calls listed."""
    message: dict[str, Any] = {"role": "assistant", "content": "", "reasoning_content": "", "reasoning": ""}
    calls = []
    for d in deltas:
        for key in ("content", "reasoning_content", "reasoning"):
            message[key] += d.get(key, "")
        for c in d.get("tool_calls", ()):
            calls.append({k: v for k, v in c.items() if k != "index"})
    if calls:
        message["tool_calls"] = calls
    if not message["reasoning_content"]:
        message["reasoning_content"] = message["reasoning"] = None
    return message


# -------------------------------------------------------------------------------------- bodies


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def completion_body(id: str, model: str, choices: list[dict[str, Any]], usage_: dict[str, Any]) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chunk_body(id: str, model: str, created: int, choices: list[dict[str, Any]],
               usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
