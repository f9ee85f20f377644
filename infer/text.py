"""Text in, text out: a chat-rendered prompt through the engine to a parsed or streamed reply.

Built on `infer.rollout`: the hard switch is `enable_thinking`; a conversation's sampling defaults
and thinking budget follow the mode it asks for (`rollout.mode_of`: the hard switch, then its last
soft switch).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

from infer import checks, rollout
from infer.engine import Engine
from infer.rollout import Completion, Message, Mode, Switch
from qwen3_jax import chat
from qwen3_jax.errors import DataError, RequestError
from qwen3_jax.tokenizer import Tokenizer


def _prompt(tokenizer: Tokenizer, messages: Sequence[Message], enable_thinking: bool,
            tools: Sequence[dict] | None = None) -> list[int]:
    mode = Mode.THINK if enable_thinking else Mode.NO_THINK
    return rollout.render_prompt(tokenizer, messages, mode, Switch.HARD, tools=tools)


def complete(
    engine: Engine, tokenizer: Tokenizer, conversations: Sequence[Sequence[Message]], *, max_new_tokens: int,
    enable_thinking: bool = True, tools: Sequence[dict] | None = None, thinking_budget: int | None = None,
    seed: int | Sequence[int] = 0, stop_token_ids: Sequence[int] | None = None, **sampling: float,
) -> list[Completion]:
    """One `rollout.Completion` per conversation, generated in one engine call.

    `sampling` (temperature, top_k, top_p, min_p, presence_penalty) overrides each conversation's
    mode defaults; `thinking_budget` applies to conversations in thinking mode.

    Raises:
      RequestError: an empty or malformed list of conversations (naming the conversation), and
        what `Engine.generate` raises for the other arguments.
    """
    conversations = checks.non_empty_list(conversations, "conversations")
    prompts = []
    for i, messages in enumerate(conversations):
        try:
            prompts.append(_prompt(tokenizer, messages, enable_thinking, tools))
        except DataError as e:
            raise RequestError(f"conversation {i}: {e}") from e
    return rollout.generate_chat(
        engine, tokenizer, prompts, [rollout.mode_of(m, enable_thinking) for m in conversations],
        max_new_tokens=max_new_tokens, thinking_budget=thinking_budget, sampling=sampling, seed=seed,
        stop_token_ids=stop_token_ids,
    )


class IncrementalDecoder:
    """Text of a growing id sequence, piece by piece: what `feed` and `flush` return concatenates to
    `decode(all ids)` exactly.

    `decode` must decode like byte-level BPE (the bytes of the ids, invalid UTF-8 replaced by
    U+FFFD), as `Tokenizer.decode` does. A multi-byte character split across tokens decodes to one
    trailing U+FFFD until its last byte arrives, so one trailing U+FFFD is held back until `flush`,
    which gives an unfinished character as U+FFFD. Decoding restarts after the last point where the
    text ended on a whole character, so a long reply costs about its length, not its length squared.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.start = 0  # ids[:start] are all shown and end on a character boundary
        self.shown = 0  # characters of decode(ids[start:]) already returned

    def feed(self, ids: Sequence[int]) -> str:
        """The new text `ids` completes (possibly empty)."""
        self.ids.extend(ids)
        text = self.decode(self.ids[self.start:])
        ready = len(text) - text.endswith("\ufffd")
        piece = text[self.shown:ready] if ready > self.shown else ""
        self.shown = max(self.shown, ready)
        if ready == len(text):
            self.start, self.shown = len(self.ids), 0
        return piece

    def flush(self) -> str:
        """The text held back, an unfinished character as U+FFFD."""
        rest = self.decode(self.ids[self.start:])[self.shown:]
        self.start, self.shown = len(self.ids), 0
        return rest


def incremental_text(decode: Callable[[list[int]], str], chunks: Iterable[Sequence[int]]) -> Iterator[str]:
    """Yields the text of a growing id sequence, chunk by chunk (`IncrementalDecoder`); what it
    yields concatenates to `decode(all ids)` exactly."""
    decoder = IncrementalDecoder(decode)
    for chunk in chunks:
        piece = decoder.feed(chunk)
        if piece:
            yield piece
    rest = decoder.flush()
    if rest:
        yield rest


def stream_text(
    engine: Engine, tokenizer: Tokenizer, messages: Sequence[Message], *, max_new_tokens: int,
    enable_thinking: bool = True, thinking_budget: int | None = None, seed: int = 0,
    stop_token_ids: Sequence[int] | None = None, chunk: int = 8, **sampling: float,
) -> Iterator[str]:
    """Yields the reply's text as it is produced (decoded in compiled chunks of `chunk` tokens).

    The pieces concatenate to `tokenizer.decode(ids, skip_special_tokens=True)` of the whole reply
    (see `incremental_text`). Arguments as `complete`'s; raises as it does.
    """
    try:
        prompt = _prompt(tokenizer, messages, enable_thinking)
    except DataError as e:
        raise RequestError(str(e)) from e
    mode = rollout.mode_of(messages, enable_thinking)
    chunks = (new[0] for new in engine.stream(
        [prompt], max_new_tokens=max_new_tokens, chunk=chunk, seed=seed,
        thinking_budget=thinking_budget if mode is Mode.THINK else None,
        stop_token_ids=tokenizer.eos_ids if stop_token_ids is None else stop_token_ids,
        **rollout.mode_sampling(mode, sampling),
    ))
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
