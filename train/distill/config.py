"""The distillation job's config: every field, its validation, and the off-policy phase's SFT config."""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from ml_collections import config_dict

from infer import batch as batch_lib
from qwen3_jax.config import DTYPES, ConfigError, Qwen3Config
from qwen3_jax.hf import CheckpointError
from train import data as data_lib
from train import schema
from train import train as train_lib
from train.checkpoint import init_from_config
from train.distill.divergence import DistillLoss
from infer import rollout as rollout_lib
from infer.rollout import Mode, Switch
from train.distill.rollout import RolloutConfig, biasing_settings
from train.train import TrainConfigError, need


def default_config() -> ml_collections.ConfigDict:
    """Every field of a distillation config. `model` is the student (`model.init_from`: an HF or
    qwen3-jax checkpoint or an earlier run's workdir, e.g. the off-policy SFT run); `optimizer`,
    `mesh`, `checkpoint` and `train` (steps, microbatches, log_every, peak_flops; `ce_chunk_len`
    is the divergence's chunk of sequence positions) are `train.train`'s."""
    c = train_lib.default_config()
    del c["data"]
    c.prompts = schema.config_dict(data_lib.PromptConfig)
    c.teacher = ml_collections.ConfigDict({
        "init_from": config_dict.placeholder(str),  # HF / qwen3-jax checkpoint, or a workdir
        "dtype": "float32",  # parameters and compute; bfloat16 halves a big teacher's memory
        "moe_impl": "auto",
        "attention": "auto",
    })
    c.rollout = ml_collections.ConfigDict({
        "max_prompt_len": 256,  # longer prompts are an error, never truncated
        "max_new_tokens": 256,
        "think_fraction": 0.5,  # share of prompts the student answers in thinking mode
        # soft: '/think' or '/no_think' appended to the last user message (the report's switches);
        # hard: thinking on, or the template's empty think block (enable_thinking=False).
        "mode_switch": "soft",
        "thinking_budget": config_dict.placeholder(int),  # thinking tokens per reply; None: no limit
        # Sampling; unset values follow Qwen's recommendation for each row's mode.
        "temperature": config_dict.placeholder(float),
        "top_k": config_dict.placeholder(int),
        "top_p": config_dict.placeholder(float),
        "min_p": config_dict.placeholder(float),
    })
    # The report minimises "the KL divergence" between the logits without saying which direction.
    # Default: reverse KL(student || teacher) (beta = 1) over the full vocabulary. On the student's
    # own samples it penalises exactly the mass the student puts where the teacher would not go
    # (mode-seeking), which is what correcting the student's own mistakes needs; it is the
    # objective of on-policy GKD (Agarwal et al. 2024, whose on-policy reverse-KL/JSD(0.9) runs did
    # best) and of Thinking Machines' on-policy distillation. Forward KL (beta = 0) covers the
    # teacher's mass instead; benchmarks/distill.py compares the signals' cost.
    c.distill = ml_collections.ConfigDict({
        "signal": "full",  # 'full' | 'top_k' | 'k1' | 'k3' (train/divergence.py)
        "beta": 1.0,
        "temperature": 1.0,
        "top_k": 64,
        "estimator_use": "reward",  # k1/k3: 'loss' or 'reward' (policy gradient)
    })
    # Phase 1, off-policy (response distillation), run first when steps > 0: the teacher answers
    # every prompt of prompts.paths (JSONL) in the given modes (infer.batch, resumable), and the
    # student is fine-tuned on those records by train.train's SFT path in WORKDIR/off_policy;
    # phase 2 (on-policy) then starts from that run.
    c.off_policy = ml_collections.ConfigDict({
        "steps": 0,  # SFT steps; 0 skips the phase (the student starts from model.*)
        "modes": "both",  # 'think' | 'no_think' | 'both' (the report distils both)
        "samples": 1,  # teacher samples per prompt and mode
        "max_new_tokens": config_dict.placeholder(int),  # None: rollout.max_new_tokens
        "thinking_budget": config_dict.placeholder(int),  # the teacher's, on think samples; None: no limit
        "temperature": config_dict.placeholder(float),  # sampling; None: Qwen's value for the mode
        "top_k": config_dict.placeholder(int),
        "top_p": config_dict.placeholder(float),
        "min_p": config_dict.placeholder(float),
        "keep": config_dict.placeholder(str),  # 'module:function' verifier: trains on accepted records only
        "keep_unfinished": False,  # train on responses cut by max_new_tokens too
        "generate_batch_size": 64,  # rows per teacher decode call
        "seq_len": config_dict.placeholder(int),  # SFT rows; None: rollout.max_prompt_len + max_new_tokens
        "batch_size": config_dict.placeholder(int),  # SFT rows per step; None: prompts.batch_size
        "learning_rate": config_dict.placeholder(float),  # None: optimizer.learning_rate
        "warmup_steps": config_dict.placeholder(int),  # None: optimizer.warmup_steps
    })
    c.train.z_loss_coef = 0.0
    return c


OFF_POLICY_MODES = {"think": ("think",), "no_think": ("no_think",), "both": ("think", "no_think")}


def off_policy_settings(config: ml_collections.ConfigDict) -> batch_lib.Settings:
    """What the teacher generates in phase 1 (infer.batch's settings)."""
    o = config.off_policy
    sampling = {k: o[k] for k in rollout_lib.SAMPLING_KEYS if o.get(k) is not None}
    return batch_lib.Settings(
        modes=OFF_POLICY_MODES[o.modes], samples=o.samples, seed=config.seed,
        max_new_tokens=o.max_new_tokens or config.rollout.max_new_tokens, thinking_budget=o.thinking_budget,
        sampling=sampling, keep=o.keep, keep_unfinished=o.keep_unfinished,
    )


def off_policy_config(config: ml_collections.ConfigDict, tokenizer: str, responses: str) -> ml_collections.ConfigDict:
    """train.train's config of phase 1: SFT of the student on the teacher's `responses`, with the
    distillation config's model, mesh, optimizer (its own schedule length), checkpointing and seed."""
    o = config.off_policy
    c = train_lib.default_config()
    for section in ("model", "mesh", "optimizer", "checkpoint"):
        c[section] = ml_collections.ConfigDict(config[section].to_dict())
    c.seed, c.tokenizer = config.seed, tokenizer
    for field in ("distributed", "coordinator_address", "num_processes", "process_id"):
        c[field] = config[field]
    c.optimizer.decay_steps = None
    if o.learning_rate is not None:
        c.optimizer.learning_rate = o.learning_rate
    if o.warmup_steps is not None:
        c.optimizer.warmup_steps = o.warmup_steps
    c.data.update(format="jsonl", kind="chat", paths=responses, packing="first_fit", num_epochs=None,
                  seed=config.prompts.seed, num_threads=1,
                  seq_len=o.seq_len or config.rollout.max_prompt_len + config.rollout.max_new_tokens,
                  batch_size=o.batch_size or config.prompts.batch_size)
    c.train.update(steps=o.steps, microbatches=config.train.microbatches, ce_chunk_len=config.train.ce_chunk_len,
                   log_every=config.train.log_every, peak_flops=config.train.peak_flops)
    return c


@dataclasses.dataclass(frozen=True)
class DistillExperiment:
    """A validated distillation config: the student's trainer `Experiment` plus the rest."""

    train: train_lib.Experiment  # model = the student; data = the prompts section
    teacher: Qwen3Config
    teacher_init_from: str
    tokenizer: str
    rollout: RolloutConfig
    loss: DistillLoss
    off_policy: train_lib.Experiment | None  # phase 1's SFT, when off_policy.steps > 0


def validate(config: ml_collections.ConfigDict) -> DistillExperiment:
    """Checks every field before any device work; raises TrainConfigError naming the field."""
    student = train_lib.model_config(config.model)
    mesh = train_lib.mesh_shape(config.mesh)
    train_lib.check_shardable(student, mesh)
    t = config.teacher
    need(t.init_from is not None, "teacher.init_from must name the teacher's checkpoint")
    need(t.dtype in DTYPES, f"teacher.dtype must be one of {DTYPES}, got {t.dtype!r}")
    try:
        teacher = init_from_config(t.init_from, dtype=t.dtype, param_dtype=t.dtype, moe_impl=t.moe_impl,
                                   attention=t.attention, scan_layers=True, remat="none")
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise TrainConfigError(f"teacher: {e}") from e
    need(
        teacher.vocab_size == student.vocab_size,
        f"the teacher's vocab_size ({teacher.vocab_size}) differs from the student's ({student.vocab_size}): "
        "logit distillation needs one vocabulary",
    )
    train_lib.check_shardable(teacher, mesh)

    p = config.prompts
    need(p.paths is not None, "prompts.paths must name the prompt files (JSONL/Parquet/ArrayRecord chat records)")
    try:
        prompts = schema.from_config_dict(data_lib.PromptConfig, p, where="prompts.")
        data_lib.expand_paths(prompts.paths)
    except FileNotFoundError as e:
        raise TrainConfigError(f"missing prompt files: {e}") from e
    except ConfigError as e:
        raise TrainConfigError(str(e)) from e

    r = config.rollout
    for name in ("max_prompt_len", "max_new_tokens"):
        need(r[name] >= 1, f"rollout.{name} must be >= 1, got {r[name]}")
    need(0.0 <= r.think_fraction <= 1.0, f"rollout.think_fraction must be in [0, 1], got {r.think_fraction}")
    switches = tuple(Switch)
    need(r.mode_switch in switches, f"rollout.mode_switch must be one of {switches}, got {r.mode_switch!r}")
    need(r.thinking_budget is None or r.thinking_budget >= 0,
          f"rollout.thinking_budget must be None or >= 0, got {r.thinking_budget}")
    overrides = tuple((k, r[k]) for k in rollout_lib.SAMPLING_KEYS if r.get(k) is not None)
    rollout = RolloutConfig(r.max_prompt_len, r.max_new_tokens, float(r.think_fraction), Switch(r.mode_switch),
                            r.thinking_budget, overrides)
    try:
        rollout_lib.check_sampling(dict(overrides))
    except ConfigError as e:
        raise TrainConfigError(f"rollout: {e}") from e
    for who, cfg in (("student", student), ("teacher", teacher)):
        need(rollout.seq_len <= cfg.context_length,
              f"rollout.max_prompt_len + rollout.max_new_tokens = {rollout.seq_len} exceeds the {who}'s context "
              f"of {cfg.context_length} positions")
    need(config.train.z_loss_coef == 0, "train.z_loss_coef has no meaning in distillation; leave it 0")
    try:
        loss = DistillLoss(**config.distill.to_dict())
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"distill: {e}") from e
    if loss.signal == "top_k":
        need(loss.top_k <= student.vocab_size, f"distill.top_k={loss.top_k} exceeds the vocabulary")
    check_sampled_signal(loss, rollout)

    spec = (config.tokenizer or train_lib.checkpoint_tokenizer(config.model.init_from)
            or train_lib.checkpoint_tokenizer(t.init_from))
    need(spec is not None, "distillation renders chat prompts: set `tokenizer` or use a student or teacher "
                            "checkpoint that ships one (tokenizer.json or tokenizer.model)")
    exp = train_lib.experiment(
        config, student, mesh, data=prompts, batch_size=prompts.batch_size,
        seq_len=rollout.seq_len, batch_field="prompts.batch_size",
        seq_field="rollout.max_prompt_len + rollout.max_new_tokens",
    )
    return DistillExperiment(exp, teacher, t.init_from, spec, rollout, loss, _validate_off_policy(config, spec))


def check_sampled_signal(loss: DistillLoss, rollout: RolloutConfig) -> None:
    """Refuses a sampled-token signal ('k1', 'k3') with rollouts that do not sample from the student's
    softmax at distill.temperature over the whole vocabulary: its gradient would be biased (issue 22).

    Refusing, rather than overriding the sampling, keeps the rollout settings what the config says.
    Raises TrainConfigError naming the fields and the values the signal needs.
    """
    if loss.signal not in ("k1", "k3"):
        return
    modes = [m for m, used in ((Mode.THINK, rollout.think_fraction > 0), (Mode.NO_THINK, rollout.think_fraction < 1))
             if used]
    for mode in modes:
        bad = biasing_settings(rollout.row_sampling(mode), loss.temperature)
        need(not bad, (
            f"distill.signal={loss.signal!r} is an unbiased estimate only on tokens sampled from the student's "
            f"softmax at distill.temperature={loss.temperature} with no truncation, but {mode} rollouts sample with "
            f"{', '.join('rollout.' + b for b in bad)} (unset rollout fields take Qwen's values for the mode): set "
            f"rollout.temperature={loss.temperature}, rollout.top_k=0, rollout.top_p=1.0 and rollout.min_p=0.0, "
            "or use distill.signal='full' or 'top_k'"))


def _validate_off_policy(config: ml_collections.ConfigDict, tokenizer: str) -> train_lib.Experiment | None:
    o = config.off_policy
    need(o.steps >= 0, f"off_policy.steps must be >= 0, got {o.steps}")
    if not o.steps:
        return None
    need(o.modes in OFF_POLICY_MODES, f"off_policy.modes must be one of {sorted(OFF_POLICY_MODES)}, got {o.modes!r}")
    need(config.prompts.format == "jsonl", "off_policy reads the prompts as JSONL (infer.batch): set prompts.format")
    need(o.generate_batch_size >= 1, f"off_policy.generate_batch_size must be >= 1, got {o.generate_batch_size}")
    try:
        settings = off_policy_settings(config)
        for path in data_lib.expand_paths([config.prompts.paths] if isinstance(config.prompts.paths, str)
                                          else list(config.prompts.paths)):
            batch_lib.check(path, os.devnull, settings)
    except (batch_lib.BatchError, ValueError) as e:
        raise TrainConfigError(f"off_policy: {e}") from e
    # The responses do not exist yet: validate the SFT config against the prompt file, also chat JSONL.
    sft = off_policy_config(config, tokenizer, config.prompts.paths)
    try:
        return train_lib.validate(sft)
    except TrainConfigError as e:
        raise TrainConfigError(f"off_policy: {e}") from e

