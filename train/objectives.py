"""Training objectives and the device-side pieces they share: the chunked vocab projection, the
model at compute dtype, the MoE auxiliary loss.

An objective is `(params, microbatch, frozen) -> step.Terms`; `step.update_step` differentiates it.
Shapes in names: B batch, T sequence, D hidden, V vocab, C chunk length.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from qwen3_jax.config import Qwen3Config
from qwen3_jax.model import ForwardOutput, Qwen3
from qwen3_jax.moe import load_balancing_loss
from qwen3_jax.sharding import ShardingRules, constrain
from train.config import StepConfig

Params = dict[str, Any]  # nnx pure dict: nested dicts of float32 arrays
Batch = dict[str, jax.Array]  # tokens, targets, loss_mask, segment_ids, positions: [B, T]


class Terms(NamedTuple):
    """One microbatch's contribution to an objective, returned by an `Objective`.

    loss_sum: the training loss summed over loss-mask tokens (divided by the global batch's
      loss-mask token count by the step, so accumulation gives the big batch's gradient).
    aux: the MoE load-balancing loss of this call (0 for dense models); averaged over microbatches.
    sums: per-token quantities summed over loss-mask tokens, reported as means (metrics only).
    """

    loss_sum: jax.Array
    aux: jax.Array
    sums: dict[str, jax.Array]


# objective(params, microbatch, frozen) -> Terms. `frozen` is a pytree the step passes through
# unchanged and never differentiates (a distillation teacher's parameters), or None.
Objective = Callable[[Params, Batch, Any], Terms]


def model_at(graphdef: nnx.GraphDef, params: Params, dtype: Any) -> Qwen3:
    """The model with `params` cast to the compute `dtype` (gradients flow back in their own dtype)."""
    dtype = jnp.dtype(dtype)
    return nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params))


def moe_aux(out: ForwardOutput, cfg: Qwen3Config) -> jax.Array:
    """The load-balancing loss of one forward pass (Qwen3 report); 0 for dense models."""
    return load_balancing_loss(out.router_stats) if cfg.is_moe else jnp.zeros((), jnp.float32)


def unembedding(model: Qwen3) -> jax.Array:
    """[D, V] output projection: the tied embedding's transpose or lm_head."""
    return model.embed[...].T if model.lm_head is None else model.lm_head[...]


def scan_vocab_chunks(
    fn: Callable[..., Any], weights: Sequence[jax.Array], arrays: Sequence[jax.Array], *, chunk_len: int,
    rules: ShardingRules,
) -> Any:
    """Sums of `fn(weights, *chunk)` over the sequence cut into chunks of `chunk_len` positions.

    `weights` are [D, V] projections; `arrays` are [B, T, ...], each passed to `fn` as its
    [B, C, ...] chunk. `fn` returns a pytree of float32 scalars (its chunk's sums); it is
    rematerialised, so its [B, C, V] logits exist one chunk at a time, forward and backward.
    Chunks cut the sequence axis, so each keeps the whole (sharded) batch and every data shard
    works on every chunk. Raises ValueError when `chunk_len` does not divide T.
    """
    B, T = arrays[0].shape[:2]
    C = min(chunk_len, T)
    if T % C:
        raise ValueError(f"ce_chunk_len={chunk_len} must divide the sequence length {T}")

    def chunks(x):  # [B, T, ...] -> [T / C, B, C, ...]
        return x.reshape(B, T // C, C, *x.shape[2:]).swapaxes(0, 1)

    chunk_fn = jax.checkpoint(fn)

    def body(carry, xs):
        return jax.tree.map(jnp.add, carry, chunk_fn(weights, *xs)), None

    # Gathered over the embed (fsdp) axes once, here: XLA does not hoist a loop-invariant all-gather
    # out of the scan, so the weight would be gathered for every chunk, forward and backward (at
    # 32,768-token rows, most of a step's collective bytes). The price: the [D, V / vocab shards]
    # weight and its gradient (in the weight's dtype) whole on every device. The gradient's
    # reduction over fsdp is XLA's to place: its TPU pipeline moves it out of the loop.
    weights = tuple(constrain(w, (None, "vocab"), rules) for w in weights)
    xs = tuple(chunks(x) for x in arrays)
    first = jax.eval_shape(chunk_fn, weights, *(x[0] for x in xs))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    sums, _ = jax.lax.scan(body, zeros, xs)
    return sums


def chunked_cross_entropy(
    hidden_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array, *,
    chunk_len: int, rules: ShardingRules,
) -> tuple[jax.Array, jax.Array]:
    """(sum of mask * CE, sum of mask * logsumexp^2) without materialising [B, T, V] logits
    (`scan_vocab_chunks`)."""
    vocab_V = jnp.arange(w_DxV.shape[1])

    def chunk_sums(weights, h_BxCxD, t_BxC, m_BxC):
        (w_DxV,) = weights
        logits_BxCxV = jnp.einsum("BCD,DV->BCV", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        logits_BxCxV = constrain(logits_BxCxV, ("batch", "seq", "act_vocab"), rules)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        # A select + sum rather than a gather: stays local when the vocab axis is sharded.
        target_BxC = jnp.sum(jnp.where(vocab_V == t_BxC[..., None], logits_BxCxV, 0.0), axis=-1)
        return jnp.sum(m_BxC * (lse_BxC - target_BxC)), jnp.sum(m_BxC * jnp.square(lse_BxC))

    return scan_vocab_chunks(chunk_sums, (w_DxV,), (hidden_BxTxD, targets_BxT, mask_BxT.astype(jnp.float32)),
                             chunk_len=chunk_len, rules=rules)


def lm_objective(
    params: Params, batch: Batch, frozen: None, *, graphdef: nnx.GraphDef, cfg: Qwen3Config, step_cfg: StepConfig,
) -> Terms:
    """Next-token cross-entropy (+ z-loss) over loss-mask tokens, + the MoE aux loss; the forward
    pass runs at the compute dtype (`model_at`)."""
    del frozen
    model = model_at(graphdef, params, cfg.dtype)
    out = model.forward(batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    ce_sum, z_sum = chunked_cross_entropy(
        out.hidden_BxTxD, unembedding(model), batch["targets"], batch["loss_mask"], chunk_len=step_cfg.ce_chunk_len,
        rules=cfg.rules,
    )
    aux = moe_aux(out, cfg)
    sums = {"loss": ce_sum, **({"z_loss": z_sum} if step_cfg.z_loss_coef else {})}
    return Terms(ce_sum + step_cfg.z_loss_coef * z_sum, aux, sums)
