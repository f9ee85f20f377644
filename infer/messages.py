"""Message-level generation: chat rendering + the decode engine + completion parsing."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from infer import request
from infer.engine import Engine
from infer.sampling import NON_THINKING_SAMPLING, THINKING_SAMPLING
from qwen3_jax import chat
from qwen3_jax.tokenizer import Tokenizer

Message = dict[str, Any]


class Completion(NamedTuple):
    thinking: str
    answer: str
    token_ids: list[int]


def last_soft_switch(messages: Sequence[Message]) -> str | None:
    """'/think' or '/no_think' as the model would read it: the last flag in user/system text."""
    for message in reversed(messages):
        if message.get("role") not in ("user", "system"):
            continue
        content = message.get("content") or ""
        positions = {flag: content.rfind(flag) for flag in ("/think", "/no_think")}
        found = {f: p for f, p in positions.items() if p >= 0}
        if found:
            return max(found, key=found.get)
    return None


def sampling_defaults(messages: Sequence[Message], enable_thinking: bool) -> dict[str, float]:
    """Qwen's recommended settings for the mode the conversation asks for."""
    thinking = enable_thinking and last_soft_switch(messages) != "/no_think"
    return dict(THINKING_SAMPLING if thinking else NON_THINKING_SAMPLING)


def prompt_ids(tokenizer: Tokenizer, messages: Sequence[Message], *, enable_thinking: bool = True,
               tools: Sequence[dict] | None = None) -> list[int]:
    return tokenizer.encode(chat.render(messages, tools=tools, add_generation_prompt=True, enable_thinking=enable_thinking))


def complete(
    engine: Engine, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int,
    enable_thinking: bool = True, tools: Sequence[dict] | None = None, **kwargs,
) -> list[Completion]:
    """One completion per conversation; sampling defaults follow each batch's first conversation's mode.
    Raises RequestError / RequestTypeError (ValueErrors) for an empty or malformed list of
    conversations, naming the conversation, and what `Engine.stream` raises for other arguments."""
    conversations = request.non_empty_list(conversations, "conversations")
    prompts = []
    for i, messages in enumerate(conversations):
        try:
            prompts.append(prompt_ids(tokenizer, messages, enable_thinking=enable_thinking, tools=tools))
        except ValueError as e:  # the chat template's checks say what is wrong with the messages
            raise request.RequestError(f"conversation {i}: {e}") from e
    settings = {**sampling_defaults(conversations[0], enable_thinking), "stop_token_ids": tokenizer.eos_ids, **kwargs}
    outputs = engine.generate(prompts, max_new_tokens=max_new_tokens, **settings)
    return [Completion(*chat.parse_completion_ids(ids, tokenizer), ids) for ids in outputs]


def incremental_text(decode: Callable[[list[int]], str], chunks: Iterable[Sequence[int]]) -> Iterator[str]:
    """Yields the text of a growing id sequence, chunk by chunk; what it yields concatenates to
    `decode(all ids)` exactly.

    `decode` must decode like byte-level BPE (the bytes of the ids, invalid UTF-8 replaced by
    U+FFFD), as `Tokenizer.decode` does. A multi-byte character split across tokens decodes to one
    trailing U+FFFD until its last byte arrives, so one trailing U+FFFD is held back while more
    chunks may come; at the end everything is flushed, an unfinished character as U+FFFD. Decoding
    restarts after the last point where the text ended on a whole character, so a long reply costs
    about its length, not its length squared.
    """
    ids: list[int] = []
    start = 0  # ids[:start] are all shown and end on a character boundary
    shown = 0  # characters of decode(ids[start:]) already yielded
    for chunk in chunks:
        ids.extend(chunk)
        text = decode(ids[start:])
        ready = len(text) - text.endswith("\ufffd")
        if ready > shown:
            yield text[shown:ready]
            shown = ready
        if ready == len(text):
            start, shown = len(ids), 0
    rest = decode(ids[start:])[shown:]
    if rest:
        yield rest


def stream_text(
    engine: Engine, tokenizer: Tokenizer, messages: Sequence[Message], *, max_new_tokens: int,
    enable_thinking: bool = True, chunk: int = 8, **kwargs,
) -> Iterator[str]:
    """Yields the completion's text as it is produced (decoded in compiled chunks of `chunk` tokens).

    The pieces concatenate to `tokenizer.decode(ids, skip_special_tokens=True)` of the whole reply
    (see `incremental_text`).
    """
    prompt = prompt_ids(tokenizer, messages, enable_thinking=enable_thinking)
    settings = {**sampling_defaults(messages, enable_thinking), "stop_token_ids": tokenizer.eos_ids, **kwargs}
    chunks = (new[0] for new in engine.stream([prompt], max_new_tokens=max_new_tokens, chunk=chunk, **settings))
    yield from incremental_text(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), chunks)


def chat_turn(
    engine: Engine, tokenizer: Tokenizer, messages: Sequence[Message], *, max_new_tokens: int,
    write: Callable[[str], Any] | None = None, **kwargs,
) -> Message:
    """Streams the assistant's reply to `messages` through `write` and returns it as the message
    to append to the history: the answer as content, the thinking as reasoning_content (the chat
    template drops it from earlier turns when rendering). `kwargs` go to `stream_text`."""
    text = ""
    for piece in stream_text(engine, tokenizer, messages, max_new_tokens=max_new_tokens, **kwargs):
        text += piece
        if write is not None:
            write(piece)
    thinking, answer = chat.parse_completion(text)
    return {"role": "assistant", "content": answer, "reasoning_content": thinking}
