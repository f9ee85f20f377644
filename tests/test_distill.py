"""Distillation: divergences against float64 numpy, masks, the sharded update, learning, exact resume."""

from __future__ import annotations

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
from infer.rollout import Mode
from infer.sampling import NON_THINKING_SAMPLING, THINKING_SAMPLING, SamplingParams, kept_mask
from qwen3_jax.errors import ConfigError, DataError
from qwen3_jax.model import abstract_model
from qwen3_jax.sharding import ShardingRules
from qwen3_jax.tokenizer import Tokenizer
from train import distill
from train import step as step_lib
from train.checkpoint import load_params
from train.config import OptimizerConfig
from train.distill import config as dconfig
from train import rollout as distill_rollout
from train.distill import run as distill_run
from train.distill.divergence import DistillLoss, chunked_sums, divergence, token_terms
from train.miniature.spm import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = ShardingRules()
VOCAB = 320


# ------------------------------------------------------------------- float64 numpy reference


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def reference(s, t, y, loss: DistillLoss):
    """(per-token loss, per-token divergence, d loss / d student logits) in float64, written out by
    hand from the definitions (train/divergence.py's module doc), not from the code under test."""
    T = loss.temperature
    ls, lt = log_softmax64(np.asarray(s) / T), log_softmax64(np.asarray(t) / T)
    ps, pt = np.exp(ls), np.exp(lt)
    onehot = np.eye(ps.shape[-1])[y]
    if loss.signal == "full":
        b = loss.beta
        if b == 0:
            d = (pt * (lt - ls)).sum(-1)
            g = ps - pt
        elif b == 1:
            d = (ps * (ls - lt)).sum(-1)
            g = ps * (ls - lt - d[..., None])
        else:
            lm = np.log(b * pt + (1 - b) * ps)
            d = b * (pt * (lt - lm)).sum(-1) + (1 - b) * (ps * (ls - lm)).sum(-1)
            dp = (1 - b) * (ls - lm)  # d JSD / d p_s
            g = ps * (dp - (ps * dp).sum(-1, keepdims=True))
        return d, d, g / T
    if loss.signal == "top_k":
        top = np.argsort(-lt, axis=-1, kind="stable")[..., : loss.top_k]
        lq = log_softmax64(np.take_along_axis(lt, top, -1))
        d = (np.exp(lq) * (lq - np.take_along_axis(ls, top, -1))).sum(-1)
        qfull = np.zeros_like(ps)
        np.put_along_axis(qfull, top, np.exp(lq), -1)
        return d, d, (ps - qfull) / T
    log_r = (lt * onehot).sum(-1) - (ls * onehot).sum(-1)
    rho = np.exp(log_r)
    k = -log_r if loss.signal == "k1" else rho - 1 - log_r
    dlogp = onehot - ps  # d log p_s(y) / d student logits (times T)
    if loss.estimator_use == "reward":
        return k * (ls * onehot).sum(-1), k, k[..., None] * dlogp / T
    return k, k, (1 - rho)[..., None] * dlogp / T  # k3 as a loss


def random_case(seed=0, B=3, T=16, D=8, E=12, V=41):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(B, T, D)).astype(np.float32)
    ws = rng.normal(size=(D, V)).astype(np.float32)
    ht = rng.normal(size=(B, T, E)).astype(np.float32)
    wt = (1.5 * rng.normal(size=(E, V))).astype(np.float32)
    y = rng.integers(0, V, (B, T))
    mask = np.zeros((B, T), np.float32)  # prompt, completion, padding per row
    for b, (p, c) in enumerate([(3, 9), (1, 15), (6, 4)][:B]):
        mask[b, p - 1 : p - 1 + c] = 1
    return hs, ws, ht, wt, y, mask


LOSSES = [DistillLoss("full", beta=b, temperature=t) for b in (0.0, 1.0, 0.3) for t in (1.0, 1.7)] + [
    DistillLoss("top_k", top_k=5, temperature=1.3),
    DistillLoss("k1", estimator_use="reward", temperature=1.2), DistillLoss("k3", estimator_use="loss", temperature=1.2),
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda l: f"{l.signal}-b{l.beta}-T{l.temperature}-{l.estimator_use}")
def test_chunked_sums_equal_float64_numpy_in_value_and_gradient(loss):
    hs, ws, ht, wt, y, mask = random_case()

    def f(hs, ws):
        sums = chunked_sums(hs, ws, ht, wt, y, mask, loss=loss, chunk_len=4, rules=RULES)
        return sums.loss, sums

    (value, sums), (g_h, g_w) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(hs, ws)
    s64, t64 = hs.astype(np.float64) @ ws, ht.astype(np.float64) @ wt
    per_loss, per_div, g_logits = reference(s64, t64, y, loss)
    np.testing.assert_allclose(value, (mask * per_loss).sum(), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(sums.divergence, (mask * per_div).sum(), rtol=2e-5, atol=1e-5)
    G = mask[..., None] * g_logits
    np.testing.assert_allclose(g_h, G @ ws.T.astype(np.float64), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_w, np.einsum("btd,btv->dv", hs.astype(np.float64), G), rtol=1e-4, atol=1e-5)
    entropy = lambda l: -(np.exp(l) * l).sum(-1)  # noqa: E731
    for name, logits in (("student_entropy", s64), ("teacher_entropy", t64)):
        expected = (mask * entropy(log_softmax64(logits / loss.temperature))).sum()
        np.testing.assert_allclose(getattr(sums, name), expected, rtol=2e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_divergence_api_is_the_masked_mean_and_matches_numpy(beta):
    """train.distill.divergence(student, teacher, mask, beta=..., temperature=...) on full logits."""
    _, _, _, _, _, mask = random_case()
    rng = np.random.default_rng(1)
    s = rng.normal(size=(*mask.shape, 29)).astype(np.float32)
    t = (2 * rng.normal(size=s.shape)).astype(np.float32)
    value, grad = jax.value_and_grad(lambda s: distill.divergence(s, t, mask, beta=beta, temperature=1.5))(s)
    per, _, g = reference(s, t, np.zeros(mask.shape, int), DistillLoss("full", beta=beta, temperature=1.5))
    np.testing.assert_allclose(value, (mask * per).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(grad, mask[..., None] * g / mask.sum(), rtol=1e-4, atol=1e-7)
    assert float(distill.divergence(s, t, np.zeros_like(mask), beta=beta)) == 0.0


@pytest.mark.parametrize("loss", [
    DistillLoss("full", beta=0.0), DistillLoss("full", beta=1.0), DistillLoss("full", beta=0.5, temperature=2.0),
    DistillLoss("k3", estimator_use="loss"), DistillLoss("k1", estimator_use="reward"),
], ids=lambda l: f"{l.signal}-{l.beta}-{l.estimator_use}")
def test_teacher_identical_to_student_gives_zero_divergence_and_gradient(loss):
    """(top_k is not zero there by design: it also pulls the mass outside the teacher's top k.)"""
    hs, ws, _, _, y, mask = random_case(seed=3)
    f = lambda hs, ws: chunked_sums(hs, ws, hs, ws, y, mask, loss=loss, chunk_len=8, rules=RULES)  # noqa: E731
    sums = f(hs, ws)
    grads = jax.grad(lambda hs, ws: f(hs, ws).loss, argnums=(0, 1))(hs, ws)
    assert abs(float(sums.loss)) < 1e-5 and abs(float(sums.divergence)) < 1e-5
    for g in grads:
        np.testing.assert_allclose(g, 0.0, atol=1e-5)


def behaviour_policy(logits_BxV, sampling):
    """The distribution the rollout's sampler draws each row's token from under `sampling`."""
    kept_BxV = kept_mask(jnp.asarray(logits_BxV, jnp.float32), SamplingParams.make(len(logits_BxV), **sampling))
    tempered = np.where(np.asarray(kept_BxV), np.asarray(logits_BxV, np.float64) / sampling["temperature"], -np.inf)
    return np.exp(log_softmax64(tempered))


@pytest.mark.parametrize("loss, beta", [
    (DistillLoss("k1", estimator_use="reward", temperature=1.3), 1.0),  # reverse KL(student || teacher)
    (DistillLoss("k3", estimator_use="loss", temperature=1.3), 0.0),  # forward KL(teacher || student)
], ids=lambda x: getattr(x, "signal", x))
def test_sampled_token_signals_are_unbiased_exactly_under_the_sampling_validation_accepts(loss, beta):
    """Issue 22: the expected gradient of a k1/k3 signal over the rollout sampler's actual distribution
    equals the divergence's exact gradient for every setting `biasing_settings` accepts, and misses
    it by far under Qwen's per-mode settings, which validation therefore refuses."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 40)), 1.5 * rng.normal(size=(4, 40))
    grad_y = [np.asarray(jax.grad(lambda z: token_terms(z, jnp.asarray(t, jnp.float32), jnp.full(4, y), loss)[0].sum())(
        jnp.asarray(s, jnp.float32))) for y in range(40)]  # row b: d loss_b / d logits_b when row b samples y
    exact = reference(s, t, np.zeros(4, int), DistillLoss("full", beta=beta, temperature=loss.temperature))[2]
    exact_sampling = {"temperature": loss.temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    for sampling in (exact_sampling, THINKING_SAMPLING, NON_THINKING_SAMPLING, {**exact_sampling, "top_k": 20}):
        q = behaviour_policy(s, sampling)
        expected = sum(q[:, y, None] * grad_y[y] for y in range(40))
        error = np.abs(expected - exact).max() / np.abs(exact).max()
        accepted = not dconfig.biasing_settings(sampling, loss.temperature)
        assert accepted == (error < 1e-4), (sampling, error)
        assert accepted or error > 0.05, (sampling, error)


@pytest.mark.parametrize("signal, use", [("k1", "loss"), ("k3", "reward")])
def test_signal_uses_without_a_divergence_gradient_are_refused(signal, use):
    with pytest.raises(ValueError, match=r"no divergence's gradient in expectation"):
        DistillLoss(signal, estimator_use=use)


def test_different_vocabularies_are_a_named_error():
    hs, ws, ht, wt, y, mask = random_case()
    with pytest.raises(ValueError, match="vocabularies differ"):
        chunked_sums(hs, ws, ht, wt[:, :-1], y, mask, loss=DistillLoss(), chunk_len=4, rules=RULES)


# ----------------------------------------------------------------------------- mask alignment


def test_loss_mask_covers_exactly_the_sampled_completion_tokens():
    batch = distill_rollout.rollout_batch([[11, 12, 13], [21]], [[14, 15, 16], [22, 23]], seq_len=8,
                                  forced=[[False, False, False], [False, True]])
    np.testing.assert_array_equal(batch["tokens"], [[11, 12, 13, 14, 15, 16, 0, 0], [21, 22, 23, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["targets"], [[12, 13, 14, 15, 16, 0, 0, 0], [22, 23, 0, 0, 0, 0, 0, 0]])
    # Row 0: positions 2, 3, 4 predict completion tokens 14, 15, 16. Row 1: position 0 predicts 22;
    # 23 was forced by the thinking budget, so position 1 does not count.
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 0, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(batch["segment_ids"], [[1] * 6 + [0] * 2, [1] * 3 + [0] * 5])
    with pytest.raises(ValueError, match="exceed seq_len"):
        distill_rollout.rollout_batch([[1] * 5], [[2] * 4], seq_len=8)


def test_a_one_position_shift_changes_the_loss():
    """Per-position divergences are all different, so only the exact alignment gives the value."""
    P, C, T, V = 4, 3, 10, 7
    batch = distill_rollout.rollout_batch([list(range(1, P + 1))], [[5, 6, 2]], seq_len=T)
    student = np.zeros((1, T, V), np.float32)
    teacher = np.zeros((1, T, V), np.float32)
    teacher[0, :, 0] = np.arange(1, T + 1)  # position i: teacher peaks more with i
    per_position = np.array([float(divergence(student[:, i:i + 1], teacher[:, i:i + 1], np.ones((1, 1)), beta=1.0))
                             for i in range(T)])
    assert len(set(np.round(per_position, 6))) == T
    got = float(divergence(student, teacher, batch["loss_mask"], beta=1.0))
    np.testing.assert_allclose(got, per_position[P - 1 : P - 1 + C].mean(), rtol=1e-6)
    for shift in (-1, 1):
        shifted = np.roll(batch["loss_mask"], shift, axis=1)
        assert abs(float(divergence(student, teacher, shifted, beta=1.0)) - got) > 1e-3


# ---------------------------------------------------------------------------- the objective


def tiny(name="tiny-dense", **overrides):
    return q.preset(name, vocab_size=VOCAB, **overrides)


STUDENT = dict(hidden_size=48, num_layers=2, intermediate_size=96, num_heads=4, num_kv_heads=2,
               tie_word_embeddings=False)


def objective(student_cfg, teacher_cfg, loss=DistillLoss(), chunk_len=8):
    import functools

    return functools.partial(
        distill_run.distill_objective, graphdef=nnx.graphdef(abstract_model(student_cfg)), cfg=student_cfg,
        teacher_graphdef=nnx.graphdef(abstract_model(teacher_cfg)), loss=loss, chunk_len=chunk_len,
    )


def test_objective_scores_the_completion_under_both_models():
    """The update's objective equals `divergence` on the two models' full logits, on the mask."""
    s_cfg, t_cfg = tiny(**STUDENT), tiny("tiny-moe")
    student, teacher = q.init_model(s_cfg, seed=1), q.init_model(t_cfg, seed=2)
    batch = distill_rollout.rollout_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 11], [12, 13, 14, 15, 16]], seq_len=16)
    params = nnx.to_pure_dict(nnx.state(student, nnx.Param))
    t_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
    terms = jax.jit(objective(s_cfg, t_cfg))(params, batch, t_params)
    full_s = student(jnp.asarray(batch["tokens"]))
    full_t = teacher(jnp.asarray(batch["tokens"]))
    expected = divergence(full_s, full_t, batch["loss_mask"], beta=1.0)
    np.testing.assert_allclose(terms.sums["divergence"] / batch["loss_mask"].sum(), expected, rtol=1e-5)


OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100, end_learning_rate_ratio=0.1,
                               eps=1e-4)


@pytest.mark.parametrize("teacher_name, mesh_shape", [
    ("tiny-dense", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("tiny-moe", {"data": 2, "expert": 4}),
])
def test_sharded_update_equals_one_device(teacher_name, mesh_shape):
    s_cfg, t_cfg = tiny(**STUDENT), tiny(teacher_name)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, VOCAB, n)) for n in (3, 7, 2, 5, 1, 4, 6, 2)]
    completions = [list(rng.integers(0, VOCAB, n)) for n in (9, 4, 13, 1, 15, 6, 2, 8)]
    host_batch = distill_rollout.rollout_batch(prompts, completions, seq_len=16)
    params = nnx.to_pure_dict(nnx.state(q.init_model(s_cfg, seed=3), nnx.Param))
    t_params = nnx.to_pure_dict(nnx.state(q.init_model(t_cfg, seed=4), nnx.Param))
    results = []
    for mesh in (q.make_mesh({"data": 1}, jax.devices()[:1]), q.make_mesh(mesh_shape)):
        state = step_lib.init_train_state(s_cfg, OPT, mesh, params=jax.device_put(jax.device_get(params)))
        teacher = jax.device_put(t_params, step_lib.params_shardings(t_cfg, mesh))
        batch = jax.device_put(host_batch, step_lib.batch_sharding(mesh, s_cfg.rules))
        update = step_lib.compile_update(objective(s_cfg, t_cfg), s_cfg, 1, OPT, mesh,
                                         step_lib.params_shardings(t_cfg, mesh))
        new_state, metrics = update(state, batch, teacher)
        results.append((jax.device_get(metrics), jax.device_get(new_state.params)))
    (m1, p1), (m8, p8) = results
    for k in ("loss", "divergence", "student_entropy", "teacher_entropy", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p8), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=step_lib.param_path(path))


# --------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A sentencepiece tokenizer with Qwen3's control tokens, a peaked tiny teacher checkpoint
    that ships it, and a prompt file."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 99, (200, 2))
    (root / "corpus.txt").write_text("\n".join(
        f"What is {a} plus {b}? The answer is {a + b}. Considering the limited time by the user, I have to "
        "give the solution based on the thinking directly now." for a, b in pairs))
    tokenizer = Tokenizer.from_sentencepiece(train_sentencepiece([str(root / "corpus.txt")], str(root / "spm"), VOCAB))
    # Untied: a random tied model's argmax is its input token (the embedding's self-similarity),
    # which any two such models agree on. Scaled: a confident teacher.
    teacher = q.init_model(tiny(tie_word_embeddings=False), seed=1)
    teacher.lm_head[...] = teacher.lm_head[...] * 6.0
    q.save_model(teacher, root / "teacher")
    tokenizer.save(root / "teacher")
    with open(root / "prompts.jsonl", "w") as f:
        for a, b in pairs[:64]:
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]}) + "\n")
    return root, tokenizer, teacher


def resolve(cd):
    return dconfig.resolve_distill(dconfig.distill_config(cd))


def distill_config(root, **overrides):
    c = dconfig.default_config()
    c.model.preset = "tiny-dense"
    c.model.overrides = dict(vocab_size=VOCAB, **STUDENT)
    c.teacher.init_from = str(root / "teacher")
    c.prompts.paths = str(root / "prompts.jsonl")
    c.prompts.batch_size = 8
    c.rollout.max_prompt_len = 40
    c.rollout.max_new_tokens = 24
    c.rollout.thinking_budget = 6
    c.train.ce_chunk_len = 16
    c.train.peak_flops = 1e10
    c.optimizer.learning_rate = 1e-2
    c.optimizer.warmup_steps = 2
    c.optimizer.decay_steps = 40
    c.checkpoint.every = 100
    for key, value in overrides.items():
        section, field = key.rsplit(".", 1)
        c[section][field] = value
    return c


def greedy_agreement(student: q.Qwen3, teacher: q.Qwen3, tokenizer, records) -> float:
    """Fraction of the teacher's greedy completion tokens that are the student's argmax too."""
    rollout = dconfig.RolloutConfig(max_prompt_len=40, max_new_tokens=24, think_fraction=1.0)
    prompts = [distill_rollout.render_prompt(r, Mode.NO_THINK, tokenizer, rollout) for r in records]
    completions = Engine.for_tokenizer(teacher, tokenizer).generate(
        prompts, max_new_tokens=12, temperature=0.0, stop_token_ids=())
    batch = distill_rollout.rollout_batch(prompts, completions, seq_len=64)
    argmax = np.asarray(jnp.argmax(student(jnp.asarray(batch["tokens"])), axis=-1))
    mask = batch["loss_mask"] > 0
    return float(np.mean(argmax[mask] == batch["targets"][mask]))


def test_distillation_lowers_the_divergence_and_raises_greedy_agreement(assets, tmp_path):
    root, tokenizer, teacher = assets
    config = distill_config(root, **{"train.steps": 30})
    exp = resolve(config)
    records = [json.loads(line) for line in open(root / "prompts.jsonl")][-16:]
    before = greedy_agreement(q.init_model(exp.student.model, seed=config.seed), teacher, tokenizer, records)
    summary = distill_run.run(config, str(tmp_path))
    mesh = q.make_mesh({"data": 1}, jax.devices()[:1])
    params = load_params(str(tmp_path), exp.student.model, mesh)
    student = nnx.merge(nnx.graphdef(abstract_model(exp.student.model)), params)
    after = greedy_agreement(student, teacher, tokenizer, records)
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = np.mean([m["divergence"] for m in metrics[:3]]), np.mean([m["divergence"] for m in metrics[-3:]])
    assert last < 0.5 * first, (first, last)
    assert after > before + 0.2, (before, after)
    assert {"completion_len", "student_entropy", "teacher_entropy", "tokens_per_s", "mfu", "rollout_tokens_per_s",
            "update_time", "rollout_time"} <= set(metrics[-1])
    assert summary["last_loss"] < summary["first_loss"]


def test_resumed_run_repeats_the_uninterrupted_divergence_curve(assets, tmp_path):
    root, _, _ = assets
    overrides = {"rollout.max_new_tokens": 8, "rollout.max_prompt_len": 40, "checkpoint.every": 2,
                 "prompts.batch_size": 4}
    distill_run.run(distill_config(root, **overrides, **{"train.steps": 5}), str(tmp_path / "whole"))
    distill_run.run(distill_config(root, **overrides, **{"train.steps": 3}), str(tmp_path / "cut"))  # saves 2, 3
    distill_run.run(distill_config(root, **overrides, **{"train.steps": 5}), str(tmp_path / "cut"))

    def curve(workdir):
        return {m["step"]: m["divergence"] for m in map(json.loads, open(workdir / "metrics.jsonl"))}

    whole, cut = curve(tmp_path / "whole"), curve(tmp_path / "cut")
    assert sorted(cut) == sorted(whole) == [1, 2, 3, 4, 5]
    for step in whole:
        np.testing.assert_allclose(cut[step], whole[step], rtol=1e-6, err_msg=f"step {step}")


def test_off_policy_phase_then_on_policy_in_one_run(assets, tmp_path):
    """Phase 1 (teacher responses in both modes + SFT) runs first; phase 2 starts from its result."""
    root, tokenizer, _ = assets
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(open(root / "prompts.jsonl").readlines()[:4]))
    config = distill_config(root, **{
        "prompts.paths": str(prompts), "prompts.batch_size": 4, "train.steps": 1, "off_policy.steps": 2,
        "off_policy.max_new_tokens": 8, "off_policy.thinking_budget": 2, "off_policy.temperature": 0.0,
        "off_policy.keep_unfinished": True, "off_policy.seq_len": 64,
        "rollout.max_new_tokens": 8,
    })
    config.optimizer.update(decay_steps=None, warmup_steps=0)
    distill_run.run(config, str(tmp_path / "w"))
    records = [json.loads(line) for line in open(tmp_path / "w" / "off_policy" / "teacher_responses.jsonl")]
    assert sorted((r["prompt_line"], r["mode"]) for r in records) == [
        (line, mode) for line in range(1, 5) for mode in ("no_think", "think")]
    assert all(r["messages"][-2]["content"].endswith("/" + r["mode"]) for r in records)
    sft = [json.loads(line) for line in open(tmp_path / "w" / "off_policy" / "metrics.jsonl")]
    assert [m["step"] for m in sft] == [1, 2]
    cfg = resolve(config).student.model
    mesh = q.make_mesh({"data": 1}, jax.devices()[:1])
    after_sft = load_params(str(tmp_path / "w" / "off_policy"), cfg, mesh)
    assert not np.allclose(after_sft["runs"][0]["mlp"]["up_proj"], q.init_model(cfg, seed=0).runs[0].mlp.up_proj[...])
    on_policy = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert [m["step"] for m in on_policy] == [1]
    # Rerunning resumes both phases: nothing is generated or trained again.
    distill_run.run(config, str(tmp_path / "w"))
    assert len(open(tmp_path / "w" / "off_policy" / "teacher_responses.jsonl").readlines()) == len(records)
    assert len(open(tmp_path / "w" / "metrics.jsonl").readlines()) == 1


@pytest.mark.parametrize("overrides, message", [
    ({"teacher.init_from": None}, r"teacher.init_from must name"),
    ({"distill.signal": "kl"}, r"signal must be one of"),
    ({"distill.beta": 1.5}, r"beta must be in \[0, 1\]"),
    ({"rollout.think_fraction": 2.0}, r"think_fraction must be in \[0, 1\]"),
    ({"rollout.thinking_budget": -2}, r"thinking_budget must be None or >= 0"),
    ({"rollout.max_new_tokens": 40960}, r"exceeds the student's context of 40960 positions"),
    ({"rollout.mode_switch": "magic"}, r"mode_switch must be one of"),
    ({"rollout.top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"prompts.batch_size": 3, "mesh.data": 2}, r"prompts.batch_size=3 is not divisible by the data-parallel"),
    ({"train.ce_chunk_len": 5}, r"ce_chunk_len=5 must divide rollout.max_prompt_len \+ rollout.max_new_tokens=64"),
])
def test_config_errors_are_named(assets, overrides, message):
    root, _, _ = assets
    with pytest.raises(ConfigError, match=message):
        resolve(distill_config(root, **overrides))


def test_sampled_token_signal_with_filtered_rollouts_is_refused_naming_the_fields(assets):
    """Issue 22: k1/k3 need rollouts from the student's untruncated softmax at distill.temperature;
    the default rollout (Qwen's per-mode temperature, top-k, top-p) is refused, the exact one accepted."""
    root, _, _ = assets
    k3 = {"distill.signal": "k3", "distill.estimator_use": "loss", "distill.temperature": 0.9}
    with pytest.raises(ConfigError, match=(
            r"distill.signal='k3' .* distill.temperature=0.9 .* rollout.temperature=0.6, rollout.top_p=0.95, "
            r"rollout.top_k=20 .* set rollout.temperature=0.9, rollout.top_k=0, rollout.top_p=1.0")):
        resolve(distill_config(root, **k3))
    with pytest.raises(ConfigError, match=r"no_think rollouts sample with rollout.top_k=20"):
        resolve(distill_config(root, **k3, **{"rollout.think_fraction": 0.0, "rollout.temperature": 0.9,
                                                       "rollout.top_p": 1.0}))
    exact = {"rollout.temperature": 0.9, "rollout.top_k": 0, "rollout.top_p": 1.0, "rollout.min_p": 0.0}
    assert resolve(distill_config(root, **k3, **exact)).config.distill.signal == "k3"
    assert resolve(distill_config(root, **{"distill.signal": "full"})).config.distill.signal == "full"


def test_teacher_with_another_vocabulary_is_refused(assets, tmp_path):
    root, tokenizer, _ = assets
    q.save_model(q.init_model(q.preset("tiny-dense", vocab_size=VOCAB + 64)), tmp_path / "t")
    with pytest.raises(ConfigError, match=r"teacher's vocab_size \(384\) differs"):
        resolve(distill_config(root, **{"teacher.init_from": str(tmp_path / "t")}))


def test_too_long_prompt_is_named_not_truncated(assets):
    root, tokenizer, _ = assets
    rollout = dconfig.RolloutConfig(max_prompt_len=8, max_new_tokens=8, think_fraction=1.0)
    with pytest.raises(DataError, match=r"more than rollout.max_prompt_len=8"):
        distill_rollout.render_prompt({"messages": [{"role": "user", "content": "What is 1 plus 2?"}]}, Mode.THINK,
                              tokenizer, rollout)
    with pytest.raises(DataError, match="must not end with an assistant turn"):
        distill_rollout.render_prompt({"messages": [{"role": "assistant", "content": "hi"}]}, Mode.THINK, tokenizer,
                              rollout)


def test_soft_and_hard_switches_render_the_mode():
    tokenizer_free = [{"role": "user", "content": "Hi"}]
    from qwen3_jax import chat

    assert chat.with_soft_switch(tokenizer_free, True)[-1]["content"] == "Hi /think"
    assert chat.with_soft_switch(tokenizer_free, False)[-1]["content"] == "Hi /no_think"
    assert chat.with_soft_switch([{"role": "user", "content": "Hi /no_think"}], False)[-1]["content"] == "Hi /no_think"
    assert tokenizer_free[0]["content"] == "Hi"  # a copy
    with pytest.raises(ValueError, match="has none"):
        chat.with_soft_switch([{"role": "system", "content": "x"}], True)


DISTILL_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "distill_*.py")))


@pytest.mark.parametrize("path", DISTILL_CONFIGS, ids=os.path.basename)
def test_shipped_distill_configs_validate(path, assets, tmp_path, monkeypatch):
    """Each distillation config is consistent on the mesh it is written for (devices faked; tiny
    checkpoints of the same vocabulary stand in for the real ones)."""
    root, _, _ = assets
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    vocab = q.preset(config.model.preset).vocab_size if config.model.preset else 151936
    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_heads=2,
                 num_kv_heads=1)
    for name in ("teacher", "student"):
        ckpt = tmp_path / name
        q.save_model(q.init_model(q.preset("tiny-moe" if name == "teacher" else "tiny-dense", **small)), ckpt)
        (ckpt / "tokenizer.json").write_text("{}")
    config.teacher.init_from = str(tmp_path / "teacher")
    if config.model.init_from is not None:
        config.model.init_from = str(tmp_path / "student")
    config.prompts.paths = str(root / "prompts.jsonl")
    devices = max(8, math.prod(v for v in config.mesh.values() if v > 0))
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    exp = resolve(config)
    assert exp.teacher.vocab_size == exp.student.model.vocab_size
