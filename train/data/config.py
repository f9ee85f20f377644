"""The schema of the `data` (packed training rows) and `prompts` (rollout prompts) config sections.

`train.schema.config_dict(DataConfig)` is the `data` section a trainer's ConfigDict starts from, and
`from_config_dict(DataConfig, section)` the validated section. Checks that need the files or the
process count are functions the job's validation calls once: `expand_paths`, `process_shards`.
"""

from __future__ import annotations

import dataclasses

from train.schema import need

FORMATS = ("jsonl", "parquet", "arrayrecord", "synthetic")
KINDS = ("text", "chat")
PACKINGS = ("first_fit", "concat_then_split")
ON_BAD_RECORD = ("error", "skip")


def _integer(value: object, name: str, minimum: int, optional: bool = False) -> None:
    need((optional and value is None) or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum),
         f"{name} must be {'unset or ' if optional else ''}an integer >= {minimum}, got {value!r}")


def _choice(value: object, name: str, options: tuple[str, ...]) -> None:
    need(value in options, f"{name} must be one of {options}, got {value!r}")


def _paths(config: DataConfig | PromptConfig, required: bool) -> None:
    """Normalises `paths` to a tuple (a config file or the command line may give one string)."""
    paths = config.paths
    if isinstance(paths, str):
        paths = (paths,)
    elif isinstance(paths, list):
        paths = tuple(paths)
    object.__setattr__(config, "paths", paths)
    if required:
        need(isinstance(paths, tuple) and paths and all(isinstance(p, str) and p for p in paths),
             f"paths must be a path/glob or a non-empty list of them for format {config.format!r}, "
             f"got {config.paths!r}")


@dataclasses.dataclass(frozen=True)
class RecordPolicy:
    """What a stream does with bad records and with files that changed under a checkpoint."""

    # 'error': the first bad record or empty file stops the stream, naming file and line (JSONL, 1-based)
    # or record index (Parquet, ArrayRecord, 0-based); 'skip': they are left out, logged and counted.
    on_bad_record: str = "error"
    # Resuming with data files that differ from the checkpoint's is an error unless True (then a warning).
    allow_changed_data: bool = False

    def __post_init__(self):
        _choice(self.on_bad_record, "on_bad_record", ON_BAD_RECORD)
        need(isinstance(self.allow_changed_data, bool),
             f"allow_changed_data must be a bool, got {self.allow_changed_data!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig(RecordPolicy):
    """Packed training rows: where the records are, how they become documents and rows."""

    format: str = "jsonl"  # one of FORMATS; 'synthetic' needs no files (arithmetic progressions)
    paths: str | tuple[str, ...] | None = None  # a path/glob or a list of them, read in sorted-glob order
    kind: str = "text"  # 'text' (pretraining: record[text_field]) | 'chat' (SFT: `messages`, optional `tools`)
    text_field: str = "text"  # the text field of 'text' records
    seq_len: int = 2048  # L, the tokens of every packed row
    batch_size: int = 8  # global rows per step; each process yields batch_size // process_count
    seed: int = 0  # the shuffle (reshuffled every epoch) and the synthetic documents
    shuffle: bool = True  # shuffle each shard's records
    num_epochs: int | None = None  # passes over the data; None repeats forever
    # 'first_fit': documents packed whole into `packing_bins` rows at a time (padding; an SFT sample is
    # never cut); 'concat_then_split': documents concatenated and cut at row boundaries (no padding).
    packing: str = "first_fit"
    # Independent pipelines the records are split into, a multiple of the process count dividing
    # batch_size; None: one per process. Fixed shards give the same batches on any number of processes.
    shards: int | None = None
    packing_bins: int = 32  # rows first_fit fills at once: more bins, less padding, more buffering
    num_threads: int = 4  # threads that read and tokenise records
    synthetic_num_docs: int = 4096  # synthetic documents per epoch
    synthetic_vocab_size: int | None = None  # synthetic token range; None: the tokenizer's (or model's) vocab

    def __post_init__(self):
        super().__post_init__()
        _choice(self.format, "format", FORMATS)
        _paths(self, required=self.format != "synthetic")
        _choice(self.kind, "kind", KINDS)
        need(isinstance(self.text_field, str) and self.text_field,
             f"text_field must be a non-empty string, got {self.text_field!r}")
        _integer(self.seq_len, "seq_len", 2)
        _integer(self.batch_size, "batch_size", 1)
        _integer(self.seed, "seed", 0)
        need(isinstance(self.shuffle, bool), f"shuffle must be a bool, got {self.shuffle!r}")
        _integer(self.num_epochs, "num_epochs", 1, optional=True)
        _choice(self.packing, "packing", PACKINGS)
        # An SFT sample is never cut: concat_then_split would train the rest of an answer at
        # position 0 of the next row with no prompt in context.
        need(not (self.kind == "chat" and self.packing == "concat_then_split"),
             "kind='chat' with packing='concat_then_split' would cut conversations at row boundaries; "
             "chat (SFT) records need packing='first_fit', which keeps every sample whole")
        _integer(self.shards, "shards", 1, optional=True)
        _integer(self.packing_bins, "packing_bins", 1)
        _integer(self.num_threads, "num_threads", 1)
        _integer(self.synthetic_num_docs, "synthetic_num_docs", 1)
        _integer(self.synthetic_vocab_size, "synthetic_vocab_size", 2, optional=True)


@dataclasses.dataclass(frozen=True)
class PromptConfig(RecordPolicy):
    """Rollout prompts: chat records whose `messages` end in a user turn, batched whole (never packed or cut)."""

    format: str = "jsonl"  # 'jsonl' | 'parquet' | 'arrayrecord', records as in DataConfig
    paths: str | tuple[str, ...] | None = None  # a path/glob or a list of them
    batch_size: int = 8  # prompts per step (global)
    seed: int = 0  # the shuffle, reshuffled every epoch
    shuffle: bool = True
    num_epochs: int | None = None  # None repeats forever
    num_threads: int = 1

    def __post_init__(self):
        super().__post_init__()
        _choice(self.format, "format", FORMATS[:-1])
        _paths(self, required=True)
        _integer(self.batch_size, "batch_size", 1)
        _integer(self.seed, "seed", 0)
        need(isinstance(self.shuffle, bool), f"shuffle must be a bool, got {self.shuffle!r}")
        _integer(self.num_epochs, "num_epochs", 1, optional=True)
        _integer(self.num_threads, "num_threads", 1)
