"""Training entry point: pretraining and SFT of Qwen3 models on a device mesh.

    python -m train.train --config configs/tiny_pretrain.py --workdir /tmp/tiny \
        [--config.train.steps=500 --config.mesh.fsdp=4 ...]

The config file's `get_config()` starts from `default_config()` below, which lists every field;
`validate` turns it into a frozen `Experiment` and rejects bad values before any device work.
A workdir that already holds checkpoints resumes from the latest one (state, data position and
all; `model.init_from` then plays no part), so re-running the same command after a crash or
preemption continues the run. SIGTERM saves a checkpoint at the current step and exits with 0.
A NaN / inf loss or gradient norm stops the run with an error naming the step; states are saved
only once their step's metrics are known to be finite, so the last checkpoint is a good one.

Before a resumed run trains, the checkpoint is checked (see `resume`): its files against the
manifest written when it was saved, its model config against the run's (every differing field
named), its data files' fingerprint against today's files. `checkpoint.restore_step` picks another
step than the latest; `checkpoint.on_corrupt='fallback'` falls back from a corrupt step to the
newest intact one. Steps set aside by either are moved to `checkpoints.discarded/`, never deleted.
A checkpoint that cannot be written (a full disk) stops the run with an error naming the step,
the last complete step intact. Bad data records stop the run with their file and line, or with
`data.on_bad_record='skip'` are skipped and counted (`skipped_records` in metrics.jsonl).

The workdir receives `checkpoints/`, `metrics.jsonl` (one JSON object per step), TensorBoard
event files in `tensorboard/`, `config.json` (the resolved config) and, when the data needs one,
the tokenizer, so the workdir is a checkpoint like any other (`qwen3_jax.load_any`, the infer
CLIs, `qwen3_jax.convert`, `model.init_from`).

Metrics are fetched one step late: step k's metrics are read after step k+1 is dispatched, so
the host never makes the device wait. Step time is the interval between consecutive fetches
(the device time per step once the pipeline is full; the first step includes compilation).
MFU = model FLOPs per token (6 x matmul parameters per token + attention, PaLM appendix B) x
tokens/s over the mesh's peak: `train.peak_flops` x devices, or, when unset, the FLOP/s of a
large matmul run on every device at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
import tqdm
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_dict, config_flags

from qwen3_jax.cli import quiet_orbax_logs
from qwen3_jax.layout import TRAINER_CHECKPOINTS
from qwen3_jax.config import DTYPES, ConfigError, Qwen3Config, preset
from qwen3_jax.hf import CheckpointError
from qwen3_jax.model import abstract_model, count_params
from qwen3_jax.sharding import MESH_AXES, initialize_distributed, make_mesh
from qwen3_jax.tokenizer import Tokenizer, tokenizer_dir
from train import data as data_lib
from train.checkpoint import (
    CheckpointWriteError, Checkpointer, CorruptCheckpointError, init_from_config, load_params, save_tokenizer,
)
from train.step import (
    OptimizerConfig, StepConfig, TrainState, abstract_train_state, batch_sharding, init_train_state, make_train_step,
)


class TrainConfigError(ValueError):
    """An invalid training config; raised before any device work."""


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


ON_CORRUPT = ("error", "fallback")


# ------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """Every field of a training config with its default. Fields that may be unset are typed
    placeholders, so they can still be set from the command line."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameter init (dropout-free model: the only randomness besides data.seed)
    c.distributed = False  # several processes (TPU pod slices): call jax.distributed.initialize() first
    # Where discovery fails (GPU clusters, CPU processes; TPU, SLURM and Open MPI are discovered):
    # 'host:port' of process 0's coordinator, the number of processes and this one's index.
    c.coordinator_address = config_dict.placeholder(str)
    c.num_processes = config_dict.placeholder(int)
    c.process_id = config_dict.placeholder(int)
    # The TPU slice the config is written for, as jax.experimental.topologies names it
    # ("v5p:4x4x4"); when set, the mesh must use all of its chips. benchmarks.tpu_aot compiles for it.
    c.topology = config_dict.placeholder(str)
    c.model = ml_collections.ConfigDict({
        "preset": config_dict.placeholder(str),  # qwen3_jax.config.PRESETS name ...
        "init_from": config_dict.placeholder(str),  # ... or an HF / Orbax checkpoint directory
        # Runtime policy. Master params are always float32; `dtype` is the compute dtype.
        "dtype": "float32",
        "remat": "none",
        "scan_layers": True,
        "moe_impl": "auto",
        "attention": "auto",  # qwen3_jax.attention: auto, einsum, blockwise, splash, cudnn
        # Other Qwen3Config fields (architecture of a preset, router_aux_loss_coef, ...).
        "overrides": ml_collections.ConfigDict(),
    })
    c.tokenizer = config_dict.placeholder(str)  # 'qwen3', a tokenizer dir / tokenizer.json / spm .model
    c.data = data_lib.default_config()  # see train/data.py
    # Typed placeholders instead of data.py's plain None defaults, which the command line cannot set.
    c.data.paths = config_dict.placeholder(object)  # a path / glob, or a list of them
    c.data.num_epochs = config_dict.placeholder(int)
    c.data.shards = config_dict.placeholder(int)
    c.data.synthetic_vocab_size = config_dict.placeholder(int)
    c.mesh = ml_collections.ConfigDict({a: 1 for a in MESH_AXES})  # one axis may be -1: the rest
    c.optimizer = ml_collections.ConfigDict({
        "learning_rate": 3e-4,
        "warmup_steps": 100,
        "decay_steps": config_dict.placeholder(int),  # None: train.steps
        "end_learning_rate_ratio": 0.1,
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.1,
        "max_grad_norm": 1.0,
        "no_decay": ("norm", "embed"),
    })
    c.train = ml_collections.ConfigDict({
        "steps": 1000,
        "microbatches": 1,
        "ce_chunk_len": 512,
        "z_loss_coef": 0.0,
        "log_every": 10,  # progress lines when not on a terminal (metrics.jsonl gets every step)
        "peak_flops": config_dict.placeholder(float),  # per device, FLOP/s; None: measure
    })
    c.checkpoint = ml_collections.ConfigDict({
        "every": 500,
        "keep": 3,
        "async_save": True,
        # Resume from this step instead of the latest; the newer steps are set aside (once: a rerun
        # of the same command resumes from the run's own later steps).
        "restore_step": config_dict.placeholder(int),
        # 'error': a corrupt step stops the run, naming the file; 'fallback': it is set aside and
        # the next older intact step is restored.
        "on_corrupt": "error",
    })
    return c


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A validated training config."""

    model: Qwen3Config
    init_from: str | None
    tokenizer: str | None
    mesh: dict[str, int]  # every axis of MESH_AXES, -1 resolved
    optimizer: OptimizerConfig
    step: StepConfig
    data: ml_collections.ConfigDict
    steps: int
    seed: int
    log_every: int
    peak_flops: float | None
    checkpoint_every: int
    checkpoint_keep: int
    async_checkpoint: bool
    restore_step: int | None
    on_corrupt: str


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise TrainConfigError(msg)


def model_config(model: ml_collections.ConfigDict) -> Qwen3Config:
    need(
        (model.preset is None) != (model.init_from is None),
        "set exactly one of model.preset (random init) and model.init_from (checkpoint weights), "
        f"got preset={model.preset!r}, init_from={model.init_from!r}",
    )
    need(model.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got {model.dtype!r}")
    overrides = dict(model.overrides)
    need("param_dtype" not in overrides, "master params are float32; set model.dtype for the compute dtype")
    overrides.update(
        dtype=model.dtype, param_dtype="float32", remat=model.remat, scan_layers=model.scan_layers,
        moe_impl=model.moe_impl, attention=model.attention,
    )
    try:
        if model.preset is not None:
            return preset(model.preset, **overrides)
        need(os.path.isdir(model.init_from), f"model.init_from={model.init_from!r} is not a directory")
        return init_from_config(model.init_from, **overrides)
    except (ConfigError, CheckpointError, TypeError) as e:
        raise TrainConfigError(f"model: {e}") from e


def mesh_shape(mesh: ml_collections.ConfigDict) -> dict[str, int]:
    shape = dict(mesh)
    unknown = sorted(set(shape) - set(MESH_AXES))
    need(not unknown, f"unknown mesh axes {unknown}; allowed: {MESH_AXES}")
    need(all(v == -1 or v >= 1 for v in shape.values()), f"mesh sizes must be >= 1 or -1, got {shape}")
    need(list(shape.values()).count(-1) <= 1, f"at most one mesh axis may be -1, got {shape}")
    devices = jax.device_count()
    known = math.prod(v for v in shape.values() if v != -1)
    if -1 in shape.values():
        need(devices % known == 0, f"mesh {shape}: {devices} devices are not divisible by {known}")
        shape = {a: devices // known if v == -1 else v for a, v in shape.items()}
    total = math.prod(shape.values())
    need(
        total <= devices,
        f"mesh {shape} needs {total} devices but only {devices} are available ({jax.default_backend()})",
    )
    return {a: shape.get(a, 1) for a in MESH_AXES}


def topology_chips(topology: str) -> int:
    """Chips of a TPU slice named as jax.experimental.topologies does: 64 for "v5p:4x4x4"."""
    m = re.fullmatch(r"[a-z0-9]+:(\d+(?:x\d+)*)", topology)
    need(m is not None, f"topology {topology!r} is not a TPU slice name like 'v5p:4x4x4' or 'v6e:2x4'")
    return math.prod(int(d) for d in m.group(1).split("x"))


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


def validate(config: ml_collections.ConfigDict) -> Experiment:
    """Checks every field and their combinations; raises TrainConfigError naming the fields."""
    model = model_config(config.model)
    mesh = mesh_shape(config.mesh)
    if config.topology is not None:
        need(topology_chips(config.topology) == math.prod(mesh.values()),
             f"mesh {mesh} uses {math.prod(mesh.values())} devices but topology={config.topology!r} has "
             f"{topology_chips(config.topology)} chips")
    check_shardable(model, mesh)
    try:
        data_cfg = data_lib.DataConfig.from_config(config.data)
        data_lib.process_shards(data_cfg.batch_size, data_cfg.shards, jax.process_index(), jax.process_count())
    except data_lib.DataConfigError as e:
        raise TrainConfigError(str(e)) from e
    data = ml_collections.ConfigDict(config.data.to_dict())
    if data_cfg.format == "synthetic":
        vocab = data_cfg.synthetic_vocab_size or model.vocab_size
        need(vocab <= model.vocab_size,
              f"data.synthetic_vocab_size={vocab} exceeds the model's vocab_size={model.vocab_size}")
        data.synthetic_vocab_size = vocab
    else:
        try:
            data_lib.expand_paths(data_cfg.paths)
        except FileNotFoundError as e:
            raise TrainConfigError(f"missing data files: {e}") from e
        need(
            config.tokenizer is not None or checkpoint_tokenizer(config.model.init_from) is not None,
            f"data.format={data_cfg.format!r} needs a tokenizer: set `tokenizer` or init from a checkpoint "
            "directory that ships one (tokenizer.json or tokenizer.model)",
        )

    return experiment(config, model, mesh, data=data, batch_size=data_cfg.batch_size, seq_len=data_cfg.seq_len,
                      batch_field="data.batch_size", seq_field="data.seq_len")


def experiment(
    config: ml_collections.ConfigDict, model: Qwen3Config, mesh: dict[str, int], *, data: ml_collections.ConfigDict,
    batch_size: int, seq_len: int, batch_field: str, seq_field: str,
) -> Experiment:
    """Checks the fields every trainer shares (batch split, chunking, steps, optimizer,
    checkpoints) for `batch_size` rows of `seq_len` tokens; `*_field` name them in errors."""
    dp = mesh["data"] * mesh["fsdp"] * mesh["expert"]
    micro = config.train.microbatches
    need(micro >= 1, f"train.microbatches must be >= 1, got {micro}")
    need(
        batch_size % dp == 0,
        f"{batch_field}={batch_size} is not divisible by the data-parallel degree {dp} "
        f"(mesh data={mesh['data']} x fsdp={mesh['fsdp']} x expert={mesh['expert']})",
    )
    need(
        batch_size % (micro * dp) == 0,
        f"{batch_field}={batch_size} in train.microbatches={micro} gives microbatches of {batch_size / micro:g} "
        f"rows, which must be a multiple of the data-parallel degree {dp}",
    )
    chunk = config.train.ce_chunk_len
    need(chunk >= 1 and seq_len % min(chunk, seq_len) == 0,
          f"train.ce_chunk_len={chunk} must divide {seq_field}={seq_len}")
    steps = config.train.steps
    need(steps >= 1, f"train.steps must be >= 1, got {steps}")

    o = config.optimizer
    for pattern in o.no_decay:
        try:
            re.compile(pattern)
        except re.error as e:
            raise TrainConfigError(f"optimizer.no_decay: bad regex {pattern!r}: {e}") from e
    decay_steps = steps if o.decay_steps is None else o.decay_steps
    need(o.learning_rate > 0, f"optimizer.learning_rate must be positive, got {o.learning_rate}")
    need(0 <= o.warmup_steps < decay_steps,
          f"optimizer.warmup_steps={o.warmup_steps} must be in [0, decay_steps={decay_steps})")
    need(0 <= o.end_learning_rate_ratio <= 1,
          f"optimizer.end_learning_rate_ratio must be in [0, 1], got {o.end_learning_rate_ratio}")
    ckpt = config.checkpoint
    need(ckpt.every >= 1 and ckpt.keep >= 1,
          f"checkpoint.every and checkpoint.keep must be >= 1, got {ckpt.every}, {ckpt.keep}")
    need(ckpt.restore_step is None or (isinstance(ckpt.restore_step, int) and ckpt.restore_step >= 1),
          f"checkpoint.restore_step must be a saved step (>= 1) or unset, got {ckpt.restore_step!r}")
    need(ckpt.on_corrupt in ON_CORRUPT, f"checkpoint.on_corrupt must be one of {ON_CORRUPT}, got {ckpt.on_corrupt!r}")
    peak = config.train.peak_flops
    need(peak is None or peak > 0, f"train.peak_flops must be positive or unset, got {peak}")
    return Experiment(
        model=model,
        init_from=config.model.init_from,
        tokenizer=config.tokenizer,
        mesh=mesh,
        optimizer=OptimizerConfig(
            learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, decay_steps=decay_steps,
            end_learning_rate_ratio=o.end_learning_rate_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
            weight_decay=o.weight_decay, max_grad_norm=o.max_grad_norm, no_decay=tuple(o.no_decay),
        ),
        step=StepConfig(microbatches=micro, ce_chunk_len=min(chunk, seq_len), z_loss_coef=config.train.z_loss_coef),
        data=data,
        steps=steps,
        seed=config.seed,
        log_every=max(1, config.train.log_every),
        peak_flops=peak,
        checkpoint_every=ckpt.every,
        checkpoint_keep=ckpt.keep,
        async_checkpoint=ckpt.async_save,
        restore_step=ckpt.restore_step,
        on_corrupt=ckpt.on_corrupt,
    )


def checkpoint_tokenizer(init_from: str | None) -> str | None:
    """`init_from` when it ships a tokenizer (HF and converted checkpoints do, and so do this
    trainer's workdirs, their checkpoints/ dirs and step folders: see `tokenizer_dir`)."""
    return init_from if init_from and tokenizer_dir(init_from) is not None else None


def load_tokenizer(exp: Experiment) -> Tokenizer | None:
    """The tokenizer `exp` names or its checkpoint ships; None for synthetic data."""
    if exp.data.format == "synthetic":
        return None
    return tokenizer_from_spec(exp.tokenizer or checkpoint_tokenizer(exp.init_from), exp.model)


def tokenizer_from_spec(spec: str, model: Qwen3Config) -> Tokenizer:
    """'qwen3', a directory that ships a tokenizer, a tokenizer.json or a sentencepiece .model;
    raises TrainConfigError when it has more ids than the model's vocabulary."""
    if spec == "qwen3":
        tokenizer = Tokenizer.qwen3()
    elif os.path.isdir(spec):
        tokenizer = Tokenizer.from_checkpoint(spec)
    else:
        tokenizer = Tokenizer.from_sentencepiece(spec) if spec.endswith(".model") else Tokenizer.from_file(spec)
    need(
        tokenizer.vocab_size <= model.vocab_size,
        f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.vocab_size}",
    )
    return tokenizer


# ------------------------------------------------------------------------------------ metrics


def flops_per_token(cfg: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters used in matmuls + 12 x L x heads x head_dim x T.

    The embedding lookup is not a matmul (a tied embedding still counts once, as the unembedding);
    MoE counts the active experts only. Attention counts the full T x T score matrix (PaLM).
    """
    _, active = count_params(cfg)
    matmul_params = active - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def measure_peak_flops(mesh: Mesh, dtype: str) -> float:
    """FLOP/s of the whole mesh on square matmuls, one per device at the same time (best of 3)."""
    n = 1024 if jax.default_backend() == "cpu" else 8192
    devices = mesh.devices.size
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    x = jax.jit(lambda: jnp.ones((devices, n, n), dtype), out_shardings=sharding)()
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a), out_shardings=sharding)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 * devices / best


class MetricsWriter:
    """Per-step scalars to metrics.jsonl and TensorBoard, plus a progress bar or periodic lines."""

    def __init__(self, workdir: str, exp: Experiment, start_step: int):
        self._primary = jax.process_index() == 0
        self._log_every, self._steps = exp.log_every, exp.steps
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self._primary else None
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard")) if self._primary else None
        self._bar = tqdm.tqdm(total=exp.steps, initial=start_step, dynamic_ncols=True,
                              disable=not (self._primary and sys.stderr.isatty()))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._primary:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()  # readable by whoever watches the run, even after a kill -9
        for name, value in scalars.items():
            self._tb.add_scalar(f"train/{name}", value, step)
        line = format_metrics(scalars)
        if not self._bar.disable:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(line, refresh=False)
        elif step % self._log_every == 0 or step == self._steps:
            print(f"step {step}/{self._steps} | {line}", flush=True)

    def close(self) -> None:
        if self._primary:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


# (metric, format) in display order; a line shows the metrics its step reported.
_DISPLAY = (
    ("loss", "loss {:.4f}"), ("divergence", "divergence {:.4f}"), ("z_loss", "z_loss {:.4f}"),
    ("aux_loss", "aux_loss {:.4f}"), ("student_entropy", "H_student {:.3f}"), ("teacher_entropy", "H_teacher {:.3f}"),
    ("completion_len", "len {:.1f}"), ("closed_thinking", "closed {:.2f}"), ("grad_norm", "grad_norm {:.3f}"),
    ("learning_rate", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"), ("step_time", "{:.3f} s/step"),
    ("mfu", "MFU {:.1%}"),
)


def format_metrics(s: dict[str, float]) -> str:
    return " | ".join(fmt.format(s[k]) for k, fmt in _DISPLAY if k in s)


# --------------------------------------------------------------------------------------- loop


class PreemptionWatch:
    """True once the run should checkpoint and stop.

    One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption service
    (started by jax.distributed.initialize) catches the signal and orbax picks a step at which
    every host stops together; installing our own handler there would shadow it.
    """

    def __init__(self, checkpointer: Checkpointer):
        self._checkpointer = checkpointer
        self._flag = False
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def __call__(self, step: int) -> bool:
        return self._checkpointer.reached_preemption(step) if self._multi else self._flag

    def close(self) -> None:
        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


def start_distributed(config: ml_collections.ConfigDict) -> None:
    """Joins the multi-process job when `config.distributed` (before anything touches the devices),
    with the config's coordinator_address / num_processes / process_id (None: discovered)."""
    if config.distributed:
        initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)


def global_batch(host: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows assembled into global [batch, ...] arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the experiment in `workdir`; returns a summary of this invocation."""
    start_distributed(config)
    exp = validate(config)
    cfg = exp.model
    mesh = make_mesh(exp.mesh)
    tokenizer = load_tokenizer(exp)
    data = data_lib.make_stream(exp.data, tokenizer)
    train_step = make_train_step(cfg, exp.step, exp.optimizer, mesh)
    sharding = batch_sharding(mesh, cfg.rules)
    tokens_per_step = exp.data.batch_size * exp.data.seq_len
    model_flops_per_step = flops_per_token(cfg, exp.data.seq_len) * tokens_per_step

    def rates(scalars: dict[str, float], step_time: float, peak: float) -> dict[str, float]:
        return {"tokens_per_s": tokens_per_step / step_time, "mfu": model_flops_per_step / step_time / peak}

    return run_loop(
        config, workdir, exp, mesh, tokenizer, data,
        lambda state, host: train_step(state, global_batch(host, sharding)), rates,
    )


StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]
RatesFn = Callable[[dict[str, float], float, float], dict[str, float]]


def run_loop(
    config: ml_collections.ConfigDict, workdir: str, exp: Experiment, mesh: Mesh, tokenizer: Tokenizer | None,
    data: data_lib.DataStream, step_fn: StepFn, rates: RatesFn,
) -> dict[str, float]:
    """The loop every trainer shares: init or resume, steps, metrics, checkpoints, SIGTERM.

    The workdir ships `tokenizer` (when there is one) at its root, so it serves as a checkpoint.

    `step_fn(state, next(data.iterator))` applies one update and returns the new state and its
    metrics (device arrays, read one step late, or host floats); `rates(scalars, step_time,
    peak_flops)` adds `tokens_per_s` and `mfu`. States are saved (with the data iterator's
    position, `data.checkpoint_info()` and the model config) every `checkpoint.every` steps, at
    the end and on SIGTERM, and only once their step's loss and gradient norm are known to be
    finite. A resumed run is checked first (`resume`); nothing in the workdir is written before.
    """
    cfg = exp.model
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(os.path.join(workdir, TRAINER_CHECKPOINTS), every=exp.checkpoint_every,
                                keep=exp.checkpoint_keep, async_save=exp.async_checkpoint)
    try:
        resumed = resume(checkpointer, exp, data, abstract_train_state(cfg, exp.optimizer, mesh))
    except BaseException:
        checkpointer.close()
        raise
    if resumed is None:
        params = None if exp.init_from is None else load_params(exp.init_from, cfg, mesh)
        state = init_train_state(cfg, exp.optimizer, mesh, seed=exp.seed, params=params)
        start = 0
    else:
        start, state = resumed
        if start >= exp.steps:
            print(f"nothing to do: step {start} of train.steps={exp.steps} is done", flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    save_tokenizer(workdir, tokenizer)  # the workdir ships its tokenizer, like any checkpoint

    peak = exp.peak_flops * mesh.devices.size if exp.peak_flops else measure_peak_flops(mesh, cfg.dtype)
    writer = MetricsWriter(workdir, exp, start)
    preemption = PreemptionWatch(checkpointer)
    skipping = data.bad_records.policy == "skip"
    history: list[dict[str, float]] = []
    last_fetch = time.perf_counter()

    def report(step: int, metrics: dict[str, Any]) -> None:
        nonlocal last_fetch
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        # A step that blocks on its own work (a rollout) times itself; an asynchronous one is
        # timed from one metrics fetch to the next.
        step_time = scalars.pop("step_time", now - last_fetch)
        last_fetch = now
        if not (math.isfinite(scalars["loss"]) and math.isfinite(scalars["grad_norm"])):
            checkpointer.wait()
            good = checkpointer.latest_step()
            kept = ("no checkpoint was saved" if good is None
                    else f"the last good checkpoint is step {good} in {checkpointer.directory}")
            raise NonFiniteLossError(
                f"non-finite loss {scalars['loss']} (grad_norm {scalars['grad_norm']}) at step {step}; "
                f"stopping: {kept}"
            )
        scalars.update(step_time=step_time, **rates(scalars, step_time, peak))
        if skipping:  # records skipped so far (read ahead of this step by the pipeline's buffers)
            scalars["skipped_records"] = data.bad_records.count
        history.append(scalars)
        writer.write(step, scalars)

    try:
        pending = None
        for step in range(start + 1, exp.steps + 1):
            checkpointer.poll()  # a background save that failed stops the run here
            try:
                host_batch = next(data.iterator)
            except StopIteration:
                raise TrainConfigError(
                    f"the data ran out before step {step} of train.steps={exp.steps}: raise its num_epochs "
                    "(None repeats forever) or lower train.steps"
                ) from None
            state, metrics = step_fn(state, host_batch)
            if pending is not None:
                report(*pending)  # the previous step: the device is already busy with this one
            pending = (step, metrics)
            preempted = preemption(step)
            if preempted or step == exp.steps or checkpointer.should_save(step):
                report(*pending)  # a state is saved only once its step is known to be finite
                pending = None
                checkpointer.save(step, state, data.iterator, cfg, data.checkpoint_info())
            if preempted:
                print(f"preempted: saved step {step}, exiting", flush=True)
                break
        checkpointer.wait()
    finally:
        preemption.close()
        writer.close()
        checkpointer.close()
    if skipping:
        print(f"data: {data.bad_records.summary()}", flush=True)
    return summarize(history)


def resume(
    checkpointer: Checkpointer, exp: Experiment, data: data_lib.DataStream, abstract_state: TrainState,
) -> tuple[int, TrainState] | None:
    """The (step, state) a run continues from, None for a fresh run; moves `data.iterator` there.

    The step is the latest, or `exp.restore_step` (the steps after it are set aside, once: when
    they were set aside before, this is a rerun that continues from its own later steps). Before
    anything is restored, the step's files are verified, its model config compared with
    `exp.model` (ConfigMismatchError naming the fields) and its data files with today's
    (`DataStream.resume`). A corrupt step raises CorruptCheckpointError naming the step and the
    file, or with `exp.on_corrupt='fallback'` is set aside and the next older step tried.
    """
    applied = checkpointer.discarded_dir(f"restore_step_{exp.restore_step}")  # marks the choice as made
    if exp.restore_step is not None and not os.path.isdir(applied):
        steps = checkpointer.steps()
        if exp.restore_step not in steps:
            raise CheckpointError(
                f"checkpoint.restore_step={exp.restore_step} is not a saved step of {checkpointer.directory}; the "
                f"saved steps are {steps}")
        for newer in (s for s in steps if s > exp.restore_step):
            print(f"checkpoint.restore_step={exp.restore_step}: step {newer} set aside to "
                  f"{checkpointer.set_aside(newer, os.path.basename(applied))}", flush=True)
        if jax.process_index() == 0:
            os.makedirs(applied, exist_ok=True)
    while (step := checkpointer.latest_step()) is not None:
        try:
            checkpointer.verify(step)
            checkpointer.check_model_config(step, exp.model)
            data.resume(checkpointer.data_info(step), f"checkpoint step {step} in {checkpointer.directory}")
            state = checkpointer.restore(step, abstract_state, data.iterator)
        except CorruptCheckpointError as e:
            if exp.on_corrupt == "error":
                raise CorruptCheckpointError(
                    f"{e}. Set checkpoint.on_corrupt='fallback' to resume from the newest intact step, or "
                    "checkpoint.restore_step to choose one") from e
            print(f"{e}; set aside to {checkpointer.set_aside(step, 'corrupt')}, falling back", flush=True)
            continue
        print(f"resuming from step {step} in {checkpointer.directory}", flush=True)
        return step, state
    if os.path.isdir(checkpointer.discarded_dir("corrupt")):
        raise CorruptCheckpointError(
            f"no intact checkpoint is left in {checkpointer.directory} (the corrupt ones are in "
            f"{checkpointer.discarded_dir('corrupt')}); move one back, or start a new workdir")
    return None


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """First and last loss of this invocation; speed averaged past its first (compiling) step."""
    if not history:
        return {}
    steady = history[1:] or history
    return {
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in steady])),
        "mfu": float(np.mean([h["mfu"] for h in steady])),
    }


# --------------------------------------------------------------------------------------- main

USER_ERRORS = (TrainConfigError, NonFiniteLossError, CheckpointError, CheckpointWriteError, data_lib.DataError,
               FileNotFoundError)


def run_command(run_fn: Callable[[ml_collections.ConfigDict, str], Any], argv: list[str],
                errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
    """What the `--config` / `--workdir` commands share: `run_fn(config, workdir)` with Orbax's
    per-save INFO logs silenced (`quiet_orbax_logs`), and a user error printed as one line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax_logs()
    try:
        return run_fn(flags.FLAGS.config, flags.FLAGS.workdir)
    except errors as e:
        sys.exit(f"error: {e}")


def define_command_flags(config_help: str, workdir_help: str) -> None:
    """`--config` (a config file, overridable field by field) and `--workdir`, both required.
    Called under `__main__`, not at import: config files import these modules for default_config()."""
    config_flags.DEFINE_config_file("config", None, config_help)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    summary = run_command(run, argv)
    if summary:
        print(
            f"done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} | "
            f"{summary['tokens_per_s']:,.0f} tok/s | MFU {100 * summary['mfu']:.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    define_command_flags("Experiment config file (configs/*.py).", "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
    app.run(main)
