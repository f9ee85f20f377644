"""The training job's config: frozen dataclass sections, each field declared once, and `resolve`.

`default_config()` is the ConfigDict `configs/*.py` start from and `--config.<field>=` overrides;
`train_config(cd)` validates it (field by field, in each section's `__post_init__`). `resolve` does
the checks that need devices or files and returns the `Job` the loop runs on. Other trainers
(distillation) reuse the sections and `resolve_shared`. Every error is a ConfigError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import ml_collections
from flax import nnx

from qwen3_jax.config import DTYPES, Qwen3Config, preset
from qwen3_jax.errors import CheckpointError, ConfigError
from qwen3_jax.model import abstract_model
from qwen3_jax.sharding import MESH_AXES, mesh_sizes
from qwen3_jax.tokenizer import Tokenizer, tokenizer_dir
from train import data as data_lib
from train.data.config import DataConfig
from train.schema import config_dict, from_config_dict, need

ON_CORRUPT = ("error", "fallback")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model: a preset (random init) or a checkpoint's weights, and the runtime policy.
    Master params are always float32; `dtype` is the compute dtype."""

    preset: str | None = None  # qwen3_jax.config.PRESETS name ...
    init_from: str | None = None  # ... or an HF / Orbax checkpoint / trainer workdir directory
    dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = True
    moe_impl: str = "auto"
    attention: str = "auto"  # qwen3_jax.attention: auto, einsum, blockwise, splash, cudnn
    # Other Qwen3Config fields (architecture of a preset, router_aux_loss_coef, ...).
    overrides: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        need((self.preset is None) != (self.init_from is None),
             "set exactly one of model.preset (random init) and model.init_from (checkpoint weights), "
             f"got preset={self.preset!r}, init_from={self.init_from!r}")
        need(self.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        need("param_dtype" not in self.overrides,
             "master params are float32; set model.dtype for the compute dtype")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (qwen3_jax.sharding.MESH_AXES); one may be -1: all remaining devices."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def shape(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping, masked weight decay."""

    learning_rate: float = 3e-4  # peak, reached after warmup_steps
    warmup_steps: int = 100
    # Length of the whole schedule, warmup included; None: the run's train.steps (see `resolve_shared`).
    decay_steps: int | None = None
    end_learning_rate_ratio: float = 0.1  # final learning rate as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    no_decay: tuple[str, ...] = ("norm", "embed")  # regexes searched in "runs/0/attn/q_norm/weight"

    def __post_init__(self):
        for pattern in self.no_decay:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"optimizer.no_decay: bad regex {pattern!r}: {e}") from e
        need(self.learning_rate > 0, f"optimizer.learning_rate must be positive, got {self.learning_rate}")
        need(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.decay_steps is None or self.warmup_steps < self.decay_steps,
             f"optimizer.warmup_steps={self.warmup_steps} must be in [0, decay_steps={self.decay_steps})")
        need(0 <= self.end_learning_rate_ratio <= 1,
             f"optimizer.end_learning_rate_ratio must be in [0, 1], got {self.end_learning_rate_ratio}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The `train` section: the run's length, what one compiled step does, and reporting."""

    steps: int = 1000
    microbatches: int = 1  # gradient accumulation steps inside one compiled step
    ce_chunk_len: int = 512  # sequence positions per cross-entropy chunk (must divide seq_len)
    z_loss_coef: float = 0.0  # weight of mean(logsumexp(logits)^2) over loss tokens
    log_every: int = 10  # progress lines when not on a terminal (metrics.jsonl gets every step)
    peak_flops: float | None = None  # per device, FLOP/s; None: measure

    def __post_init__(self):
        need(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        need(self.microbatches >= 1, f"train.microbatches must be >= 1, got {self.microbatches}")
        need(self.ce_chunk_len >= 1, f"train.ce_chunk_len must be >= 1, got {self.ce_chunk_len}")
        need(self.peak_flops is None or self.peak_flops > 0,
             f"train.peak_flops must be positive or unset, got {self.peak_flops}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    async_save: bool = True
    # Resume from this step instead of the latest; the newer steps are set aside (once: a rerun of
    # the same command resumes from the run's own later steps).
    restore_step: int | None = None
    # 'error': a corrupt step stops the run, naming the file; 'fallback': it is set aside and the
    # next older intact step is restored.
    on_corrupt: str = "error"

    def __post_init__(self):
        need(self.every >= 1 and self.keep >= 1,
             f"checkpoint.every and checkpoint.keep must be >= 1, got {self.every}, {self.keep}")
        need(self.restore_step is None or self.restore_step >= 1,
             f"checkpoint.restore_step must be a saved step (>= 1) or unset, got {self.restore_step!r}")
        need(self.on_corrupt in ON_CORRUPT,
             f"checkpoint.on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """The slice and mesh a released config's bfloat16 weights are served on (benchmarks.tpu_aot)."""

    topology: str | None = None
    mesh: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """The sections every trainer's config has (`TrainConfig`, `train.distill.config.DistillConfig`)."""

    seed: int = 0  # parameter init (dropout-free model: the only randomness besides data.seed)
    distributed: bool = False  # several processes (TPU pod slices): jax.distributed.initialize() first
    # Where discovery fails (GPU clusters, CPU processes; TPU, SLURM and Open MPI are discovered):
    # 'host:port' of process 0's coordinator, the number of processes and this one's index.
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # The TPU slice the config is written for, as jax.experimental.topologies names it
    # ("v5p:4x4x4"); when set, the mesh must use all of its chips. benchmarks.tpu_aot compiles for it.
    topology: str | None = None
    tokenizer: str | None = None  # 'qwen3', a tokenizer dir / tokenizer.json / spm .model
    model: ModelConfig | None = None  # required: the config file names the model
    mesh: MeshConfig = MeshConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: StepConfig = StepConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def __post_init__(self):
        need(self.model is not None, "set model.preset (random init) or model.init_from (checkpoint weights)")


@dataclasses.dataclass(frozen=True)
class TrainConfig(JobConfig):
    """A pretraining or SFT job (`python -m train.train`)."""

    data: DataConfig | None = None  # required (train/data/config.py); jsonl needs data.paths
    serving: ServingConfig = ServingConfig()

    def __post_init__(self):
        super().__post_init__()
        need(self.data is not None, "set the data section")


def default_config() -> ml_collections.ConfigDict:
    """Every field of the training job with its default (`configs/*.py` start from it)."""
    return config_dict(TrainConfig)


def train_config(cd: ml_collections.ConfigDict | dict) -> TrainConfig:
    """The validated TrainConfig of a ConfigDict (ConfigError names an unknown or bad field)."""
    return from_config_dict(TrainConfig, cd)


# ------------------------------------------------------------------------- what needs devices or files


@dataclasses.dataclass(frozen=True)
class Job:
    """A resolved trainer config: what `train.loop.run_loop` runs on.

    `config` is the job's validated config (a TrainConfig, or another trainer's with the same
    `seed`, `model`, `train` and `checkpoint` sections); the other fields are resolved from it.
    """

    config: Any
    model: Qwen3Config
    mesh: dict[str, int]  # every axis of MESH_AXES, -1 resolved
    optimizer: OptimizerConfig  # decay_steps set
    step: StepConfig  # ce_chunk_len at most the sequence length
    data: DataConfig  # synthetic_vocab_size resolved
    tokenizer: str | None  # a `tokenizer_from_spec` spec; None for synthetic data


def model_config(model: ModelConfig) -> Qwen3Config:
    """The Qwen3Config of `model` (reads `init_from`'s config); ConfigError names what is wrong."""
    overrides = dict(model.overrides)
    overrides.update(
        dtype=model.dtype, param_dtype="float32", remat=model.remat, scan_layers=model.scan_layers,
        moe_impl=model.moe_impl, attention=model.attention,
    )
    try:
        if model.preset is not None:
            return preset(model.preset, **overrides)
        need(os.path.isdir(model.init_from), f"model.init_from={model.init_from!r} is not a directory")
        from train.checkpoint import init_from_config  # Orbax: only when a checkpoint is read
        return init_from_config(model.init_from, **overrides)
    except (ConfigError, CheckpointError, TypeError) as e:
        raise ConfigError(f"model: {e}") from e


def topology_chips(topology: str) -> int:
    """Chips of a TPU slice named as jax.experimental.topologies does: 64 for "v5p:4x4x4"."""
    m = re.fullmatch(r"[a-z0-9]+:(\d+(?:x\d+)*)", topology)
    need(m is not None, f"topology {topology!r} is not a TPU slice name like 'v5p:4x4x4' or 'v6e:2x4'")
    return math.prod(int(d) for d in m.group(1).split("x"))


def resolve_mesh(mesh: MeshConfig, topology: str | None) -> dict[str, int]:
    """Every axis of MESH_AXES on this job's devices (`jax.device_count()`), -1 resolved; with a
    `topology`, the mesh must use all of its chips."""
    try:
        shape = mesh_sizes(mesh.shape(), jax.device_count())
    except ValueError as e:
        raise ConfigError(f"mesh: {e}") from None
    shape = {a: shape.get(a, 1) for a in MESH_AXES}
    if topology is not None:
        need(topology_chips(topology) == math.prod(shape.values()),
             f"mesh {shape} uses {math.prod(shape.values())} devices but topology={topology!r} has "
             f"{topology_chips(topology)} chips")
    return shape


def check_shardable(cfg: Qwen3Config, mesh: dict[str, int]) -> None:
    """Every sharded parameter dimension must split evenly over its mesh axes."""
    _, state = nnx.split(abstract_model(cfg))
    for path, var in nnx.to_flat_state(state):
        spec = cfg.rules.spec(tuple(var.get_metadata()["axes"]), MESH_AXES)
        for dim, axes in zip(var.shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            ways = math.prod(mesh[a] for a in axes)
            need(dim % ways == 0, f"parameter {'/'.join(map(str, path))} has a dimension of {dim}, which the "
                                  f"mesh splits {ways} ways ({' x '.join(axes)}): it must divide evenly")


def resolve_shared(
    config: Any, mesh: dict[str, int], *, batch_size: int, seq_len: int, batch_field: str, seq_field: str,
) -> tuple[OptimizerConfig, StepConfig]:
    """The optimizer and step every trainer resolves the same way, for `batch_size` rows of
    `seq_len` tokens on `mesh` (`*_field` name them in errors): the batch splits over the
    data-parallel degree and the microbatches, `train.ce_chunk_len` divides `seq_len`, and the
    schedule's length is `optimizer.decay_steps` or else `train.steps`. A warmup that does not fit
    an unset schedule (a shortened run) is cut to a tenth of the run, with a note.
    """
    dp = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    micro = config.train.microbatches
    need(batch_size % dp == 0,
         f"{batch_field}={batch_size} is not divisible by the data-parallel degree {dp} "
         f"(mesh data={mesh['data']} x fsdp={mesh['fsdp']} x expert={mesh['expert']})")
    need(batch_size % (micro * dp) == 0,
         f"{batch_field}={batch_size} in train.microbatches={micro} gives microbatches of {batch_size / micro:g} "
         f"rows, which must be a multiple of the data-parallel degree {dp}")
    chunk = config.train.ce_chunk_len
    need(seq_len % min(chunk, seq_len) == 0, f"train.ce_chunk_len={chunk} must divide {seq_field}={seq_len}")
    o, steps = config.optimizer, config.train.steps
    if o.decay_steps is None:
        warmup = o.warmup_steps
        if warmup >= steps:
            warmup = steps // 10
            if jax.process_index() == 0:
                print(f"note: optimizer.warmup_steps={o.warmup_steps} does not fit train.steps={steps}: warming up "
                      f"for {warmup} steps (a tenth of the run); set optimizer.warmup_steps to choose", flush=True)
        o = dataclasses.replace(o, warmup_steps=warmup, decay_steps=steps)
    return o, dataclasses.replace(config.train, ce_chunk_len=min(chunk, seq_len))


def checkpoint_tokenizer(init_from: str | None) -> str | None:
    """`init_from` when it ships a tokenizer (HF and converted checkpoints do, and so do this
    trainer's workdirs, their checkpoints/ dirs and step folders: see `tokenizer_dir`)."""
    return init_from if init_from and tokenizer_dir(init_from) is not None else None


def tokenizer_from_spec(spec: str, model: Qwen3Config) -> Tokenizer:
    """'qwen3', a directory that ships a tokenizer, a tokenizer.json or a sentencepiece .model.

    Raises:
      ConfigError: the tokenizer has more ids than the model's vocabulary.
    """
    if spec == "qwen3":
        tokenizer = Tokenizer.qwen3()
    elif os.path.isdir(spec):
        tokenizer = Tokenizer.from_checkpoint(spec)
    else:
        tokenizer = Tokenizer.from_sentencepiece(spec) if spec.endswith(".model") else Tokenizer.from_file(spec)
    need(tokenizer.vocab_size <= model.vocab_size,
         f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.vocab_size}")
    return tokenizer


def resolve(config: TrainConfig) -> Job:
    """Everything about `config` that needs the devices or files, checked before any device work.

    Raises:
      ConfigError: naming the field (the mesh, the model's checkpoint, shardability, the batch
        split, data files, the tokenizer).
    """
    model = model_config(config.model)
    mesh = resolve_mesh(config.mesh, config.topology)
    check_shardable(model, mesh)
    data_cfg = config.data
    data_lib.process_shards(data_cfg.batch_size, data_cfg.shards, jax.process_index(), jax.process_count())
    tokenizer = None
    if data_cfg.format == "synthetic":
        vocab = data_cfg.synthetic_vocab_size or model.vocab_size
        need(vocab <= model.vocab_size,
             f"data.synthetic_vocab_size={vocab} exceeds the model's vocab_size={model.vocab_size}")
        data_cfg = dataclasses.replace(data_cfg, synthetic_vocab_size=vocab)
    else:
        try:
            data_lib.expand_paths(data_cfg.paths)
        except FileNotFoundError as e:
            raise ConfigError(f"missing data files: {e}") from e
        tokenizer = config.tokenizer or checkpoint_tokenizer(config.model.init_from)
        need(tokenizer is not None,
             f"data.format={data_cfg.format!r} needs a tokenizer: set `tokenizer` or init from a checkpoint "
             "directory that ships one (tokenizer.json or tokenizer.model)")
    optimizer, step = resolve_shared(config, mesh, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
                                     batch_field="data.batch_size", seq_field="data.seq_len")
    return Job(config=config, model=model, mesh=mesh, optimizer=optimizer, step=step, data=data_cfg,
               tokenizer=tokenizer)
