"""The Qwen3 causal LM (dense and MoE) as a Flax NNX module, with stacked, scanned layers.

Layers of the same kind are stacked along a leading `layers` axis and applied with `lax.scan`
(or a Python loop over the same stacked parameters when `scan_layers=False`), so a 94-layer model
compiles one layer body and checkpoints have one layout either way.
"""

from __future__ import annotations


from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qwen3_jax.config import Qwen3Config
from qwen3_jax.layers import (
    CACHE_AXES, MLP, Attention, AttentionInputs, KVCache, RMSNorm, embed_tokens, param, rope_cos_sin,
)
from qwen3_jax.moe import MoE, RouterStats
from qwen3_jax.sharding import auto_mesh, constrain, state_shardings

_REMAT = {
    "full": None,
    # Full remat with each layer's input, the one array a layer saves, kept in host memory.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("layer_input",),
        offload_src="device", offload_dst="pinned_host"),
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)); the MLP is dense or MoE."""

    def __init__(self, cfg: Qwen3Config, moe: bool, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), param_dtype=pd)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), param_dtype=pd)
        self.mlp = MoE(cfg, rngs=rngs) if moe else MLP(cfg, rngs=rngs)

    def __call__(
        self, x_BxTxD: jax.Array, ctx: AttentionInputs, cache: KVCache | None, token_mask_BxT: jax.Array | None
    ) -> tuple[jax.Array, KVCache | None, RouterStats | None]:
        h, cache = self.attn(self.input_norm(x_BxTxD), ctx, cache)
        x_BxTxD = x_BxTxD + h
        h = self.post_attn_norm(x_BxTxD)
        stats = None
        if isinstance(self.mlp, MoE):
            h, stats = self.mlp(h, token_mask_BxT)
        else:
            h = self.mlp(h)
        x_BxTxD = constrain(x_BxTxD + h, ("batch", "seq", "act_embed"), self.cfg.rules)
        return x_BxTxD, cache, stats


def _stack_layers(cfg: Qwen3Config, moe: bool, n: int, rngs: nnx.Rngs) -> DecoderLayer:
    """n layers with every parameter stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(r: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(cfg, moe, rngs=r)

    stack = make(rngs)
    # By hand, not nnx.vmap's PARTITION_NAME: that writes Flax's `out_sharding` metadata, and the rules read `axes`.
    for _, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Param):
            var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
    return stack


class ForwardOutput(NamedTuple):
    hidden_BxTxD: jax.Array  # after the final norm
    cache: tuple[KVCache, ...] | None  # one KVCache per layer run, stacked on a leading layers axis
    router_stats: RouterStats | None  # per MoE layer, stacked on a leading [L_moe] axis; None for dense models


class Qwen3(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.runs = nnx.List([_stack_layers(cfg, moe, n, rngs) for moe, n in cfg.layer_runs])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ("norm",), param_dtype=pd)
        self.lm_head = None if cfg.tie_word_embeddings else param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    # --------------------------------------------------------------------------------- API
    def __call__(
        self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
    ) -> jax.Array:
        """float32 logits [B, T, vocab] for a full sequence (no cache)."""
        return self.logits(self.forward(tokens_BxT, positions_BxT=positions_BxT, segment_ids_BxT=segment_ids_BxT).hidden_BxTxD)

    def logits(self, hidden_BxTxD: jax.Array) -> jax.Array:
        dtype = hidden_BxTxD.dtype
        # float32 accumulation and output, as the trainer's chunked cross-entropy computes them: a
        # bf16 engine's token log-probs then equal the trainer's recomputation.
        if self.lm_head is None:
            out = jnp.einsum("BTD,VD->BTV", hidden_BxTxD, self.embed[...].astype(dtype),
                             preferred_element_type=jnp.float32)
        else:
            out = jnp.einsum("BTD,DV->BTV", hidden_BxTxD, self.lm_head[...].astype(dtype),
                             preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "seq", "act_vocab"), self.cfg.rules)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> tuple:
        """Zeroed KV cache: per run, one KVCache stacked on a leading layers axis, or one KVCache
        per layer for runs split by `unstack_layers` (see `KVCache` for the slot layout)."""
        cfg = self.cfg
        dtype = jnp.dtype(dtype or cfg.dtype)
        sizes = {"batch": batch, "act_kv_heads": cfg.num_kv_heads, "cache_seq": max_len, "head_dim": cfg.head_dim}

        def zeros(*lead):
            return KVCache(*(jnp.zeros(lead + tuple(sizes[a] for a in axes), dtype) for axes in CACHE_AXES))

        return tuple(
            tuple(zeros() for _ in run) if isinstance(run, nnx.List) else zeros(n)
            for run, (_, n) in zip(self.runs, cfg.layer_runs)
        )

    def forward(
        self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None, cache: tuple[KVCache, ...] | None = None,
        cache_start_B: jax.Array | None = None,
    ) -> ForwardOutput:
        """Hidden states after the final norm.

        Without a cache, attention is causal over the T tokens (within segments if segment ids are
        given; segment id 0 marks padding and is left out of the MoE load-balancing statistics).
        With a cache, this call's keys are written at slots cache_start_B + t and queries attend to
        every slot up to their own, so prefill and decode are the same call. Token ids must be in
        [0, vocab_size); they are checked where they enter (the engine's request checks, the trainer's
        tokenizer-vs-model check), not here, where checking would copy them to the host.
        """
        cfg = self.cfg
        B, T = tokens_BxT.shape
        if cache is not None and segment_ids_BxT is not None:
            raise ValueError("segment_ids are for packed training sequences and cannot be combined with a KV cache")
        if cache is not None and cache_start_B is None:
            cache_start_B = jnp.zeros((B,), jnp.int32)
        q_slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cache_start_B is not None:
            q_slots = q_slots + cache_start_B[:, None].astype(jnp.int32)
        positions_BxT = q_slots if positions_BxT is None else positions_BxT
        cos, sin = rope_cos_sin(positions_BxT, cfg)
        ctx = AttentionInputs(cos, sin, q_slots, cache_start_B, segment_ids_BxT)
        token_mask = None if segment_ids_BxT is None else segment_ids_BxT != 0

        x = embed_tokens(self.embed[...], tokens_BxT, cfg.rules).astype(jnp.dtype(cfg.dtype))
        x = constrain(x, ("batch", "seq", "act_embed"), cfg.rules)
        new_cache, stats = [], []
        for i, run in enumerate(self.runs):
            x, run_cache, run_stats = _apply_run(run, x, ctx, None if cache is None else cache[i], token_mask, cfg)
            new_cache.append(run_cache)
            if run_stats is not None:
                stats.append(run_stats)
        router_stats = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
        return ForwardOutput(self.norm(x), None if cache is None else tuple(new_cache), router_stats)


def _stack(trees: list):
    """Per-layer outputs stacked on a leading axis (None when the layers return None)."""
    return None if trees[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _apply_run(run: DecoderLayer | nnx.List, x, ctx, cache, token_mask, cfg: Qwen3Config):
    """(x, the run's new cache, its router stats stacked per layer or None for dense layers)."""
    if isinstance(run, nnx.List):  # split by unstack_layers: separate weights, a plain loop
        new_cache, stats = [], []
        for i, layer in enumerate(run):
            x, c, s = layer(x, ctx, None if cache is None else cache[i], token_mask)
            new_cache.append(c)
            stats.append(s)
        return x, None if cache is None else tuple(new_cache), _stack(stats)
    graphdef, state = nnx.split(run)

    def body(h, xs):
        layer_state, layer_cache = xs
        if cfg.remat == "offload":
            h = checkpoint_name(h, "layer_input")
        h, layer_cache, s = nnx.merge(graphdef, layer_state)(h, ctx, layer_cache, token_mask)
        return h, (layer_cache, s)

    if cfg.remat != "none":
        body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
        x, (new_cache, stats) = jax.lax.scan(body, x, (state, cache))
        return x, new_cache, stats
    n = jax.tree.leaves(state)[0].shape[0]
    outs = []
    for i in range(n):
        at = lambda t: jax.tree.map(lambda a: a[i], t)  # noqa: E731
        x, out = body(x, (at(state), None if cache is None else at(cache)))
        outs.append(out)
    new_cache = None if cache is None else _stack([c for c, _ in outs])
    return x, new_cache, _stack([s for _, s in outs])


def unstack_layers(model: Qwen3) -> Qwen3:
    """The same model with every stacked run split into a list of per-layer modules (a copy).

    For decoding on XLA:CPU, which copies each layer's weights out of the stack on every step of a
    scan (or unrolled loop) over stacked weights: that doubles the memory traffic of a
    bandwidth-bound decode step. The stacked layout stays canonical for training and checkpoints.
    """
    graphdef, state = nnx.split(model)
    split = nnx.merge(graphdef, state)
    runs = []
    for run in model.runs:
        run_def, run_state = nnx.split(run)
        runs.append(nnx.List([nnx.merge(run_def, layer) for layer in _unstack(run_state)]))
    split.runs = nnx.List(runs)
    return split


def _unstack(stacked):
    """[the i-th slice of every leaf of `stacked` for i in range(layers)], each laid out as its
    stack minus the leading layers axis; one compiled program (slicing each leaf eagerly would
    compile one per leaf and layer). Abstract leaves (`abstract_model`) give abstract slices."""
    n = jax.tree.leaves(stacked)[0].shape[0]

    def layer_sharding(a) -> jax.sharding.Sharding | None:
        s = a.sharding
        if isinstance(s, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
        return s

    if all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(stacked)):
        layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=layer_sharding(a)), stacked)
        return [layer] * n
    shardings = jax.tree.map(layer_sharding, stacked)
    return jax.jit(lambda t: [jax.tree.map(lambda a: a[i], t) for i in range(n)], out_shardings=[shardings] * n)(stacked)


# ------------------------------------------------------------------------------ construction


def abstract_model(cfg: Qwen3Config) -> Qwen3:
    """The model with ShapeDtypeStruct leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))


def abstract_params(cfg: Qwen3Config, mesh: jax.sharding.Mesh | None = None) -> dict:
    """The parameters as `nnx.to_pure_dict(nnx.state(model, nnx.Param))` lays them out, each a
    ShapeDtypeStruct with its NamedSharding on `auto_mesh(mesh)` by `cfg.rules` (no sharding
    without a mesh): a restore or `jax.jit` target. Nothing is allocated."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    shapes = nnx.to_pure_dict(state)
    if mesh is None:
        return shapes
    shardings = nnx.to_pure_dict(state_shardings(state, mesh, cfg.rules))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def init_model(cfg: Qwen3Config, *, seed: int = 0, mesh: jax.sharding.Mesh | None = None) -> Qwen3:
    """Randomly initialised model whose parameters are created already sharded on `mesh`.

    The init runs under jit with the rules' output shardings, so no device ever holds the whole
    model unless the rules say so. A mesh with Explicit axes (jax.make_mesh) is used as its
    `auto_mesh` twin.
    """
    mesh = auto_mesh(mesh)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))

    def make():
        return nnx.state(Qwen3(cfg, rngs=nnx.Rngs(seed)))

    shardings = None if mesh is None else state_shardings(abstract_state, mesh, cfg.rules)
    return nnx.merge(graphdef, jax.jit(make, out_shardings=shardings)())


def count_params(cfg: Qwen3Config) -> tuple[int, int]:
    """(total, active per token) parameter counts, computed from shapes without allocating."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    if not cfg.is_moe:
        return total, total
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total, total - moe_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
