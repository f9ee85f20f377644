"""Checkpoints and resuming: restoring onto another mesh, init_from, damaged steps, restore_step,
another model, changed data files."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen3_jax import make_mesh, preset, to_hf
from qwen3_jax.errors import CheckpointError, CorruptCheckpointError, DataError
from qwen3_jax.model import abstract_model
from tests.helpers.train_fixtures import (
    OPT, assert_trees_close, initial_state, single_device, synthetic_batches, tiny_config, tiny_job,
    write_word_tokenizer,
)
from train import data as data_lib
from train import loop as loop_lib
from train import step as step_lib
from train import train as train_lib
from train.checkpoint import Checkpointer, init_from_config, load_params
from train.config import tokenizer_from_spec


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
    save_steps(workdir, [2, 4], data_lib.make_stream(tiny_job().data, None))
    return str(workdir)


def resume(workdir, **overrides):
    """`loop.resume` of the tiny run in `workdir` with config `overrides`: (step, state) or None."""
    job = tiny_job(**overrides)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=10)
    try:
        return loop_lib.resume(ckpt, job, data_lib.make_stream(job.data, None),
                               step_lib.abstract_train_state(job.model, job.optimizer, single_device()))
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
    save_steps(workdir, [3], data_lib.make_stream(tiny_job().data, None))
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
    with pytest.raises(CheckpointError, match=r"checkpoint step 4 .* was saved for another model \(.*" + message):
        train_lib.run(tiny_config(**overrides, **{"train.peak_flops": 1e10}), str(workdir))
    assert sorted(os.listdir(workdir)) == ["checkpoints"]  # no metrics, no config.json written over the run's


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_skipped_records_are_counted_and_changed_data_files_are_named_on_resume(tmp_path, word_tokenizer, capsys):
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for i, path in enumerate(files):
        path.write_text("".join(json.dumps({"text": f"w{i} w{j} w{j + 1}"}) + "\n" for j in range(20)))
    with open(files[1], "a") as f:
        f.write('{"text": "w1 w2"\n')  # line 21: not JSON
    overrides = {"data.format": "jsonl", "data.paths": str(tmp_path / "*.jsonl"), "tokenizer": word_tokenizer,
                 "data.on_bad_record": "skip", "data.num_epochs": 1, "train.peak_flops": 1e10,
                 "optimizer.decay_steps": 100}
    job = tiny_job(**overrides, **{"train.steps": 2})
    tokenizer = tokenizer_from_spec(job.tokenizer, job.model)

    def step_fn(state, batch):  # the loop's bookkeeping without compiling a train step
        return state._replace(step=state.step + 1), {"loss": 1.0, "grad_norm": 1.0}

    loop_lib.run_loop(job, str(tmp_path / "run"), make_mesh(job.mesh), tokenizer,
                      data_lib.make_stream(job.data, tokenizer), step_fn, lambda *_: {"tokens_per_s": 1.0, "mfu": 0.0})
    assert "data: skipped 1 bad records (on_bad_record='skip')" in capsys.readouterr().out
    assert [m["skipped_records"] for m in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))] == [1, 1]

    with open(files[0], "a") as f:
        f.write(json.dumps({"text": "w7 w8"}) + "\n")
    files[1].unlink()
    with pytest.raises(DataError, match=(
            r"the data files differ from those checkpoint step 2 .* was written with: .*b.jsonl was removed; "
            r".*a.jsonl changed size \(\d+ -> \d+ bytes\).*set data.allow_changed_data=True")):
        train_lib.run(tiny_config(**overrides, **{"train.steps": 4}), str(tmp_path / "run"))
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2  # no step trained
