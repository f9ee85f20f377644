"""The distillation job's config: its schema (each field declared once), and `resolve`.

`default_config()` is the ConfigDict `configs/distill_*.py` start from and `--config.<field>=`
overrides; `resolve` checks what needs devices or files and returns the `DistillJob` the run uses.
`model` is the student; `prompts` feed its rollouts; the off-policy phase's SFT job is composed from
this config (`off_policy_config`), never re-declared.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from infer import batch as batch_lib
from infer import rollout as rollout_lib
from qwen3_jax.config import DTYPES, Qwen3Config
from qwen3_jax.errors import CheckpointError, ConfigError
from train import data as data_lib
from train.config import (
    Job, JobConfig, TrainConfig, checkpoint_tokenizer, check_shardable, model_config, resolve, resolve_mesh,
    resolve_shared,
)
from train.data.config import DataConfig, PromptConfig
from train.distill.divergence import DistillLoss
from train.rollout import RolloutConfig, biasing_settings
from train.schema import config_dict, from_config_dict, need


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    init_from: str | None = None  # HF / qwen3-jax checkpoint, or a workdir
    dtype: str = "float32"  # parameters and compute; bfloat16 halves a big teacher's memory
    moe_impl: str = "auto"
    attention: str = "auto"

    def __post_init__(self):
        need(self.init_from is not None, "teacher.init_from must name the teacher's checkpoint")
        need(self.dtype in DTYPES, f"teacher.dtype must be one of {DTYPES}, got {self.dtype!r}")


OFF_POLICY_MODES = {"think": ("think",), "no_think": ("no_think",), "both": ("think", "no_think")}


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig:
    """Phase 1 (response distillation), run first when steps > 0: the teacher answers every prompt of
    prompts.paths (JSONL) in `modes` (infer.batch, resumable), and the student is fine-tuned on those
    records by train.train's SFT path in WORKDIR/off_policy; phase 2 (on-policy) starts from that run."""

    steps: int = 0  # SFT steps; 0 skips the phase (the student starts from model.*)
    modes: str = "both"  # 'think' | 'no_think' | 'both' (the report distils both)
    samples: int = 1  # teacher samples per prompt and mode
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    thinking_budget: int | None = None  # the teacher's, on think samples; None: no limit
    temperature: float | None = None  # sampling; None: Qwen's value for the mode
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    keep: str | None = None  # 'module:function' verifier: trains on accepted records only
    keep_unfinished: bool = False  # train on responses cut by max_new_tokens too
    generate_batch_size: int = 64  # rows per teacher decode call
    seq_len: int | None = None  # SFT rows; None: rollout.max_prompt_len + max_new_tokens
    batch_size: int | None = None  # SFT rows per step; None: prompts.batch_size
    learning_rate: float | None = None  # None: optimizer.learning_rate
    warmup_steps: int | None = None  # None: optimizer.warmup_steps

    def __post_init__(self):
        need(self.steps >= 0, f"off_policy.steps must be >= 0, got {self.steps}")
        need(self.modes in OFF_POLICY_MODES,
             f"off_policy.modes must be one of {sorted(OFF_POLICY_MODES)}, got {self.modes!r}")
        need(self.generate_batch_size >= 1,
             f"off_policy.generate_batch_size must be >= 1, got {self.generate_batch_size}")


@dataclasses.dataclass(frozen=True)
class DistillConfig(JobConfig):
    """A strong-to-weak distillation job (`python -m train.distill`). `train.ce_chunk_len` is the
    divergence's chunk of sequence positions."""

    prompts: PromptConfig | None = None  # required: the rollouts' prompt records
    teacher: TeacherConfig | None = None  # required
    rollout: RolloutConfig = RolloutConfig()
    # The report minimises "the KL divergence" between the logits without saying which direction.
    # Default: reverse KL(student || teacher) (beta = 1) over the full vocabulary: on the student's own
    # samples it penalises the mass the student puts where the teacher would not go, the objective of
    # on-policy GKD (Agarwal et al. 2024) and of Thinking Machines' on-policy distillation.
    distill: DistillLoss = DistillLoss()
    off_policy: OffPolicyConfig = OffPolicyConfig()

    def __post_init__(self):
        super().__post_init__()
        need(self.prompts is not None and self.prompts.paths is not None,
             "prompts.paths must name the prompt files (JSONL/Parquet/ArrayRecord chat records)")
        need(self.teacher is not None, "teacher.init_from must name the teacher's checkpoint")
        need(self.train.z_loss_coef == 0, "train.z_loss_coef has no meaning in distillation; leave it 0")
        check_sampled_signal(self.distill, self.rollout)


def default_config() -> ml_collections.ConfigDict:
    """Every field of a distillation job with its default (`configs/distill_*.py` start from it)."""
    return config_dict(DistillConfig)


def distill_config(cd: ml_collections.ConfigDict | dict) -> DistillConfig:
    """The validated DistillConfig of a ConfigDict (ConfigError names an unknown or bad field)."""
    return from_config_dict(DistillConfig, cd)


def check_sampled_signal(loss: DistillLoss, rollout: RolloutConfig) -> None:
    """Refuses a sampled-token signal ('k1', 'k3') with rollouts that do not sample from the student's
    softmax at distill.temperature over the whole vocabulary: its gradient would be biased (issue 22).
    Refusing, rather than overriding the sampling, keeps the rollout settings what the config says.

    Raises:
      ConfigError: naming the rollout fields and the values the signal needs.
    """
    if loss.signal not in ("k1", "k3"):
        return
    for mode in rollout.modes_used():
        bad = biasing_settings(rollout.row_sampling(mode), loss.temperature)
        need(not bad, (
            f"distill.signal={loss.signal!r} is an unbiased estimate only on tokens sampled from the student's "
            f"softmax at distill.temperature={loss.temperature} with no truncation, but {mode} rollouts sample with "
            f"{', '.join('rollout.' + b for b in bad)} (unset rollout fields take Qwen's values for the mode): set "
            f"rollout.temperature={loss.temperature}, rollout.top_k=0, rollout.top_p=1.0 and rollout.min_p=0.0, "
            "or use distill.signal='full' or 'top_k'"))


# ------------------------------------------------------------------------- what needs devices or files


@dataclasses.dataclass(frozen=True)
class DistillJob:
    """A resolved distillation config: the student's trainer `Job` (its data = the prompts) plus the rest."""

    config: DistillConfig
    student: Job
    teacher: Qwen3Config
    tokenizer: str
    off_policy: Job | None  # phase 1's SFT, when off_policy.steps > 0


def off_policy_settings(config: DistillConfig) -> batch_lib.Settings:
    """What the teacher generates in phase 1 (infer.batch's settings)."""
    o = config.off_policy
    sampling = {k: getattr(o, k) for k in rollout_lib.SAMPLING_KEYS if getattr(o, k, None) is not None}
    return batch_lib.Settings(
        modes=OFF_POLICY_MODES[o.modes], samples=o.samples, seed=config.seed,
        max_new_tokens=o.max_new_tokens or config.rollout.max_new_tokens, thinking_budget=o.thinking_budget,
        sampling=sampling, keep=o.keep, keep_unfinished=o.keep_unfinished,
    )


def off_policy_config(config: DistillConfig, tokenizer: str, responses: str) -> TrainConfig:
    """Phase 1's SFT job on the teacher's `responses`: this config's shared sections, with the
    optimizer's own schedule length and the off_policy overrides."""
    o = config.off_policy
    optimizer = dataclasses.replace(
        config.optimizer, decay_steps=None,
        **{k: getattr(o, k) for k in ("learning_rate", "warmup_steps") if getattr(o, k) is not None})
    data = DataConfig(
        format="jsonl", kind="chat", paths=responses, packing="first_fit", num_epochs=None, seed=config.prompts.seed,
        num_threads=1, seq_len=o.seq_len or config.rollout.seq_len, batch_size=o.batch_size or config.prompts.batch_size)
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(JobConfig)}
    return TrainConfig(**{**shared, "tokenizer": tokenizer, "optimizer": optimizer,
                          "train": dataclasses.replace(config.train, steps=o.steps)}, data=data)


def load_teacher_config(t: TeacherConfig) -> Qwen3Config:
    try:
        from train.checkpoint import init_from_config  # Orbax: only when a checkpoint is read
        return init_from_config(t.init_from, dtype=t.dtype, param_dtype=t.dtype, moe_impl=t.moe_impl,
                                attention=t.attention, scan_layers=True, remat="none")
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f"teacher: {e}") from e


def resolve_distill(config: DistillConfig) -> DistillJob:
    """Everything about `config` that needs the devices or files, checked before any device work.

    Raises:
      ConfigError: naming the field (models, mesh, vocabularies, context, prompt files, tokenizer,
        the off-policy phase's SFT job).
    """
    student = model_config(config.model)
    mesh = resolve_mesh(config.mesh, config.topology)
    check_shardable(student, mesh)
    teacher = load_teacher_config(config.teacher)
    need(teacher.vocab_size == student.vocab_size,
         f"the teacher's vocab_size ({teacher.vocab_size}) differs from the student's ({student.vocab_size}): "
         "logit distillation needs one vocabulary")
    check_shardable(teacher, mesh)
    try:
        data_lib.expand_paths(config.prompts.paths)
    except FileNotFoundError as e:
        raise ConfigError(f"missing prompt files: {e}") from e
    rollout, loss = config.rollout, config.distill
    for who, cfg in (("student", student), ("teacher", teacher)):
        need(rollout.seq_len <= cfg.context_length,
             f"rollout.max_prompt_len + rollout.max_new_tokens = {rollout.seq_len} exceeds the {who}'s context "
             f"of {cfg.context_length} positions")
    if loss.signal == "top_k":
        need(loss.top_k <= student.vocab_size, f"distill.top_k={loss.top_k} exceeds the vocabulary")
    spec = (config.tokenizer or checkpoint_tokenizer(config.model.init_from)
            or checkpoint_tokenizer(config.teacher.init_from))
    need(spec is not None, "distillation renders chat prompts: set `tokenizer` or use a student or teacher "
                           "checkpoint that ships one (tokenizer.json or tokenizer.model)")
    optimizer, step = resolve_shared(
        config, mesh, batch_size=config.prompts.batch_size, seq_len=rollout.seq_len,
        batch_field="prompts.batch_size", seq_field="rollout.max_prompt_len + rollout.max_new_tokens")
    job = Job(config=config, model=student, mesh=mesh, optimizer=optimizer, step=step, data=config.prompts,
              tokenizer=spec)
    return DistillJob(config, job, teacher, spec, _resolve_off_policy(config, spec))


def _resolve_off_policy(config: DistillConfig, tokenizer: str) -> Job | None:
    if not config.off_policy.steps:
        return None
    need(config.prompts.format == "jsonl", "off_policy reads the prompts as JSONL (infer.batch): set prompts.format")
    try:
        settings = off_policy_settings(config)
        for path in data_lib.expand_paths(config.prompts.paths):
            batch_lib.check(path, os.devnull, settings)
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"off_policy: {e}") from e
    # The responses do not exist yet: resolve the SFT job against the prompt file, also chat JSONL.
    try:
        return resolve(off_policy_config(config, tokenizer, config.prompts.paths))
    except ConfigError as e:
        raise ConfigError(f"off_policy: {e}") from e
