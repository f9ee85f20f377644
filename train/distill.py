"""On-policy strong-to-weak distillation (Qwen3 report §4.5, phase 2) on the device mesh.

    python -m train.distill --config configs/distill_tiny.py --workdir W [--config.<field>=<value>]

Every step:

1. **Rollout.** A batch of prompts from the grain prompt source is rendered with the Qwen3 chat
   template, each in thinking or non-thinking mode (a seeded mix, `rollout.think_fraction`), and
   the student's *current* parameters complete them with the compiled prefill + `while_loop`
   decode of `infer.engine` (KV cache, per-row sampling, per-row thinking budget).
2. **Update.** One jitted function (`train.step.compile_update`, the trainer's own update with
   explicit shardings and the student state donated) runs the teacher and the student over
   prompt + completion and moves the student's next-token distributions towards the teacher's on
   the completion tokens (`train.divergence`). The teacher is frozen: its parameters are an
   argument of the jitted update, never differentiated (`stop_gradient`), with no optimizer
   state, in their own dtype (a bfloat16 teacher beside a float32 student works) and sharded by
   the same rule table on the same mesh. The divergence is computed in sequence chunks from both
   models' hidden states, so [batch, seq, vocab] logits of the two models never exist at once.

Why two jitted functions rather than one: the rollout is the engine's compiled decode (on CPU its
per-layer weight layout, see `qwen3_jax.model.unstack_layers`), the update the trainer's compiled
step, each compiled once per shape; between them the host only renders prompts and builds [B, T]
int arrays. `benchmarks/distill.py` measures that host time against the step
(`host_overhead_fraction`).

Masks: position i of the update batch predicts token i + 1, so the loss covers positions
P - 1 ... P + C - 2 of a row with a P-token prompt and a C-token completion (the logits at the last
prompt position predict the first completion token); prompt, padding and tokens forced by the
thinking budget (not the student's choices) count for nothing.

Checkpoints, resume, SIGTERM, metrics, MFU: `train.train.run_loop`, unchanged. Exact resume: the
sampling seed and mode mix of step k are functions of (`seed`, k) and the prompt iterator's
position is checkpointed with the student, so a resumed run repeats the uninterrupted one.

Shapes: B prompts per step, P prompt length, N max new tokens, T = max_prompt_len + N.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_dict

from infer import batch as batch_lib
from infer.engine import Engine
from infer.sampling import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams
from qwen3_jax import chat
from qwen3_jax.checkpoint import load_any
from qwen3_jax.config import DTYPES, ConfigError, Qwen3Config
from qwen3_jax.hf import CheckpointError
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.moe import load_balancing_loss
from qwen3_jax.sharding import make_mesh
from qwen3_jax.tokenizer import Tokenizer
from train import data as data_lib
from train import schema
from train import train as train_lib
from train.checkpoint import init_from_config
from train.divergence import DistillLoss, DistillSums, chunked_sums, divergence  # noqa: F401 (stable API)
from train.step import (
    Batch, OptimizerConfig, Params, StepConfig, Terms, TrainState, batch_sharding, compile_update, params_shardings,
    unembedding,
)
from train.train import TrainConfigError, need

THINK, NO_THINK = "think", "no_think"
MODE_SWITCHES = ("soft", "hard")


class PromptError(ValueError):
    """A prompt record the rollout cannot use (ends with an assistant turn, too long, malformed)."""


# ------------------------------------------------------------------------------------- config


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
    sampling = {k: o[k] for k in ("temperature", "top_k", "top_p", "min_p") if o[k] is not None}
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
class RolloutConfig:
    """How the student samples (static for a run)."""

    max_prompt_len: int
    max_new_tokens: int
    think_fraction: float
    mode_switch: str
    thinking_budget: int | None
    sampling: tuple[tuple[str, float], ...]  # overrides of the per-mode defaults

    @property
    def seq_len(self) -> int:
        return self.max_prompt_len + self.max_new_tokens

    def row_sampling(self, mode: str) -> dict[str, float]:
        base = THINKING_SAMPLING if mode == THINK else NON_THINKING_SAMPLING
        return {**base, **dict(self.sampling)}


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
    need(r.mode_switch in MODE_SWITCHES, f"rollout.mode_switch must be one of {MODE_SWITCHES}, got {r.mode_switch!r}")
    need(r.thinking_budget is None or r.thinking_budget >= 0,
          f"rollout.thinking_budget must be None or >= 0, got {r.thinking_budget}")
    overrides = tuple((k, r[k]) for k in ("temperature", "top_k", "top_p", "min_p") if r[k] is not None)
    rollout = RolloutConfig(r.max_prompt_len, r.max_new_tokens, float(r.think_fraction), r.mode_switch,
                            r.thinking_budget, overrides)
    try:
        for mode in (THINK, NO_THINK):
            SamplingParams.make(1, **rollout.row_sampling(mode))
    except ValueError as e:
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


# ------------------------------------------------------------------------------------ rollout


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of step `step`: a function of (seed, step), so resumed runs repeat."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def choose_modes(seed: int, step: int, n: int, think_fraction: float) -> list[str]:
    draws = np.random.default_rng([seed, step, 1]).random(n)
    return [THINK if d < think_fraction else NO_THINK for d in draws]


def render_prompt(record: dict[str, Any], mode: str, tokenizer: Tokenizer, rollout: RolloutConfig) -> list[int]:
    """Token ids of `record`'s conversation + the generation prompt, in `mode`.

    Raises PromptError when the conversation ends with an assistant turn, the chat template
    rejects it, or it is longer than `rollout.max_prompt_len` tokens (never truncated).
    """
    messages = record["messages"]
    if messages[-1].get("role") == "assistant":
        raise PromptError("a prompt must not end with an assistant turn (the student writes that turn)")
    thinking = mode == THINK
    try:
        if rollout.mode_switch == "soft":
            messages = chat.with_soft_switch(messages, thinking)
        text = chat.render(messages, tools=record.get("tools"), add_generation_prompt=True,
                           enable_thinking=thinking or rollout.mode_switch == "soft")
    except ValueError as e:
        raise PromptError(f"a prompt record the chat template rejects: {e}") from e
    ids = tokenizer.encode(text)
    if len(ids) > rollout.max_prompt_len:
        raise PromptError(
            f"a prompt has {len(ids)} tokens, more than rollout.max_prompt_len={rollout.max_prompt_len} "
            f"(it starts {messages[0].get('content', '')[:60]!r})"
        )
    return ids


def rollout_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int,
    forced: Sequence[Sequence[bool]] | None = None,
) -> dict[str, np.ndarray]:
    """The update's [B, seq_len] arrays for prompt + completion rows, right-padded.

    tokens, positions (0...), segment_ids (1 on real tokens, 0 on padding), targets (the next
    token) and loss_mask: 1 at position i exactly when token i + 1 is a completion token the
    student sampled (`forced[b][j]` marks completion tokens the thinking budget forced instead).
    Raises ValueError when a row does not fit.
    """
    B = len(prompts)
    batch = {k: np.zeros((B, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids")}
    batch["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len)).copy()
    batch["loss_mask"] = np.zeros((B, seq_len), np.float32)
    for b, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        P, C = len(prompt), len(completion)
        if P + C > seq_len:
            raise ValueError(f"row {b}: {P} prompt + {C} completion tokens exceed seq_len={seq_len}")
        batch["tokens"][b, : P + C] = [*prompt, *completion]
        batch["segment_ids"][b, : P + C] = 1
        batch["targets"][b, : P + C - 1] = batch["tokens"][b, 1 : P + C]
        sampled = np.ones(C, bool) if forced is None else ~np.asarray(forced[b], bool).reshape(C)
        batch["loss_mask"][b, P - 1 : P + C - 1] = sampled
    return batch


# ------------------------------------------------------------------------------------- update


def distill_objective(
    params: Params, batch: Batch, teacher_params: Params, *, graphdef: nnx.GraphDef, cfg: Qwen3Config,
    teacher_graphdef: nnx.GraphDef, loss: DistillLoss, chunk_len: int,
) -> Terms:
    """`train.step.Objective` of distillation: the student's divergence from the frozen teacher
    summed over loss-mask tokens (+ the student's MoE aux loss)."""
    teacher: Qwen3 = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    inputs = dict(positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    teacher_hidden = teacher.forward(batch["tokens"], **inputs).hidden_BxTxD
    dtype = jnp.dtype(cfg.dtype)
    student: Qwen3 = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params))
    out = student.forward(batch["tokens"], **inputs)
    sums: DistillSums = chunked_sums(
        out.hidden_BxTxD, unembedding(student), teacher_hidden, unembedding(teacher), batch["targets"],
        batch["loss_mask"], loss=loss, chunk_len=chunk_len, rules=cfg.rules,
    )
    aux = load_balancing_loss(out.router_stats) if cfg.is_moe else jnp.zeros((), jnp.float32)
    return Terms(sums.loss, aux, sums._asdict())


def update_flops(student: Qwen3Config, teacher: Qwen3Config, seq_len: int) -> float:
    """Model FLOPs of one update per token: the student's forward and backward (6N + attention)
    and the teacher's forward (a third of that)."""
    return train_lib.flops_per_token(student, seq_len) + train_lib.flops_per_token(teacher, seq_len) / 3


@functools.cache
def compile_distill_update(
    student: Qwen3Config, teacher: Qwen3Config, loss: DistillLoss, step_cfg: StepConfig, opt: OptimizerConfig,
    mesh: jax.sharding.Mesh,
):
    """The jitted update (`train.step.compile_update` of `distill_objective`), with the teacher's
    parameters as its frozen argument sharded by the rule table. Cached per configs and mesh, so
    runs in one process (a resumed stage, tests) compile it once."""
    objective = functools.partial(
        distill_objective, graphdef=nnx.graphdef(abstract_model(student)), cfg=student,
        teacher_graphdef=nnx.graphdef(abstract_model(teacher)), loss=loss, chunk_len=step_cfg.ce_chunk_len,
    )
    return compile_update(objective, student, step_cfg.microbatches, opt, mesh, params_shardings(teacher, mesh))


class DistillStep:
    """`run_loop`'s step function: rollout with the current student, then the jitted update."""

    def __init__(self, exp: DistillExperiment, mesh: jax.sharding.Mesh, tokenizer: Tokenizer, teacher_params: Params):
        cfg = exp.train.model
        self.exp, self.mesh, self.tokenizer, self.teacher_params = exp, mesh, tokenizer, teacher_params
        self.graphdef = nnx.graphdef(abstract_model(cfg))
        self.update = compile_distill_update(cfg, exp.teacher, exp.loss, exp.train.step, exp.train.optimizer, mesh)
        self.sharding = batch_sharding(mesh, cfg.rules)

    def student(self, params: Params) -> Qwen3:
        """The student at `params` in its compute dtype, for sampling."""
        dtype = jnp.dtype(self.exp.train.model.dtype)
        return nnx.merge(self.graphdef, jax.tree.map(lambda p: p.astype(dtype), params))

    def prompts(self, records: Sequence[dict[str, Any]], step: int) -> tuple[list[list[int]], list[str]]:
        """Prompt ids and modes of `records` at `step` (the seeded mode mix)."""
        r = self.exp.rollout
        modes = choose_modes(self.exp.train.seed, step, len(records), r.think_fraction)
        return [render_prompt(rec, m, self.tokenizer, r) for rec, m in zip(records, modes)], modes

    def rollout(self, params: Params, prompts: Sequence[Sequence[int]], modes: Sequence[str], step: int):
        """(completions, forced) of `prompts` by the student at `params`: sampled with the per-mode
        settings, the thinking budget on thinking rows, the step's seed; `forced` marks the tokens
        the budget forced."""
        r = self.exp.rollout
        rows = [r.row_sampling(m) for m in modes]
        sampling = {k: [row[k] for row in rows] for k in rows[0]}
        budgets = [r.thinking_budget if m == THINK else None for m in modes]
        engine = Engine.for_tokenizer(self.student(params), self.tokenizer, mesh=self.mesh)
        return engine.generate(
            prompts, max_new_tokens=r.max_new_tokens, stop_token_ids=self.tokenizer.eos_ids,
            thinking_budget=budgets, seed=step_seed(self.exp.train.seed, step), return_forced=True, **sampling,
        )

    def __call__(self, state: TrainState, records: Sequence[dict[str, Any]]) -> tuple[TrainState, dict[str, Any]]:
        t0 = time.perf_counter()
        step = int(jax.device_get(state.step))
        prompts, modes = self.prompts(records, step)
        t1 = time.perf_counter()
        completions, forced = self.rollout(state.params, prompts, modes, step)
        t2 = time.perf_counter()
        batch = rollout_batch(prompts, completions, self.exp.rollout.seq_len, forced)
        batch = {k: jax.make_array_from_process_local_data(self.sharding, v) for k, v in batch.items()}
        t3 = time.perf_counter()
        state, metrics = self.update(state, batch, self.teacher_params)
        jax.block_until_ready(metrics)
        t4 = time.perf_counter()
        generated = sum(len(c) for c in completions)
        think_rows = [c for c, m in zip(completions, modes) if m == THINK]
        metrics.update(
            completion_len=generated / len(completions),
            forced_tokens=sum(map(sum, forced)) / len(completions),
            think_rows=len(think_rows) / len(completions),
            rollout_time=t2 - t1,
            update_time=t4 - t3,
            host_time=(t1 - t0) + (t3 - t2),  # prompt rendering and batch assembly
            step_time=t4 - t0,
            rollout_tokens_per_s=generated / (t2 - t1),
        )
        if think_rows and self.tokenizer.end_think_id is not None:
            metrics["closed_thinking"] = sum(self.tokenizer.end_think_id in c for c in think_rows) / len(think_rows)
        return state, metrics


def load_teacher(exp: DistillExperiment, mesh: jax.sharding.Mesh) -> Qwen3:
    """The teacher in its dtype, each parameter loaded straight into its sharding on `mesh`."""
    t = exp.teacher
    model = load_any(exp.teacher_init_from, mesh=mesh, dtype=jnp.dtype(t.dtype), moe_impl=t.moe_impl,
                     attention=t.attention, scan_layers=True, remat="none")
    if model.cfg != t:
        raise TrainConfigError(f"the teacher loaded from {exp.teacher_init_from} is not the one validated")
    return model


def run_off_policy(config: ml_collections.ConfigDict, exp: DistillExperiment, teacher: Qwen3, tokenizer: Tokenizer,
                   mesh: jax.sharding.Mesh, workdir: str) -> dict[str, float]:
    """Phase 1 in `workdir`: the teacher's responses to every prompt (resumable), then SFT on them."""
    os.makedirs(workdir, exist_ok=True)
    responses = os.path.join(workdir, "teacher_responses.jsonl")
    engine = Engine.for_tokenizer(teacher, tokenizer, mesh=mesh)
    paths = data_lib.expand_paths([config.prompts.paths] if isinstance(config.prompts.paths, str)
                                  else list(config.prompts.paths))
    if len(paths) != 1:
        raise TrainConfigError(f"off_policy generates from one JSONL prompt file; prompts.paths matches {paths}")
    summary = batch_lib.generate_file(engine, tokenizer, paths[0], responses, off_policy_settings(config),
                                      batch_size=config.off_policy.generate_batch_size, progress=sys.stderr.isatty())
    print(f"off-policy teacher responses: {summary}", flush=True)
    if not os.path.getsize(responses):
        raise TrainConfigError(
            f"the teacher wrote no usable response in {responses} ({summary}): raise off_policy.max_new_tokens, "
            "set off_policy.keep_unfinished, or check the off_policy.keep verifier"
        )
    return train_lib.run(off_policy_config(config, exp.tokenizer, responses), workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Distils (or resumes distilling) into the student in `workdir`; returns a summary of the
    on-policy phase. With `off_policy.steps` > 0, phase 1 runs first in WORKDIR/off_policy."""
    train_lib.start_distributed(config)
    exp = validate(config)
    if jax.process_count() > 1:
        raise TrainConfigError(
            "on-policy rollouts run in one process for now (each process reads its own prompts, and the decode "
            "engine takes the same prompts on every process); run train.distill with distributed=False on a "
            "single host"
        )
    mesh = make_mesh(exp.train.mesh)
    tokenizer = train_lib.tokenizer_from_spec(exp.tokenizer, exp.train.model)
    teacher = load_teacher(exp, mesh)
    if exp.off_policy is not None:
        off_policy_dir = os.path.join(workdir, "off_policy")
        run_off_policy(config, exp, teacher, tokenizer, mesh, off_policy_dir)
        exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, init_from=off_policy_dir))

    # A prompt either mode cannot render within rollout.max_prompt_len is a bad record: named by
    # file and line, or skipped with prompts.on_bad_record='skip', before it reaches a rollout.
    def check(record: dict[str, Any]) -> None:
        for mode in (THINK, NO_THINK):
            render_prompt(record, mode, tokenizer, exp.rollout)

    prompts = data_lib.make_prompt_stream(exp.train.data, check=check)
    step_fn = DistillStep(exp, mesh, tokenizer, nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    seq_len, batch_size = exp.rollout.seq_len, exp.train.data.batch_size
    flops_per_step = update_flops(exp.train.model, exp.teacher, seq_len) * batch_size * seq_len

    def rates(scalars: dict[str, float], step_time: float, peak: float) -> dict[str, float]:
        # MFU of the update alone: the rollout is decode, bandwidth-bound by nature.
        return {"tokens_per_s": batch_size * seq_len / step_time,
                "mfu": flops_per_step / scalars["update_time"] / peak}

    return train_lib.run_loop(config, workdir, exp.train, mesh, tokenizer, prompts, step_fn, rates)


# --------------------------------------------------------------------------------------- main

USER_ERRORS = (*train_lib.USER_ERRORS, ConfigError, PromptError, batch_lib.BatchError)


def main(argv: list[str]) -> None:
    summary = train_lib.run_command(run, argv, USER_ERRORS)
    if summary:
        print(f"done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} | "
              f"{summary['tokens_per_s']:,.0f} tok/s | update MFU {100 * summary['mfu']:.1f}%", flush=True)


if __name__ == "__main__":
    train_lib.define_command_flags("Distillation config file (configs/distill_*.py).",
                                   "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
    app.run(main)
