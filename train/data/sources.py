"""Random access to every record of a data set, in one fixed global order: (where, record) pairs.

`where` names the record in errors: `path:line` (JSONL, 1-based, counting blank lines) or
`path, record index i` (Parquet, ArrayRecord, 0-based). JSONL and Parquet are indexed at start-up
(line offsets, footers); Parquet is read a row group at a time (the last few cached), so a shuffled
read can cost a row-group read; ArrayRecord (`write_arrayrecord`) is random-access.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter

from qwen3_jax.errors import ConfigError
from train.data.config import FORMATS
from train.data.documents import BadRecords


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
    few) whole row groups. Raises KeyError naming a file without one of `columns`."""

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
    """Writes records as UTF-8 JSON ArrayRecord entries, as `format='arrayrecord'` reads them;
    returns how many."""
    writer = ArrayRecordWriter(path, "group_size:1")
    count = 0
    try:
        for record in records:
            writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8"))
            count += 1
    finally:
        writer.close()
    return count


def file_source(
    fmt: str, paths: Sequence[str], kind: str, bad_records: BadRecords, text_field: str = "text"
) -> Sequence[tuple[str, Any]]:
    """Random access over the records of `paths` (globs) in `fmt`, text or chat, as (where,
    record) pairs; an empty file goes to `bad_records` (an error, or skipped and counted).

    Raises FileNotFoundError (see `expand_paths`), KeyError for a Parquet file without the column,
    DataError for an empty file under on_bad_record='error'.
    """
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
