"""Orbax model checkpoints and the HF <-> Orbax converter: lossless round trips, resharding, errors."""

from __future__ import annotations

import json
import shutil
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import qwen3_jax as q
from hf_fixtures import make_hf_model, save_hf_model
from qwen3_jax import convert
from qwen3_jax.checkpoint import is_hf_checkpoint, is_orbax_checkpoint, load_any, load_model, save_model
from qwen3_jax.sharding import state_shardings

KINDS = ("dense_tied", "moe")
TOKENIZER_FILES = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": "{}", "merges.txt": "#v\n"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny transformers checkpoints with (stand-in) tokenizer files beside the weights."""
    out = {}
    for i, kind in enumerate(KINDS):
        hf = make_hf_model(kind, seed=20 + i)
        path = save_hf_model(hf, tmp_path_factory.mktemp(kind))
        for name, text in TOKENIZER_FILES.items():
            with open(os.path.join(path, name), "w") as f:
                f.write(text)
        out[kind] = (hf, path)
    return out


@pytest.fixture(scope="module")
def saved_on_8(checkpoints, tmp_path_factory):
    """The MoE checkpoint loaded on an 8-device mesh and saved from there."""
    model = q.from_hf(checkpoints["moe"][1], mesh=q.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    path = str(tmp_path_factory.mktemp("orbax8"))
    save_model(model, path)
    return model, path


def _tokens(seed=0):
    return np.random.RandomState(seed).randint(0, 300, (2, 11)).astype(np.int32)


def _torch_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _random_model(cfg: q.Qwen3Config) -> q.Qwen3:
    """Random parameters without init_model's compile (seconds for a multi-run MoE)."""
    graphdef, state = nnx.split(q.abstract_model(cfg))
    rng = np.random.RandomState(0)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), state))


def _params(model) -> dict:
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", KINDS)
def test_hf_orbax_hf_round_trip_is_lossless(checkpoints, kind, tmp_path):
    hf, src = checkpoints[kind]
    orbax_dir, hf_dir = str(tmp_path / "orbax"), str(tmp_path / "hf")
    convert.main(["--src", src, "--dst", orbax_dir])  # direction inferred: HF -> Orbax
    assert is_orbax_checkpoint(orbax_dir) and not is_hf_checkpoint(orbax_dir)
    convert.main(["--src", orbax_dir, "--dst", hf_dir, "--max_shard_gb", "0.00004"])  # ~43 KB shards
    assert is_hf_checkpoint(hf_dir) and os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))

    tokens = _tokens()
    ours = np.asarray(_logits(q.from_hf(src), tokens))
    np.testing.assert_array_equal(np.asarray(_logits(load_model(orbax_dir), tokens)), ours)
    np.testing.assert_array_equal(np.asarray(_logits(q.from_hf(hf_dir), tokens)), ours)
    cls = transformers.Qwen3MoeForCausalLM if kind == "moe" else transformers.Qwen3ForCausalLM
    reloaded = cls.from_pretrained(hf_dir).eval()
    np.testing.assert_array_equal(_torch_logits(reloaded, tokens), _torch_logits(hf, tokens))
    for name in [*TOKENIZER_FILES, "generation_config.json"]:
        for out in (orbax_dir, hf_dir):
            with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
                assert a.read() == b.read(), (out, name)


def test_cli_subprocess_casts_to_bfloat16(checkpoints, tmp_path):
    src, dst = checkpoints["dense_tied"][1], str(tmp_path / "bf16")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "qwen3_jax.convert", "--src", src, "--dst", dst, "--dtype", "bfloat16"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote orbax checkpoint {dst} (bfloat16" in proc.stdout
    restored = load_model(dst)
    assert (restored.cfg.param_dtype, restored.cfg.dtype) == ("bfloat16", "bfloat16")
    ref = _params(q.from_hf(src))
    for name, value in _params(restored).items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref[name].astype(jnp.bfloat16)), err_msg=name)


# ----------------------------------------------------------------------------- resharding


def test_restores_on_one_device_and_on_another_mesh(saved_on_8):
    model, path = saved_on_8
    ref = {k: np.asarray(v) for k, v in _params(model).items()}
    assert next(iter(_params(model).values())).sharding.mesh.size == 8

    single = load_model(path)
    for name, value in _params(single).items():
        assert value.sharding == SingleDeviceSharding(jax.devices()[0]), name
        np.testing.assert_array_equal(np.asarray(value), ref[name], err_msg=name)

    mesh = q.make_mesh({"expert": 2, "tensor": 2}, devices=jax.devices()[4:])
    sharded = load_model(path, mesh=mesh)
    expected = {"/".join(map(str, k)): v for k, v in nnx.to_flat_state(state_shardings(nnx.state(sharded), mesh, sharded.cfg.rules))}
    for name, value in _params(sharded).items():
        assert value.sharding == expected[name], name
        np.testing.assert_array_equal(np.asarray(value), ref[name], err_msg=name)
    # Spot checks of the rules: experts over `expert`, the expert MLP width over `tensor`.
    assert _params(sharded)["runs/0/mlp/gate_proj"].sharding == NamedSharding(mesh, P(None, "expert", None, "tensor"))
    assert _params(sharded)["embed"].sharding == NamedSharding(mesh, P("tensor", None))


def test_runtime_fields_and_config_survive(tmp_path):
    cfg = q.preset(
        "tiny-moe", scan_layers=False, remat="dots", moe_impl="blocked", dtype="bfloat16", param_dtype="bfloat16",
        mlp_only_layers=(1,), rope_scaling=q.YarnScaling(factor=4.0, original_max_position_embeddings=64),
        max_position_embeddings=256,
    )
    model = _random_model(cfg)
    save_model(model, tmp_path)
    with open(tmp_path / "qwen3_jax.json") as f:
        assert json.load(f)["runtime"] == {
            "scan_layers": False, "remat": "dots", "moe_impl": "blocked", "dtype": "bfloat16", "param_dtype": "bfloat16",
        }
    restored = load_model(tmp_path)
    assert restored.cfg == cfg
    for name, value in _params(restored).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_params(model)[name]), err_msg=name)
    # dtype= and overrides apply on top of what was saved.
    upcast = load_any(tmp_path, dtype=jnp.float32, remat="full")
    assert upcast.cfg == cfg.replace(dtype="float32", param_dtype="float32", remat="full")
    assert upcast.embed[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(upcast.embed[...]), np.asarray(model.embed[...].astype(jnp.float32)))


def test_load_any_picks_the_format(checkpoints, saved_on_8):
    model, orbax_dir = saved_on_8
    from_orbax, from_hf = load_any(orbax_dir), load_any(checkpoints["moe"][1])
    tokens = _tokens(1)
    np.testing.assert_array_equal(np.asarray(_logits(from_orbax, tokens)), np.asarray(_logits(from_hf, tokens)))
    assert from_hf.cfg.param_dtype == "float32"


# ---------------------------------------------------------------------------------- errors


def test_load_errors_are_named(checkpoints, saved_on_8, tmp_path):
    _, orbax_dir = saved_on_8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any(tmp_path / "missing")
    with pytest.raises(q.CheckpointError, match="not a qwen3-jax checkpoint.*Hugging Face checkpoint"):
        load_model(checkpoints["moe"][1])
    with pytest.raises(q.CheckpointError, match="holds no checkpoint: expected a Hugging Face checkpoint"):
        load_any(tmp_path)
    with pytest.raises(q.CheckpointError, match=r"parameter runs/0/mlp/down_proj has shape \[3, 6, 40, 80\].*needs \[3, 6, 48, 80\]"):
        load_model(orbax_dir, moe_intermediate_size=48)
    with pytest.raises(q.CheckpointError, match=r"missing parameters \[\], unexpected parameters \['lm_head'\]"):
        load_model(orbax_dir, tie_word_embeddings=True)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        save_model(load_model(orbax_dir), orbax_dir)


def test_unknown_format_version_is_named(saved_on_8, tmp_path):
    path = shutil.copytree(saved_on_8[1], tmp_path / "ckpt")
    with open(path / "qwen3_jax.json", "w") as f:
        json.dump({"format_version": 99, "runtime": {}}, f)
    with pytest.raises(q.CheckpointError, match="format_version 99"):
        load_model(path)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--src", "{tmp}/missing", "--dst", "{tmp}/out"], "--src {tmp}/missing does not exist"),
        (["--src", "{tmp}", "--dst", "{tmp}/../other"], "--src: {tmp} holds no checkpoint: expected a Hugging Face"),
        (["--src", "{hf}", "--dst", "{tmp}/out", "--to", "safetensors"], "argument --to: invalid choice: 'safetensors'"),
        (["--src", "{hf}", "--dst", "{tmp}"], "--dst {tmp} exists and is not empty (pass --overwrite"),
        (["--src", "{hf}", "--dst", "{hf}/sub"], "must be separate directories"),
        (["--src", "{hf}", "--dst", "{tmp}/out", "--max_shard_gb", "0"], "--max_shard_gb must be positive"),
    ],
)
def test_cli_argument_errors_are_named(checkpoints, tmp_path, capsys, argv, message):
    (tmp_path / "keep.txt").write_text("not a checkpoint")
    fill = dict(tmp=str(tmp_path), hf=checkpoints["dense_tied"][1])
    with pytest.raises(SystemExit) as exc:
        convert.main([a.format(**fill) for a in argv])
    assert exc.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert (tmp_path / "keep.txt").exists()


def test_cli_overwrite_replaces_destination(checkpoints, tmp_path):
    (tmp_path / "stale.safetensors").write_text("old")
    convert.main(["--src", checkpoints["dense_tied"][1], "--dst", str(tmp_path), "--to", "hf", "--overwrite"])
    assert not (tmp_path / "stale.safetensors").exists()
    assert is_hf_checkpoint(tmp_path) and (tmp_path / "model.safetensors").exists()
