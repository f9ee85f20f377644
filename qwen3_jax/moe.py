"""Qwen3 sparse MoE block: softmax router -> top-k -> renormalise -> dropless grouped expert SwiGLU.

Dropless: every (token, expert) pair is computed, nothing is capped by a capacity factor. Expert
parallelism (`expert` mesh axis) runs under `jax.shard_map` with a fixed set of collectives per
layer (tests/test_sharding_hlo.py counts them); `moe_chunk_tokens` bounds the gathered tokens an
expert shard holds at once. The grouped matmuls (`moe_impl`, `auto` by platform): megablox's
Pallas kernels on TPU, `jax.lax.ragged_dot` on GPU, a blocked scan on CPU. Shapes: B batch, T
length, D hidden, E experts (El local), I expert width, K top-k, M = B*T*K pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox
from jax.sharding import PartitionSpec as P

from qwen3_jax.config import Qwen3Config
from qwen3_jax.layers import param
from qwen3_jax.sharding import current_mesh_axes, target_platform


class RouterStats(NamedTuple):
    """Sufficient statistics of transformers' load_balancing_loss_func, summed over tokens.

    One layer's arrays are [E] (and a scalar count); a model's forward stacks its MoE layers on a
    leading [L] axis. Summing before dividing makes the loss exact over the global batch however
    it is sharded.
    """

    expert_counts_E: jax.Array  # top-k selections per expert (float32)
    prob_sum_E: jax.Array  # router probabilities summed over tokens
    num_tokens: jax.Array  # counted tokens

    def expert_load(self) -> jax.Array:
        """Fraction of the top-k selections each expert received ([..., E], rows sum to 1)."""
        return self.expert_counts_E / jnp.maximum(jnp.sum(self.expert_counts_E, axis=-1, keepdims=True), 1.0)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """E * sum_e(frac_tokens_e * mean_prob_e), frac and mean over all layers' tokens (Switch loss;
    transformers concatenates every layer's router logits, which is the sum over the layer axis)."""
    if stats.expert_counts_E.ndim > 1:
        stats = RouterStats(*(jnp.sum(x, axis=0) for x in stats))
    num_experts = stats.expert_counts_E.shape[-1]
    n = jnp.maximum(stats.num_tokens, 1.0)
    return num_experts * jnp.sum((stats.expert_counts_E / n) * (stats.prob_sum_E / n))


def route(
    logits_BxTxE: jax.Array, k: int, normalize: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax over all experts in float32, then top-k, then (optionally) renormalise in float32."""
    probs = jax.nn.softmax(logits_BxTxE.astype(jnp.float32), axis=-1)
    weights_BxTxK, idx_BxTxK = jax.lax.top_k(probs, k)
    if normalize:
        weights_BxTxK = weights_BxTxK / jnp.sum(weights_BxTxK, axis=-1, keepdims=True)
    return probs, weights_BxTxK, idx_BxTxK


# ---------------------------------------------------------------------------- grouped matmul


def _blocked_grouped_matmul(x_MxD: jax.Array, w_ExDxF: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """Grouped matmul by fixed-size row blocks, each block owned by one expert.

    XLA:CPU lowers `ragged_dot` to a dense loop, so on CPU each group is padded to a multiple of `block` rows and a scan multiplies
    one block by its expert's weights, skipping unused blocks. Work is proportional to the routed
    pairs (plus at most E * (block - 1) padding rows), and it is differentiable.
    """
    M, _ = x_MxD.shape
    E, _, F = w_ExDxF.shape
    block = 1
    while block * 2 <= min(256, max(1, M // E)):
        block *= 2
    num_blocks = -(-(M + E * (block - 1)) // block)
    padded_E = (sizes_E + block - 1) // block * block
    ends_E, padded_ends_E = jnp.cumsum(sizes_E), jnp.cumsum(padded_E)
    rows_M = jnp.arange(M)
    group_M = jnp.searchsorted(ends_E, rows_M, side="right")  # E for rows past the last group
    gidx = jnp.minimum(group_M, E - 1)
    dest_M = jnp.where(group_M < E, padded_ends_E[gidx] - padded_E[gidx] + rows_M - (ends_E[gidx] - sizes_E[gidx]),
                       num_blocks * block)
    xp = jnp.zeros((num_blocks * block, x_MxD.shape[1]), x_MxD.dtype).at[dest_M].set(x_MxD, mode="drop")
    block_expert = jnp.searchsorted(padded_ends_E, jnp.arange(num_blocks) * block, side="right")

    def body(_, xs):
        xb, e = xs
        yb = jax.lax.cond(
            e < E,
            lambda: jnp.dot(xb, w_ExDxF[jnp.minimum(e, E - 1)], preferred_element_type=jnp.float32),
            lambda: jnp.zeros((block, F), jnp.float32),
        )
        return None, yb.astype(x_MxD.dtype)

    _, y = jax.lax.scan(body, None, (xp.reshape(num_blocks, block, -1), block_expert))
    return y.reshape(num_blocks * block, F).at[dest_M].get(mode="fill", fill_value=0)


@dataclasses.dataclass(frozen=True)
class MegabloxTiling:
    """megablox's tile sizes for one grouped matmul with `rows_per_tile` rows (hashable: a static
    argument of its jitted kernels), looked up per kernel as (m, k, n) -> (tm, tk, tn).

    tm = rows_per_tile (see `megablox_rows_per_tile`); tk and tn are the largest of 1024, 512,
    256, 128 dividing the dimension, else the whole dimension (a TPU block dimension must be a
    multiple of 128 or the full array). One table serves the forward (k = D, n = F), the input
    gradient (k = F, n = D) and the weight gradient's `tgmm` (k = D, n = F). At the largest tiles
    (512 x 1024 x 1024: bfloat16 blocks double-buffered, a float32 accumulator) a kernel holds
    about 12 MiB of VMEM. Qwen3-30B-A3B (D 2048, I 768): (512, 1024, 256) forward; 235B-A22B (D
    4096, I 1536): (512, 1024, 512); libtpu compiles them for v5p and v6e (`benchmarks.tpu_aot`).
    """

    rows_per_tile: int

    def __call__(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        def tile(dim: int) -> int:
            return next((t for t in (1024, 512, 256, 128) if dim % t == 0), dim)

        return self.rows_per_tile, tile(k), tile(n)


def megablox_rows_per_tile(num_rows: int, num_groups: int) -> int:
    """The largest power of two <= min(512, rows / groups), at least 16 (bfloat16's sublane tile).

    A tile that straddles a group boundary is computed once per group it holds, so tiles no
    larger than a group bound that waste to about 2x; 512 rows (MaxText's m tile for megablox)
    at Qwen3-30B-A3B's and 235B-A22B's training and prefill shapes, where an expert shard's
    groups hold thousands of rows; 16 for decode's few.
    """
    tm = 16
    while tm * 2 <= min(512, num_rows // max(num_groups, 1)):
        tm *= 2
    return tm


def _megablox_grouped_matmul(x_MxD: jax.Array, w_ExDxF: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """megablox's `gmm` under its own custom VJP (`ops.gmm`: `gmm` for the forward and the input
    gradient, `tgmm` for the weight gradient), grouped kernels in both passes.

    The rows past sum(sizes) (other shards' pairs, padding) form one more group, E, whose weights
    this shard does not hold: gmm computes only the El held groups' tiles and zeroes the rows
    outside them, tgmm only the held groups' gradients. Rows are padded to a multiple of the m
    tile, into that group. Off TPU the kernels run in Pallas interpret mode (tests; slow).
    """
    M, _ = x_MxD.shape
    E = w_ExDxF.shape[0]
    tm = megablox_rows_per_tile(M, E)
    pad = -M % tm
    sizes_G = jnp.concatenate([sizes_E, (M + pad - jnp.sum(sizes_E))[None]]).astype(jnp.int32)
    x = jnp.pad(x_MxD, ((0, pad), (0, 0)))
    interpret = target_platform() != "tpu"
    # Mosaic rejects a bfloat16 matmul at float32 contract precision (a global "highest" setting);
    # bfloat16 products are exact in float32 anyway.
    precision = jax.default_matmul_precision("default") if x.dtype == jnp.bfloat16 else contextlib.nullcontext()
    with precision:  # positional: ops.gmm's nondiff_argnums are (dtype, tiling, transpose_rhs, interpret)
        y = megablox.gmm(x, w_ExDxF, sizes_G, x_MxD.dtype, MegabloxTiling(tm), None, None, False, interpret)
    return y[:M]


def grouped_matmul(x_MxD: jax.Array, w_ExDxF: jax.Array, sizes_E: jax.Array, impl: str) -> jax.Array:
    """Rows of x sorted by group; rows past sum(sizes) produce zeros."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x_MxD, w_ExDxF, sizes_E)
    if impl == "megablox":
        return _megablox_grouped_matmul(x_MxD, w_ExDxF, sizes_E)
    return _blocked_grouped_matmul(x_MxD, w_ExDxF, sizes_E)


def default_impl() -> str:
    """TPU: megablox, whose weight gradient is a grouped kernel too (libtpu lowers `ragged_dot`'s to
    a dense convolution over every local expert). GPU: `ragged_dot`. CPU: the blocked scan, as
    XLA:CPU lowers `ragged_dot` to a dense loop. The platform is the installed mesh's
    (`target_platform`), so an AOT compile for a TPU slice from a CPU host gets the TPU path."""
    return {"cpu": "blocked", "tpu": "megablox"}.get(target_platform(), "ragged_dot")


def local_experts(
    x_NxD: jax.Array, idx_NxK: jax.Array, w_NxK: jax.Array, gate_ExDxI: jax.Array, up_ExDxI: jax.Array,
    down_ExIxD: jax.Array, expert_offset: jax.Array | int, impl: str,
) -> jax.Array:
    """Dropless SwiGLU over the (token, expert) pairs whose expert lives in this shard's [offset, offset+El)."""
    N, K = idx_NxK.shape
    El = gate_ExDxI.shape[0]
    local_M = idx_NxK.reshape(-1) - expert_offset
    is_local_M = (local_M >= 0) & (local_M < El)
    key_M = jnp.where(is_local_M, local_M, El)  # foreign experts sort last and fall outside every group
    order_M = jnp.argsort(key_M, stable=True)
    token_M = order_M // K
    sizes_E = jnp.bincount(key_M, length=El + 1)[:El].astype(jnp.int32)
    x_MxD = x_NxD[token_M]
    h = jax.nn.silu(grouped_matmul(x_MxD, gate_ExDxI, sizes_E, impl)) * grouped_matmul(x_MxD, up_ExDxI, sizes_E, impl)
    y_MxD = grouped_matmul(h, down_ExIxD, sizes_E, impl)
    weight_M = jnp.where(is_local_M, w_NxK.reshape(-1), 0).astype(y_MxD.dtype)[order_M]
    return jnp.zeros_like(x_NxD).at[token_M].add(y_MxD * weight_M[:, None])


def in_token_chunks(
    fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], chunk: int,
    x_NxD: jax.Array, idx_NxK: jax.Array, w_NxK: jax.Array,
) -> jax.Array:
    """fn(x [C, D], idx [C, K], w [C, K]) -> [C, D] over chunks of C = `chunk` tokens (0, or
    chunk >= N: one call on all N), each chunk rematerialised in the backward pass, so only one
    chunk's intermediates are live. Exact when a token's output depends only on its own row. Tokens
    padding the last chunk choose expert -1, which no shard holds: every shard sorts them past its
    groups and they cost nothing."""
    N, D = x_NxD.shape
    K = idx_NxK.shape[1]
    if chunk <= 0 or N <= chunk:
        return fn(x_NxD, idx_NxK, w_NxK)
    num_chunks = -(-N // chunk)
    pad = num_chunks * chunk - N
    x = jnp.pad(x_NxD, ((0, pad), (0, 0))).reshape(num_chunks, chunk, D)
    idx = jnp.pad(idx_NxK, ((0, pad), (0, 0)), constant_values=-1).reshape(num_chunks, chunk, K)
    w = jnp.pad(w_NxK, ((0, pad), (0, 0))).reshape(num_chunks, chunk, K)
    one_chunk = jax.checkpoint(lambda xs: fn(*xs), prevent_cse=False)  # prevent_cse is for code outside loops
    return jax.lax.map(one_chunk, (x, idx, w)).reshape(num_chunks * chunk, D)[:N]


class MoE(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        D, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.router = param(rngs, (D, E), ("embed", "router_experts"), pd)
        self.gate_proj = param(rngs, (E, D, I), ("experts", "embed", "moe_mlp"), pd)
        self.up_proj = param(rngs, (E, D, I), ("experts", "embed", "moe_mlp"), pd)
        self.down_proj = param(rngs, (E, I, D), ("experts", "moe_mlp", "embed"), pd)

    def __call__(self, x_BxTxD: jax.Array, token_mask_BxT: jax.Array | None) -> tuple[jax.Array, RouterStats]:
        cfg = self.cfg
        dtype = x_BxTxD.dtype
        logits = jnp.einsum("BTD,DE->BTE", x_BxTxD, self.router[...].astype(dtype))
        w = tuple(p[...].astype(dtype) for p in (self.gate_proj, self.up_proj, self.down_proj))
        out, probs, idx = self._route_and_experts(x_BxTxD, logits, *w)

        mask = jnp.ones(x_BxTxD.shape[:2], jnp.float32) if token_mask_BxT is None else token_mask_BxT.astype(jnp.float32)
        counts = jnp.einsum("BTKE,BT->E", jax.nn.one_hot(idx, cfg.num_experts, dtype=jnp.float32), mask)
        stats = RouterStats(counts, jnp.einsum("BTE,BT->E", probs, mask), jnp.sum(mask))
        return out, stats

    def _route_and_experts(self, x_BxTxD, logits_BxTxE, gate, up, down):
        """(output [B, T, D], router probabilities [B, T, E] float32, top-k expert ids [B, T, K]).

        Routing runs inside the shard_map, on each device's own tokens: the partitioner does not
        split `top_k` along the batch and all-gathers the [B, T, E] probabilities over every batch
        axis instead.
        """
        cfg = self.cfg
        impl = default_impl() if cfg.moe_impl == "auto" else cfg.moe_impl
        names = current_mesh_axes()
        has_expert, has_tensor = "expert" in names, "tensor" in names
        D = x_BxTxD.shape[-1]

        def body(x, logits, g, u, d):
            probs, w, idx = route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
            group = jax.lax.axis_size("expert") if has_expert else 1
            offset = jax.lax.axis_index("expert") * g.shape[0] if has_expert else 0

            def experts(xs, idxs, ws):  # this device's tokens -> their outputs
                if has_expert:  # every expert shard sees its expert group's tokens
                    xs, idxs, ws = (jax.lax.all_gather(a, "expert", axis=0, tiled=True) for a in (xs, idxs, ws))
                out = local_experts(xs, idxs, ws, g, u, d, offset, impl)
                if has_tensor:  # the expert width is split over `tensor`: partial sums
                    out = jax.lax.psum(out, "tensor")
                if has_expert:
                    out = jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
                return out

            # A pass gathers `group` devices' chunks: moe_chunk_tokens counts the tokens an expert shard sees.
            chunk = -(-cfg.moe_chunk_tokens // group)
            n = x.shape[0] * x.shape[1]
            out = in_token_chunks(experts, chunk, x.reshape(n, D), idx.reshape(n, -1), w.astype(x.dtype).reshape(n, -1))
            return out.reshape(x.shape), probs, idx

        if not names:
            return body(x_BxTxD, logits_BxTxE, gate, up, down)
        rules = cfg.rules
        act = P(rules.spec(("batch",), names)[0], None, None)
        gu = rules.spec(("experts", None, "moe_mlp"), names)
        dn = rules.spec(("experts", "moe_mlp", None), names)
        # check_vma=False: the blocked path's lax.cond skips empty blocks with a zeros branch that
        # carries no varying-axis type; the collectives above are placed by hand.
        return jax.shard_map(body, in_specs=(act, act, gu, gu, dn), out_specs=(act, act, act), check_vma=False)(
            x_BxTxD, logits_BxTxE, gate, up, down
        )
