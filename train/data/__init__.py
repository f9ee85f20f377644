"""Grain input pipeline for pretraining (plain text) and SFT (chat), packed to fixed-length rows.

Config: the `data` section of the training ConfigDict (or that section itself). `default_config()`
returns every field with its default; unknown fields are rejected so typos fail loudly.

  format       'jsonl' | 'parquet' | 'arrayrecord' | 'synthetic'.
  paths        file path, glob pattern, or a list of them (not used by 'synthetic'). Files are
               read in sorted-glob order. JSONL: one JSON object per line (empty lines skipped).
               ArrayRecord: each record is the UTF-8 JSON of the same object.
  kind         'text' (pretraining) | 'chat' (SFT); not used by 'synthetic'. Text records carry
               `record[text_field]`; chat records carry `messages` (a list, or its JSON string)
               and optional `tools` (a list, or its JSON string: in Parquet prefer JSON strings
               for tools, since struct columns fill missing keys with null).
  text_field   name of the text field of 'text' records (default 'text').
  seq_len      L, the length of every packed row.
  batch_size   global batch; each process yields batch_size // process_count rows.
  shards       independent pipelines the records are split into (see below); None: one per
               process. A multiple of the process count that divides batch_size.
  seed         seeds the shuffle (reshuffled every epoch) and the synthetic documents.
  shuffle      shuffle each process's shard of records (default True).
  num_epochs   passes over the data; None repeats forever.
  packing      'first_fit': documents are packed whole into `packing_bins` rows at a time (padding
               at the ends of rows; an SFT sample is never cut).
               'concat_then_split': documents are concatenated and cut at row boundaries (no
               padding; a document may continue in the next row, restarting its positions).
  packing_bins rows that 'first_fit' fills at once; more bins, less padding, more buffering.
  num_threads  threads that read and tokenise records.
  synthetic_num_docs    number of synthetic documents per epoch.
  synthetic_vocab_size  synthetic token range; None uses the tokenizer's vocab_size.
  on_bad_record         'error' (default): the first bad record or empty file stops the pipeline
                        with a DataError naming the file and the line (JSONL, 1-based) or record
                        index (Parquet and ArrayRecord, 0-based). 'skip': bad records and empty
                        files are left out, logged and counted (`BadRecords`; the trainers report
                        the count in metrics.jsonl and at the end).
  allow_changed_data    False (default): resuming from a checkpoint whose data files differ from
                        today's (a file added, removed, grown or edited) is a DataError
                        naming the files, since the restored position would point into other
                        records; True goes on with a warning.

Bad records: a line that is not JSON (or not UTF-8), a record that is not an object, a text record
without its text field or whose text is not a string, a chat record without a non-empty `messages`
list, with a message the chat template rejects (unknown role, missing content, ...), that does not
end with an assistant turn, or whose tokens exceed seq_len (an SFT sample is never cut).

Documents. Text: `encode(text) + [<|endoftext|>]` (or the eos of a tokenizer without that token),
loss on every token. Chat: `qwen3_jax.chat.render_for_training` segments, tokenised one by one
(segment boundaries sit on special tokens, so this equals tokenising the whole text), loss on the
tokens of the segments it flags (the final assistant turn). Synthetic: arithmetic progressions
modulo the vocabulary, so a tiny model can learn them within a few steps.

A text document longer than L is split into chunks of at most L tokens; every chunk is kept and
each one starts at position 0 (it can attend only within its row). A chat record longer than L is
a bad record (see above): cutting it would train on a conversation that was never written.

Rows (each a [L] array; batched to [per_process_batch, L]):
  tokens       int32   input ids; 0 on padding.
  targets      int32   next token of the same document: targets[i] = tokens[i + 1], also across
                       a chunk or row boundary inside one document.
  loss_mask    float32 1 where targets[i] is trained on: 0 on padding, on the last token of a
                       document (its target would be the next document's first token), and where
                       the target is not an assistant token of an SFT sample.
  segment_ids  int32   1, 2, 3... per document within the row; 0 on padding.
  positions    int32   RoPE positions, restarting at 0 for every document (chunk).
A final partial batch (finite num_epochs only) is padded with empty rows (loss_mask 0), so shapes
never change.

Sharding and resuming. Every process builds the same index over all records, which is cut into
`shards` contiguous blocks; a shard's records are shuffled with `seed` (in a new order every
epoch), packed and batched by their own pipeline, `batch_size // shards` rows per step. Process
p of P runs shards p * shards/P ... (p + 1) * shards/P - 1 (so it touches only its own part of the
files and row groups) and yields their rows in shard order; the global batch, process 0's rows
first, is therefore shard 0's rows, then shard 1's, and so on, whatever the number of processes:
with `shards` fixed, 1 process and 8 train on the same batches. Shards differ by at most one
record, but packing makes the number of batches per epoch differ between them: with a finite
num_epochs, train for a fixed number of steps rather than to the end of the data.

The returned grain iterator is checkpointable: `get_state()` is a small JSON-able dict
(`iterator_state` / `restore_iterator_state` turn it into bytes and back), and
`CheckpointSave(iterator)` / `CheckpointRestore(iterator)` store it in an orbax checkpoint, one
file per process. JSONL and Parquet are indexed at start-up (line offsets, Parquet footers)
and Parquet is read a row group at a time (the last few cached), so with shuffling a record can
cost a row-group read; for large corpora convert to ArrayRecord (`write_arrayrecord`), which is
random-access.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import grain.experimental as grain_exp
import jax
import numpy as np
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter
from grain.checkpoint import CheckpointRestore, CheckpointSave  # noqa: F401 (orbax args)

from qwen3_jax.chat import render_for_training, validate_messages
from qwen3_jax.errors import ConfigError, DataError
from qwen3_jax.tokenizer import Tokenizer
from train.data.config import FORMATS, KINDS, ON_BAD_RECORD, PACKINGS, DataConfig, PromptConfig  # noqa: F401

ROW_FEATURES = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_DOC_FEATURES = ("tokens", "targets", "loss_mask")
_ROW_DTYPES = {
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "segment_ids": np.int32,
    "positions": np.int32,
}

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Sources: random access over all records, in a fixed global order.


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files matching each pattern, sorted per pattern.

    Raises FileNotFoundError naming the first pattern that matches no file.
    """
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        if not matches:
            raise FileNotFoundError(f"no data file matches data.paths entry {pattern!r}")
        files.extend(matches)
    return files


def _line_spans(path: str, block_bytes: int = 1 << 24) -> np.ndarray:
    """[num_lines, 3] int64 (start, end, line number) of the non-empty lines of a file: byte
    offsets and 1-based line numbers."""
    newlines = []
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + offset)
            offset += len(block)
    ends = np.concatenate([*newlines, np.array([offset], np.int64)])
    starts = np.concatenate([np.array([0], np.int64), ends[:-1] + 1])
    spans = np.stack([starts, ends, np.arange(1, len(ends) + 1)], axis=1)
    return spans[spans[:, 1] > spans[:, 0]]


class _FileIndex:
    """A global record index over files of `lengths` records each -> (file, index in that file)."""

    def __init__(self, lengths: Sequence[int]):
        self.lengths = [int(n) for n in lengths]
        self._ends = np.cumsum(self.lengths)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        file_idx = int(np.searchsorted(self._ends, index, side="right"))
        return file_idx, index - (int(self._ends[file_idx - 1]) if file_idx else 0)


class JsonlSource:
    """Random access to the lines of several JSONL files as (`path:line`, line bytes); the byte
    offsets are indexed up front, empty lines skipped."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._spans = [_line_spans(p) for p in self._paths]
        self.files = _FileIndex([len(s) for s in self._spans])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        file_idx, line_idx = self.files.locate(index)
        start, end, number = self._spans[file_idx][line_idx]
        with open(self._paths[file_idx], "rb") as f:
            f.seek(start)
            return f"{self._paths[file_idx]}:{number}", f.read(end - start)


class ParquetSource:
    """Random access to Parquet rows as (`path, record index i`, row dict), reading (and caching a
    few) whole row groups."""

    def __init__(
        self, paths: Sequence[str], columns: Sequence[str], optional_columns: Sequence[str] = ()
    ):
        self._paths = list(paths)
        self._files = [pq.ParquetFile(p) for p in paths]
        self._columns: list[list[str]] = []
        groups: list[tuple[int, int, int]] = []  # (file, row group, its first row in the file)
        rows: list[int] = []
        for file_idx, (path, f) in enumerate(zip(paths, self._files)):
            names = set(f.schema_arrow.names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise KeyError(f"{path}: no column(s) {missing} (columns: {sorted(names)})")
            self._columns.append([*columns, *(c for c in optional_columns if c in names)])
            first = 0
            for g in range(f.num_row_groups):
                groups.append((file_idx, g, first))
                rows.append(f.metadata.row_group(g).num_rows)
                first += rows[-1]
        self.files = _FileIndex([f.metadata.num_rows for f in self._files])
        self._groups = groups
        self._group_ends = np.cumsum(rows)
        self._cache: collections.OrderedDict[int, list[dict[str, Any]]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._group_ends[-1]) if len(self._group_ends) else 0

    def _row_group(self, group: int) -> list[dict[str, Any]]:
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            file_idx, g, _ = self._groups[group]
            table = self._files[file_idx].read_row_group(g, columns=self._columns[file_idx])
            rows = table.to_pylist()
            self._cache[group] = rows
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
            return rows

    def __getitem__(self, index: int) -> tuple[str, dict[str, Any]]:
        group = int(np.searchsorted(self._group_ends, index, side="right"))
        row = index - (int(self._group_ends[group - 1]) if group else 0)
        file_idx, _, first = self._groups[group]
        return f"{self._paths[file_idx]}, record index {first + row}", self._row_group(group)[row]


class ArrayRecordSource:
    """Random access to the records of several ArrayRecord files as (`path, record index i`, bytes)."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._readers = [grain.sources.ArrayRecordDataSource([p]) for p in self._paths]
        self.files = _FileIndex([len(r) for r in self._readers])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[str, bytes]:
        file_idx, record = self.files.locate(index)
        return f"{self._paths[file_idx]}, record index {record}", self._readers[file_idx][record]


class SyntheticSource:
    """Documents `(start + step * k) % vocab_size`, 2..max_len tokens, drawn from (seed, index).

    Every token after the second is predictable from the two before it, so a small model's loss
    falls quickly; useful for smoke tests and demos without data files. Items are
    (`synthetic document i`, ids) like the file sources' (where, record).
    """

    def __init__(self, num_docs: int, vocab_size: int, max_len: int, seed: int):
        self._num_docs, self._vocab_size = num_docs, vocab_size
        self._max_len, self._seed = max_len, seed

    def __len__(self) -> int:
        return self._num_docs

    def __getitem__(self, index: int) -> tuple[str, np.ndarray]:
        rng = np.random.default_rng((self._seed, index))
        length = int(rng.integers(2, self._max_len + 1))
        start = int(rng.integers(self._vocab_size))
        step = int(rng.integers(1, 8))
        ids_n = (start + step * np.arange(length, dtype=np.int64)) % self._vocab_size
        return f"synthetic document {index}", ids_n.astype(np.int32)


def write_arrayrecord(path: str, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes records as UTF-8 JSON ArrayRecord entries, as `format='arrayrecord'` reads them."""
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8"))
            count += 1
    finally:
        writer.close()
    return count


def _make_source(cfg: DataConfig, tokenizer: Tokenizer | None, bad_records: BadRecords) -> Sequence[Any]:
    if cfg.format == "synthetic":
        vocab_size = cfg.synthetic_vocab_size or (tokenizer.vocab_size if tokenizer else None)
        if vocab_size is None:
            raise ConfigError(
                "format 'synthetic' needs data.synthetic_vocab_size or a tokenizer"
            )
        return SyntheticSource(cfg.synthetic_num_docs, vocab_size, cfg.seq_len, cfg.seed)
    return file_source(cfg.format, cfg.paths, cfg.kind, bad_records, cfg.text_field)


def file_source(
    fmt: str, paths: Sequence[str], kind: str, bad_records: BadRecords, text_field: str = "text"
) -> Sequence[tuple[str, Any]]:
    """Random access over the records of `paths` (globs) in `fmt`, text or chat, as (where,
    record) pairs; an empty file goes to `bad_records` (an error, or skipped and counted)."""
    files = expand_paths(paths)
    if fmt == "jsonl":
        source = JsonlSource(files)
    elif fmt == "parquet":
        source = (ParquetSource(files, [text_field]) if kind == "text"
                  else ParquetSource(files, ["messages"], optional_columns=["tools"]))
    elif fmt == "arrayrecord":
        source = ArrayRecordSource(files)
    else:
        raise ConfigError(f"unknown record format {fmt!r}; expected one of {FORMATS[:-1]}")
    for path, n in zip(files, source.files.lengths):
        if not n:
            bad_records.empty_file(path)
    return source


def shard_records(
    source: Sequence[Any], *, shard: int, num_shards: int, shuffle: bool, seed: int, num_epochs: int | None,
) -> grain.MapDataset:
    """The `shard`-th of `num_shards` contiguous blocks of `source`, shuffled per epoch, repeated
    `num_epochs` times (None: forever). Raises ValueError for an empty source or fewer records
    than shards."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    n = len(source)
    if not n:
        raise ValueError("the data source has no records")
    if n < num_shards:
        raise ValueError(f"{n} records cannot be split into {num_shards} shards")
    ds = grain.MapDataset.source(source)[n * shard // num_shards : n * (shard + 1) // num_shards]
    if shuffle:
        ds = ds.shuffle(seed=seed)
    return ds.repeat(num_epochs)


# ----------------------------------------------------------------------------------------------
# Records -> documents: {tokens, targets, loss_mask}, each [n].


def _document(ids: Sequence[int], trained: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """Next-token targets within the document; the last position has no target (mask 0)."""
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
        if policy not in ON_BAD_RECORD:
            raise ConfigError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {policy!r}")
        self.policy = policy
        self.count = 0
        self.empty_files: list[str] = []

    def empty_file(self, path: str) -> None:
        error = DataError(f"{path}: the file holds no records")
        if self.policy == "error":
            raise error
        log.warning("skipping an empty data file: %s", error)
        self.empty_files.append(path)

    def passes(self, item: Any) -> bool:
        """A filter over converted records: False for (and counts) a skipped bad one."""
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


class _Checked:
    """`convert(record)` of a source's (where, record) pair, or `_Bad` naming where and why the
    record cannot be used (any ValueError of the conversion: JSON, UTF-8, the chat template, the
    converters' own checks)."""

    def __init__(self, convert: Callable[[Any], Any]):
        self._convert = convert

    def __call__(self, item: tuple[str, Any]) -> Any:
        where, raw = item
        try:
            return self._convert(raw)
        except ValueError as e:
            return _Bad(DataError(f"{where}: {e}"))


def _as_record(raw: Any) -> Mapping[str, Any]:
    """A JSON object from its bytes (JSONL, ArrayRecord) or a Parquet row."""
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
    """`<|endoftext|>` if the tokenizer has it as one token (Qwen3: 151643), else its first eos."""
    ids = tokenizer.encode("<|endoftext|>")
    if len(ids) == 1:
        return ids[0]
    if not tokenizer.eos_ids:
        raise ValueError("the tokenizer has neither an <|endoftext|> token nor an eos id")
    return tokenizer.eos_ids[0]


class _TextToDocument:
    def __init__(self, tokenizer: Tokenizer, text_field: str):
        self._tokenizer = tokenizer
        self._text_field = text_field
        self._separator_id = document_separator_id(tokenizer)

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        record = _as_record(raw)
        if self._text_field not in record:
            raise ValueError(
                f"the record has no field {self._text_field!r} (fields: {sorted(record)}); set data.text_field"
            )
        text = record[self._text_field]
        if not isinstance(text, str):
            raise ValueError(f"field {self._text_field!r} is a {type(text).__name__}, not a string")
        return _document([*self._tokenizer.encode(text), self._separator_id])


def chat_tokens(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether the SFT loss covers it."""
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


def _chat_fields(record: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[Any] | None]:
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


class _ChatToDocument:
    def __init__(self, tokenizer: Tokenizer, seq_len: int):
        self._tokenizer, self._seq_len = tokenizer, seq_len

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        messages, tools = _chat_fields(_as_record(raw))
        ids, trained = chat_tokens(self._tokenizer, messages, tools)  # ValueError unless it ends with an assistant turn
        if len(ids) > self._seq_len:
            raise ValueError(
                f"the conversation has {len(ids)} tokens, more than data.seq_len={self._seq_len}; an SFT sample "
                "is never cut (raise data.seq_len, or skip such records with data.on_bad_record='skip')"
            )
        return _document(ids, trained)


class _SplitLongDocuments(grain_exp.FlatMapTransform):
    """Cuts a document into chunks of at most seq_len tokens; targets/mask were set before."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(doc["tokens"])
        starts = range(0, n, self._seq_len)
        return [{k: v[i : i + self._seq_len] for k, v in doc.items()} for i in starts]


# ----------------------------------------------------------------------------------------------
# Packing, batching, the pipeline.


def _packed_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features -> the row layout; all features share the token segmentation."""
    return {
        "tokens": packed["tokens"],
        "targets": packed["targets"],
        "loss_mask": packed["loss_mask"],
        "segment_ids": packed["tokens_segment_ids"].astype(np.int32),
        "positions": packed["tokens_positions"].astype(np.int32),
    }


class _ConcatThenSplit(grain.IterDataset):
    """grain's ConcatThenSplitIterDataset, with a state that survives JSON.

    Checkpoints store iterator states as JSON (`iterator_state`, grain's orbax handler), which
    turns tuples into lists. grain 0.2.18's packer marks "no partial document carried into the
    next row" with the slice (-1, -1) and tests for it with `!=`, so the restored [-1, -1] reads
    as a carried document: set_state takes the next document for it, keeps none of its tokens,
    and every later row is shifted by that document's length. Whether a saved state holds the
    marker depends on where the last row ended, hence on the process, shard, seed and step.
    `set_state` turns the slices back into tuples; the state itself is grain's, unchanged.
    """

    def __init__(self, parent: grain.IterDataset, length_struct: Mapping[str, int]):
        super().__init__(grain_exp.ConcatThenSplitIterDataset(parent, length_struct=length_struct))

    def __iter__(self) -> grain.DatasetIterator:
        return _TupleSlicesIterator(self._parent.__iter__())


class _TupleSlicesIterator(grain.DatasetIterator):
    """Passes a ConcatThenSplit iterator through; restores its `remainder_slices` as tuples."""

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


class _StackAndPad:
    """Stacks rows into [batch, L] arrays; a short last batch gets empty rows (loss_mask 0)."""

    def __init__(self, batch_size: int, seq_len: int):
        self._batch_size, self._seq_len = batch_size, seq_len

    def __call__(self, rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        batch = {}
        for name in ROW_FEATURES:
            batch_bl = np.zeros((self._batch_size, self._seq_len), _ROW_DTYPES[name])
            batch_bl[: len(rows)] = np.stack([r[name] for r in rows])
            batch[name] = batch_bl
        return batch


def per_process_batch_size(batch_size: int, process_count: int) -> int:
    """Rows per process of a global batch; every process must get the same number."""
    if batch_size % process_count:
        raise ConfigError(
            f"data.batch_size={batch_size} is not divisible by process_count={process_count}"
        )
    return batch_size // process_count


def process_shards(batch_size: int, shards: int | None, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` runs (`shards` None: one per
    process). Raises ConfigError unless the shards split evenly over the processes and
    `batch_size` evenly over the shards."""
    per_process_batch_size(batch_size, process_count)
    shards = process_count if shards is None else shards
    if shards % process_count:
        raise ConfigError(f"data.shards={shards} is not a multiple of process_count={process_count}")
    if batch_size % shards:
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by data.shards={shards}")
    per_process = shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


def make_iter_dataset(
    data_cfg: DataConfig,
    tokenizer: Tokenizer | None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    bad_records: BadRecords | None = None,
) -> grain.IterDataset:
    """The pipeline as a grain IterDataset of [per_process_batch, L] batches (see module doc).

    process_index / process_count default to jax.process_index() / jax.process_count().
    `bad_records` applies the section's `on_bad_record` policy and counts what it skips (a fresh
    one when None). Raises ConfigError for shards that do not split evenly (`process_shards`),
    DataError for an empty file or a source without records, and, under on_bad_record='error',
    at the `next()` that reaches a bad record.
    """
    bad_records = BadRecords(data_cfg.on_bad_record) if bad_records is None else bad_records
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    shards = process_shards(data_cfg.batch_size, data_cfg.shards, process_index, process_count)
    num_shards = data_cfg.shards or process_count
    to_document: Callable[[Any], dict[str, np.ndarray]]
    if data_cfg.format == "synthetic":
        to_document = _document
    elif tokenizer is None:
        raise ValueError(f"format {data_cfg.format!r} needs a tokenizer")
    elif data_cfg.kind == "text":
        to_document = _TextToDocument(tokenizer, data_cfg.text_field)
    else:
        to_document = _ChatToDocument(tokenizer, data_cfg.seq_len)

    source = _make_source(data_cfg, tokenizer, bad_records)
    if not len(source):
        raise DataError(f"no records in data.paths {list(data_cfg.paths)}")
    rows = data_cfg.batch_size // num_shards
    log.info(
        "data: %d records, process %d/%d runs shards %d-%d of %d, %d rows of %d tokens each per batch",
        len(source), process_index, process_count, shards[0], shards[-1], num_shards, rows, data_cfg.seq_len,
    )
    pipelines = [_shard_pipeline(data_cfg, source, to_document, bad_records, k, num_shards) for k in shards]
    if len(pipelines) == 1:
        return pipelines[0]
    # strict=False: a finite epoch ends with the shortest shard (see the module docstring).
    return grain_exp.ZipIterDataset(pipelines, strict=False).map(_concat_rows)


def _concat_rows(batches: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Shards' batches, in shard order, as one [sum of rows, L] batch per feature."""
    return {name: np.concatenate([b[name] for b in batches]) for name in ROW_FEATURES}


def _shard_pipeline(
    data_cfg: DataConfig, source: Sequence[Any], to_document: Callable[[Any], dict[str, np.ndarray]],
    bad_records: BadRecords, shard: int, num_shards: int,
) -> grain.IterDataset:
    """Shard `shard` of `num_shards`: its records, shuffled, as packed [batch_size // num_shards, L] batches."""
    batch_size = data_cfg.batch_size // num_shards
    ds = shard_records(
        source, shard=shard, num_shards=num_shards, shuffle=data_cfg.shuffle, seed=data_cfg.seed,
        num_epochs=data_cfg.num_epochs,
    )
    ds = ds.map(_Checked(to_document))
    threads = data_cfg.num_threads
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads)
    ).filter(bad_records.passes)  # after the reading threads: errors and counts in stream order
    it_ds = grain_exp.FlatMapIterDataset(it_ds, _SplitLongDocuments(data_cfg.seq_len))
    lengths = {k: data_cfg.seq_len for k in _DOC_FEATURES}
    if data_cfg.packing == "first_fit":
        it_ds = grain_exp.FirstFitPackIterDataset(
            it_ds, length_struct=lengths, num_packing_bins=data_cfg.packing_bins, shuffle_bins=False
        )
    else:
        it_ds = _ConcatThenSplit(it_ds, lengths)
    return it_ds.map(_packed_row).batch(
        batch_size, batch_fn=_StackAndPad(batch_size, data_cfg.seq_len)
    )


def make_dataset(
    data_cfg: DataConfig,
    tokenizer: Tokenizer | None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    bad_records: BadRecords | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of batches {name: [per_process_batch, L]} (see module doc and
    `make_iter_dataset`)."""
    return iter(make_iter_dataset(
        data_cfg, tokenizer, process_index=process_index, process_count=process_count, bad_records=bad_records,
    ))


def make_stream(data_cfg: DataConfig, tokenizer: Tokenizer | None, **kwargs: Any) -> DataStream:
    """`make_dataset`'s iterator with what a trainer checkpoints beside it (see `DataStream`);
    `kwargs` go to `make_dataset`."""
    bad_records = BadRecords(data_cfg.on_bad_record)
    iterator = make_dataset(data_cfg, tokenizer, bad_records=bad_records, **kwargs)
    files = () if data_cfg.format == "synthetic" else fingerprint(expand_paths(data_cfg.paths))
    return DataStream(iterator, files, bad_records, data_cfg.allow_changed_data, "data")


# ----------------------------------------------------------------------------------------------
# Prompts for rollouts (on-policy distillation): batches of chat records, not packed rows.


def prompt_record(raw: Any) -> dict[str, Any]:
    """A chat record with `messages` parsed and cleaned and `tools` parsed; other fields kept.
    Raises ValueError naming the problem when the chat template rejects the messages or the
    conversation ends with an assistant turn (a prompt is answered by the model)."""
    record = dict(_as_record(raw))
    record["messages"], record["tools"] = _chat_fields(record)
    if record["messages"][-1]["role"] == "assistant":
        raise ValueError("a prompt must not end with an assistant turn (the model writes that turn)")
    return record


def make_prompt_dataset(
    cfg: PromptConfig, *, process_index: int | None = None, process_count: int | None = None,
    bad_records: BadRecords | None = None, check: Callable[[dict[str, Any]], Any] | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of lists of `prompt_record`s, batch_size // process_count each.

    A final partial batch is dropped, so every step
    sees the same number of prompts. `check(record)` may reject a record by raising ValueError
    (e.g. a prompt too long for the rollout); rejected and malformed records follow the section's
    on_bad_record policy through `bad_records` (a fresh one when None), as in `make_dataset`.
    Raises ConfigError when the batch does not split over the processes, FileNotFoundError for missing files, DataError for an
    empty file or, under on_bad_record='error', at the `next()` that reaches a bad record.
    """
    bad_records = BadRecords(cfg.on_bad_record) if bad_records is None else bad_records
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = per_process_batch_size(cfg.batch_size, process_count)

    def convert(raw: Any) -> dict[str, Any]:
        record = prompt_record(raw)
        if check is not None:
            check(record)
        return record

    ds = shard_records(
        file_source(cfg.format, cfg.paths, "chat", bad_records), shard=process_index,
        num_shards=process_count, shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=cfg.num_epochs,
    ).map(_Checked(convert))
    threads = cfg.num_threads
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads))
    return iter(it_ds.filter(bad_records.passes).batch(batch_size, drop_remainder=True, batch_fn=list))


def make_prompt_stream(cfg: PromptConfig, **kwargs: Any) -> DataStream:
    """`make_prompt_dataset`'s iterator with what a trainer checkpoints beside it (see
    `DataStream`); `kwargs` go to `make_prompt_dataset`."""
    bad_records = BadRecords(cfg.on_bad_record)
    iterator = make_prompt_dataset(cfg, bad_records=bad_records, **kwargs)
    return DataStream(iterator, fingerprint(expand_paths(cfg.paths)), bad_records, cfg.allow_changed_data, "prompts")


# ----------------------------------------------------------------------------------------------
# What a checkpoint records about the data: the files' fingerprint and the skipped count.

_FINGERPRINT_BYTES = 1 << 20


def fingerprint(paths: Sequence[str]) -> tuple[dict[str, Any], ...]:
    """Per file, in reading order: its absolute path, size in bytes and the sha256 of its first
    and last MiB (of the whole file up to 2 MiB). Cheap for any corpus; it tells a file added,
    removed, grown, truncated or rewritten, though not an edit that keeps the size and lies more
    than a MiB from both ends."""
    out = []
    for path in paths:
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(f.read())
        out.append({"path": os.path.abspath(path), "size": size, "sha256": digest.hexdigest()})
    return tuple(out)


def fingerprint_changes(saved: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> list[str]:
    """What differs between two `fingerprint`s, one phrase per file; [] when they are equal."""
    old, new = {f["path"]: f for f in saved}, {f["path"]: f for f in now}
    changes = [f"{p} was removed" for p in old if p not in new]
    changes += [f"{p} was added" for p in new if p not in old]
    for path in (p for p in new if p in old):  # in reading order: the message is the same every time
        if old[path]["size"] != new[path]["size"]:
            changes.append(f"{path} changed size ({old[path]['size']} -> {new[path]['size']} bytes)")
        elif old[path]["sha256"] != new[path]["sha256"]:
            changes.append(f"{path} changed content (same size)")
    if not changes and list(old) != list(new):
        changes.append(f"the files are read in another order (now {list(new)})")
    return changes


@dataclasses.dataclass(frozen=True)
class DataStream:
    """A trainer's input: the checkpointable `iterator`, the `fingerprint` of the files it reads
    (empty for synthetic data), its `bad_records` policy and count, and whether a resume may go on
    with changed files. `section` ('data' or 'prompts') names the config section in errors."""

    iterator: grain.DatasetIterator
    files: tuple[dict[str, Any], ...]
    bad_records: BadRecords
    allow_changed_data: bool
    section: str

    def checkpoint_info(self) -> dict[str, Any]:
        """What a checkpoint records beside the iterator's position (JSON-able)."""
        return {"files": list(self.files), "skipped_records": self.bad_records.count}

    def resume(self, saved: Mapping[str, Any] | None, where: str) -> None:
        """Checks the files against `saved` (a `checkpoint_info()` of the checkpoint `where`) and
        carries its skipped count over. Raises DataError listing every difference, unless
        allow_changed_data (then it logs them). `saved=None` (a checkpoint written before this
        record existed) is taken as it is."""
        if saved is None:
            return
        changes = fingerprint_changes(saved["files"], self.files)
        if changes:
            message = f"the {self.section} files differ from those {where} was written with: {'; '.join(changes)}"
            if not self.allow_changed_data:
                raise DataError(
                    f"{message}. The restored position would point into other records: restore the files, or set "
                    f"{self.section}.allow_changed_data=True to go on with them"
                )
            log.warning("%s; going on (%s.allow_changed_data=True)", message, self.section)
        self.bad_records.count = int(saved["skipped_records"])


def iterator_state(iterator: grain.DatasetIterator) -> bytes:
    """The iterator position as JSON bytes (small: indices and packing counters)."""
    return json.dumps(iterator.get_state()).encode("utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, state: bytes) -> None:
    """Moves an iterator built from the same config to a position saved by `iterator_state`."""
    iterator.set_state(json.loads(state))
