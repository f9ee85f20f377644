"""Records -> documents {tokens, targets, loss_mask} (each [n]), and the policy for records that cannot be used.

Text: `encode(text) + [<|endoftext|>]`, loss on every token. Chat (SFT): the segments of
`qwen3_jax.chat.render_for_training`, tokenised one by one, loss on the final assistant turn; a
conversation longer than seq_len is a bad record, never cut.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from qwen3_jax.chat import render_for_training, validate_messages
from qwen3_jax.errors import DataError
from qwen3_jax.tokenizer import Tokenizer
from train.data.config import ON_BAD_RECORD
from train.schema import need

log = logging.getLogger(__name__)


def document(ids: Sequence[int], trained: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """Next-token targets within the document; the last position has no target (mask 0).
    `trained[i]`: whether the loss covers token i (None: every token)."""
    tokens_n = np.asarray(ids, np.int32)
    targets_n = np.zeros_like(tokens_n)
    targets_n[:-1] = tokens_n[1:]
    # The loss at position i trains targets[i] = tokens[i + 1]: it follows that token's flag.
    trained_n = np.ones(len(tokens_n), bool) if trained is None else np.asarray(trained, bool)
    loss_mask_n = np.zeros(len(tokens_n), np.float32)
    loss_mask_n[:-1] = trained_n[1:]
    return {"tokens": tokens_n, "targets": targets_n, "loss_mask": loss_mask_n}


class BadRecords:
    """What a pipeline does with bad records and empty files (`on_bad_record`), and what it met.

    'error': the first one raises its DataError (at the `next()` that reaches it). 'skip': each
    is left out, logged (the first `LOGGED` records by file and line, then every thousandth) and
    counted: `count` records so far (carried over a resume by `DataStream`), `empty_files`.
    A bad record is counted each time the iterator reads it (once per epoch); reading runs ahead
    of the batches by the packing buffer, and a resumed run counts again the few records it
    re-reads to rebuild a partly packed row.
    """

    LOGGED = 10

    def __init__(self, policy: str = "error"):
        need(policy in ON_BAD_RECORD, f"on_bad_record must be one of {ON_BAD_RECORD}, got {policy!r}")
        self.policy = policy
        self.count = 0
        self.empty_files: list[str] = []

    def empty_file(self, path: str) -> None:
        """Raises DataError naming `path` under 'error'; logs and records it under 'skip'."""
        error = DataError(f"{path}: the file holds no records")
        if self.policy == "error":
            raise error
        log.warning("skipping an empty data file: %s", error)
        self.empty_files.append(path)

    def passes(self, item: Any) -> bool:
        """A filter over converted records: False for (and counts) a skipped bad one; raises its
        DataError under 'error'."""
        if not isinstance(item, _Bad):
            return True
        if self.policy == "error":
            raise item.error
        self.count += 1
        if self.count <= self.LOGGED or self.count % 1000 == 0:
            log.warning("skipping bad record %d: %s", self.count, item.error)
        return False

    def summary(self) -> str:
        files = f" and {len(self.empty_files)} empty files" if self.empty_files else ""
        return f"skipped {self.count} bad records{files} (on_bad_record='skip')"


class _Bad(NamedTuple):
    """A record the conversion rejected, in place of its document."""

    error: DataError


class Checked:
    """`convert(record)` of a source's (where, record) pair, or a bad-record marker naming where and
    why the record cannot be used (any ValueError of the conversion: JSON, UTF-8, the chat
    template, the converters' own checks), which `BadRecords.passes` handles in stream order."""

    def __init__(self, convert: Callable[[Any], Any]):
        self._convert = convert

    def __call__(self, item: tuple[str, Any]) -> Any:
        where, raw = item
        try:
            return self._convert(raw)
        except ValueError as e:
            return _Bad(DataError(f"{where}: {e}"))


def as_record(raw: Any) -> Mapping[str, Any]:
    """A JSON object from its bytes (JSONL, ArrayRecord) or a Parquet row; ValueError if it is not one."""
    try:
        record = json.loads(raw) if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(record, Mapping):
        raise ValueError(f"a data record must be a JSON object, got {type(record).__name__}")
    return record


def document_separator_id(tokenizer: Tokenizer) -> int:
    """`<|endoftext|>` if the tokenizer has it as one token (Qwen3: 151643), else its first eos.
    Raises ValueError when it has neither."""
    ids = tokenizer.encode("<|endoftext|>")
    if len(ids) == 1:
        return ids[0]
    if not tokenizer.eos_ids:
        raise ValueError("the tokenizer has neither an <|endoftext|> token nor an eos id")
    return tokenizer.eos_ids[0]


class TextToDocument:
    """A text record's `text_field`, tokenised and ended by the document separator."""

    def __init__(self, tokenizer: Tokenizer, text_field: str):
        self._tokenizer = tokenizer
        self._text_field = text_field
        self._separator_id = document_separator_id(tokenizer)

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        record = as_record(raw)
        if self._text_field not in record:
            raise ValueError(
                f"the record has no field {self._text_field!r} (fields: {sorted(record)}); set data.text_field"
            )
        text = record[self._text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {self._text_field!r} is a {type(text).__name__}, not a string")
        return document([*self._tokenizer.encode(text), self._separator_id])


def chat_tokens(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether the SFT loss covers it.
    Segment boundaries sit on special tokens, so the ids equal those of the whole text."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, flag in render_for_training(messages, tools=tools):
        segment = tokenizer.encode(text)
        ids.extend(segment)
        trained.extend([flag] * len(segment))
    return ids, trained


def _json_field(record: Mapping[str, Any], name: str) -> Any:
    """`record[name]`, parsed when it is a JSON string (Parquet columns hold them that way)."""
    value = record.get(name)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"'{name}' is a string but not JSON ({e})") from None
    return value


def chat_fields(record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Any] | None]:
    """A chat record's messages (null fields dropped: Parquet structs fill absent keys with None)
    and tools, checked by the chat template's rules; ValueError naming what is wrong."""
    if "messages" not in record:
        raise ValueError(f"the chat record has no 'messages' field (fields: {sorted(record)})")
    messages = _json_field(record, "messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"the chat record's 'messages' must be a non-empty list, got {messages!r:.200}")
    messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m for m in messages]
    tools = _json_field(record, "tools") or None
    validate_messages(messages, tools)
    return messages, tools


class ChatToDocument:
    """A chat record as one SFT document of at most `seq_len` tokens; ValueError for a longer one."""

    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self._tokenizer, self._seq_len = tokenizer, seq_len

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        messages, tools = chat_fields(as_record(raw))
        ids, trained = chat_tokens(self._tokenizer, messages, tools)  # ValueError unless it ends with an assistant turn
        if len(ids) > self._seq_len:
            raise ValueError(
                f"the conversation has {len(ids)} tokens, more than data.seq_len={self._seq_len}; an SFT sample "
                "is never cut (raise data.seq_len, or skip such records with data.on_bad_record='skip')"
            )
        return document(ids, trained)
