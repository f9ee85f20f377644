"""Training: loss, step, sharding equivalence, accumulation, checkpoints, CLI and its errors."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

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
from qwen3_jax.model import abstract_model
from train import data as data_lib
from train import step as step_lib
from train import train as train_lib
from qwen3_jax.hf import CheckpointError
from train.checkpoint import (
    Checkpointer, ConfigMismatchError, CorruptCheckpointError, init_from_config, load_params,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adam's first update is ~lr * g / (|g| + eps): for gradients near zero (cancellations) it turns
# summation-order noise into O(lr) differences. A larger eps keeps the update a smooth function of
# the gradient, so comparing updated params checks the gradients at a tight tolerance.
OPT = step_lib.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100, end_learning_rate_ratio=0.1,
                               eps=1e-4)
STEP = step_lib.StepConfig(ce_chunk_len=8)
PARAM_ATOL = 1e-3 * OPT.learning_rate  # a parameter moves by <= ~lr: 0.1% of one update
BATCH, SEQ = 8, 32  # every in-process step shares these shapes, so compiled steps are reused


def single_device():
    return make_mesh({"data": 1}, jax.devices()[:1])


@functools.cache
def initial_state(name: str) -> step_lib.TrainState:
    """A single-device train state per preset; tests copy it (steps donate their input).

    Parameters are drawn on the host: compiling the random init costs more than these tests'
    steps (the CLI runs cover `init_train_state`'s own init).
    """
    rng = np.random.default_rng(1)

    def draw(path, x):
        is_norm = "norm" in step_lib.param_path(path)
        return (1.0 if is_norm else 0.0) + (0.1 if is_norm else 0.02) * rng.standard_normal(x.shape, np.float32)

    cfg = preset(name)
    params = jax.tree_util.tree_map_with_path(draw, step_lib.abstract_params(cfg))
    return step_lib.init_train_state(cfg, OPT, single_device(), params=jax.device_put(params))


def synthetic_batches(cfg, seed: int = 0):
    """Packed batches from the real pipeline (segment ids, padding and all)."""
    dcfg = data_lib.default_config()
    dcfg.update(format="synthetic", seq_len=SEQ, batch_size=BATCH, seed=seed,
                synthetic_vocab_size=cfg.vocab_size, num_threads=1)
    return data_lib.make_dataset(dcfg, None, process_index=0, process_count=1)


def one_step(cfg, mesh, state, batch, step_cfg=STEP):
    """One train step from a copy of `state` placed on `mesh`; returns (metrics, new params) on host."""
    state = jax.device_put(jax.device_get(state), step_lib.train_state_shardings(cfg, OPT, mesh))
    batch = jax.device_put(batch, step_lib.batch_sharding(mesh, cfg.rules))
    new_state, metrics = step_lib.make_train_step(cfg, step_cfg, OPT, mesh)(state, batch)
    return jax.device_get(metrics), jax.device_get(new_state.params)


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=step_lib.param_path(path))


def tiny_config(**overrides):
    """configs/tiny_pretrain.py, smaller; `overrides` as {"section.field": value}."""
    from configs.tiny_pretrain import get_config

    c = get_config()
    c.data.seq_len, c.data.batch_size, c.train.ce_chunk_len = 32, 4, 16
    for key, value in overrides.items():
        section, field = key.rsplit(".", 1) if "." in key else ("", key)
        (c[section] if section else c)[field] = value
    return c


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
        ce, z = step_lib.chunked_cross_entropy(h, w, targets, mask, chunk_len=8, rules=rules)
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
    mask = step_lib.weight_decay_mask(step_lib.abstract_params(preset("tiny-moe")), ("norm", "embed"))
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
    accumulated = step_lib.StepConfig(microbatches=2, ce_chunk_len=STEP.ce_chunk_len)
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
    train_step = step_lib.make_train_step(cfg, STEP, OPT, mesh)
    state = jax.device_put(jax.device_get(initial_state("tiny-dense")), step_lib.train_state_shardings(cfg, OPT, mesh))
    history = []
    for _, batch in zip(range(60), synthetic_batches(cfg, seed=4)):
        state, metrics = train_step(state, jax.device_put(batch, step_lib.batch_sharding(mesh, cfg.rules)))
        history.append(float(metrics["loss"]))
    assert np.mean(history[-5:]) < 0.7 * history[0], history


# -------------------------------------------------------------------------------- checkpoints


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = preset("tiny-moe")
    big = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = jax.device_put(initial_state("tiny-moe"), step_lib.train_state_shardings(cfg, OPT, big))
    iterator = synthetic_batches(cfg)
    next(iterator)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), every=1, keep=1)
    ckpt.save(7, state, iterator, cfg)
    ckpt.wait()
    following = next(iterator)["tokens"]
    expected = jax.device_get(state)
    for mesh in (make_mesh({"data": 2, "fsdp": 2}, jax.devices()[:4]), single_device()):
        fresh = synthetic_batches(cfg)
        restored = ckpt.restore(7, step_lib.abstract_train_state(cfg, OPT, mesh), fresh)
        assert_trees_close(jax.device_get(restored), expected, rtol=0, atol=0)
        gate = restored.params["runs"][0]["mlp"]["gate_proj"]
        assert gate.sharding == step_lib.params_shardings(cfg, mesh)["runs"][0]["mlp"]["gate_proj"]
        np.testing.assert_array_equal(next(fresh)["tokens"], following)  # the data position too
    ckpt.close()
    # The same checkpoint seeds another run's weights (model.init_from=<trainer checkpoint dir>).
    assert init_from_config(str(tmp_path / "ckpt")) == cfg
    params = load_params(str(tmp_path / "ckpt"), cfg, single_device())
    assert_trees_close(jax.device_get(params), expected.params, rtol=0, atol=0)


def test_init_from_hf_checkpoint(tmp_path):
    cfg = preset("tiny-moe")  # untied: lm_head is loaded too
    state = initial_state("tiny-moe")
    to_hf(nnx.merge(nnx.graphdef(abstract_model(cfg)), state.params), str(tmp_path))
    mesh = make_mesh({"expert": 2, "tensor": 2}, jax.devices()[:4])
    assert init_from_config(str(tmp_path)) == cfg
    params = load_params(str(tmp_path), cfg, mesh)
    assert_trees_close(jax.device_get(params), jax.device_get(state.params), rtol=0, atol=0)
    assert params["lm_head"].sharding == step_lib.params_shardings(cfg, mesh)["lm_head"]


# ------------------------------------------------------------------- resuming a damaged run


def save_steps(workdir, steps, stream) -> None:
    """Checkpoints of the tiny run at `steps`, as `run_loop` writes them (the state's step field
    tells them apart)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=10)
    state = initial_state("tiny-dense")
    for step in steps:
        ckpt.save(step, state._replace(step=jnp.int32(step)), stream.iterator, preset("tiny-dense"),
                  stream.checkpoint_info())
    ckpt.wait()
    ckpt.close()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> str:
    """A workdir of the tiny (synthetic data) run with complete steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("saved")
    save_steps(workdir, [2, 4], data_lib.make_stream(train_lib.validate(tiny_config()).data, None))
    return str(workdir)


def resume(workdir, **overrides):
    """`train.resume` of the tiny run in `workdir` with config `overrides`: (step, state) or None."""
    exp = train_lib.validate(tiny_config(**overrides))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=10)
    try:
        return train_lib.resume(ckpt, exp, data_lib.make_stream(exp.data, None),
                                step_lib.abstract_train_state(exp.model, exp.optimizer, single_device()))
    finally:
        ckpt.close()


def largest_file(directory) -> str:
    return max((os.path.join(d, n) for d, _, names in os.walk(directory) for n in names), key=os.path.getsize)


def truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def garble(path) -> None:
    """Same size, other bytes: only the manifest's hash can tell."""
    with open(path, "r+b") as f:
        f.write(b"#" * 16)


@pytest.mark.parametrize("damage, message", [
    (lambda step: os.remove(largest_file(step / "state")), r"file state/ocdbt.process_0/d/\w+ is missing"),
    (lambda step: truncate(largest_file(step / "state")),
     r"file state/ocdbt.process_0/d/\w+ has \d+ bytes, \d+ when it was written \(truncated"),
    (lambda step: garble(step / "state" / "_METADATA"), r"file state/_METADATA has changed since it was written"),
    (lambda step: garble(step / "model_config" / "metadata"), r"file model_config/metadata has changed"),
    # No manifest (killed just after the commit): Orbax's own failure, named with the step.
    (lambda step: (os.remove(step / "MANIFEST.json"), truncate(largest_file(step / "state"))), r"cannot be restored"),
], ids=["missing", "truncated", "state_metadata", "model_config", "unverified"])
def test_corrupt_step_is_named_with_the_step_and_file(saved_run, tmp_path, damage, message):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    damage(workdir / "checkpoints" / "4")
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint step 4 in .*checkpoints.*" + message):
        resume(workdir)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing moved or deleted


def test_on_corrupt_fallback_restores_the_newest_intact_step(saved_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    truncate(largest_file(workdir / "checkpoints" / "4" / "state"))
    step, state = resume(workdir, **{"checkpoint.on_corrupt": "fallback"})
    assert step == 2 and int(state.step) == 2
    assert_trees_close(jax.device_get(state.params), jax.device_get(initial_state("tiny-dense").params), 0, 0)
    assert os.listdir(workdir / "checkpoints.discarded" / "corrupt" / "4")  # set aside whole, not deleted
    assert "checkpoint step 4" in capsys.readouterr().out
    for name in ("2", "4"):  # nothing left to fall back to
        shutil.rmtree(workdir / "checkpoints" / name, ignore_errors=True)
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint is left"):
        resume(workdir, **{"checkpoint.on_corrupt": "fallback"})


def test_restore_step_sets_the_newer_steps_aside_once(saved_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    with pytest.raises(CheckpointError, match=r"restore_step=3 is not a saved step .* the saved steps are \[2, 4\]"):
        resume(workdir, **{"checkpoint.restore_step": 3})
    step, state = resume(workdir, **{"checkpoint.restore_step": 2})
    assert step == 2 and int(state.step) == 2
    assert os.listdir(workdir / "checkpoints.discarded" / "restore_step_2") == ["4"]
    # The run goes on from step 2 and saves step 3; the same command, rerun, continues from there.
    save_steps(workdir, [3], data_lib.make_stream(train_lib.validate(tiny_config()).data, None))
    step, _ = resume(workdir, **{"checkpoint.restore_step": 2})
    assert step == 3 and sorted(os.listdir(workdir / "checkpoints")) == ["2", "3"]


@pytest.mark.parametrize("overrides, message", [
    ({"model.overrides": {"vocab_size": 1024}}, r"vocab_size: 512 in the checkpoint, 1024 in this run"),
    ({"model.preset": "tiny-moe"},
     r"architectures: \['Qwen3ForCausalLM'\] in the checkpoint, \['Qwen3MoeForCausalLM'\] in this run.*num_experts"),
])
def test_resuming_another_model_is_named_before_any_training(saved_run, tmp_path, overrides, message):
    workdir = tmp_path / "run"
    shutil.copytree(saved_run, workdir)
    with pytest.raises(ConfigMismatchError, match=r"checkpoint step 4 .* was saved for another model \(.*" + message):
        train_lib.run(tiny_config(**overrides, **{"train.peak_flops": 1e10}), str(workdir))
    assert sorted(os.listdir(workdir)) == ["checkpoints"]  # no metrics, no config.json written over the run's


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """tokenizer.json of a word-level vocabulary: "w0" ... "w99", <|endoftext|>, and the chat
    template's role words and control tokens (added tokens, split out of the text as Qwen3's are)."""
    import tokenizers

    control = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    words = ["<|endoftext|>", *(f"w{i}" for i in range(100)), "user", "assistant", *control]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(control)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_skipped_records_are_counted_and_changed_data_files_are_named_on_resume(tmp_path, word_tokenizer, capsys):
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for i, path in enumerate(files):
        path.write_text("".join(json.dumps({"text": f"w{i} w{j} w{j + 1}"}) + "\n" for j in range(20)))
    with open(files[1], "a") as f:
        f.write('{"text": "w1 w2"\n')  # line 21: not JSON
    overrides = {"data.format": "jsonl", "data.paths": str(tmp_path / "*.jsonl"), "tokenizer": word_tokenizer,
                 "data.on_bad_record": "skip", "data.num_epochs": 1, "train.peak_flops": 1e10,
                 "optimizer.decay_steps": 100}
    config = tiny_config(**overrides, **{"train.steps": 2})
    exp = train_lib.validate(config)
    tokenizer = train_lib.load_tokenizer(exp)

    def step_fn(state, batch):  # the loop's bookkeeping without compiling a train step
        return state._replace(step=state.step + 1), {"loss": 1.0, "grad_norm": 1.0}

    train_lib.run_loop(config, str(tmp_path / "run"), exp, make_mesh(exp.mesh), tokenizer,
                       data_lib.make_stream(exp.data, tokenizer), step_fn, lambda *_: {"tokens_per_s": 1.0, "mfu": 0.0})
    assert "data: skipped 1 bad records (on_bad_record='skip')" in capsys.readouterr().out
    assert [m["skipped_records"] for m in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))] == [1, 1]

    with open(files[0], "a") as f:
        f.write(json.dumps({"text": "w7 w8"}) + "\n")
    files[1].unlink()
    with pytest.raises(data_lib.DataChangedError, match=(
            r"the data files differ from those checkpoint step 2 .* was written with: .*b.jsonl was removed; "
            r".*a.jsonl changed size \(\d+ -> \d+ bytes\).*set data.allow_changed_data=True")):
        train_lib.run(tiny_config(**overrides, **{"train.steps": 4}), str(tmp_path / "run"))
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2  # no step trained


def test_sigkill_on_a_2x2_mesh_with_moe_and_shuffled_chat_data_resumes_to_identical_losses(
        tmp_path, word_tokenizer, cli_env):
    """The SIGKILL test where more can go wrong than in its single-device run: a data x fsdp mesh
    (sharded state and batch), the MoE model, and SFT records from a shuffled JSONL file read for
    several epochs (each reshuffled), packed whole, with loss masks."""
    rng = np.random.default_rng(0)

    def words():
        return " ".join(f"w{i}" for i in rng.integers(0, 100, rng.integers(1, 6)))

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": words()},
                                                     {"role": "assistant", "content": words()}]}) + "\n"
                            for _ in range(12)))
    overrides = ("--config.model.preset=tiny-moe", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                 "--config.data.format=jsonl", "--config.data.kind=chat", f"--config.data.paths={path}",
                 "--config.data.shuffle=True", f"--config.tokenizer={word_tokenizer}", *STEPS_16)
    finish(cli(cli_env, tmp_path / "reference", *overrides))
    reference = losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 17)) and len(set(reference.values())) == 16

    killed = cli(cli_env, tmp_path / "run", *overrides)
    wait_until(lambda: latest_checkpoint(tmp_path / "run") and max(losses(tmp_path / "run"), default=0) >= 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert max(losses(tmp_path / "run")) < 16
    assert "resuming from step" in finish(cli(cli_env, tmp_path / "run", *overrides))
    assert losses(tmp_path / "run") == reference  # bit-identical


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.data": 2, "mesh.fsdp": 2, "data.batch_size": 6},
     r"data.batch_size=6 is not divisible by the data-parallel degree 4"),
    ({"train.microbatches": 4, "mesh.data": 2},
     r"microbatches of 1 rows, which must be a multiple of the data-parallel degree 2"),
    ({"mesh.data": 4, "mesh.tensor": 4}, r"needs 16 devices but only 8 are available"),
    ({"data.format": "jsonl", "data.paths": "/nonexistent/*.jsonl", "tokenizer": "qwen3"},
     r"missing data files: .*'/nonexistent/\*\.jsonl'"),
    ({"model.init_from": "/tmp"}, r"exactly one of model.preset .* and model.init_from"),
    ({"model.preset": "qwen3-7b"}, r"unknown preset"),
    ({"train.ce_chunk_len": 12}, r"ce_chunk_len=12 must divide data.seq_len=32"),
    ({"data.synthetic_vocab_size": 1000}, r"synthetic_vocab_size=1000 exceeds the model's vocab_size=512"),
])
def test_config_errors_are_clear(overrides, message):
    with pytest.raises(train_lib.TrainConfigError, match=message):
        train_lib.validate(tiny_config(**overrides))


# Training configs; distillation configs are checked in test_distill.py, the recipe's in test_recipe.py.
CONFIG_FILES = sorted(set(glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))
                      - set(glob.glob(os.path.join(REPO, "configs", "distill_*.py")))
                      - {os.path.join(REPO, "configs", "miniature.py")})


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_shipped_configs_validate(path, tmp_path, monkeypatch):
    """Every experiment config is consistent on the mesh it is written for (devices faked)."""
    spec = importlib.util.spec_from_file_location("experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if config.data.format != "synthetic":
        (tmp_path / "data").write_text("")
        config.data.paths = str(tmp_path / "data")
    if config.model.preset is None:  # SFT: a tiny converted checkpoint shipping a tokenizer
        to_hf(nnx.merge(nnx.graphdef(abstract_model(preset("tiny-moe"))), initial_state("tiny-moe").params),
              str(tmp_path / "hf"))
        (tmp_path / "hf" / "tokenizer.json").write_text("{}")
        config.model.init_from = str(tmp_path / "hf")
    devices = max(8, math.prod(v for v in config.mesh.values() if v > 0))
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    exp = train_lib.validate(config)
    assert exp.model.param_dtype == "float32"
    data_parallel = exp.mesh["data"] * exp.mesh["fsdp"] * exp.mesh["expert"]
    assert exp.data.batch_size % (data_parallel * exp.step.microbatches) == 0


# ------------------------------------------------------------------------------------- CLI
# Subprocesses share the session's persistent compilation cache (conftest.py): they all compile the
# same step (the learning rate schedule, a compile-time constant, is fixed by decay_steps rather
# than train.steps).


@pytest.fixture(scope="module")
def cli_env(no_torch) -> dict[str, str]:
    """Environment of the training subprocesses: this one's, with torch hidden (`no_torch`)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([no_torch, REPO]))


def cli_args(workdir, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "train.train", "--config", os.path.join(REPO, "configs/tiny_pretrain.py"),
        f"--workdir={workdir}", "--config.data.seq_len=32", "--config.data.batch_size=4",
        "--config.train.ce_chunk_len=16", "--config.train.peak_flops=1e10", "--config.optimizer.decay_steps=100",
        *overrides,
    ]


def cli(env: dict[str, str], workdir, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(cli_args(workdir, *overrides), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, returncode: int = 0) -> str:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == returncode, out
    return out


def losses(workdir) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) keeps the last."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, open(path).read().splitlines())}


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def latest_checkpoint(workdir) -> int | None:
    """Newest committed step (Orbax writes into a temporary folder and renames it when done)."""
    root = os.path.join(workdir, "checkpoints")
    steps = [int(name) for name in os.listdir(root) if name.isdigit()] if os.path.isdir(root) else []
    return max(steps, default=None)


STEPS_16 = ("--config.train.steps=16", "--config.checkpoint.every=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env) -> tuple[str, dict[int, float]]:
    """An uninterrupted 16-step run (checkpoints every 4): its workdir and losses."""
    workdir = tmp_path_factory.mktemp("reference")
    finish(cli(cli_env, workdir, *STEPS_16))
    return str(workdir), losses(workdir)


def test_resume_after_sigkill_gives_identical_losses(tmp_path, cli_env, reference):
    ref_dir, ref_losses = reference
    assert sorted(ref_losses) == list(range(1, 17))
    records = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time", "mfu"} <= set(records[0])
    assert os.listdir(os.path.join(ref_dir, "tensorboard"))

    killed = cli(cli_env, tmp_path, *STEPS_16)
    wait_until(lambda: latest_checkpoint(tmp_path) and max(losses(tmp_path), default=0) >= 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert max(losses(tmp_path)) < 16
    out = finish(cli(cli_env, tmp_path, *STEPS_16))
    assert "resuming from step" in out
    assert losses(tmp_path) == ref_losses  # exact equality: bit-identical losses


# Loaded by a training subprocess via PYTHONPATH: every Orbax commit (the rename of a finished
# step's temporary folder) waits first, so a test can kill the run while a save is in flight.
SLOW_COMMIT = """
import asyncio
from orbax.checkpoint._src.path import atomicity

_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def finalize(self):
    await asyncio.sleep(0.3)
    await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


def test_sigkill_during_an_async_save_resumes_from_the_last_complete_step(tmp_path, cli_env, reference):
    slow = tmp_path / "slow_commit"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_COMMIT)
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(slow), cli_env["PYTHONPATH"]])}
    workdir = tmp_path / "run"
    in_flight = workdir / "checkpoints" / "8.orbax-checkpoint-tmp"
    killed = cli(env, workdir, *STEPS_16)
    wait_until(lambda: latest_checkpoint(workdir) == 4 and in_flight.is_dir(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert in_flight.is_dir() and latest_checkpoint(workdir) == 4  # killed with step 8 half written

    out = finish(cli(cli_env, workdir, *STEPS_16))
    assert "resuming from step 4" in out
    assert losses(workdir) == reference[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "16", "8"]  # the partial step is gone


def _tmpfs_available() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def _disk_bytes(directory) -> int:
    """Bytes `directory`'s files take on a filesystem of 4 KiB pages."""
    return sum(-(-os.path.getsize(os.path.join(d, n)) // 4096) * 4096
               for d, _, names in os.walk(directory) for n in names)


def test_full_disk_during_a_save_is_named_and_the_run_resumes_once_space_is_back(tmp_path, cli_env, reference):
    """A tmpfs mounted in a user + mount namespace holds one checkpoint of the tiny run and a
    third of another: saving step 8 fails with ENOSPC. Then the same mount is grown (space is
    back) and the same command resumes from step 4."""
    if not _tmpfs_available():
        pytest.skip("needs `unshare --user --mount` (unprivileged user namespaces) to mount a small tmpfs")
    size_kib = (_disk_bytes(os.path.join(reference[0], "checkpoints", "16")) * 4 // 3 + (256 << 10)) >> 10
    disk = tmp_path / "disk"
    disk.mkdir()
    run = shlex.join(cli_args(disk / "run", *STEPS_16))
    script = f"""
        mount -t tmpfs -o size={size_kib}k tmpfs {disk} || exit 99
        {run} > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc
        ls {disk}/run/checkpoints > {tmp_path}/after_full.txt
        mount -o remount,size=256m {disk}
        {run} > {tmp_path}/resumed.log 2>&1; echo $? > {tmp_path}/resumed.rc
        cp {disk}/run/metrics.jsonl {tmp_path}/metrics.jsonl
    """
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO, env=cli_env,
                   check=True, timeout=300)
    full = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", full
    # Orbax's writer threads log the failure too (tracebacks, interleaved); the run ends with ours.
    (error,) = [line for line in full.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: checkpoint step 8 could not be written to"), full
    assert "No space left on device" in error and "the last complete checkpoint, step 4, is intact" in error
    assert (tmp_path / "after_full.txt").read_text().split() == ["4"]  # no partial step 8 left behind

    resumed = (tmp_path / "resumed.log").read_text()
    assert (tmp_path / "resumed.rc").read_text().strip() == "0", resumed
    assert "resuming from step 4" in resumed
    assert losses(tmp_path) == reference[1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cli_env):
    proc = cli(cli_env, tmp_path, "--config.train.steps=100", "--config.checkpoint.every=1000")
    wait_until(lambda: max(losses(tmp_path), default=0) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "preempted" in out
    step = latest_checkpoint(tmp_path)
    assert 2 <= step < 100 and step == max(losses(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cli_env):
    proc = cli(cli_env, tmp_path, "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
               "--config.checkpoint.every=1")
    out = finish(proc, returncode=1)
    assert "error: non-finite loss" in out and "at step 2; stopping: the last good checkpoint is step 1" in out
    assert "Traceback" not in out
    assert latest_checkpoint(tmp_path) == 1
