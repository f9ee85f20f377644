"""Orbax model checkpoints and the HF <-> Orbax converter: lossless round trips, resharding, errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

import qwen3_jax as q
from qwen3_jax.config import YarnScaling
from qwen3_jax.hf_config import from_hf_config, to_hf_config
from qwen3_jax.model import abstract_model
from qwen3_jax import convert
from qwen3_jax.checkpoint import CHUNK_BYTES, is_hf_checkpoint, is_orbax_checkpoint, load_any, load_model, save_model
from qwen3_jax.hf import stacked_dims
from qwen3_jax.safetensors import SafetensorsReader
from qwen3_jax.sharding import state_shardings
from qwen3_jax.stream import open_params

KINDS = ("dense_tied", "moe")
TOKENIZER_FILES = {"tokenizer.json": '{"model": {}}', "tokenizer_config.json": "{}", "merges.txt": "#v\n"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoints, tmp_path_factory):
    """The shared tiny transformers checkpoints, copied, with (stand-in) tokenizer files beside the weights."""
    out = {}
    for kind in KINDS:
        hf, src = hf_checkpoints[kind]
        path = str(tmp_path_factory.mktemp(kind))
        shutil.copytree(src, path, dirs_exist_ok=True)
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
    graphdef, state = nnx.split(abstract_model(cfg))
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


# ---------------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def multi_shard(checkpoints, tmp_path_factory):
    """The fixtures as transformers saves them in several safetensors files with an index; the MoE
    one also with fused experts (experts.gate_up_proj / experts.down_proj per layer)."""
    out = {}
    for kind, (hf, _), fused in (("dense_tied", checkpoints["dense_tied"], False), ("moe", checkpoints["moe"], False),
                                 ("moe_fused", checkpoints["moe"], True)):
        path = str(tmp_path_factory.mktemp(kind))
        hf.save_pretrained(path, max_shard_size="100KB", save_original_format=not fused)
        assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 2, kind
        assert fused == ("model.layers.0.mlp.experts.gate_up_proj" in SafetensorsReader(path).keys())
        out[kind] = path
    return out


def _files(path) -> dict[str, bytes]:
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))}


@pytest.mark.parametrize("kind", ["dense_tied", "moe", "moe_fused"])
def test_streamed_conversion_equals_in_memory(multi_shard, kind, tmp_path):
    """The converter (which streams) writes what save_model / to_hf write from the loaded model."""
    src = multi_shard[kind]
    streamed, in_memory = str(tmp_path / "streamed"), str(tmp_path / "in_memory")
    convert.main(["--src", src, "--dst", streamed])
    save_model(q.from_hf(src), in_memory)
    ref = load_model(in_memory)
    for name, value in _params(load_model(streamed)).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_params(ref)[name]), err_msg=name)
    meta = "params/array_metadatas/process_0"  # write and chunk shapes of every array
    assert open(os.path.join(streamed, meta)).read() == open(os.path.join(in_memory, meta)).read()

    hf_streamed, hf_in_memory = str(tmp_path / "hf_streamed"), str(tmp_path / "hf_in_memory")
    convert.main(["--src", streamed, "--dst", hf_streamed, "--max_shard_gb", "0.0001"])  # ~107 KB files
    q.to_hf(ref, hf_in_memory, max_shard_bytes=int(0.0001 * 2**30))
    out, want = _files(hf_streamed), _files(hf_in_memory)
    assert len([n for n in out if n.endswith(".safetensors")]) > 2
    assert {n: b for n, b in out.items() if n not in convert.TOKENIZER_FILES} == want  # weights, index, config


def test_converter_reads_one_layer_or_expert_at_a_time(multi_shard, tmp_path, monkeypatch):
    """Host memory stays one block: no read spans two layers (or experts) of a stacked parameter
    or more than CHUNK_BYTES, in either direction, so the peak does not grow with the model."""
    blocks = []

    def recording(*args, **kwargs):
        fmt, cfg, read = open_params(*args, **kwargs)

        def read_recorded(param, index):
            block = read(param, index)
            blocks.append((param, block.shape, block.nbytes, stacked_dims(param, cfg)))
            return block

        return fmt, cfg, read_recorded

    monkeypatch.setattr(convert, "open_params", recording)
    convert.main(["--src", multi_shard["moe_fused"], "--dst", str(tmp_path / "orbax")])
    convert.main(["--src", str(tmp_path / "orbax"), "--dst", str(tmp_path / "hf")])
    assert {param for param, *_ in blocks} >= {("runs", 0, "mlp", "gate_proj"), ("runs", 0, "attn", "q_proj")}
    for param, shape, _, n in blocks:
        assert shape[:n] == (1,) * n, (param, shape)
    assert max(nbytes for _, _, nbytes, _ in blocks) <= CHUNK_BYTES


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
        "tiny-moe", scan_layers=False, remat="dots", moe_impl="blocked", moe_chunk_tokens=64, dtype="bfloat16",
        param_dtype="bfloat16", mlp_only_layers=(1,), rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=64),
        max_position_embeddings=256,
    )
    model = _random_model(cfg)
    save_model(model, tmp_path)
    with open(tmp_path / "qwen3_jax.json") as f:
        assert json.load(f)["runtime"] == {
            "scan_layers": False, "remat": "dots", "moe_impl": "blocked", "moe_chunk_tokens": 64, "dtype": "bfloat16",
            "param_dtype": "bfloat16", "attention": "auto", "attention_block_q": 512, "attention_block_kv": 1024,
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


# ------------------------------------------------------------- checkpoints from elsewhere


def _read_st(path) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), f.read()


def _write_st(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def _edit_header(path, edit) -> None:
    header, data = _read_st(path)
    edit(header)
    _write_st(path, header, data)


def _overwrite(path, offset: int, raw: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


NORM0, NORM1 = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
SAFETENSORS_FAULTS = {  # damage to model.safetensors, and what the error says
    "truncated": (lambda p: os.truncate(p, os.path.getsize(p) - 100),
                  r"model.safetensors: tensor \S+: data_offsets \[\d+, \d+\] do not lie within the file's \d+ data "
                  r"bytes \(a truncated file"),
    "shorter_than_a_header": (lambda p: open(p, "wb").write(b"\x01\x02"), r"has 2 bytes, too few for a safetensors header"),
    "header_length_lies": (lambda p: _overwrite(p, 0, struct.pack("<Q", 1 << 40)),
                           r"the header length field says 1099511627776 bytes, but the file has \d+ after it"),
    "header_not_json": (lambda p: _overwrite(p, 8, b"{oops"), r"the safetensors header is not JSON"),
    "offsets_lie": (lambda p: _edit_header(p, lambda h: h[NORM0].update(data_offsets=[0, 4])),
                    rf"tensor {NORM0}: data_offsets span 4 bytes, but F32 of shape \[80\] is 320 bytes"),
    "overlapping": (lambda p: _edit_header(p, lambda h: h[NORM1].update(data_offsets=h[NORM0]["data_offsets"])),
                    r"tensors \S+layernorm.weight and \S+layernorm.weight claim overlapping bytes"),
    "wrong_dtype": (lambda p: _edit_header(p, lambda h: h[NORM0].update(dtype="I32")),
                    rf"tensor {NORM0} has dtype 'I32'; Qwen3 weights are one of"),
    "wrong_shape": (lambda p: _edit_header(p, lambda h: h["model.norm.weight"].update(shape=[40, 2])),
                    r"tensor model.norm.weight has shape \[40, 2\] in the checkpoint but the config needs \[80\]"),
}


@pytest.mark.parametrize("fault", list(SAFETENSORS_FAULTS))
def test_damaged_safetensors_are_named(checkpoints, tmp_path, fault):
    damage, message = SAFETENSORS_FAULTS[fault]
    path = shutil.copytree(checkpoints["dense_tied"][1], tmp_path / "ckpt")
    damage(path / "model.safetensors")
    with pytest.raises(q.CheckpointError, match=message):
        q.from_hf(str(path))


@pytest.fixture(scope="module")
def sharded(checkpoints, tmp_path_factory) -> str:
    """The dense checkpoint re-exported in two shards, with an index."""
    path = str(tmp_path_factory.mktemp("sharded"))
    q.to_hf(q.from_hf(checkpoints["dense_tied"][1]), path, max_shard_bytes=600_000)
    assert len(os.listdir(path)) == 4, os.listdir(path)  # config.json, index, two shards
    return path


def _edit_index(path, edit) -> None:
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump(index, f)


def _point_first_tensor_at(target: str):
    return lambda path: _edit_index(path, lambda m: m.update({min(m): target}))


def _shard(path, i: int):
    return sorted(path.glob("model-*.safetensors"))[i]


INDEX_FAULTS = {
    "missing_shard": (lambda path: os.remove(_shard(path, 1)), r"lists shard model-00002-of-\d+.safetensors, which is missing"),
    "outside_by_dotdot": (_point_first_tensor_at("../outside.safetensors"),
                          r"lists shard '../outside.safetensors', which is outside the checkpoint directory"),
    "absolute_path": (_point_first_tensor_at("/etc/hostname"), r"lists shard '/etc/hostname', which is outside"),
    "symlink_out": (lambda path: (os.remove(_shard(path, 0)), os.symlink(path.parent / "outside.safetensors",
                                                                        path / "model-00001-of-00002.safetensors")),
                    r"lists shard 'model-00001-of-00002.safetensors', which is outside"),
    "tensor_not_in_its_shard": (lambda path: _edit_index(path, lambda m: m.update({
        "model.norm.weight": next(v for v in sorted(set(m.values())) if v != m["model.norm.weight"])})),
        r"says tensor model.norm.weight is in model-\d+-of-00002.safetensors, but .* does not hold it"),
    "index_not_json": (lambda path: (path / "model.safetensors.index.json").write_text("{oops"),
                       r"model.safetensors.index.json is not a safetensors index"),
}


@pytest.mark.parametrize("fault", list(INDEX_FAULTS))
def test_bad_safetensors_index_is_named(sharded, tmp_path, fault):
    damage, message = INDEX_FAULTS[fault]
    path = shutil.copytree(sharded, tmp_path / "ckpt")
    shutil.copy(_shard(path, 0), tmp_path / "outside.safetensors")  # a file to escape to
    damage(path)
    with pytest.raises(q.CheckpointError, match=message):
        q.from_hf(str(path))


CONFIG_FAULTS = {
    "not_json": ("{oops", r"config.json is not JSON"),
    "not_an_object": ("[1, 2]", r"config.json holds a JSON list, not an object"),
    "string_for_int": ({"vocab_size": "300"}, r"field 'vocab_size' must be an integer, got '300'"),
    "float_for_int": ({"num_hidden_layers": 3.0}, r"field 'num_hidden_layers' must be an integer, got 3.0"),
    "bool_for_int": ({"num_attention_heads": True}, r"field 'num_attention_heads' must be an integer, got True"),
    "null_eps": ({"rms_norm_eps": None}, r"field 'rms_norm_eps' must be a float, got None"),
    "string_for_bool": ({"tie_word_embeddings": "yes"}, r"field 'tie_word_embeddings' must be true or false"),
    "bad_rope_factor": ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}},
                        r"yarn factor must be a number >= 1 .*, got '4'"),
    "missing_field": ({"hidden_size": None}, r"field 'hidden_size' must be an integer, got None"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_bad_config_json_is_named(checkpoints, tmp_path, fault):
    change, message = CONFIG_FAULTS[fault]
    path = shutil.copytree(checkpoints["dense_tied"][1], tmp_path / "ckpt")
    if isinstance(change, str):
        (path / "config.json").write_text(change)
    else:
        config = {**json.loads((path / "config.json").read_text()), **change}
        (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(q.ConfigError, match=message):
        load_any(path)


def test_nothing_is_ever_unpickled(checkpoints, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(module, name, refuse)
    load_any(checkpoints["dense_tied"][1])
    pytorch = tmp_path / "pytorch"
    pytorch.mkdir()
    shutil.copy(os.path.join(checkpoints["dense_tied"][1], "config.json"), pytorch)
    (pytorch / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch.save zip would be unpickled")
    with pytest.raises(q.CheckpointError, match=r"pytorch_model.bin: pickle-based PyTorch files, which qwen3-jax never "
                                                 r"loads"):
        load_any(pytorch)


HF_CONFIGS = [to_hf_config(q.preset(name)) for name in ("tiny-dense", "tiny-moe")]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.sampled_from(["qwen3", "qwen3_moe", "yarn", "default", "silu"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
                         "attention_factor", "truncate", "rope_theta", "x"]), inner, max_size=4),
    max_leaves=6,
)


@st.composite
def hf_configs(draw) -> dict:
    """A real config.json with a few fields replaced, added or removed, or random JSON altogether."""
    if draw(st.booleans()):
        return draw(st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=6))
    config = dict(draw(st.sampled_from(HF_CONFIGS)))
    for name in draw(st.lists(st.sampled_from(sorted(config) + ["num_local_experts", "rope_parameters"]), max_size=4)):
        if draw(st.booleans()):
            config.pop(name, None)
        else:
            config[name] = draw(JSON_VALUES)
    return config


@settings(max_examples=300, deadline=None)
@given(hf_configs())
def test_from_hf_config_raises_only_config_errors_on_any_json(config):
    try:
        cfg = from_hf_config(config)
    except q.ConfigError:
        return
    assert isinstance(cfg, q.Qwen3Config)


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
