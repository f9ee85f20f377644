"""Records -> packed [batch, L] rows: shard, shuffle, convert, split long documents, pack, batch.

The records are cut into `shards` contiguous blocks, each shuffled per epoch, packed and batched by
its own pipeline; process p of P runs shards p * shards/P ... (p + 1) * shards/P - 1 and yields their
rows in shard order, so with `shards` fixed the global batches are the same on any number of processes.
Shards' batch counts per epoch differ with packing: with a finite num_epochs, train for a fixed number
of steps. The iterators are grain's, checkpointable (`get_state()` is a small JSON-able dict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import grain.experimental as grain_exp
import jax
import numpy as np

from qwen3_jax.errors import ConfigError, DataError
from qwen3_jax.tokenizer import Tokenizer
from train.data.config import DataConfig
from train.data.documents import BadRecords, ChatToDocument, Checked, TextToDocument, document
from train.data.sources import SyntheticSource, expand_paths, file_source
from train.data.state import DataStream, fingerprint
from train.schema import need

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


def per_process_batch_size(batch_size: int, process_count: int, field: str = "data.batch_size") -> int:
    """Rows per process of a global batch; ConfigError (naming `field`) unless every process gets
    the same number."""
    need(batch_size % process_count == 0, f"{field}={batch_size} is not divisible by process_count={process_count}")
    return batch_size // process_count


def process_shards(batch_size: int, shards: int | None, process_index: int, process_count: int) -> range:
    """The shards process `process_index` of `process_count` runs (`shards` None: one per
    process). Raises ConfigError unless the shards split evenly over the processes and
    `batch_size` evenly over the shards."""
    per_process_batch_size(batch_size, process_count)
    shards = process_count if shards is None else shards
    need(shards % process_count == 0, f"data.shards={shards} is not a multiple of process_count={process_count}")
    need(batch_size % shards == 0, f"data.batch_size={batch_size} is not divisible by data.shards={shards}")
    per_process = shards // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


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


class _SplitLongDocuments(grain_exp.FlatMapTransform):
    """Cuts a document into chunks of at most seq_len tokens, each its own segment from position 0
    (targets and mask were set before, so a chunk's last target is the next chunk's first token).
    Only text documents reach it longer than a row: chat documents are checked against seq_len."""

    def __init__(self, seq_len: int):
        self._seq_len = seq_len

    def flat_map(self, doc: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = len(doc["tokens"])
        starts = range(0, n, self._seq_len)
        return [{k: v[i : i + self._seq_len] for k, v in doc.items()} for i in starts]


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

    Workaround for grain 0.2.18 (delete once the pinned grain restores its own state from JSON):
    checkpoints store iterator states as JSON, which turns tuples into lists, and the packer marks
    "no partial document carried into the next row" with the slice (-1, -1) and tests for it with
    `!=`, so a restored [-1, -1] reads as a carried document and every later row is shifted.
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
    ds = ds.map(Checked(to_document))
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


def _source(data_cfg: DataConfig, tokenizer: Tokenizer | None, bad_records: BadRecords) -> Sequence[Any]:
    if data_cfg.format == "synthetic":
        vocab_size = data_cfg.synthetic_vocab_size or (tokenizer.vocab_size if tokenizer else None)
        need(vocab_size is not None, "format 'synthetic' needs data.synthetic_vocab_size or a tokenizer")
        return SyntheticSource(data_cfg.synthetic_num_docs, vocab_size, data_cfg.seq_len, data_cfg.seed)
    return file_source(data_cfg.format, data_cfg.paths, data_cfg.kind, bad_records, data_cfg.text_field)


def make_dataset(
    data_cfg: DataConfig,
    tokenizer: Tokenizer | None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    bad_records: BadRecords | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of batches {name: [per_process_batch, L]} (ROW_FEATURES).

    process_index / process_count default to jax.process_index() / jax.process_count().
    `bad_records` applies the section's `on_bad_record` policy and counts what it skips (a fresh
    one when None). Raises ConfigError for shards that do not split evenly (`process_shards`) or a
    file format without a tokenizer, FileNotFoundError for missing files, DataError for an empty
    file or a source without records, and, under on_bad_record='error', at the `next()` that
    reaches a bad record.
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
        to_document = document
    elif tokenizer is None:
        raise ConfigError(f"format {data_cfg.format!r} needs a tokenizer")
    elif data_cfg.kind == "text":
        to_document = TextToDocument(tokenizer, data_cfg.text_field)
    else:
        to_document = ChatToDocument(tokenizer, data_cfg.seq_len)

    source = _source(data_cfg, tokenizer, bad_records)
    if not len(source):
        raise DataError(f"no records in data.paths {list(data_cfg.paths)}")
    rows = data_cfg.batch_size // num_shards
    log.info(
        "data: %d records, process %d/%d runs shards %d-%d of %d, %d rows of %d tokens each per batch",
        len(source), process_index, process_count, shards[0], shards[-1], num_shards, rows, data_cfg.seq_len,
    )
    pipelines = [_shard_pipeline(data_cfg, source, to_document, bad_records, k, num_shards) for k in shards]
    if len(pipelines) == 1:
        return iter(pipelines[0])
    # strict=False: a finite epoch ends with the shortest shard.
    return iter(grain_exp.ZipIterDataset(pipelines, strict=False).map(_concat_rows))


def make_stream(data_cfg: DataConfig, tokenizer: Tokenizer | None, **kwargs: Any) -> DataStream:
    """`make_dataset`'s iterator with what a trainer checkpoints beside it (see `DataStream`);
    `kwargs` go to `make_dataset`."""
    bad_records = BadRecords(data_cfg.on_bad_record)
    iterator = make_dataset(data_cfg, tokenizer, bad_records=bad_records, **kwargs)
    files = () if data_cfg.format == "synthetic" else fingerprint(expand_paths(data_cfg.paths))
    return DataStream(iterator, files, bad_records, data_cfg.allow_changed_data, "data")
