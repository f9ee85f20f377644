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
  seed         seeds the shuffle (reshuffled every epoch) and the synthetic documents.
  shuffle      shuffle each process's shard of records (default True).
  num_epochs   passes over the data; None repeats forever.
  packing      'first_fit': documents are packed whole into `packing_bins` rows at a time (padding
               at the ends of rows; an SFT sample is never cut unless it is longer than L).
               'concat_then_split': documents are concatenated and cut at row boundaries (no
               padding; a document may continue in the next row, restarting its positions).
  packing_bins rows that 'first_fit' fills at once; more bins, less padding, more buffering.
  num_threads  threads that read and tokenise records.
  synthetic_num_docs    number of synthetic documents per epoch.
  synthetic_vocab_size  synthetic token range; None uses the tokenizer's vocab_size.

Documents. Text: `encode(text) + [<|endoftext|>]` (or the eos of a tokenizer without that token),
loss on every token. Chat: `qwen3_jax.chat.render_for_training` segments, tokenised one by one
(segment boundaries sit on special tokens, so this equals tokenising the whole text), loss on the
tokens of the segments it flags (the final assistant turn). Synthetic: arithmetic progressions
modulo the vocabulary, so a tiny model can learn them within a few steps.

A document longer than L is split into chunks of at most L tokens; every chunk is kept and each
one starts at position 0 (it can attend only within its row).

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

Sharding and resuming. Every process builds the same index over all records, takes the
`process_index`-th of `process_count` contiguous blocks of it (so a process touches only its own
part of the files and row groups), and shuffles that shard with `seed`, in a new order every
epoch. Shards differ by at most one record, but packing makes the number of batches per epoch
differ between processes: with a finite num_epochs, train for a fixed number of steps rather
than to the end of the data.

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
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grain
import grain.experimental as grain_exp
import jax
import ml_collections
import numpy as np
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter
from grain.checkpoint import CheckpointRestore, CheckpointSave  # noqa: F401 (orbax args)

from qwen3_jax.chat import render_for_training
from qwen3_jax.tokenizer import Tokenizer

FORMATS = ("jsonl", "parquet", "arrayrecord", "synthetic")
KINDS = ("text", "chat")
PACKINGS = ("first_fit", "concat_then_split")
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


class DataConfigError(ValueError):
    """A missing, unknown or invalid `data.*` config value."""


def default_config() -> ml_collections.ConfigDict:
    """The `data` config section with every field at its default (see the module docstring)."""
    return ml_collections.ConfigDict(
        {
            "format": "jsonl",
            "paths": None,
            "kind": "text",
            "text_field": "text",
            "seq_len": 2048,
            "batch_size": 8,
            "seed": 0,
            "shuffle": True,
            "num_epochs": None,
            "packing": "first_fit",
            "packing_bins": 32,
            "num_threads": 4,
            "synthetic_num_docs": 4096,
            "synthetic_vocab_size": None,
        }
    )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The validated `data` config section."""

    format: str
    paths: tuple[str, ...]
    kind: str
    text_field: str
    seq_len: int
    batch_size: int
    seed: int
    shuffle: bool
    num_epochs: int | None
    packing: str
    packing_bins: int
    num_threads: int
    synthetic_num_docs: int
    synthetic_vocab_size: int | None

    @classmethod
    def from_config(cls, cfg: Any) -> DataConfig:
        """Reads `cfg.data` (or `cfg` itself when it is the data section), filling in defaults."""
        section = cfg["data"] if "data" in cfg else cfg
        values = dict(default_config().items())
        unknown = sorted(set(section.keys()) - set(values))
        if unknown:
            raise DataConfigError(
                f"unknown data config field(s) {unknown}; known: {sorted(values)}"
            )
        values.update(section.items())

        def choice(name: str, options: tuple[str, ...]) -> str:
            if values[name] not in options:
                raise DataConfigError(f"data.{name} must be one of {options}, got {values[name]!r}")
            return values[name]

        def integer(name: str, minimum: int) -> int:
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise DataConfigError(f"data.{name} must be an integer >= {minimum}, got {v!r}")
            return int(v)

        def optional_integer(name: str, minimum: int) -> int | None:
            return None if values[name] is None else integer(name, minimum)

        fmt = choice("format", FORMATS)
        paths = values["paths"]
        if isinstance(paths, str):
            paths = (paths,)
        if fmt != "synthetic":
            if not (
                isinstance(paths, (list, tuple))
                and paths
                and all(isinstance(p, str) and p for p in paths)
            ):
                raise DataConfigError(
                    f"data.paths must be a path/glob or a non-empty list of them for "
                    f"format {fmt!r}, got {values['paths']!r}"
                )
        if not isinstance(values["shuffle"], bool):
            raise DataConfigError(f"data.shuffle must be a bool, got {values['shuffle']!r}")
        if not isinstance(values["text_field"], str) or not values["text_field"]:
            raise DataConfigError(
                f"data.text_field must be a non-empty string, got {values['text_field']!r}"
            )
        return cls(
            format=fmt,
            paths=tuple(paths or ()),
            kind=choice("kind", KINDS),
            text_field=values["text_field"],
            seq_len=integer("seq_len", 2),
            batch_size=integer("batch_size", 1),
            seed=integer("seed", 0),
            shuffle=values["shuffle"],
            num_epochs=optional_integer("num_epochs", 1),
            packing=choice("packing", PACKINGS),
            packing_bins=integer("packing_bins", 1),
            num_threads=integer("num_threads", 1),
            synthetic_num_docs=integer("synthetic_num_docs", 1),
            synthetic_vocab_size=optional_integer("synthetic_vocab_size", 2),
        )


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
    """[num_lines, 2] int64 (start, end) byte offsets of the non-empty lines of a file."""
    newlines = []
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + offset)
            offset += len(block)
    ends = np.concatenate([*newlines, np.array([offset], np.int64)])
    starts = np.concatenate([np.array([0], np.int64), ends[:-1] + 1])
    spans = np.stack([starts, ends], axis=1)
    return spans[spans[:, 1] > spans[:, 0]]


class JsonlSource:
    """Random access to the JSON lines of several files (byte offsets are indexed up front)."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._spans = [_line_spans(p) for p in self._paths]
        self._file_ends = np.cumsum([len(s) for s in self._spans])

    def __len__(self) -> int:
        return int(self._file_ends[-1]) if len(self._file_ends) else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        file_idx = int(np.searchsorted(self._file_ends, index, side="right"))
        line_idx = index - (int(self._file_ends[file_idx - 1]) if file_idx else 0)
        start, end = self._spans[file_idx][line_idx]
        with open(self._paths[file_idx], "rb") as f:
            f.seek(start)
            line = f.read(end - start)
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self._paths[file_idx]} (byte {start}): bad JSON line: {e}") from e


class ParquetSource:
    """Random access to Parquet rows, reading (and caching a few) whole row groups."""

    def __init__(
        self, paths: Sequence[str], columns: Sequence[str], optional_columns: Sequence[str] = ()
    ):
        self._files = [pq.ParquetFile(p) for p in paths]
        self._columns: list[list[str]] = []
        groups: list[tuple[int, int]] = []
        rows: list[int] = []
        for file_idx, (path, f) in enumerate(zip(paths, self._files)):
            names = set(f.schema_arrow.names)
            missing = [c for c in columns if c not in names]
            if missing:
                raise KeyError(f"{path}: no column(s) {missing} (columns: {sorted(names)})")
            self._columns.append([*columns, *(c for c in optional_columns if c in names)])
            for g in range(f.num_row_groups):
                groups.append((file_idx, g))
                rows.append(f.metadata.row_group(g).num_rows)
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
            file_idx, g = self._groups[group]
            table = self._files[file_idx].read_row_group(g, columns=self._columns[file_idx])
            rows = table.to_pylist()
            self._cache[group] = rows
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
            return rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = int(np.searchsorted(self._group_ends, index, side="right"))
        return self._row_group(group)[index - (int(self._group_ends[group - 1]) if group else 0)]


class SyntheticSource:
    """Documents `(start + step * k) % vocab_size`, 2..max_len tokens, drawn from (seed, index).

    Every token after the second is predictable from the two before it, so a small model's loss
    falls quickly; useful for smoke tests and demos without data files.
    """

    def __init__(self, num_docs: int, vocab_size: int, max_len: int, seed: int):
        self._num_docs, self._vocab_size = num_docs, vocab_size
        self._max_len, self._seed = max_len, seed

    def __len__(self) -> int:
        return self._num_docs

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng((self._seed, index))
        length = int(rng.integers(2, self._max_len + 1))
        start = int(rng.integers(self._vocab_size))
        step = int(rng.integers(1, 8))
        ids_n = (start + step * np.arange(length, dtype=np.int64)) % self._vocab_size
        return ids_n.astype(np.int32)


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


def _make_source(cfg: DataConfig, tokenizer: Tokenizer | None) -> Sequence[Any]:
    if cfg.format == "synthetic":
        vocab_size = cfg.synthetic_vocab_size or (tokenizer.vocab_size if tokenizer else None)
        if vocab_size is None:
            raise DataConfigError(
                "format 'synthetic' needs data.synthetic_vocab_size or a tokenizer"
            )
        return SyntheticSource(cfg.synthetic_num_docs, vocab_size, cfg.seq_len, cfg.seed)
    return file_source(cfg.format, cfg.paths, cfg.kind, cfg.text_field)


def file_source(fmt: str, paths: Sequence[str], kind: str, text_field: str = "text") -> Sequence[Any]:
    """Random access over the records of `paths` (globs) in `fmt`: text or chat records."""
    files = expand_paths(paths)
    if fmt == "jsonl":
        return JsonlSource(files)
    if fmt == "parquet":
        if kind == "text":
            return ParquetSource(files, [text_field])
        return ParquetSource(files, ["messages"], optional_columns=["tools"])
    if fmt == "arrayrecord":
        return grain.sources.ArrayRecordDataSource(files)
    raise DataConfigError(f"unknown record format {fmt!r}; expected one of {FORMATS[:-1]}")


def process_records(
    source: Sequence[Any], *, process_index: int, process_count: int, shuffle: bool, seed: int,
    num_epochs: int | None,
) -> grain.MapDataset:
    """This process's contiguous block of `source`, shuffled per epoch, repeated `num_epochs`
    times (None: forever). Raises ValueError for an empty source or fewer records than processes."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})"
        )
    n = len(source)
    if not n:
        raise ValueError("the data source has no records")
    if n < process_count:
        raise ValueError(f"{n} records cannot be sharded over {process_count} processes")
    ds = grain.MapDataset.source(source)[
        n * process_index // process_count : n * (process_index + 1) // process_count
    ]
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


def _as_record(raw: Any) -> Mapping[str, Any]:
    record = json.loads(raw) if isinstance(raw, bytes) else raw
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
            raise KeyError(
                f"record has no field {self._text_field!r} (fields: {sorted(record)}); "
                "set data.text_field"
            )
        text = record[self._text_field]
        if not isinstance(text, str):
            raise TypeError(f"field {self._text_field!r} is a {type(text).__name__}, not a string")
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


def _clean_messages(messages: Any) -> list[dict[str, Any]]:
    """Parses a JSON string and drops null fields (Parquet structs fill absent keys with None)."""
    if isinstance(messages, str):
        messages = json.loads(messages)
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"chat record 'messages' must be a non-empty list, got {messages!r:.200}")
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


class _ChatToDocument:
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def __call__(self, raw: Any) -> dict[str, np.ndarray]:
        record = _as_record(raw)
        if "messages" not in record:
            raise KeyError(f"chat record has no 'messages' field (fields: {sorted(record)})")
        tools = record.get("tools")
        if isinstance(tools, str):
            tools = json.loads(tools)
        messages = _clean_messages(record["messages"])
        return _document(*chat_tokens(self._tokenizer, messages, tools or None))


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
        raise DataConfigError(
            f"data.batch_size={batch_size} is not divisible by process_count={process_count}"
        )
    return batch_size // process_count


def make_iter_dataset(
    cfg: Any,
    tokenizer: Tokenizer | None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The pipeline as a grain IterDataset of [per_process_batch, L] batches (see module doc).

    process_index / process_count default to jax.process_index() / jax.process_count().
    """
    data_cfg = DataConfig.from_config(cfg)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = per_process_batch_size(data_cfg.batch_size, process_count)
    to_document: Callable[[Any], dict[str, np.ndarray]]
    if data_cfg.format == "synthetic":
        to_document = _document
    elif tokenizer is None:
        raise ValueError(f"format {data_cfg.format!r} needs a tokenizer")
    elif data_cfg.kind == "text":
        to_document = _TextToDocument(tokenizer, data_cfg.text_field)
    else:
        to_document = _ChatToDocument(tokenizer)

    source = _make_source(data_cfg, tokenizer)
    if not len(source):
        raise ValueError(f"no records in data.paths {list(data_cfg.paths)}")
    ds = process_records(
        source, process_index=process_index, process_count=process_count, shuffle=data_cfg.shuffle,
        seed=data_cfg.seed, num_epochs=data_cfg.num_epochs,
    )
    log.info(
        "data: %d records, process %d/%d, %d rows of %d tokens per batch",
        len(source), process_index, process_count, batch_size, data_cfg.seq_len,
    )
    ds = ds.map(to_document)
    threads = data_cfg.num_threads
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads)
    )
    it_ds = grain_exp.FlatMapIterDataset(it_ds, _SplitLongDocuments(data_cfg.seq_len))
    lengths = {k: data_cfg.seq_len for k in _DOC_FEATURES}
    if data_cfg.packing == "first_fit":
        it_ds = grain_exp.FirstFitPackIterDataset(
            it_ds, length_struct=lengths, num_packing_bins=data_cfg.packing_bins, shuffle_bins=False
        )
    else:
        it_ds = grain_exp.ConcatThenSplitIterDataset(it_ds, length_struct=lengths)
    return it_ds.map(_packed_row).batch(
        batch_size, batch_fn=_StackAndPad(batch_size, data_cfg.seq_len)
    )


def make_dataset(
    cfg: Any,
    tokenizer: Tokenizer | None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of batches {name: [per_process_batch, L]} (see module doc)."""
    return iter(
        make_iter_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count)
    )


# ----------------------------------------------------------------------------------------------
# Prompts for rollouts (on-policy distillation): batches of chat records, not packed rows.


def prompt_default_config() -> ml_collections.ConfigDict:
    """The `prompts` config section: chat records whose `messages` end in a user turn."""
    return ml_collections.ConfigDict(
        {
            "format": "jsonl",  # 'jsonl' | 'parquet' | 'arrayrecord' (records as in `data`)
            "paths": None,
            "batch_size": 8,  # prompts per step (global)
            "seed": 0,
            "shuffle": True,
            "num_epochs": None,  # None repeats forever
            "num_threads": 1,
        }
    )


def prompt_record(raw: Any) -> dict[str, Any]:
    """A chat record with `messages` parsed and cleaned and `tools` parsed; other fields kept."""
    record = dict(_as_record(raw))
    if "messages" not in record:
        raise KeyError(f"prompt record has no 'messages' field (fields: {sorted(record)})")
    record["messages"] = _clean_messages(record["messages"])
    tools = record.get("tools")
    record["tools"] = (json.loads(tools) if isinstance(tools, str) else tools) or None
    return record


def make_prompt_dataset(
    cfg: Any, *, process_index: int | None = None, process_count: int | None = None
) -> grain.DatasetIterator:
    """A checkpointable iterator of lists of `prompt_record`s, batch_size // process_count each.

    `cfg` is a `prompt_default_config()` section. A final partial batch is dropped, so every step
    sees the same number of prompts. Raises DataConfigError for bad fields, FileNotFoundError for
    missing files.
    """
    values = dict(prompt_default_config().items())
    unknown = sorted(set(cfg.keys()) - set(values))
    if unknown:
        raise DataConfigError(f"unknown prompts config field(s) {unknown}; known: {sorted(values)}")
    values.update(cfg.items())
    paths = (values["paths"],) if isinstance(values["paths"], str) else values["paths"]
    if not paths:
        raise DataConfigError(f"prompts.paths must be a path/glob or a list of them, got {values['paths']!r}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = per_process_batch_size(values["batch_size"], process_count)
    ds = process_records(
        file_source(values["format"], paths, "chat"), process_index=process_index, process_count=process_count,
        shuffle=values["shuffle"], seed=values["seed"], num_epochs=values["num_epochs"],
    ).map(prompt_record)
    threads = values["num_threads"]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads))
    return iter(it_ds.batch(batch_size, drop_remainder=True, batch_fn=list))


def iterator_state(iterator: grain.DatasetIterator) -> bytes:
    """The iterator position as JSON bytes (small: indices and packing counters)."""
    return json.dumps(iterator.get_state()).encode("utf-8")


def restore_iterator_state(iterator: grain.DatasetIterator, state: bytes) -> None:
    """Moves an iterator built from the same config to a position saved by `iterator_state`."""
    iterator.set_state(json.loads(state))
