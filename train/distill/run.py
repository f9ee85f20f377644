"""The distillation run: rollouts by the current student, the jitted update against the frozen teacher, the loop.

Each step renders a batch of prompts (a seeded mix of thinking and non-thinking modes), lets the
student complete them with `infer.engine`'s compiled decode, and runs one jitted update
(`train.step.compile_update`) that moves the student's next-token distributions towards the
teacher's on the sampled completion tokens (`train.distill.divergence`). Resume is exact: a step's
seed and modes are functions of (`seed`, step), and the prompt iterator is checkpointed.
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
from flax import nnx

from infer import batch as batch_lib
from infer.engine import Engine
from infer.rollout import Mode
from qwen3_jax.checkpoint import load_any
from qwen3_jax.config import Qwen3Config
from qwen3_jax.errors import ConfigError
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.sharding import make_mesh
from qwen3_jax.tokenizer import Tokenizer
from train import data as data_lib
from train import train as train_lib
from train.config import OptimizerConfig, StepConfig, tokenizer_from_spec
from train.distill.config import DistillConfig, DistillJob, distill_config, off_policy_config, off_policy_settings, resolve_distill
from train.distill.divergence import DistillLoss, DistillSums, chunked_sums
from train.loop import global_batch, run_loop, start_distributed
from train.rollout import Roller, render_prompt
from train.metrics import flops_per_token
from train.objectives import Terms, model_at, moe_aux, unembedding
from train.step import Batch, Params, TrainState, batch_sharding, compile_update, params_shardings


def distill_objective(
    params: Params, batch: Batch, teacher_params: Params, *, graphdef: nnx.GraphDef, cfg: Qwen3Config,
    teacher_graphdef: nnx.GraphDef, loss: DistillLoss, chunk_len: int,
) -> Terms:
    """`train.step.Objective` of distillation: the student's divergence from the frozen teacher
    summed over loss-mask tokens (+ the student's MoE aux loss)."""
    teacher: Qwen3 = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    inputs = dict(positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    teacher_hidden = teacher.forward(batch["tokens"], **inputs).hidden_BxTxD
    student = model_at(graphdef, params, cfg.dtype)
    out = student.forward(batch["tokens"], **inputs)
    sums: DistillSums = chunked_sums(
        out.hidden_BxTxD, unembedding(student), teacher_hidden, unembedding(teacher), batch["targets"],
        batch["loss_mask"], loss=loss, chunk_len=chunk_len, rules=cfg.rules,
    )
    return Terms(sums.loss, moe_aux(out, cfg), sums._asdict())


def update_flops(student: Qwen3Config, teacher: Qwen3Config, seq_len: int) -> float:
    """Model FLOPs of one update per token: the student's forward and backward (6N + attention)
    and the teacher's forward (a third of that)."""
    return flops_per_token(student, seq_len) + flops_per_token(teacher, seq_len) / 3


def compile_distill_update(
    student: Qwen3Config, teacher: Qwen3Config, loss: DistillLoss, step_cfg: StepConfig, opt: OptimizerConfig,
    mesh: jax.sharding.Mesh,
):
    """The jitted update (`train.step.compile_update` of `distill_objective`), with the teacher's
    parameters as its frozen argument sharded by the rule table."""
    objective = functools.partial(
        distill_objective, graphdef=nnx.graphdef(abstract_model(student)), cfg=student,
        teacher_graphdef=nnx.graphdef(abstract_model(teacher)), loss=loss, chunk_len=step_cfg.ce_chunk_len,
    )
    return compile_update(objective, student, step_cfg.microbatches, opt, mesh, params_shardings(teacher, mesh))


class DistillStep:
    """`run_loop`'s step function: rollout with the current student (`train.rollout.Roller`), then the
    jitted update."""

    def __init__(self, job: DistillJob, mesh: jax.sharding.Mesh, tokenizer: Tokenizer, teacher_params: Params):
        cfg = job.student.model
        self.job, self.rollout_cfg, self.tokenizer = job, job.config.rollout, tokenizer
        self.teacher_params = teacher_params
        self.roller = Roller(job.config.rollout, seed=job.config.seed, tokenizer=tokenizer, mesh=mesh,
                             graphdef=nnx.graphdef(abstract_model(cfg)), dtype=cfg.dtype)
        self.update = compile_distill_update(cfg, job.teacher, job.config.distill, job.student.step,
                                             job.student.optimizer, mesh)
        self.sharding = batch_sharding(mesh, cfg.rules)

    def __call__(self, state: TrainState, records: Sequence[dict[str, Any]]) -> tuple[TrainState, dict[str, Any]]:
        t0 = time.perf_counter()
        rollout = self.roller(state.params, records, int(jax.device_get(state.step)))
        t1 = time.perf_counter()
        batch = global_batch(rollout.local_batch(self.rollout_cfg.seq_len), self.sharding)
        t2 = time.perf_counter()
        state, metrics = self.update(state, batch, self.teacher_params)
        jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        metrics.update(rollout.metrics(self.tokenizer), update_time=t3 - t2,
                       host_time=rollout.render_seconds + (t2 - t1),  # prompt rendering and batch assembly
                       step_time=t3 - t0)
        return state, metrics


def load_teacher(job: DistillJob, mesh: jax.sharding.Mesh) -> Qwen3:
    """The teacher in its dtype, each parameter loaded straight into its sharding on `mesh`."""
    t = job.config.teacher
    model = load_any(t.init_from, mesh=mesh, dtype=jnp.dtype(t.dtype), moe_impl=t.moe_impl,
                     attention=t.attention, scan_layers=True, remat="none")
    if model.cfg != job.teacher:
        raise ConfigError(f"the teacher loaded from {t.init_from} is not the one validated")
    return model


def run_off_policy(job: DistillJob, teacher: Qwen3, tokenizer: Tokenizer, mesh: jax.sharding.Mesh,
                   workdir: str) -> dict[str, float]:
    """Phase 1 in `workdir`: the teacher's responses to every prompt (resumable), then SFT on them."""
    config = job.config
    os.makedirs(workdir, exist_ok=True)
    responses = os.path.join(workdir, "teacher_responses.jsonl")
    engine = Engine.for_tokenizer(teacher, tokenizer, mesh=mesh)
    paths = data_lib.expand_paths(config.prompts.paths)
    if len(paths) != 1:
        raise ConfigError(f"off_policy generates from one JSONL prompt file; prompts.paths matches {paths}")
    summary = batch_lib.generate_file(engine, tokenizer, paths[0], responses, off_policy_settings(config),
                                      batch_size=config.off_policy.generate_batch_size, progress=sys.stderr.isatty())
    print(f"off-policy teacher responses: {summary}", flush=True)
    if not os.path.getsize(responses):
        raise ConfigError(
            f"the teacher wrote no usable response in {responses} ({summary}): raise off_policy.max_new_tokens, "
            "set off_policy.keep_unfinished, or check the off_policy.keep verifier"
        )
    return train_lib.run(off_policy_config(config, job.tokenizer, responses), workdir)


def run(config: DistillConfig | ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Distils (or resumes distilling) into the student in `workdir`; returns a summary of the
    on-policy phase. With `off_policy.steps` > 0, phase 1 runs first in WORKDIR/off_policy."""
    config = config if isinstance(config, DistillConfig) else distill_config(config)
    start_distributed(config)
    job = resolve_distill(config)
    mesh = make_mesh(job.student.mesh)
    tokenizer = tokenizer_from_spec(job.tokenizer, job.student.model)
    teacher = load_teacher(job, mesh)
    student = job.student
    if job.off_policy is not None:
        if jax.process_count() > 1:
            raise ConfigError("off_policy.steps > 0 writes the teacher's responses from one process: run phase 1 "
                              "on a single host (or set off_policy.steps=0 and model.init_from its result)")
        off_policy_dir = os.path.join(workdir, "off_policy")
        run_off_policy(job, teacher, tokenizer, mesh, off_policy_dir)
        model = dataclasses.replace(config.model, preset=None, init_from=off_policy_dir)
        student = dataclasses.replace(student, config=dataclasses.replace(config, model=model))

    # A prompt either mode cannot render within rollout.max_prompt_len is a bad record: named by
    # file and line, or skipped with prompts.on_bad_record='skip', before it reaches a rollout.
    def check(record: dict[str, Any]) -> None:
        for mode in Mode:
            render_prompt(record, mode, tokenizer, config.rollout)

    prompts = data_lib.make_prompt_stream(config.prompts, check=check)
    step_fn = DistillStep(job, mesh, tokenizer, nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    seq_len, batch_size = config.rollout.seq_len, config.prompts.batch_size
    flops_per_step = update_flops(student.model, job.teacher, seq_len) * batch_size * seq_len

    def rates(scalars: dict[str, float], step_time: float, peak: float) -> dict[str, float]:
        # MFU of the update alone: the rollout is decode, bandwidth-bound by nature.
        return {"tokens_per_s": batch_size * seq_len / step_time,
                "mfu": flops_per_step / scalars["update_time"] / peak}

    return run_loop(student, workdir, mesh, tokenizer, prompts, step_fn, rates)
