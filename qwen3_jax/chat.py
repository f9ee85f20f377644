"""Qwen3 ChatML: the one place that turns messages into prompt/training text and parses replies.

`render` reproduces the official hybrid-thinking Qwen3 `chat_template` character for character.
Messages use the OpenAI/HF shape: {"role": "system" | "user" | "assistant" | "tool", "content": str,
"reasoning_content": str (assistant, optional; else inline <think>...</think>),
"tool_calls": [{"function": {"name": str, "arguments": dict | str}}] (assistant, optional)}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from qwen3_jax.ids import END_THINK_TEXT, THINK_TEXT

if TYPE_CHECKING:  # only for annotations: rendering and text parsing need no tokenizer
    from qwen3_jax.tokenizer import Tokenizer

Message = Mapping[str, Any]

ROLES = ("system", "user", "assistant", "tool")
ASSISTANT_HEADER = "<|im_start|>assistant\n"
EMPTY_THINK_BLOCK = "<think>\n\n</think>\n\n"
_TRAILING_STOP_MARKERS = re.compile(r"(?:<\|im_end\|>|<\|endoftext\|>)+\Z")

_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)


def render(
    messages: Sequence[Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
) -> str:
    """Render a conversation exactly as the official Qwen3 chat template does.

    `enable_thinking=False` appends the empty think block after the generation prompt (Qwen's
    hard switch); otherwise the model opens its own ``<think>``. ``/think`` and ``/no_think`` are
    ordinary text (soft switches the model was trained to follow). Thinking of assistant turns
    before the last real user query is dropped, as in the template.

    Raises ValueError naming the message index for an unknown role or missing content.
    """
    text = "".join(part for part, _ in _segments(messages, tools))
    if add_generation_prompt:
        text += ASSISTANT_HEADER + ("" if enable_thinking else EMPTY_THINK_BLOCK)
    return text


def render_for_training(
    messages: Sequence[Message], *, tools: Sequence[Mapping[str, Any]] | None = None
) -> list[tuple[str, bool]]:
    """`render(messages)` as consecutive ``(text, trained)`` segments for the SFT loss mask.

    Only the final message, which must be an assistant turn, is trained: its think block
    (``<think>\\n...\\n</think>\\n\\n``, or the empty block for a sample without reasoning, which
    is how Qwen3's non-thinking samples look), content, tool calls and the closing
    ``<|im_end|>``. The ``<|im_start|>assistant\\n`` header and the ``\\n`` after ``<|im_end|>``
    are not trained.

    Earlier assistant turns are context only: the template drops the thinking of turns before the
    last user query, so they do not look like what the model generated at the time (the template
    is not prefix-preserving). Intermediate tool-call turns after the last query are context too,
    so each sample has exactly one target. To train several turns of one conversation, make one
    sample per turn by truncating the messages after each target assistant turn.
    """
    segments = _segments(messages, tools, train_last=True)  # validates the messages
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"a training conversation must end with an assistant turn (the turn the loss covers), but its last "
            f"message is a {messages[-1]['role']} message"
        )
    merged: list[tuple[str, bool]] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        elif text:
            merged.append((text, trained))
    return merged


THINK_FLAG, NO_THINK_FLAG = "/think", "/no_think"


def with_soft_switch(messages: Sequence[Message], thinking: bool) -> list[Any]:
    """A copy of `messages` whose last user message ends with `` /think`` or `` /no_think``.

    These are Qwen3's soft switches (report §4.3, Table 9): plain text in the user turn that a
    model trained with thinking-mode fusion obeys, the last flag of a conversation winning. A
    message that already ends with the flag is left as it is; entries that are not messages are
    copied untouched (`render` names them). Raises ValueError when there is no user message.
    """
    out = [dict(m) if isinstance(m, Mapping) else m for m in messages]
    users = [m for m in out if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("a soft switch goes in a user message, and the conversation has none")
    flag = THINK_FLAG if thinking else NO_THINK_FLAG
    last = users[-1]
    if isinstance(last.get("content"), str) and not last["content"].rstrip().endswith(flag):
        last["content"] += " " + flag
    return out


def parse_completion(text: str) -> tuple[str, str]:
    """Split generated assistant text into ``(thinking, answer)``.

    - With ``</think>``: split at the LAST one (like Qwen's own parsing); a leading ``<think>`` is
      removed from the thinking, and both parts are stripped of surrounding newlines.
    - No ``</think>`` but the text starts with ``<think>``: generation stopped mid-thought (for
      example at a token limit), so everything after ``<think>`` is unfinished thinking and the
      answer is "".
    - Otherwise there is no thinking and the whole text is the answer.

    Trailing ``<|im_end|>``/``<|endoftext|>`` (text decoded with special tokens) are removed.
    """
    text = _strip_stop_markers(text)
    before, sep, after = text.rpartition(END_THINK_TEXT)
    if sep:
        return _clean_thinking(before), after.strip("\n")
    return _split_without_end_think(text)


def parse_completion_ids(ids: Sequence[int], tokenizer: Tokenizer) -> tuple[str, str]:
    """`parse_completion` on generated ids, splitting at the last ``</think>`` id (`ids.END_THINK_ID`).

    Splitting on ids rather than text does not depend on how the model spelled other text; the
    parts are decoded with special tokens skipped (``<|im_end|>`` goes, ``<think>`` stays).
    Raises ValueError for an id that is not an integer in [0, 2**32) (see `Tokenizer.decode`).
    """
    ids = list(ids)  # Tokenizer.decode checks them
    end = tokenizer.end_think_id
    if end is not None and end in ids:
        k = len(ids) - 1 - ids[::-1].index(end)
        thinking = tokenizer.decode(ids[:k], skip_special_tokens=True)
        answer = tokenizer.decode(ids[k + 1 :], skip_special_tokens=True)
        return _clean_thinking(thinking), answer.strip("\n")
    return _split_without_end_think(tokenizer.decode(ids, skip_special_tokens=True))


# ---- rendering ----------------------------------------------------------------------------------


def _segments(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None, train_last: bool = False
) -> list[tuple[str, bool]]:
    """The template's output as ``(text, trained)`` pieces; `trained` only with `train_last`."""
    validate_messages(messages, tools)
    out: list[tuple[str, bool]] = []
    first = messages[0]
    if tools:
        system = first["content"] + "\n\n" if first["role"] == "system" else ""
        tool_lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
        out.append(("<|im_start|>system\n" + system + _TOOLS_HEADER + tool_lines + _TOOLS_FOOTER, False))
    elif first["role"] == "system":
        out.append(("<|im_start|>system\n" + first["content"] + "<|im_end|>\n", False))

    last_query = _last_query_index(messages)
    n = len(messages)
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user" or (role == "system" and i > 0):
            out.append((f"<|im_start|>{role}\n{message['content']}<|im_end|>\n", False))
        elif role == "assistant":
            trained = train_last and i == n - 1
            body = _assistant_body(message, after_query=i > last_query, is_last=i == n - 1)
            out += [(ASSISTANT_HEADER, False), (body + "<|im_end|>", trained), ("\n", False)]
        elif role == "tool":
            # Consecutive tool results share one user turn.
            opens = i == 0 or messages[i - 1]["role"] != "tool"
            closes = i == n - 1 or messages[i + 1]["role"] != "tool"
            text = ("<|im_start|>user" if opens else "") + "\n<tool_response>\n" + message["content"]
            out.append((text + "\n</tool_response>" + ("<|im_end|>\n" if closes else ""), False))
    return out


def _last_query_index(messages: Sequence[Message]) -> int:
    """Index of the last user message that is not a wrapped tool response (len-1 if none)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            content = messages[i]["content"]
            if not (content.startswith("<tool_response>") and content.endswith("</tool_response>")):
                return i
    return len(messages) - 1


def _assistant_body(message: Message, *, after_query: bool, is_last: bool) -> str:
    """Everything between ``<|im_start|>assistant\\n`` and ``<|im_end|>``."""
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if END_THINK_TEXT in content:
            reasoning = content.split(END_THINK_TEXT)[0].rstrip("\n").split(THINK_TEXT)[-1].lstrip("\n")
            content = content.split(END_THINK_TEXT)[-1].lstrip("\n")
    # Only turns after the last user query keep a think block: the current answer (always, so
    # a reply without reasoning gets the empty block) and multi-step tool-call turns with reasoning.
    if after_query and (is_last or reasoning):
        body = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
    else:
        body = content
    for j, call in enumerate(message.get("tool_calls") or ()):
        if j > 0 or content:
            body += "\n"
        fn = call.get("function") or call
        args = fn["arguments"]
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        body += '<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + args + "}\n</tool_call>"
    return body


def validate_messages(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Checks a conversation (and its tools) against what `render` needs; raises ValueError naming
    the message (by index) or tool and what is wrong: not a list of dicts, an unknown role, a
    missing or non-string content, a malformed tool call or tool."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message dicts")
    if not messages:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} is a {type(m).__name__}, expected a dict")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {ROLES}")
        content = m.get("content")
        tool_calls = m.get("tool_calls") if role == "assistant" else None
        # An assistant turn that only calls tools may have no content (OpenAI style: None).
        if not isinstance(content, str) and not (tool_calls and content is None):
            raise ValueError(f"message {i} ({role}) needs a string 'content', got {content!r}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"message {i} ({role}) has a non-string 'reasoning_content'")
        if tool_calls is not None and (isinstance(tool_calls, (str, Mapping)) or not isinstance(tool_calls, Sequence)):
            raise ValueError(f"message {i} 'tool_calls' must be a list, got {type(tool_calls).__name__}")
        for j, call in enumerate(tool_calls or ()):
            fn = (call.get("function") or call) if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
                raise ValueError(
                    f"message {i} tool call {j} needs "
                    "{'function': {'name': str, 'arguments': dict | str}}"
                )
    if tools is not None:
        if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
            raise ValueError(f"tools must be a list of dicts, got {type(tools).__name__}")
        for j, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise ValueError(f"tool {j} is a {type(tool).__name__}, expected a dict")


# ---- parsing ------------------------------------------------------------------------------------


def _strip_stop_markers(text: str) -> str:
    return _TRAILING_STOP_MARKERS.sub("", text)


def _clean_thinking(text: str) -> str:
    return text.strip("\n").removeprefix(THINK_TEXT).strip("\n")


def _split_without_end_think(text: str) -> tuple[str, str]:
    if text.lstrip("\n").startswith(THINK_TEXT):
        return _clean_thinking(text), ""
    return "", text.strip("\n")
