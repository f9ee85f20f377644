"""The update step: chunked loss, weight decay mask, sharding equivalence, accumulation, and
gradients against transformers."""

from __future__ import annotations

import functools
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from qwen3_jax import from_hf, make_mesh, preset, to_hf
from helpers.safetensors_files import write_safetensors
from qwen3_jax.model import abstract_model, abstract_params
from tests.helpers.train_fixtures import (
    BATCH, OPT, PARAM_ATOL, SEQ, STEP, assert_trees_close, initial_state, single_device, synthetic_batches, train_step,
)
from train import objectives
from train import step as step_lib
from train.config import StepConfig


def one_step(cfg, mesh, state, batch, step_cfg=STEP):
    """One train step from a copy of `state` placed on `mesh`; returns (metrics, new params) on host."""
    state = jax.device_put(jax.device_get(state), step_lib.train_state_shardings(cfg, OPT, mesh))
    batch = jax.device_put(batch, step_lib.batch_sharding(mesh, cfg.rules))
    new_state, metrics = train_step(cfg, step_cfg, mesh)(state, batch)
    return jax.device_get(metrics), jax.device_get(new_state.params)


# --------------------------------------------------------------------------------------- loss


def test_chunked_cross_entropy_matches_full_logits():
    B, T, D, V = 2, 24, 16, 40
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(B, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, T))
    mask = (rng.uniform(size=(B, T)) > 0.3).astype(np.float32)
    rules = preset("tiny-dense").rules

    def chunked(h, w):
        ce, z = objectives.chunked_cross_entropy(h, w, targets, mask, chunk_len=8, rules=rules)
        return ce + 1e-2 * z

    def full(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        z = jnp.square(jax.nn.logsumexp(logits, axis=-1))
        return jnp.sum(mask * ce) + 1e-2 * jnp.sum(mask * z)

    value, grads = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, w)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_weight_decay_mask_skips_norms_and_embeddings():
    mask = step_lib.weight_decay_mask(abstract_params(preset("tiny-moe")), ("norm", "embed"))
    flat = {step_lib.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert not flat["embed"] and not flat["norm/weight"] and not flat["runs/0/attn/q_norm/weight"]
    assert flat["lm_head"] and flat["runs/0/attn/q_proj"] and flat["runs/0/mlp/router"]


# --------------------------------------------------------------------------------------- step


@pytest.mark.parametrize("name, mesh_shape", [
    ("tiny-dense", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("tiny-moe", {"data": 2, "expert": 2, "tensor": 2}),
    ("tiny-dense", "jax.make_mesh"),  # issue 13, case 7: Explicit axes
])
def test_sharded_step_matches_single_device(name, mesh_shape):
    cfg = preset(name)
    batch = next(synthetic_batches(cfg))
    ref_metrics, ref_params = one_step(cfg, single_device(), initial_state(name), batch)
    if mesh_shape == "jax.make_mesh":
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
        fresh = step_lib.init_train_state(cfg, OPT, mesh, seed=3)
        assert_trees_close(jax.device_get(fresh.params), jax.device_get(
            step_lib.init_train_state(cfg, OPT, make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), seed=3).params),
            rtol=0, atol=0)
    else:
        mesh = make_mesh(mesh_shape)
    metrics, params = one_step(cfg, mesh, initial_state(name), batch)
    assert set(metrics) == set(ref_metrics) and ("aux_loss" in metrics) == cfg.is_moe
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert_trees_close(params, ref_params, rtol=1e-5, atol=PARAM_ATOL)


def test_gradient_accumulation_matches_one_big_batch():
    """Two microbatches on 8 devices against one batch on one device (dense: the MoE aux loss is
    per microbatch by design)."""
    cfg = preset("tiny-dense")
    batch = next(synthetic_batches(cfg, seed=3))
    ref_metrics, ref_params = one_step(cfg, single_device(), initial_state("tiny-dense"), batch)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    accumulated = StepConfig(microbatches=2, ce_chunk_len=STEP.ce_chunk_len)
    metrics, params = one_step(cfg, mesh, initial_state("tiny-dense"), batch, accumulated)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert_trees_close(params, ref_params, rtol=1e-5, atol=PARAM_ATOL)


def unpacked_batch(vocab: int) -> dict[str, np.ndarray]:
    """A batch as transformers sees one: a document per row from position 0, rows right-padded
    to different lengths, the first targets of some rows untrained (a prompt)."""
    rng = np.random.default_rng(5)
    lengths, prompts = rng.integers(SEQ // 2, SEQ + 1, BATCH), rng.integers(0, 6, BATCH)
    t = np.arange(SEQ)
    real = t < lengths[:, None]
    tokens = np.where(real, rng.integers(0, vocab, (BATCH, SEQ)), 0).astype(np.int32)
    return dict(tokens=tokens, targets=np.concatenate([tokens[:, 1:], np.zeros((BATCH, 1), np.int32)], axis=1),
                loss_mask=((t >= prompts[:, None]) & (t < lengths[:, None] - 1)).astype(np.float32),
                segment_ids=real.astype(np.int32), positions=np.broadcast_to(t, (BATCH, SEQ)).astype(np.int32))


def hf_loss_and_grads(hf, batch) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' `labels=` loss (+ router_aux_loss_coef x aux for MoE) and torch autograd's
    gradients, by parameter name."""
    labels = np.full(batch["tokens"].shape, -100)
    labels[:, 1:] = np.where(batch["loss_mask"][:, :-1] > 0, batch["tokens"][:, 1:], -100)  # transformers shifts
    hf.zero_grad()
    out = hf(torch.tensor(batch["tokens"], dtype=torch.long), attention_mask=torch.tensor(batch["segment_ids"]),
             labels=torch.tensor(labels), output_router_logits=hf.config.model_type == "qwen3_moe")
    out.loss.backward()
    return out.loss.item(), {name: p.grad.float().numpy() for name, p in hf.named_parameters()}


@functools.cache
def first_adamw_update(name: str):
    """(params, grads) -> params after the first AdamW update of OPT, jitted: eager, each op
    would compile on its own."""
    tx = step_lib.make_optimizer(OPT, preset(name))
    return jax.jit(lambda params, grads: optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0]))


@pytest.mark.parametrize("name, dtype", [
    ("tiny-dense", "float32"), ("tiny-moe", "float32"), ("tiny-dense", "bfloat16"),
])
def test_step_zero_matches_transformers_loss_and_gradients(name, dtype, tmp_path):
    """The train step on an unpacked batch against transformers (tied head: tiny-dense; untied
    with the aux loss: tiny-moe): the loss, the gradient norm, and the parameters after AdamW
    applies torch autograd's gradients, read into our layout by the checkpoint loader. In bfloat16
    (float32 master weights) that update errs by at most ~1.5x what transformers' own bfloat16
    gradients give."""
    cfg = preset(name, dtype=dtype)
    start = jax.device_get(initial_state(name).params)
    to_hf(nnx.merge(nnx.graphdef(abstract_model(cfg)), start), str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    batch = unpacked_batch(cfg.vocab_size)
    metrics, params = one_step(cfg, single_device(), initial_state(name), batch)
    assert metrics["loss_tokens"] == batch["loss_mask"].sum()

    def adamw_step(torch_grads):  # our params after AdamW applies these gradients
        os.makedirs(tmp_path / "grads", exist_ok=True)
        write_safetensors(str(tmp_path / "grads" / "model.safetensors"), torch_grads)
        shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "grads")
        return first_adamw_update(name)(start, nnx.to_pure_dict(nnx.state(from_hf(str(tmp_path / "grads")))))

    ref_loss, ref_grads = hf_loss_and_grads(hf, batch)
    expected = adamw_step(ref_grads)
    if dtype == "float32":
        loss = metrics["loss"] + cfg.router_aux_loss_coef * metrics.get("aux_loss", 0.0)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        grad_norm = math.sqrt(sum(np.sum(g * g) for g in ref_grads.values()))
        assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-5)
        assert_trees_close(params, expected, rtol=1e-5, atol=PARAM_ATOL)
        return
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16).eval()
    bf16_expected = adamw_step(hf_loss_and_grads(hf_bf16, batch)[1])

    def error(tree):
        return math.sqrt(sum(np.sum(np.square(a - b, dtype=np.float64)) for a, b in
                             zip(jax.tree.leaves(tree), jax.tree.leaves(expected))))

    assert error(params) <= 1.5 * error(bf16_expected)


def test_microbatches_are_strided_rows():
    x = np.arange(8)[:, None] * np.ones((1, 3), int)
    np.testing.assert_array_equal(step_lib.split_microbatches(x, 2)[:, :, 0], [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_loss_falls_on_synthetic_data():
    cfg, mesh = preset("tiny-dense"), single_device()
    step = train_step(cfg, STEP, mesh)
    state = jax.device_put(jax.device_get(initial_state("tiny-dense")), step_lib.train_state_shardings(cfg, OPT, mesh))
    history = []
    for _, batch in zip(range(60), synthetic_batches(cfg, seed=4)):
        state, metrics = step(state, jax.device_put(batch, step_lib.batch_sharding(mesh, cfg.rules)))
        history.append(float(metrics["loss"]))
    assert np.mean(history[-5:]) < 0.7 * history[0], history
