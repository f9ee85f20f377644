"""The RL run: rollouts by the current policy, rewards, group advantages, the jitted GRPO-family update, the loop.

Each step samples K completions for each of a batch of prompts (`train.rollout.Roller`: a seeded
think / no_think mix, the thinking budget, each token's log-probability), scores them with the
reward function, centres the rewards within each prompt's group, and makes
rl.ppo_epochs x rl.ppo_minibatches optimizer updates (`train.step.compile_update`) of
`train.rl.loss`'s clipped surrogate, the rollout's log-probabilities as the behaviour policy's for
all of them. Resume is exact: a step's modes, sampling keys and minibatch order are functions of
(`seed`, step), and the prompt iterator is checkpointed.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from infer.rollout import Mode
from qwen3_jax.config import Qwen3Config
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.sharding import constrain, make_mesh
from qwen3_jax.tokenizer import Tokenizer
from train import data as data_lib
from train.checkpoint import load_params
from train.config import tokenizer_from_spec
from train.loop import global_batch, run_loop, start_distributed
from train.metrics import flops_per_token
from train.objectives import Batch, Params, Terms, model_at, moe_aux, scan_vocab_chunks, unembedding
from train.rl.config import RLConfig, RLJob, RLLoss, resolve_rl, rl_config
from train.rl.loss import group_advantages, relative_weights, token_terms
from train.rl.rewards import load_reward, score
from train.rollout import Roller, render_prompt
from train.step import TrainState, batch_sharding, compile_update, init_train_state, params_shardings

SUMS = ("loss", "clip_frac", "entropy", "kl", "ratio", "logp_diff")


def rl_objective(
    params: Params, batch: Batch, ref_params: Params | None, *, graphdef: nnx.GraphDef, cfg: Qwen3Config,
    loss: RLLoss, temperature: float, chunk_len: int,
) -> Terms:
    """`train.step.Objective` of RL: `token_terms`' loss weighted by the batch's `loss_weight`
    (`prepare_batch`) and summed over the sampled tokens, the policy's log-probabilities taken at
    `temperature` in sequence chunks. Sums for metrics (per sampled token once divided): loss,
    clip_frac, entropy (of softmax(logits / temperature)), kl (to the frozen reference
    `ref_params`, 0 without), ratio and logp_diff = |logp - old_logp| (0 on the first update of a
    rollout batch: the engine's log-probabilities are the trainer's)."""
    policy = model_at(graphdef, params, cfg.dtype)
    inputs = dict(positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    out = policy.forward(batch["tokens"], **inputs)
    weights, hidden = [unembedding(policy)], [out.hidden_BxTxD]
    if ref_params is not None:
        ref = model_at(graphdef, jax.lax.stop_gradient(ref_params), cfg.dtype)
        weights.append(unembedding(ref))
        hidden.append(ref.forward(batch["tokens"], **inputs).hidden_BxTxD)
    vocab_V = jnp.arange(weights[0].shape[1])

    def logits_logp(h_BxCxD, w_DxV, t_BxC):
        logits_BxCxV = jnp.einsum("BCD,DV->BCV", h_BxCxD, w_DxV, preferred_element_type=jnp.float32) / temperature
        logits_BxCxV = constrain(logits_BxCxV, ("batch", "seq", "act_vocab"), cfg.rules)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        # A select + sum rather than a gather: stays local when the vocab axis is sharded.
        target_BxC = jnp.sum(jnp.where(vocab_V == t_BxC[..., None], logits_BxCxV, 0.0), axis=-1)
        return logits_BxCxV, lse_BxC, target_BxC - lse_BxC

    def chunk_sums(ws, t_BxC, m_BxC, w_BxC, old_BxC, adv_BxC, *h):
        m_BxC = m_BxC > 0
        logits_BxCxV, lse_BxC, logp_BxC = logits_logp(h[0], ws[0], t_BxC)
        entropy_BxC = lse_BxC - jnp.sum(jax.nn.softmax(logits_BxCxV, axis=-1) * logits_BxCxV, axis=-1)
        ref_BxC = None if len(h) == 1 else logits_logp(h[1], ws[1], t_BxC)[2]
        old_BxC = jnp.where(m_BxC, old_BxC, jax.lax.stop_gradient(logp_BxC))  # off the mask: ratio 1, finite
        loss_BxC, clipped_BxC, kl_BxC = token_terms(
            logp_BxC, old_BxC, adv_BxC, clip_low=loss.clip_low, clip_high=loss.clip_high, ref_logp_BxT=ref_BxC,
            kl_beta=loss.kl_beta, kl_estimator=loss.kl_estimator)
        on = lambda x: jnp.sum(jnp.where(m_BxC, x, 0.0))  # noqa: E731
        # The loss is weighted, not masked: relative_weights is 0 off the sampled tokens.
        return dict(loss=jnp.sum(w_BxC * loss_BxC), clip_frac=on(clipped_BxC), entropy=on(entropy_BxC), kl=on(kl_BxC),
                    ratio=on(jnp.exp(logp_BxC - old_BxC)), logp_diff=on(jnp.abs(logp_BxC - old_BxC)))

    arrays = [batch[k] for k in ("targets", "loss_mask", "loss_weight", "old_logp", "advantages")] + hidden
    sums = scan_vocab_chunks(chunk_sums, tuple(weights), arrays, chunk_len=chunk_len, rules=cfg.rules)
    if ref_params is None:
        sums.pop("kl")
    return Terms(sums["loss"], moe_aux(out, cfg), sums)


def prepare_batch(batch: Batch, *, loss: RLLoss) -> Batch:
    """The update batch with `loss_weight`: `relative_weights` of the whole global batch's mask,
    computed before the microbatch split so every aggregation's normaliser is the global batch's."""
    return {**batch, "loss_weight": relative_weights(batch["loss_mask"], loss.aggregation, loss.norm_len)}


def compile_rl_update(cfg: Qwen3Config, loss: RLLoss, temperature: float, job: RLJob, mesh: jax.sharding.Mesh):
    """The jitted update (`train.step.compile_update` of `rl_objective`), with the frozen
    reference's parameters as its `frozen` argument when the loss uses one."""
    objective = functools.partial(rl_objective, graphdef=nnx.graphdef(abstract_model(cfg)), cfg=cfg, loss=loss,
                                  temperature=temperature, chunk_len=job.policy.step.ce_chunk_len)
    frozen = params_shardings(cfg, mesh) if loss.uses_reference else None
    return compile_update(objective, cfg, job.policy.step.microbatches, job.policy.optimizer, mesh, frozen,
                          prepare=functools.partial(prepare_batch, loss=loss))


def update_flops(cfg: Qwen3Config, seq_len: int, reference: bool) -> float:
    """Model FLOPs of one update per token: the policy's forward and backward (6N + attention),
    plus the reference's forward (a third of that) when it is used."""
    return flops_per_token(cfg, seq_len) * (4 / 3 if reference else 1)


def reward_metrics(rewards: np.ndarray, samples: int) -> dict[str, float]:
    """Mean and std of the rewards, and the fraction of groups whose rewards are all equal (their
    advantages are 0: no learning signal)."""
    groups = rewards.reshape(-1, samples)
    return dict(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
                groups_all_equal=float(np.mean(np.all(groups == groups[:, :1], axis=1))))


class RLStep:
    """`run_loop`'s step function: rollout with the current policy, rewards, the updates."""

    def __init__(self, job: RLJob, mesh: jax.sharding.Mesh, tokenizer: Tokenizer, ref_params: Params | None):
        config, cfg = job.config, job.policy.model
        self.job, self.config, self.tokenizer, self.ref_params = job, config, tokenizer, ref_params
        self.reward = load_reward(config.reward)
        self.roller = Roller(config.rollout, seed=config.seed, tokenizer=tokenizer, mesh=mesh,
                             graphdef=nnx.graphdef(abstract_model(cfg)), dtype=cfg.dtype, samples=config.samples,
                             logprobs=True)
        self.update = compile_rl_update(cfg, config.rl, config.temperature, job, mesh)
        self.sharding = batch_sharding(mesh, cfg.rules)
        # A minibatch's rows gathered from the whole rollout batch on device (rows live on every host).
        self.take = jax.jit(lambda b, idx: {k: v[idx] for k, v in b.items()}, out_shardings=self.sharding)
        self.history: list[dict[str, float]] = []

    def minibatches(self, step: int, epoch: int) -> list[np.ndarray]:
        """Row indices of each minibatch of `epoch`: a seeded permutation of the rows, a function of
        (seed, step, epoch)."""
        M = self.config.rl.ppo_minibatches
        order = np.random.default_rng([self.config.seed, step, epoch, 2]).permutation(self.job.rows)
        return [np.sort(order[m::M]).astype(np.int32) for m in range(M)]

    def __call__(self, state: TrainState, records: Sequence[dict[str, Any]]) -> tuple[TrainState, dict[str, Any]]:
        config, loss = self.config, self.config.rl
        t0 = time.perf_counter()
        step = int(jax.device_get(state.step)) // loss.updates_per_step
        rollout = self.roller(state.params, records, step)
        t1 = time.perf_counter()
        local = rollout.completions[rollout.local]
        rewards = score(self.reward, records, [self.tokenizer.decode(c.token_ids) for c in local], config.samples,
                        first_prompt=rollout.local.start // config.samples, step=step + 1)
        advantages = group_advantages(rewards, config.samples, scale_by_std=loss.scale_advantages_by_std)
        t2 = time.perf_counter()
        host = rollout.local_batch(config.rollout.seq_len)
        host["advantages"] = np.repeat(advantages[rollout.local, None], config.rollout.seq_len, axis=1)
        batch = global_batch(host, self.sharding)
        t3 = time.perf_counter()
        updates = []
        for epoch in range(loss.ppo_epochs):
            for rows in self.minibatches(step, epoch) if loss.ppo_minibatches > 1 else [None]:
                mb = batch if rows is None else self.take(batch, rows)
                state, metrics = self.update(state, mb, self.ref_params)
                updates.append(metrics)
        jax.block_until_ready(updates)
        t4 = time.perf_counter()
        metrics = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *updates)
        metrics["behaviour_logp_diff"] = updates[0]["logp_diff"]  # stale weights or a mismatch would show here
        scalars = {**reward_metrics(rewards, config.samples), **rollout.metrics(self.tokenizer)}
        self.history.append(scalars)
        metrics.update(scalars, reward_time=t2 - t1, update_time=t4 - t3,
                       host_time=rollout.render_seconds + (t3 - t2), step_time=t4 - t0)
        return state, metrics


def reference_params(job: RLJob, mesh: jax.sharding.Mesh) -> Params:
    """The frozen reference: the policy's initial parameters (model.init_from, else the seeded init),
    whatever step a resumed run continues from."""
    cfg, config = job.policy.model, job.config
    if config.model.init_from is not None:
        return load_params(config.model.init_from, cfg, mesh)
    return init_train_state(cfg, job.policy.optimizer, mesh, seed=config.seed).params


def run(config: RLConfig | ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes training) the policy with RL in `workdir`; returns a summary of this
    invocation: `train.loop.summarize`'s, plus first_reward / last_reward (the mean reward of this
    invocation's first and last step). Raises ConfigError before any device work, TrainingError
    for a failing reward function (before the step's update)."""
    config = config if isinstance(config, RLConfig) else rl_config(config)
    start_distributed(config)
    job = resolve_rl(config)
    cfg = job.policy.model
    mesh = make_mesh(job.policy.mesh)
    tokenizer = tokenizer_from_spec(job.policy.tokenizer, cfg)

    # A prompt either mode cannot render within rollout.max_prompt_len is a bad record: named by
    # file and line, or skipped with prompts.on_bad_record='skip', before it reaches a rollout.
    def check(record: dict[str, Any]) -> None:
        for mode in Mode:
            render_prompt(record, mode, tokenizer, config.rollout)

    prompts = data_lib.make_prompt_stream(config.prompts, check=check)
    ref = reference_params(job, mesh) if config.rl.uses_reference else None
    step_fn = RLStep(job, mesh, tokenizer, ref)
    seq_len = config.rollout.seq_len
    tokens_per_step = job.rows * seq_len
    flops_per_step = update_flops(cfg, seq_len, ref is not None) * tokens_per_step * config.rl.ppo_epochs

    def rates(scalars: dict[str, float], step_time: float, peak: float) -> dict[str, float]:
        # MFU of the updates alone: the rollout is decode, bandwidth-bound by nature.
        return {"tokens_per_s": tokens_per_step / step_time, "mfu": flops_per_step / scalars["update_time"] / peak}

    summary = run_loop(job.policy, workdir, mesh, tokenizer, prompts, step_fn, rates)
    if step_fn.history:
        summary.update(first_reward=step_fn.history[0]["reward_mean"], last_reward=step_fn.history[-1]["reward_mean"])
    return summary
