"""Grain input pipelines: packed [batch, L] rows for pretraining (text) and SFT (chat), prompt batches for rollouts.

`make_stream(DataConfig, tokenizer)` yields {tokens, targets, loss_mask, segment_ids, positions}, each
[batch_size // process_count, L]; `make_prompt_stream(PromptConfig)` yields lists of chat records. Both
return a `DataStream`: a checkpointable iterator plus the files' fingerprint and bad-record count that
a checkpoint records beside it. Record and row formats: README, "Data".
"""

from train.data.config import DataConfig, PromptConfig
from train.data.documents import BadRecords
from train.data.pipeline import ROW_FEATURES, make_dataset, make_stream, process_shards
from train.data.prompts import make_prompt_dataset, make_prompt_stream
from train.data.sources import expand_paths, write_arrayrecord
from train.data.state import DataStream

__all__ = [
    "ROW_FEATURES", "BadRecords", "DataConfig", "DataStream", "PromptConfig",
    "expand_paths", "make_dataset", "make_prompt_dataset", "make_prompt_stream", "make_stream", "process_shards",
    "write_arrayrecord",
]
