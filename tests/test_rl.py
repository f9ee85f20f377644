"""Reasoning RL: policy_loss against float64 numpy, the update's normalisers under microbatching and
sharding, engine log-probs = the trainer's (ratio 1), forced tokens, learning on a toy task, resume,
named errors."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qwen3_jax as q
from infer.engine import Engine
from qwen3_jax.errors import ConfigError, DataError, TrainingError
from qwen3_jax.model import abstract_model
from qwen3_jax.tokenizer import Tokenizer
from train import rl
from train import step as step_lib
from train.config import OptimizerConfig
from train.miniature.spm import train_sentencepiece
from train.rl import config as rl_config_lib
from train.rl import trainer as rl_run
from train.rl.config import RLLoss
from train.rl.loss import AGGREGATIONS, relative_weights
from train.rl.rewards import miniature_answer
from train.rollout import rollout_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 320

# ------------------------------------------------------------------- float64 numpy reference


def reference_loss(logp, old, adv_B, mask, *, aggregation, clip_low, clip_high, ref=None, kl_beta=0.0,
                   kl_estimator="k3", norm_len=None):
    """The issue's formula, written out in float64."""
    mask = np.asarray(mask, np.float64)
    on = mask > 0
    logp, old = (np.where(on, np.asarray(x, np.float64), 0.0) for x in (logp, old))
    B, T = mask.shape
    A = np.asarray(adv_B, np.float64)[:, None] * np.ones((1, T))
    r = np.exp(np.where(on, logp - old, 0.0))
    per = -np.minimum(r * A, np.clip(r, 1 - clip_low, 1 + clip_high) * A)
    if ref is not None:
        d = np.where(on, np.where(on, np.asarray(ref, np.float64), 0.0) - logp, 0.0)
        per = per + kl_beta * (-d if kl_estimator == "k1" else np.exp(d) - d - 1)
    per = np.where(on, per, 0.0)
    if aggregation == "token_mean":
        return per.sum() / mask.sum()
    if aggregation == "seq_mean_token_mean":
        rows = [per[b].sum() / mask[b].sum() for b in range(B) if mask[b].sum() > 0]
        return float(np.mean(rows))
    return per.sum() / (B * (T if norm_len is None else norm_len))


def loss_case(seed=0, B=5, T=9):
    rng = np.random.default_rng(seed)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[2] = 0  # a row without a sampled token (e.g. all forced)
    logp = np.log(rng.uniform(0.05, 0.9, (B, T))).astype(np.float32)
    old = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios on both sides of the clip
    ref = (logp + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    # Padding holds garbage the loss must never see.
    for x in (logp, old, ref):
        x[mask == 0] = np.where(rng.random((B, T)) < 0.5, -np.inf, 1e30)[mask == 0]
    adv = rng.normal(0, 1, B).astype(np.float32)
    return logp, old, adv, mask, ref


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl", [None, "k1", "k3"])
def test_policy_loss_value_and_gradient_match_float64_numpy(aggregation, kl):
    logp, old, adv, mask, ref = loss_case(seed=len(aggregation) + len(kl or ""))
    common = dict(aggregation=aggregation, clip_low=0.1, clip_high=0.3, norm_len=12 if "norm" in aggregation else None)
    kl_kw = {} if kl is None else dict(kl_beta=0.3, kl_estimator=kl)
    kw = {**common, **kl_kw, **({} if kl is None else {"ref_logp_BxT": ref})}
    ref_kw = {**common, **kl_kw, **({} if kl is None else {"ref": ref})}
    got = rl.policy_loss(logp, old, adv, mask, **kw)
    expected = reference_loss(logp, old, adv, mask, **ref_kw)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    grad = np.asarray(jax.grad(lambda x: rl.policy_loss(x, old, adv, mask, **kw))(jnp.asarray(logp)))
    assert np.all(grad[mask == 0] == 0)  # padding and forced tokens carry no gradient
    eps, on = 1e-6, np.argwhere(mask > 0)
    for b, t in on[:: max(1, len(on) // 12)]:  # central differences of the float64 reference
        up, down = logp.astype(np.float64), logp.astype(np.float64)
        up[b, t] += eps
        down[b, t] -= eps
        fd = (reference_loss(up, old, adv, mask, **ref_kw) - reference_loss(down, old, adv, mask, **ref_kw)) / (2 * eps)
        np.testing.assert_allclose(grad[b, t], fd, rtol=1e-3, atol=1e-6, err_msg=f"{(b, t)}")


def test_asymmetric_clip_bounds_the_ratio_on_each_side():
    mask = np.ones((2, 1), np.float32)
    old = np.zeros((2, 1), np.float32)
    logp = np.log(np.array([[1.5], [0.5]], np.float32))  # ratios 1.5 and 0.5
    kw = dict(aggregation="token_mean", clip_low=0.2, clip_high=0.28)
    # A > 0: the gain stops at 1 + clip_high; A < 0: the loss stops at 1 - clip_low.
    assert float(rl.policy_loss(logp[:1], old[:1], np.ones(1), mask[:1], **kw)) == pytest.approx(-1.28)
    assert float(rl.policy_loss(logp[1:], old[1:], -np.ones(1), mask[1:], **kw)) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        rl.policy_loss(logp, old, np.ones(2), mask, aggregation="mean")


@pytest.mark.parametrize("scale", [False, True])
def test_group_advantages_center_each_group_and_scale_by_its_std(scale):
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.0])
    got = rl.group_advantages(rewards, 3, scale_by_std=scale)
    groups = rewards.reshape(3, 3)
    expected = groups - groups.mean(1, keepdims=True)
    if scale:
        expected = expected / (groups.std(1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, expected.reshape(-1), rtol=1e-6, atol=1e-7)
    assert np.all(got[3:6] == 0)  # all-equal rewards: no signal
    with pytest.raises(ValueError, match="groups of 4"):
        rl.group_advantages(rewards, 4, scale_by_std=scale)


# ------------------------------------------------------------------------- the compiled update

TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=1, intermediate_size=48, num_heads=2, num_kv_heads=2,
            head_dim=16, tie_word_embeddings=False)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100, eps=1e-4)


def update_fn(cfg, loss: RLLoss, mesh, microbatches=1, temperature=1.0, chunk_len=8):
    objective = functools.partial(rl_run.rl_objective, graphdef=nnx.graphdef(abstract_model(cfg)), cfg=cfg,
                                  loss=loss, temperature=temperature, chunk_len=chunk_len)
    frozen = step_lib.params_shardings(cfg, mesh) if loss.uses_reference else None
    return step_lib.compile_update(objective, cfg, microbatches, OPT, mesh, frozen,
                                   prepare=functools.partial(rl_run.prepare_batch, loss=loss))


def random_rl_batch(rng, B=8, T=16):
    prompts = [list(rng.integers(1, VOCAB, n)) for n in rng.integers(1, 6, B)]
    # Very different completion lengths, so per-row and per-batch normalisers differ.
    completions = [list(rng.integers(1, VOCAB, n)) for n in (10, 1, 6, 3, 9, 2, 7, 5)[:B]]
    forced = [[bool(rng.random() < 0.2) for _ in c] for c in completions]
    logprobs = [list(np.log(rng.uniform(0.01, 0.5, len(c)))) for c in completions]
    batch = rollout_batch(prompts, completions, T, forced, logprobs)
    batch["advantages"] = np.repeat(rng.normal(0, 1, B).astype(np.float32)[:, None], T, axis=1)
    return batch


@pytest.mark.parametrize("loss", [
    RLLoss(aggregation="token_mean"),
    RLLoss(aggregation="seq_mean_token_mean", kl_beta=0.1, kl_estimator="k1"),
    RLLoss(aggregation="seq_mean_token_sum_norm", norm_len=20, kl_beta=0.1),
], ids=lambda l: l.aggregation)
def test_microbatched_and_sharded_updates_equal_the_one_batch_one_device_update(loss):
    cfg = q.preset("tiny-dense", **TINY)
    host = random_rl_batch(np.random.default_rng(1))
    params = jax.device_get(nnx.to_pure_dict(nnx.state(q.init_model(cfg, seed=2), nnx.Param)))
    ref = jax.device_get(nnx.to_pure_dict(nnx.state(q.init_model(cfg, seed=3), nnx.Param)))
    one = q.make_mesh({"data": 1}, jax.devices()[:1])
    results = []
    # 8 devices (data-parallel degree 4) and 2 microbatches of 4 rows: each device holds one row of a microbatch.
    for mesh, micro in ((one, 1), (q.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), 2)):
        state = step_lib.init_train_state(cfg, OPT, mesh, params=jax.device_put(params))
        frozen = jax.device_put(ref, step_lib.params_shardings(cfg, mesh)) if loss.uses_reference else None
        batch = jax.device_put(host, step_lib.batch_sharding(mesh, cfg.rules))
        new, metrics = update_fn(cfg, loss, mesh, micro)(state, batch, frozen)
        results.append((jax.device_get(metrics), jax.device_get(new.params)))
    # The loss the update reports is policy_loss on full arrays.
    model = q.init_model(cfg, seed=2)
    logits = model(jnp.asarray(host["tokens"])).astype(jnp.float32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(host["targets"])[..., None], -1)[..., 0]
    ref_model = nnx.merge(nnx.graphdef(model), nnx.state(q.init_model(cfg, seed=3)))
    ref_logits = ref_model(jnp.asarray(host["tokens"])).astype(jnp.float32)
    ref_logp = jnp.take_along_axis(jax.nn.log_softmax(ref_logits), jnp.asarray(host["targets"])[..., None], -1)[..., 0]
    expected = rl.policy_loss(logp, host["old_logp"], host["advantages"][:, 0], host["loss_mask"],
                              aggregation=loss.aggregation, clip_low=loss.clip_low, clip_high=loss.clip_high,
                              ref_logp_BxT=ref_logp if loss.kl_beta else None, kl_beta=loss.kl_beta,
                              kl_estimator=loss.kl_estimator, norm_len=loss.norm_len)
    np.testing.assert_allclose(results[0][0]["loss"], expected, rtol=1e-5)
    (m1, p1), *others = results
    for m, p in others:
        for k in ("loss", "grad_norm", "clip_frac", "entropy", *(("kl",) if loss.uses_reference else ())):
            np.testing.assert_allclose(m[k], m1[k], rtol=2e-5, err_msg=k)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(p1), strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5, err_msg=step_lib.param_path(path))


def test_relative_weights_normalise_by_the_whole_batch():
    mask = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], jnp.float32)
    np.testing.assert_allclose(relative_weights(mask, "token_mean"), mask)
    # N = 5 tokens: row 0's tokens weigh N / (4 x 2 rows), row 1's N / (1 x 2); the empty row counts in no mean.
    np.testing.assert_allclose(relative_weights(mask, "seq_mean_token_mean")[:, 0], [5 / 8, 5 / 2, 0])
    np.testing.assert_allclose(relative_weights(mask, "seq_mean_token_sum_norm", 10)[0, 0], 5 / 30)


def test_forced_tokens_carry_no_policy_gradient():
    """Changing what the batch holds at a forced token (its recorded log-prob, its advantage)
    changes neither the loss nor the gradient: the budget forced it, the policy did not sample it."""
    cfg = q.preset("tiny-dense", **TINY)
    rng = np.random.default_rng(4)
    batch = random_rl_batch(rng)
    forced_positions = (batch["segment_ids"] > 0) & (batch["loss_mask"] == 0) & (batch["old_logp"] != 0)
    assert forced_positions.any()
    params = nnx.to_pure_dict(nnx.state(q.init_model(cfg, seed=5), nnx.Param))
    objective = functools.partial(rl_run.rl_objective, graphdef=nnx.graphdef(abstract_model(cfg)), cfg=cfg,
                                  loss=RLLoss(), temperature=1.0, chunk_len=8)
    grad = jax.jit(jax.grad(lambda p, b: objective(p, rl_run.prepare_batch(b, loss=RLLoss()), None).loss_sum))
    moved = dict(batch, old_logp=np.where(forced_positions, -30.0, batch["old_logp"]).astype(np.float32),
                 advantages=np.where(forced_positions, 50.0, batch["advantages"]).astype(np.float32))
    for a, b in zip(jax.tree.leaves(grad(params, batch)), jax.tree.leaves(grad(params, moved))):
        np.testing.assert_array_equal(a, b)
    # The same change on a sampled token moves the gradient: the check can fail.
    sampled = np.argwhere(batch["loss_mask"] > 0)[0]
    other = dict(batch, old_logp=batch["old_logp"].copy())
    other["old_logp"][tuple(sampled)] -= 3.0
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(grad(params, batch)),
                                                          jax.tree.leaves(grad(params, other))))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_logprobs_are_the_trainers_and_the_first_ratio_is_one(hf_checkpoints, temperature):
    """Rollout log-probs from the engine on an HF-written checkpoint = the trainer's recomputation
    (f32, 1e-5), so the first update on a rollout batch sees ratio 1 and clips nothing."""
    _, path = hf_checkpoints["dense"]
    model = q.from_hf(path)
    cfg = model.cfg
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17], [5]]
    out = Engine(model).generate(prompts, max_new_tokens=12, temperature=temperature, top_k=0, top_p=1.0,
                                 stop_token_ids=(), seed=[1, 2, 3, 4], return_logprobs=True)
    batch = rollout_batch(prompts, out.tokens, 32, out.forced, out.logprobs)
    logits = model(jnp.asarray(batch["tokens"])).astype(jnp.float32) / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
    on = batch["loss_mask"] > 0
    np.testing.assert_allclose(np.asarray(logp)[on], batch["old_logp"][on], rtol=0, atol=1e-5)
    batch["advantages"] = np.repeat(np.asarray([1.0, -1.0, 0.5, -0.5], np.float32)[:, None], 32, axis=1)
    mesh = q.make_mesh({"data": 1}, jax.devices()[:1])
    state = step_lib.init_train_state(cfg, OPT, mesh, params=nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    _, metrics = update_fn(cfg, RLLoss(), mesh, temperature=temperature)(state, batch, None)
    assert float(metrics["logp_diff"]) < 1e-6 and float(metrics["clip_frac"]) == 0.0
    np.testing.assert_allclose(float(metrics["ratio"]), 1.0, atol=1e-6)


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A sentencepiece tokenizer with Qwen3's control tokens and a prompt file: "write the digit 7"."""
    root = tmp_path_factory.mktemp("rl")
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_text("\n".join(
        f"Write the digit {d} {n} times. The answer is {str(d) * n}. {a} plus {b} is {a + b}."
        for d, n, a, b in rng.integers(0, 10, (300, 4))))
    tokenizer = Tokenizer.from_sentencepiece(train_sentencepiece([str(root / "corpus.txt")], str(root / "spm"), VOCAB))
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(32):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Write the digit 7, {i} times."}],
                                "digit": 7, "index": i}) + "\n")
    return root, tokenizer


def rl_config(root, **overrides):
    c = rl_config_lib.default_config()
    c.model.preset = "tiny-dense"
    c.model.overrides = dict(TINY, hidden_size=48, num_layers=2)
    c.tokenizer = str(root / "spm.model")
    c.prompts.paths = str(root / "prompts.jsonl")
    c.prompts.batch_size = 4
    c.prompts.shuffle = False
    c.samples = 4
    c.reward = "helpers.rl_rewards:digits"
    c.rollout.max_prompt_len = 40
    c.rollout.max_new_tokens = 8
    c.rollout.think_fraction = 0.0
    c.train.ce_chunk_len = 16
    c.train.peak_flops = 1e10
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 0
    c.optimizer.decay_steps = 100
    c.checkpoint.every = 100
    for key, value in overrides.items():
        section, _, field = key.rpartition(".")
        (c[section] if section else c)[field] = value
    return c


def metrics_of(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_rl_raises_the_mean_reward_on_a_toy_task(assets, tmp_path):
    root, _ = assets
    summary = rl_run.run(rl_config(root, **{"train.steps": 30}), str(tmp_path))
    metrics = metrics_of(tmp_path)
    first = np.mean([m["reward_mean"] for m in metrics[:5]])
    last = np.mean([m["reward_mean"] for m in metrics[-5:]])
    assert last > first + 0.5, (first, last)  # measured: 0.005 -> 0.76 (rewards 0.0 -> 0.88 by step 30)
    assert summary["last_reward"] == metrics[-1]["reward_mean"]
    # The rollout at every step used the weights the previous update left: the first update of
    # each step recomputes the rollout's log-probs exactly (stale weights would differ here).
    assert max(m["behaviour_logp_diff"] for m in metrics) < 1e-5
    assert {"reward_std", "groups_all_equal", "clip_frac", "entropy", "completion_len", "rollout_tokens_per_s",
            "mfu", "reward_time", "update_time", "rollout_time"} <= set(metrics[-1])


def test_resumed_run_repeats_the_reward_curve_with_ppo_minibatches(assets, tmp_path):
    root, _ = assets
    kw = {"checkpoint.every": 2, "rl.ppo_minibatches": 2, "rl.ppo_epochs": 2, "rl.kl_beta": 0.05}
    rl_run.run(rl_config(root, **kw, **{"train.steps": 4}), str(tmp_path / "whole"))
    rl_run.run(rl_config(root, **kw, **{"train.steps": 2}), str(tmp_path / "cut"))
    rl_run.run(rl_config(root, **kw, **{"train.steps": 4}), str(tmp_path / "cut"))
    whole, cut = metrics_of(tmp_path / "whole"), metrics_of(tmp_path / "cut")
    assert [m["step"] for m in cut] == [m["step"] for m in whole] == [1, 2, 3, 4]
    for a, b in zip(whole, cut):
        for k in ("reward_mean", "loss", "kl"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-6, err_msg=f"step {a['step']} {k}")
    # Later PPO updates move off the behaviour policy (and the reference); the first of each step does not.
    assert all(m["behaviour_logp_diff"] < 1e-5 for m in whole) and whole[-1]["kl"] > whole[0]["kl"] > 0


@pytest.mark.parametrize("reward, message", [
    ("helpers.rl_rewards:raises", r"reward function raised RuntimeError: verifier crashed for prompt 0 of step 1"),
    ("helpers.rl_rewards:nan_on_second", r"returned nan, not a finite number for prompt 1 of step 1's batch"),
])
def test_a_failing_reward_is_named_and_stops_before_the_update(assets, tmp_path, reward, message):
    root, _ = assets
    with pytest.raises(TrainingError, match=message):
        rl_run.run(rl_config(root, reward=reward, **{"train.steps": 1}), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints" / "1")


@pytest.mark.parametrize("overrides, error, message", [
    ({"samples": 1}, ConfigError, "samples .the group size K. must be >= 2"),
    ({"reward": "no_such_module:f"}, ConfigError, "reward='no_such_module:f' does not name a function"),
    ({"rollout.top_k": 20}, ConfigError, r"sample with rollout.top_k=20"),
    ({"rollout.max_prompt_len": 40960}, ConfigError, "exceeds the policy's context"),
    ({"rl.aggregation": "mean"}, ConfigError, "rl.aggregation must be one of"),
    ({"rollout.max_prompt_len": 8}, DataError, "more than rollout.max_prompt_len=8"),
])
def test_bad_configs_and_prompts_are_named(assets, tmp_path, overrides, error, message):
    root, _ = assets
    with pytest.raises(error, match=message):
        rl_run.run(rl_config(root, **{"train.steps": 1, **overrides}), str(tmp_path))


def test_miniature_verifier_reads_the_answer_after_thinking():
    record = {"answer": 7}
    assert miniature_answer(record, "<think>\n1: 3+4=7\n</think>\n\nThe answer is 7.<|im_end|>") == 1.0
    assert miniature_answer(record, "<think>\nthe answer is 7\n</think>\n\nThe answer is 3.") == 0.0
    assert miniature_answer(record, "<think>\nThe answer is 7.") == 0.0  # never closed its thinking


RL_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "rl_*.py")))


@pytest.mark.parametrize("path", RL_CONFIGS, ids=os.path.basename)
def test_shipped_rl_configs_validate(path, assets, tmp_path, monkeypatch):
    """Each RL config is consistent on the mesh it is written for (devices faked; a tiny checkpoint
    of the same vocabulary stands in for the real one)."""
    root, _ = assets
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    vocab = 512 if "miniature" in path else 151936
    ckpt = tmp_path / "policy"
    q.save_model(q.init_model(q.preset("tiny-dense", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                       num_heads=2, num_kv_heads=1, max_position_embeddings=40960)), ckpt)
    (ckpt / "tokenizer.json").write_text("{}")
    config.model.init_from = str(ckpt)
    config.tokenizer = None
    config.prompts.paths = str(root / "prompts.jsonl")
    devices = max(8, math.prod(v for v in config.mesh.values() if v > 0))
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    job = rl_config_lib.resolve_rl(rl_config_lib.rl_config(config))
    assert job.rows == config.prompts.batch_size * config.samples
