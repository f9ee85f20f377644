"""Dense building blocks: embedding lookup, RMSNorm, RoPE (with YaRN), GQA attention with QK-Norm,
SwiGLU MLP.

Shapes in names: B batch, T query length, S key length (cache slots), D hidden, N query heads,
K kv heads, G = N / K query heads per kv head, H head_dim, F MLP width.
Every parameter carries its logical axes as `axes` metadata; `qwen3_jax.sharding` maps them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from qwen3_jax import attention
from qwen3_jax.config import Qwen3Config, YarnScaling
from qwen3_jax.sharding import ShardingRules, constrain, current_mesh_axes

_init = nnx.initializers.normal(0.02)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, init=_init) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, dtype), axes=axes)


def ones_param(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), axes=axes)


class RMSNorm(nnx.Module):
    """Statistics in float32, cast back to the activation dtype, then multiply by `w` (not 1 + w)."""

    def __init__(self, dim: int, eps: float, axes: tuple[str | None, ...], *, param_dtype):
        self.eps = eps
        self.weight = ones_param((dim,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


# ------------------------------------------------------------------------------------ Embedding


def embed_tokens(table_VxD: jax.Array, tokens_BxT: jax.Array, rules: ShardingRules) -> jax.Array:
    """Rows of `table_VxD` for `tokens_BxT`: [B, T, D], split over the batch axes like every layer's input.

    With a mesh installed the lookup runs under `jax.shard_map` with the table as the rules shard it
    (vocab over `tensor`, D over `fsdp`), because the partitioner finds no efficient path from the
    gather's natural output (D split over `fsdp`) to the batch-split activation and replicates it
    ("Involuntary full rematerialization"), forward and backward. Collectives, for one call:
      - all-gather of the int32 token ids over the embed axes (`fsdp`): each device looks up its
        D-slice for every row of its fsdp group;
      - psum over the vocab axes (`tensor`): Megatron's vocab-parallel lookup, each shard fills the
        rows of the ids in its vocab range and zeros elsewhere, so the table is never gathered;
      - all-to-all over the embed axes: each device sends every peer that peer's rows of its
        D-slice and receives its own rows' other D-slices ([B/shards, T, D] in the end).
    Vocab axes that also split the batch (not the default rules) are gathered by the partitioner
    first, since the psum needs every vocab shard to hold the same rows.
    """
    names = current_mesh_axes()
    if not names:
        return jnp.take(table_VxD, tokens_BxT, axis=0)
    batch_axes = set(rules.mesh_axes("batch"))
    vocab_axes = tuple(a for a in rules.mesh_axes("vocab") if a in names and a not in batch_axes)
    embed_axes = tuple(a for a in rules.mesh_axes("embed") if a in names)
    table_spec = P(vocab_axes or None, rules.spec(("embed",), names)[0])
    tokens_spec = rules.spec(("batch", "seq"), names)

    def lookup(table_VlxDl, ids_BlxTl):
        if embed_axes:
            ids_BlxTl = jax.lax.all_gather(ids_BlxTl, embed_axes, axis=0, tiled=True)
        if vocab_axes:
            rows = table_VlxDl.shape[0]
            local_BxT = ids_BlxTl - jax.lax.axis_index(vocab_axes) * rows
            ours_BxT = (local_BxT >= 0) & (local_BxT < rows)
            x = jnp.take(table_VlxDl, jnp.where(ours_BxT, local_BxT, 0), axis=0)
            x = jax.lax.psum(jnp.where(ours_BxT[..., None], x, 0), vocab_axes)
        else:
            x = jnp.take(table_VlxDl, ids_BlxTl, axis=0)
        if embed_axes:
            x = jax.lax.all_to_all(x, embed_axes, split_axis=0, concat_axis=2, tiled=True)
        return x

    out_spec = P(*tokens_spec, None)
    return jax.shard_map(lookup, in_specs=(table_spec, tokens_spec), out_specs=out_spec)(table_VxD, tokens_BxT)


# ----------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: YarnScaling | None) -> tuple[np.ndarray, float]:
    """Inverse frequencies [H/2] (float32) and the cos/sin scale, as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    pos_freqs = np.float32(theta) ** exponents
    if scaling is None:
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0

    def correction_dim(rotations: float) -> float:
        orig = scaling.original_max_position_embeddings
        return head_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = np.float32(1.0) - ramp
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)
    inv_freq = inv_inter * (np.float32(1.0) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), scaling.mscale


def rope_cos_sin(positions_BxT: jax.Array, cfg: Qwen3Config) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H] in float32, scaled by the YaRN attention factor, then cast to the compute dtype."""
    inv_freq, scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb_BxTxH = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    dtype = jnp.dtype(cfg.dtype)
    return (jnp.cos(emb_BxTxH) * scale).astype(dtype), (jnp.sin(emb_BxTxH) * scale).astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Half-split ("rotate_half") convention: pairs (i, i + H/2), not interleaved."""
    half = x_BxTxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    return x_BxTxNxH * cos_BxTxH[:, :, None, :] + rotated * sin_BxTxH[:, :, None, :]


# ------------------------------------------------------------------------------------ Attention


class KVCache(NamedTuple):
    """Key/value slots of one layer (stacked with a leading layer axis in the model).

    Keys are stored [B, K, H, S] and values [B, K, S, H]: per (row, kv head), the scores are a
    [G, H] x [H, S] product and the output a [G, S] x [S, H] one, both streaming the cache.
    """

    k_BxKxHxS: jax.Array
    v_BxKxSxH: jax.Array


# Logical axes of the two cache arrays, for sharding them (batch -> data, kv heads -> tensor).
CACHE_AXES = KVCache(("batch", "act_kv_heads", "head_dim", "cache_seq"), ("batch", "act_kv_heads", "cache_seq", "head_dim"))


class AttentionInputs(NamedTuple):
    """Per-call attention context shared by all layers.

    q_slots_BxT: index of each query in its row's key sequence (cache slot, or t without cache);
    causality is by slot, so packed documents whose positions restart still mask correctly.
    cache_start_B: where this call's keys are written in the cache (None without a cache).
    segment_ids_BxT: packed-document ids; queries attend only within their own segment.
    """

    cos_BxTxH: jax.Array
    sin_BxTxH: jax.Array
    q_slots_BxT: jax.Array
    cache_start_B: jax.Array | None = None
    segment_ids_BxT: jax.Array | None = None


def _write_cache(cache: KVCache, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, start_B: jax.Array) -> KVCache:
    """Writes row b's T new keys and values at slots start_B[b] + t, in place when the cache is donated.

    Scatters with unique, sorted indices: XLA:CPU updates only the T slots, where a vmapped
    dynamic_update_slice at batch 1 becomes a select over the whole cache. Out-of-range slots
    are dropped; callers check prompt and generation lengths on the host first.
    """
    B, T = k_BxTxKxH.shape[:2]
    rows_BxT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    slots_BxT = start_B[:, None] + jnp.arange(T)[None, :]
    # Both index pairs are split by sliced axes, so each update is laid out [B, T, K, H].
    scatter = dict(indices_are_sorted=True, unique_indices=True, mode="drop")
    k = cache.k_BxKxHxS.at[rows_BxT, :, :, slots_BxT].set(k_BxTxKxH.astype(cache.k_BxKxHxS.dtype), **scatter)
    v = cache.v_BxKxSxH.at[rows_BxT, :, slots_BxT, :].set(v_BxTxKxH.astype(cache.v_BxKxSxH.dtype), **scatter)
    return KVCache(k, v)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q_proj = param(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd)
        self.q_norm = RMSNorm(H, cfg.rms_norm_eps, ("head_dim",), param_dtype=pd)
        self.k_norm = RMSNorm(H, cfg.rms_norm_eps, ("head_dim",), param_dtype=pd)

    def __call__(
        self, x_BxTxD: jax.Array, ctx: AttentionInputs, cache: KVCache | None
    ) -> tuple[jax.Array, KVCache | None]:
        cfg, rules = self.cfg, self.cfg.rules
        dtype = x_BxTxD.dtype
        q = jnp.einsum("BTD,DNH->BTNH", x_BxTxD, self.q_proj[...].astype(dtype))
        k = jnp.einsum("BTD,DKH->BTKH", x_BxTxD, self.k_proj[...].astype(dtype))
        v = jnp.einsum("BTD,DKH->BTKH", x_BxTxD, self.v_proj[...].astype(dtype))
        # QK-Norm: one RMSNorm over head_dim, per head, before RoPE.
        q = apply_rope(self.q_norm(q), ctx.cos_BxTxH, ctx.sin_BxTxH)
        k = apply_rope(self.k_norm(k), ctx.cos_BxTxH, ctx.sin_BxTxH)
        q = constrain(q, ("batch", "seq", "act_heads", None), rules)
        k = constrain(k, ("batch", "seq", "act_kv_heads", None), rules)
        v = constrain(v, ("batch", "seq", "act_kv_heads", None), rules)

        B, T = x_BxTxD.shape[:2]
        cached, packed = cache is not None or ctx.cache_start_B is not None, ctx.segment_ids_BxT is not None
        kv_slots = None if cache is None else cache.k_BxKxHxS.shape[-1]
        impl = attention.choose(cfg, cached=cached, packed=packed, queries=T, kv_slots=kv_slots)
        if impl == "splash":
            out_BxTxNxH = attention.splash_attention(q, k, v, ctx.segment_ids_BxT, cfg)
        elif impl == "cudnn":
            out_BxTxNxH = attention.cudnn_attention(q, k, v, cfg)
        else:
            if cache is None:
                k_BxKxHxS, v_BxKxSxH = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)
            else:
                cache = _write_cache(cache, k, v, ctx.cache_start_B)
                k_BxKxHxS, v_BxKxSxH = cache.k_BxKxHxS.astype(dtype), cache.v_BxKxSxH.astype(dtype)
            q_BxTxKxGxH = q.reshape(B, T, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
            mask = attention.Mask(ctx.q_slots_BxT, ctx.segment_ids_BxT)
            if impl == "einsum":
                out_BxTxKxGxH = attention.einsum_attention(q_BxTxKxGxH, k_BxKxHxS, v_BxKxSxH, mask)
            else:
                out_BxTxKxGxH = attention.blockwise_attention(q_BxTxKxGxH, k_BxKxHxS, v_BxKxSxH, mask,
                                                              cfg.attention_block_q, cfg.attention_block_kv)
            out_BxTxNxH = out_BxTxKxGxH.reshape(B, T, cfg.num_heads, cfg.head_dim)
        # One flat contraction over N*H: with a two-dim contraction XLA:CPU transposes the
        # o_proj weight on every call instead of the small activation.
        NH = cfg.num_heads * cfg.head_dim
        out_BxTxNH = out_BxTxNxH.reshape(B, T, NH)
        out = jnp.einsum("BTF,FD->BTD", out_BxTxNH, self.o_proj[...].astype(dtype).reshape(NH, -1))
        return out, cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.rules = cfg.rules
        self.gate_proj = param(rngs, (D, F), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, (D, F), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, (F, D), ("mlp", "embed"), pd)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        dtype = x_BxTxD.dtype
        gate = jnp.einsum("BTD,DF->BTF", x_BxTxD, self.gate_proj[...].astype(dtype))
        up = jnp.einsum("BTD,DF->BTF", x_BxTxD, self.up_proj[...].astype(dtype))
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"), self.rules)
        return jnp.einsum("BTF,FD->BTD", h, self.down_proj[...].astype(dtype))
