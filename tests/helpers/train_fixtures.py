"""Shared pieces of the trainer tests (test_step, test_resume, test_train_config, test_train_cli)."""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

from qwen3_jax import make_mesh, preset
from train import data as data_lib
from train import step as step_lib
from train.config import OptimizerConfig, StepConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Adam's first update is ~lr * g / (|g| + eps): for gradients near zero (cancellations) it turns
# summation-order noise into O(lr) differences. A larger eps keeps the update a smooth function of
# the gradient, so comparing updated params checks the gradients at a tight tolerance.
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=100, end_learning_rate_ratio=0.1, eps=1e-4)
STEP = StepConfig(ce_chunk_len=8)
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


@functools.cache
def train_step(cfg, step_cfg, mesh):
    """`make_train_step` with OPT, compiled once per (config, mesh) for the session."""
    return step_lib.make_train_step(cfg, step_cfg, OPT, mesh)


def synthetic_batches(cfg, seed: int = 0):
    """Packed batches from the real pipeline (segment ids, padding and all)."""
    dcfg = data_lib.DataConfig(format="synthetic", seq_len=SEQ, batch_size=BATCH, seed=seed,
                               synthetic_vocab_size=cfg.vocab_size, num_threads=1)
    return data_lib.make_dataset(dcfg, None, process_index=0, process_count=1)


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


def tiny_job(**overrides):
    """The resolved `tiny_config(**overrides)`."""
    from train.config import resolve, train_config

    return resolve(train_config(tiny_config(**overrides)))


def write_word_tokenizer(directory) -> str:
    """tokenizer.json of a word-level vocabulary: "w0" ... "w99", <|endoftext|>, and the chat
    template's role words and control tokens (added tokens, split out of the text as Qwen3's are)."""
    import tokenizers

    control = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    words = ["<|endoftext|>", *(f"w{i}" for i in range(100)), "user", "assistant", *control]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(control)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path
