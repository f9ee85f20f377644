"""Attention implementations: blockwise and splash against the einsum reference, value and gradient;
the automatic choice; bounded memory; the TPU kernel compiled for a TPU topology (needs libtpu)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import qwen3_jax as q
from infer.engine import Engine
from qwen3_jax import attention as A
from qwen3_jax.errors import ConfigError

RNG = np.random.default_rng(0)


def _normal(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _grads(fn, q_, k, v, w):
    return jax.jit(jax.grad(lambda a, b, c: jnp.sum(fn(a, b, c) * w), argnums=(0, 1, 2)))(q_, k, v)


def _assert_same(fn, ref, q_, k, v, atol=2e-6):
    out, expected = fn(q_, k, v), ref(q_, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=atol)
    w = _normal(*expected.shape)
    for g, g_ref in zip(_grads(fn, q_, k, v, w), _grads(ref, q_, k, v, w)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=atol * 4)


# Packed rows (two documents, then padding with segment id 0), lengths that no block divides,
# two kv heads of three query heads each.
@pytest.mark.parametrize("block_q, block_kv", [(8, 16), (16, 8), (5, 7)])
def test_blockwise_equals_einsum_packed_rows(block_q, block_kv):
    B, T, K, G, H = 2, 37, 2, 3, 16
    seg = jnp.asarray([[1] * 20 + [2] * 10 + [0] * 7, [1] * 9 + [2] * 28])
    mask = A.Mask(jnp.broadcast_to(jnp.arange(T), (B, T)), seg)
    q_, k, v = _normal(B, T, K, G, H), _normal(B, K, H, T), _normal(B, K, T, H)
    _assert_same(lambda a, b, c: A.blockwise_attention(a, b, c, mask, block_q, block_kv),
                 lambda a, b, c: A.einsum_attention(a, b, c, mask), q_, k, v)


@pytest.mark.parametrize("T", [1, 6])  # decode, and a prefill chunk
def test_blockwise_equals_einsum_over_a_cache_at_row_offsets(T):
    B, S, K, G, H = 3, 50, 2, 2, 16
    starts = jnp.asarray([0, 17, 44])  # rows at different cache offsets; slots past a row's query are stale
    mask = A.Mask(starts[:, None] + jnp.arange(T)[None], None)
    q_, k, v = _normal(B, T, K, G, H), _normal(B, K, H, S), _normal(B, K, S, H)
    _assert_same(lambda a, b, c: A.blockwise_attention(a, b, c, mask, 4, 8),
                 lambda a, b, c: A.einsum_attention(a, b, c, mask), q_, k, v)


def test_one_tile_is_the_reference_bit_for_bit():
    B, T, K, G, H = 1, 12, 1, 2, 8
    mask = A.Mask(jnp.arange(T)[None], None)
    q_, k, v = _normal(B, T, K, G, H), _normal(B, K, H, T), _normal(B, K, T, H)
    assert np.array_equal(A.blockwise_attention(q_, k, v, mask, 16, 16), A.einsum_attention(q_, k, v, mask))


def test_blockwise_memory_is_bounded_by_a_tile():
    """At T = 4096 the einsum scores are 128 MiB per (row, head pair); blockwise holds 256 x 256 tiles."""
    B, T, K, G, H = 1, 4096, 1, 2, 16
    mask = A.Mask(jnp.arange(T)[None], None)
    args = (jax.ShapeDtypeStruct((B, T, K, G, H), jnp.float32), jax.ShapeDtypeStruct((B, K, H, T), jnp.float32),
            jax.ShapeDtypeStruct((B, K, T, H), jnp.float32))
    scores_bytes = B * K * G * T * T * 4

    def temp_bytes(fn):
        loss = lambda a, b, c: jnp.sum(fn(a, b, c))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile().memory_analysis().temp_size_in_bytes

    einsum = temp_bytes(lambda a, b, c: A.einsum_attention(a, b, c, mask))
    blockwise = temp_bytes(lambda a, b, c: A.blockwise_attention(a, b, c, mask, 256, 256))
    assert einsum >= scores_bytes
    assert blockwise < scores_bytes / 16, (blockwise, einsum)


def test_splash_kernel_equals_einsum_in_the_pallas_interpreter():
    """The TPU kernel's own code, run by the Pallas interpreter on CPU: causal, segments, GQA."""
    B, T, N, K, H = 2, 256, 4, 2, 128
    cfg = q.preset("tiny-dense", attention_block_q=128, attention_block_kv=128)
    seg = jnp.asarray([[1] * 100 + [2] * 100 + [0] * 56, [3] * 256])

    def reference(a, b, c):
        mask = A.Mask(jnp.broadcast_to(jnp.arange(T), (B, T)), seg)
        out = A.einsum_attention(a.reshape(B, T, K, N // K, H), jnp.transpose(b, (0, 2, 3, 1)), jnp.swapaxes(c, 1, 2), mask)
        return out.reshape(B, T, N, H)

    _assert_same(lambda a, b, c: A.splash_attention(a, b, c, seg, cfg, interpret=True), reference,
                 _normal(B, T, N, H), _normal(B, T, K, H), _normal(B, T, K, H), atol=5e-6)
    with pytest.raises(ValueError, match="multiple of its block"):
        A.splash_attention(_normal(1, 200, N, H), _normal(1, 200, K, H), _normal(1, 200, K, H), None, cfg, interpret=True)


def test_splash_kernel_under_a_mesh_equals_one_device():
    """Sharded over data and tensor with shard_map: each device runs the kernel on its rows and heads."""
    B, T, N, K, H = 4, 128, 4, 2, 128
    cfg = q.preset("tiny-dense", attention_block_q=128, attention_block_kv=128)
    q_, k, v = _normal(B, T, N, H), _normal(B, T, K, H), _normal(B, T, K, H)
    one = A.splash_attention(q_, k, v, None, cfg, interpret=True)
    mesh = q.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda a, b, c: A.splash_attention(a, b, c, None, cfg, interpret=True))(q_, k, v)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(one), atol=1e-6)


# ------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def hf_dense(hf_checkpoints):
    return hf_checkpoints["dense"]


def test_blockwise_model_matches_transformers_and_its_gradient_matches_einsum(hf_dense):
    hf, path = hf_dense
    tokens = np.random.RandomState(1).randint(0, 300, (2, 29)).astype(np.int32)
    with torch.no_grad():
        expected = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    models = {impl: q.from_hf(path, attention=impl, attention_block_q=8, attention_block_kv=4)
              for impl in ("einsum", "blockwise")}
    logits = nnx.jit(lambda m, t: m(t))(models["blockwise"], jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4)

    def grads(model):
        graphdef, params = nnx.split(model)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(jnp.asarray(tokens)) ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    for g, g_ref in zip(jax.tree.leaves(grads(models["blockwise"])), jax.tree.leaves(grads(models["einsum"]))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=2e-6, rtol=1e-4)


def test_blockwise_decode_gives_the_einsum_tokens():
    """Prompts of different lengths, a cache of many tiles: prefill and every decode step run blockwise."""
    prompts = [[5, 9, 11, 3, 7, 1, 2, 8, 4, 6, 10, 12, 13], [21, 22, 23]]
    out = {}
    for impl in ("einsum", "blockwise"):
        model = q.init_model(q.preset("tiny-dense", attention=impl, attention_block_q=4, attention_block_kv=8), seed=3)
        out[impl] = Engine(model, forced_ids=[0]).generate(prompts, max_new_tokens=20, temperature=0.0, stop_token_ids=())
    assert out["blockwise"] == out["einsum"]


def test_packed_training_rows_are_equal_under_every_cpu_implementation():
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 512, (2, 24)), jnp.int32)
    seg = jnp.asarray([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4])
    pos = jnp.asarray([list(range(10)) + list(range(14)), list(range(20)) + [0] * 4])
    logits = {}
    for impl in ("einsum", "blockwise"):
        model = q.init_model(q.preset("tiny-moe", attention=impl, attention_block_q=8, attention_block_kv=8), seed=1)
        logits[impl] = np.asarray(nnx.jit(lambda m, t, p, s: m(t, positions_BxT=p, segment_ids_BxT=s))(model, tokens, pos, seg))
    np.testing.assert_allclose(logits["blockwise"], logits["einsum"], atol=1e-5)


# ----------------------------------------------------------------------------- choosing


def test_auto_picks_the_backend_kernel_where_it_applies():
    cfg = q.preset("tiny-dense")
    bf16 = cfg.replace(dtype="bfloat16")
    assert A.choose(cfg, cached=False, packed=True, backend="tpu") == "splash"
    assert A.choose(cfg, cached=True, packed=False, backend="tpu") == "blockwise"
    assert A.choose(bf16, cached=False, packed=False, backend="gpu") == "cudnn"
    assert A.choose(bf16, cached=False, packed=True, backend="gpu") == "blockwise"  # cuDNN takes no segment ids
    assert A.choose(cfg, cached=False, packed=False, backend="gpu") == "blockwise"  # float32: no cuDNN kernel
    assert A.choose(cfg, cached=False, packed=False, backend="cpu") == "blockwise"
    assert A.choose(cfg.replace(attention="einsum"), cached=True, packed=False, backend="tpu") == "einsum"
    # CPU decode over a small cache: einsum (measured faster there); over a long cache or prefill: blockwise.
    assert A.choose(cfg, cached=True, packed=False, queries=1, kv_slots=2048, backend="cpu") == "einsum"
    assert A.choose(cfg, cached=True, packed=False, queries=1, kv_slots=2049, backend="cpu") == "blockwise"
    assert A.choose(cfg, cached=True, packed=False, queries=8, kv_slots=2048, backend="cpu") == "blockwise"
    assert A.choose(cfg, cached=True, packed=False, queries=1, kv_slots=2048, backend="gpu") == "blockwise"


@pytest.mark.parametrize("impl, dtype, cached, packed, message", [
    ("splash", "float32", True, False, "no KV-cache path"),
    ("cudnn", "bfloat16", True, False, "no KV-cache path"),
    ("cudnn", "bfloat16", False, True, "packed segment ids"),
    ("cudnn", "float32", False, False, "needs dtype bfloat16"),
])
def test_explicit_choices_that_cannot_run_a_call_are_named(impl, dtype, cached, packed, message):
    with pytest.raises(ValueError, match=message):
        A.choose(q.preset("tiny-dense", attention=impl, dtype=dtype), cached=cached, packed=packed, backend="gpu")


@pytest.mark.parametrize("field, value, message", [
    ("attention", "flash", "attention must be one of"),
    ("attention_block_q", 0, "attention_block_q must be positive"),
])
def test_bad_attention_config_is_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        q.preset("tiny-dense", **{field: value})


def test_splash_model_compiles_for_a_tpu_topology():
    """The real train-shaped call (forward + gradient, packed rows) through the splash kernel, lowered
    and compiled for a v5p slice from this CPU host: `auto` reads the platform off the mesh."""
    pytest.importorskip("libtpu", reason="needs jax[tpu] (libtpu) to compile for a TPU topology")
    from jax.experimental import topologies
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    from qwen3_jax.model import abstract_model
    from qwen3_jax.sharding import state_shardings

    topo = topologies.get_topology_desc("v5p:2x2x1", platform="tpu")
    mesh = Mesh(np.asarray(topo.devices).reshape(2, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    cfg = q.preset("tiny-dense", head_dim=128, num_heads=4, num_kv_heads=2, dtype="bfloat16",
                   attention_block_q=128, attention_block_kv=128)
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(state, mesh, cfg.rules)
    params = jax.tree.map(lambda s, v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), shardings, state,
                          is_leaf=lambda x: isinstance(x, NamedSharding))
    rows = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=NamedSharding(mesh, P("fsdp")))

    def loss(p, tokens, seg):
        return jnp.mean(nnx.merge(graphdef, p)(tokens, segment_ids_BxT=seg).astype(jnp.float32) ** 2)

    # The suite's float32 "highest" matmul precision (conftest) asks Mosaic for a bf16 dot it has no kernel for.
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss)).lower(params, rows, rows).compile()
    assert "splash" in compiled.as_text() or "tpu_custom_call" in compiled.as_text()
