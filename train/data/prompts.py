"""Prompts for rollouts (on-policy distillation): batches of whole chat records, never packed or cut."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grain
import jax

from train.data.config import PromptConfig
from train.data.documents import BadRecords, Checked, as_record, chat_fields
from train.data.pipeline import per_process_batch_size, shard_records
from train.data.sources import expand_paths, file_source
from train.data.state import DataStream, fingerprint


def prompt_record(raw: Any) -> dict[str, Any]:
    """A chat record with `messages` parsed and cleaned and `tools` parsed; other fields kept.
    Raises ValueError naming the problem when the chat template rejects the messages or the
    conversation ends with an assistant turn (a prompt is answered by the model)."""
    record = dict(as_record(raw))
    record["messages"], record["tools"] = chat_fields(record)
    if record["messages"][-1]["role"] == "assistant":
        raise ValueError("a prompt must not end with an assistant turn (the model writes that turn)")
    return record


def make_prompt_dataset(
    cfg: PromptConfig, *, process_index: int | None = None, process_count: int | None = None,
    bad_records: BadRecords | None = None, check: Callable[[dict[str, Any]], Any] | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of lists of `prompt_record`s, batch_size // process_count each.

    A final partial batch is dropped, so every step sees the same number of prompts. `check(record)`
    may reject a record by raising ValueError (e.g. a prompt too long for the rollout: prompts are
    never truncated); rejected and malformed records follow `cfg.on_bad_record` through
    `bad_records` (a fresh one when None), as in `make_dataset`.
    Raises ConfigError when the batch does not split over the processes, FileNotFoundError for
    missing files, DataError for an empty file or, under on_bad_record='error', at the `next()`
    that reaches a bad record.
    """
    bad_records = BadRecords(cfg.on_bad_record) if bad_records is None else bad_records
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    batch_size = per_process_batch_size(cfg.batch_size, process_count, "prompts.batch_size")

    def convert(raw: Any) -> dict[str, Any]:
        record = prompt_record(raw)
        if check is not None:
            check(record)
        return record

    ds = shard_records(
        file_source(cfg.format, cfg.paths, "chat", bad_records), shard=process_index,
        num_shards=process_count, shuffle=cfg.shuffle, seed=cfg.seed, num_epochs=cfg.num_epochs,
    ).map(Checked(convert))
    threads = cfg.num_threads
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads))
    return iter(it_ds.filter(bad_records.passes).batch(batch_size, drop_remainder=True, batch_fn=list))


def make_prompt_stream(cfg: PromptConfig, **kwargs: Any) -> DataStream:
    """`make_prompt_dataset`'s iterator with what a trainer checkpoints beside it (see
    `DataStream`); `kwargs` go to `make_prompt_dataset`."""
    bad_records = BadRecords(cfg.on_bad_record)
    iterator = make_prompt_dataset(cfg, bad_records=bad_records, **kwargs)
    return DataStream(iterator, fingerprint(expand_paths(cfg.paths)), bad_records, cfg.allow_changed_data, "prompts")
