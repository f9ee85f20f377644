"""A training workdir is a checkpoint like any other: load_any, convert, the infer CLIs, init_from.

One tiny SFT run (configs/sft.py from an HF checkpoint shipping a sentencepiece tokenizer, two
steps, a checkpoint at each) serves every test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx

import qwen3_jax as q
from qwen3_jax import convert
from qwen3_jax.checkpoint import load_any, load_model
from qwen3_jax.tokenizer import Tokenizer, tokenizer_dir
from train import train as train_lib
from train.config import resolve, tokenizer_from_spec, train_config
from train.miniature.spm import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.array([[5, 17, 260, 3, 99, 42, 8]], np.int32)


def sft_config(init_from: str, data: str):
    """configs/sft.py, shrunk to two float32 steps on a 2-device mesh."""
    from configs.sft import get_config

    c = get_config()
    c.model.init_from, c.model.dtype = init_from, "float32"
    c.data.paths, c.data.seq_len, c.data.batch_size, c.data.num_threads = data, 64, 4, 1
    c.mesh.fsdp = 2
    c.optimizer.learning_rate, c.optimizer.warmup_steps = 1e-2, 0
    c.train.steps, c.train.ce_chunk_len, c.train.peak_flops = 2, 64, 1e10
    c.checkpoint.every = 1
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, the HF checkpoint it started from, the tokenizer)."""
    root = tmp_path_factory.mktemp("sft")
    (root / "corpus.txt").write_text("\n".join(f"what is {a} plus {b}? it is {a + b}." for a in range(30) for b in range(5)))
    tokenizer = Tokenizer.from_sentencepiece(train_sentencepiece([str(root / "corpus.txt")], str(root / "spm"), 300))
    init = str(root / "hf")
    q.to_hf(q.init_model(q.preset("tiny-dense"), seed=3), init)
    tokenizer.save(init)
    records = [{"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                             {"role": "assistant", "content": f"it is {a + b}.", "reasoning_content": f"{a} + {b}"}]}
               for a in range(6) for b in range(3)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    workdir = str(root / "work")
    train_lib.run(sft_config(init, str(root / "chat.jsonl")), workdir)
    return workdir, init, tokenizer


def params(model) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@nnx.jit
def logits(model, tokens):
    return model(tokens)


def test_the_workdir_ships_its_tokenizer(run):
    workdir, _, tokenizer = run
    assert os.path.isfile(os.path.join(workdir, "tokenizer.model"))
    text = "<|im_start|>user\nwhat is 3 plus 4?<|im_end|>"
    for path in (workdir, os.path.join(workdir, "checkpoints"), os.path.join(workdir, "checkpoints", "1")):
        assert str(tokenizer_dir(path)) == workdir
        assert Tokenizer.from_checkpoint(path).encode(text) == tokenizer.encode(text)
    # ... and carries it into the next run: model.init_from=WORKDIR needs no `tokenizer` setting.
    config = sft_config(workdir, os.path.join(os.path.dirname(workdir), "chat.jsonl"))
    job = resolve(train_config(config))
    assert job.model == load_any(workdir).cfg.replace(remat="full")
    assert tokenizer_from_spec(job.tokenizer, job.model).encode(text) == tokenizer.encode(text)


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # the raw restore below, on purpose
def test_a_step_loads_that_steps_weights(run):
    workdir, init, _ = run
    latest, first = load_any(workdir), load_any(workdir, step=1)
    assert latest.cfg.param_dtype == latest.cfg.dtype == "float32"  # the master weights, not the bf16 compute dtype
    # The params Orbax itself reads back from step 2's train state (optimizer state and all).
    saved = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))["params"]
    expected = {"/".join(str(p.key) for p in path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(saved)}
    assert expected.keys() == params(latest).keys()
    for name, value in params(latest).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    for a, b in ((first, latest), (first, load_any(init))):  # each step moved the weights
        assert not np.array_equal(params(a)["embed"], params(b)["embed"])
    assert_same_params(load_any(os.path.join(workdir, "checkpoints"), step=1), first)
    assert_same_params(load_any(os.path.join(workdir, "checkpoints", "1")), first)
    half = load_any(workdir, dtype="bfloat16")
    assert half.cfg.param_dtype == "bfloat16"
    np.testing.assert_array_equal(params(half)["embed"], params(latest)["embed"].astype(half.embed[...].dtype))


def test_converts_to_hf_and_orbax(run, tmp_path, capsys):
    workdir, _, _ = run
    hf_dir = str(tmp_path / "hf")
    convert.main(["--src", workdir, "--dst", hf_dir, "--to", "hf"])
    assert "copied tokenizer.model" in capsys.readouterr().out
    assert Tokenizer.from_checkpoint(hf_dir).vocab_size == 300
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = reloaded(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, np.asarray(logits(load_any(workdir), TOKENS)), rtol=1e-4, atol=1e-4)

    orbax_dir = str(tmp_path / "orbax")
    convert.main(["--src", os.path.join(workdir, "checkpoints"), "--step", "1", "--dst", orbax_dir, "--to", "orbax"])
    assert_same_params(load_model(orbax_dir), load_any(workdir, step=1))
    assert os.path.isfile(os.path.join(orbax_dir, "tokenizer.model"))


def test_generate_cli_serves_a_workdir(run):
    workdir, _, _ = run
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    r = subprocess.run(
        [sys.executable, "-m", "infer.generate", "--checkpoint", workdir, "--step", "1", "--prompt", "what is 1 plus 2?",
         "--max_new_tokens", "4", "--temperature", "0"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert "=== answer ===" in r.stdout and "(4 tokens)" in r.stderr


def test_missing_steps_and_empty_directories_are_named(run, tmp_path, capsys):
    workdir, init, _ = run
    with pytest.raises(q.CheckpointError, match=r"checkpoints has no step 7; the saved steps are \[1, 2\]"):
        load_any(workdir, step=7)
    with pytest.raises(q.CheckpointError, match="is one step folder; step=2 names another"):
        load_any(os.path.join(workdir, "checkpoints", "1"), step=2)
    with pytest.raises(q.CheckpointError, match="step=1 picks a step of a trainer checkpoint, but .* is a hf checkpoint"):
        load_any(init, step=1)
    with pytest.raises(q.CheckpointError, match="holds no checkpoint: expected a Hugging Face checkpoint"):
        load_any(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"no tokenizer shipped with checkpoint {tmp_path}"):
        Tokenizer.from_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()  # a run that has not saved yet
    with pytest.raises(q.CheckpointError, match="checkpoints holds no saved step of the trainer"):
        load_any(tmp_path)
    with pytest.raises(SystemExit):
        convert.main(["--src", workdir, "--step", "7", "--dst", str(tmp_path / "out")])
    assert "--src: " in capsys.readouterr().err and not os.path.exists(tmp_path / "out")
