"""Training: loss, step, sharding equivalence, accumulation, checkpoints, CLI and its errors."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qwen3_jax import make_mesh, preset, to_hf
from qwen3_jax.model import abstract_model
from train import data as data_lib
from train import step as step_lib
from train import train as train_lib
from train.checkpoint import Checkpointer, init_from_config, load_params

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


# Training configs; distillation configs are checked in test_distill.py.
CONFIG_FILES = sorted(set(glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))
                      - set(glob.glob(os.path.join(REPO, "configs", "distill_*.py"))))


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
# Subprocesses share a persistent compilation cache: they all compile the same step (the learning
# rate schedule, a compile-time constant, is fixed by decay_steps rather than train.steps).


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the training subprocesses: a shared persistent compilation cache, and torch
    hidden (it is a test-only reference; tensorboardX would otherwise import it, ~2 s per run)."""
    no_torch = tmp_path_factory.mktemp("no_torch")
    (no_torch / "torch.py").write_text("raise ImportError('torch is not part of the training stack')\n")
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(no_torch), REPO]),
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def cli(env: dict[str, str], workdir, *overrides: str) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "train.train", "--config", os.path.join(REPO, "configs/tiny_pretrain.py"),
        f"--workdir={workdir}", "--config.data.seq_len=32", "--config.data.batch_size=4",
        "--config.train.ce_chunk_len=16", "--config.train.peak_flops=1e10", "--config.optimizer.decay_steps=100",
        *overrides,
    ]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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


def test_resume_after_sigkill_gives_identical_losses(tmp_path, cli_env):
    steps = ["--config.train.steps=16", "--config.checkpoint.every=4"]
    finish(cli(cli_env, tmp_path / "ref", *steps))
    reference = losses(tmp_path / "ref")
    assert sorted(reference) == list(range(1, 17))
    records = [json.loads(line) for line in open(tmp_path / "ref/metrics.jsonl")]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time", "mfu"} <= set(records[0])
    assert os.listdir(tmp_path / "ref/tensorboard")

    killed = cli(cli_env, tmp_path / "run", *steps)
    wait_until(lambda: latest_checkpoint(tmp_path / "run") and max(losses(tmp_path / "run"), default=0) >= 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert max(losses(tmp_path / "run")) < 16
    out = finish(cli(cli_env, tmp_path / "run", *steps))
    assert "resuming from step" in out
    assert losses(tmp_path / "run") == reference  # exact equality: bit-identical losses


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
