"""The training job's config: defaults, validation, `resolve`, and the shipped configs."""

from __future__ import annotations

import glob
import importlib.util
import math
import os

import jax
import pytest
from flax import nnx

from qwen3_jax import preset, to_hf
from qwen3_jax.errors import ConfigError
from qwen3_jax.model import abstract_model
from tests.helpers.train_fixtures import REPO, initial_state, tiny_job
from train.config import default_config, resolve, train_config


def test_default_config_lists_every_field_with_its_default():
    c = default_config()
    assert c.optimizer.warmup_steps == 100 and c.optimizer.decay_steps is None and c.train.steps == 1000
    assert c.mesh.to_dict() == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    assert c.model.preset is None and c.model.init_from is None and c.checkpoint.on_corrupt == "error"
    c.model.preset, c.data.format, c.train.stepz = "tiny-dense", "synthetic", 3
    with pytest.raises(ConfigError, match="unknown config field train.stepz; did you mean train.steps"):
        train_config(c)


def test_a_shortened_run_cuts_a_warmup_that_does_not_fit(capsys):
    """Issue 27: `--config.train.steps=20` on tiny_pretrain (warmup_steps=20) runs: with
    optimizer.decay_steps unset the schedule follows the run, and so does a warmup that would
    outlast it. An explicit decay_steps is the user's schedule and is still checked."""
    job = tiny_job(**{"train.steps": 20})
    assert (job.optimizer.warmup_steps, job.optimizer.decay_steps) == (2, 20)
    assert "optimizer.warmup_steps=20 does not fit train.steps=20" in capsys.readouterr().out
    job = tiny_job(**{"train.steps": 21})
    assert (job.optimizer.warmup_steps, job.optimizer.decay_steps) == (20, 21)
    with pytest.raises(ConfigError, match=r"optimizer.warmup_steps=20 must be in \[0, decay_steps=20\)"):
        tiny_job(**{"optimizer.decay_steps": 20})


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
    with pytest.raises(ConfigError, match=message):
        tiny_job(**overrides)


# Training configs; distillation's are checked in test_distill.py, RL's in test_rl.py, the recipe's in
# test_recipe.py.
CONFIG_FILES = sorted(set(glob.glob(os.path.join(REPO, "configs", "[!_]*.py")))
                      - set(glob.glob(os.path.join(REPO, "configs", "distill_*.py")))
                      - set(glob.glob(os.path.join(REPO, "configs", "rl_*.py")))
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
    job = resolve(train_config(config))
    assert job.model.param_dtype == "float32"
    data_parallel = job.mesh["data"] * job.mesh["fsdp"] * job.mesh["expert"]
    assert job.data.batch_size % (data_parallel * job.step.microbatches) == 0
