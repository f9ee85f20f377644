"""The compiled update step: objective, optimizer, gradient accumulation, sharded train state.

Everything here is a pure function of static configs (frozen dataclasses, hashable) and arrays:

- Train state = float32 master params (an nnx pure dict) + optax state + step, each leaf sharded
  like the parameter it belongs to (`train_state_shardings`), created directly on the mesh.
- `update_step` is generic over an `Objective` (a loss summed over loss-mask tokens, the MoE aux
  loss, and per-token sums to report), with an optional frozen pytree passed through (a
  distillation teacher's parameters, `train.distill`). `lm_objective` is the language-modelling
  one: cross-entropy over loss-mask tokens, computed in sequence chunks so the [tokens, vocab]
  float32 logits never exist at once, + optional z-loss, + for MoE the load-balancing loss times
  `router_aux_loss_coef`. Token sums are normalised by the loss-mask token count of the whole
  global batch.
- Gradient accumulation scans over microbatches inside the step. Token-sum gradients are then
  exactly those of the big batch (sums divided by the global token count). The MoE aux loss is a
  ratio of router statistics, so it is computed per microbatch (over all data shards: the stats
  are sums the partitioner all-reduces) and averaged over microbatches; with one microbatch it is
  the global-batch load-balancing loss of the Qwen3 report.

Every function here that takes a mesh uses its `auto_mesh` twin, so a mesh from `jax.make_mesh`
(Explicit axes) gives the same step as one from `qwen3_jax.make_mesh`.

Shapes in names: B batch, T sequence, D hidden, V vocab, C chunk length, M microbatches.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen3_jax.config import Qwen3Config
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.moe import load_balancing_loss
from qwen3_jax.sharding import ShardingRules, auto_mesh, constrain, state_shardings

Params = dict[str, Any]  # nnx pure dict: nested dicts of float32 arrays
Batch = dict[str, jax.Array]  # tokens, targets, loss_mask, segment_ids, positions: [B, T]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, global-norm clipping, masked weight decay."""

    learning_rate: float  # peak, reached after warmup_steps
    warmup_steps: int
    decay_steps: int  # length of the whole schedule, warmup included (usually the run's steps)
    end_learning_rate_ratio: float  # final learning rate as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    no_decay: tuple[str, ...] = ("norm", "embed")  # regexes searched in "runs/0/attn/q_norm/weight"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    microbatches: int = 1  # gradient accumulation steps inside one compiled step
    ce_chunk_len: int = 512  # sequence positions per cross-entropy chunk (must divide seq_len)
    z_loss_coef: float = 0.0  # weight of mean(logsumexp(logits)^2) over loss tokens


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates applied so far
    params: Params
    opt_state: optax.OptState


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


# ----------------------------------------------------------------------------------- optimizer


def learning_rate_schedule(opt: OptimizerConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        decay_steps=opt.decay_steps,
        end_value=opt.learning_rate * opt.end_learning_rate_ratio,
    )


def param_path(path: tuple) -> str:
    """'runs/0/attn/q_norm/weight' for a jax key path into the params dict."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def weight_decay_mask(params: Params, no_decay: tuple[str, ...]) -> Params:
    """True where weight decay applies: every parameter whose path matches none of `no_decay`."""
    patterns = [re.compile(p) for p in no_decay]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(p.search(param_path(path)) for p in patterns), params
    )


def make_optimizer(opt: OptimizerConfig, cfg: Qwen3Config) -> optax.GradientTransformation:
    """The model config fixes the tree structure of the weight-decay mask."""
    adamw = optax.adamw(
        learning_rate_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps,
        weight_decay=opt.weight_decay, mask=weight_decay_mask(abstract_params(cfg), opt.no_decay),
    )
    if opt.max_grad_norm <= 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), adamw)


# --------------------------------------------------------------------------------- train state


def abstract_params(cfg: Qwen3Config) -> Params:
    return nnx.to_pure_dict(nnx.state(abstract_model(cfg)))


def params_shardings(cfg: Qwen3Config, mesh: Mesh) -> Params:
    _, abstract_state = nnx.split(abstract_model(cfg))
    return nnx.to_pure_dict(state_shardings(abstract_state, mesh, cfg.rules))


def train_state_shardings(cfg: Qwen3Config, opt: OptimizerConfig, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf: optimizer moments follow their parameter, scalars replicate."""
    mesh = auto_mesh(mesh)
    tx = make_optimizer(opt, cfg)
    params = params_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, P())
    opt_state = optax.tree_map_params(
        tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, abstract_params(cfg)), params,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(replicated, params, opt_state)


def abstract_train_state(cfg: Qwen3Config, opt: OptimizerConfig, mesh: Mesh) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target for a checkpoint on `mesh`."""
    tx = make_optimizer(opt, cfg)
    shapes = jax.eval_shape(
        lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p)), abstract_params(cfg)
    )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
        train_state_shardings(cfg, opt, mesh),
    )


@functools.cache
def _state_builders(cfg: Qwen3Config, opt: OptimizerConfig, mesh: Mesh):
    """(seed -> fresh state, params -> state), jitted once per (config, mesh)."""
    tx = make_optimizer(opt, cfg)
    shardings = train_state_shardings(cfg, opt, mesh)

    def from_params(p: Params) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))

    def fresh(seed: jax.Array) -> TrainState:
        return from_params(nnx.to_pure_dict(nnx.state(Qwen3(cfg, rngs=nnx.Rngs(jax.random.key(seed))))))

    return (
        jax.jit(fresh, out_shardings=shardings),
        jax.jit(from_params, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0),
    )


def init_train_state(
    cfg: Qwen3Config, opt: OptimizerConfig, mesh: Mesh, *, seed: int = 0, params: Params | None = None,
) -> TrainState:
    """Step 0 state built on the mesh: from `params` (consumed) or a fresh init from `seed`
    (the same values as `init_model(cfg, seed=seed)`)."""
    fresh, from_params = _state_builders(cfg, opt, auto_mesh(mesh))
    return fresh(jnp.int32(seed)) if params is None else from_params(params)


def batch_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    mesh = auto_mesh(mesh)
    return NamedSharding(mesh, rules.spec(("batch", "seq"), mesh.axis_names))


# -------------------------------------------------------------------------------------- loss


def chunked_cross_entropy(
    hidden_BxTxD: jax.Array, w_DxV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array, *,
    chunk_len: int, rules: ShardingRules,
) -> tuple[jax.Array, jax.Array]:
    """(sum of mask * CE, sum of mask * logsumexp^2) without materialising [B, T, V] logits.

    Chunks cut the sequence axis, so each keeps the whole (sharded) batch and every data shard
    works on every chunk. Each chunk is rematerialised: the backward pass recomputes its
    [B, C, V] float32 logits instead of keeping all of them alive.
    """
    B, T, _ = hidden_BxTxD.shape
    C = min(chunk_len, T)
    if T % C:
        raise ValueError(f"ce_chunk_len={chunk_len} must divide the sequence length {T}")
    vocab_V = jnp.arange(w_DxV.shape[1])

    def chunks(x):  # [B, T, ...] -> [T / C, B, C, ...]
        return x.reshape(B, T // C, C, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_sums(w_DxV, h_BxCxD, t_BxC, m_BxC):
        logits_BxCxV = jnp.einsum("BCD,DV->BCV", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
        logits_BxCxV = constrain(logits_BxCxV, ("batch", "seq", "act_vocab"), rules)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        # A select + sum rather than a gather: stays local when the vocab axis is sharded.
        target_BxC = jnp.sum(jnp.where(vocab_V == t_BxC[..., None], logits_BxCxV, 0.0), axis=-1)
        return jnp.sum(m_BxC * (lse_BxC - target_BxC)), jnp.sum(m_BxC * jnp.square(lse_BxC))

    def body(carry, xs):
        ce, z = chunk_sums(w_DxV, *xs)
        return (carry[0] + ce, carry[1] + z), None

    # Gathered over the embed (fsdp) axes once, here: XLA does not hoist a loop-invariant all-gather
    # out of the scan, so the weight would be gathered for every chunk, forward and backward (at
    # 32,768-token rows, most of a step's collective bytes). The price: the [D, V / vocab shards]
    # weight and its gradient (in the weight's dtype) whole on every device. The gradient's
    # reduction over fsdp is XLA's to place: its TPU pipeline moves it out of the loop.
    w_DxV = constrain(w_DxV, (None, "vocab"), rules)
    zero = jnp.zeros((), jnp.float32)
    xs = (chunks(hidden_BxTxD), chunks(targets_BxT), chunks(mask_BxT.astype(jnp.float32)))
    (ce_sum, z_sum), _ = jax.lax.scan(body, (zero, zero), xs)
    return ce_sum, z_sum


def lm_objective(
    params: Params, batch: Batch, frozen: None, *, graphdef: nnx.GraphDef, cfg: Qwen3Config, step_cfg: StepConfig,
) -> Terms:
    """Next-token cross-entropy (+ z-loss) over loss-mask tokens; params cast to the compute dtype
    for the forward pass (gradients flow back in float32)."""
    del frozen
    dtype = jnp.dtype(cfg.dtype)
    model: Qwen3 = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(dtype), params))
    out = model.forward(batch["tokens"], positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    ce_sum, z_sum = chunked_cross_entropy(
        out.hidden_BxTxD, unembedding(model), batch["targets"], batch["loss_mask"], chunk_len=step_cfg.ce_chunk_len,
        rules=cfg.rules,
    )
    aux = load_balancing_loss(out.router_stats) if cfg.is_moe else jnp.zeros((), jnp.float32)
    sums = {"loss": ce_sum, **({"z_loss": z_sum} if step_cfg.z_loss_coef else {})}
    return Terms(ce_sum + step_cfg.z_loss_coef * z_sum, aux, sums)


def unembedding(model: Qwen3) -> jax.Array:
    """[D, V] output projection: the tied embedding's transpose or lm_head."""
    return model.embed[...].T if model.lm_head is None else model.lm_head[...]


def split_microbatches(x_BxT: jax.Array, m: int) -> jax.Array:
    """[B, ...] -> [M, B / M, ...], microbatch i = rows i, i + M, i + 2M, ...

    Strided rather than contiguous: each device's block of rows contributes B / M / shards rows
    to every microbatch, so slicing one out needs no communication.
    """
    return x_BxT.reshape(x_BxT.shape[0] // m, m, *x_BxT.shape[1:]).swapaxes(0, 1)


# -------------------------------------------------------------------------------------- step


def update_step(
    state: TrainState, batch: Batch, frozen: Any, *, objective: Objective, cfg: Qwen3Config, microbatches: int,
    tx: optax.GradientTransformation, schedule: optax.Schedule, params_sharding: Params,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of `objective` over `batch` ([B, ...] arrays with a `loss_mask`).

    Metrics: each of the objective's `sums` divided by the global loss-mask token count,
    `grad_norm`, `learning_rate`, `loss_tokens`, and `aux_loss` for MoE models.
    """
    M = microbatches
    loss_tokens = jnp.sum(batch["loss_mask"])  # over the global batch
    num_tokens = jnp.maximum(loss_tokens, 1.0)

    def loss_fn(params, mb):
        terms = objective(params, mb, frozen)
        return terms.loss_sum / num_tokens + cfg.router_aux_loss_coef * terms.aux / M, terms

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if M == 1:
        grads, terms = grad_fn(state.params, batch)
    else:
        def accumulate(acc, mb):
            mb = {k: constrain(v, ("batch", "seq"), cfg.rules) for k, v in mb.items()}
            g, t = grad_fn(state.params, mb)
            g = jax.lax.with_sharding_constraint(g, params_sharding)
            return jax.tree.map(jnp.add, acc, (g, t)), None

        init = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[: x.shape[0] // M], batch))
        init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), init)
        (grads, terms), _ = jax.lax.scan(accumulate, init, jax.tree.map(lambda x: split_microbatches(x, M), batch))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {name: value / num_tokens for name, value in terms.sums.items()}
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step), loss_tokens=loss_tokens)
    if cfg.is_moe:
        metrics["aux_loss"] = terms.aux / M
    return TrainState(state.step + 1, params, opt_state), metrics


def compile_update(
    objective: Objective, cfg: Qwen3Config, microbatches: int, opt: OptimizerConfig, mesh: Mesh,
    frozen_shardings: Any = None,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`update_step` jitted with explicit shardings: the state (donated) as the trainer shards it,
    every batch array split over the batch axes, `frozen` as `frozen_shardings` (not donated).
    The returned function runs under `mesh` (an Explicit-axes mesh is used as its `auto_mesh`
    twin); `.jitted` is the jax.jit object (for AOT lowering under `jax.set_mesh(mesh)`)."""
    mesh = auto_mesh(mesh)
    tx = make_optimizer(opt, cfg)
    shardings = train_state_shardings(cfg, opt, mesh)
    step = jax.jit(
        functools.partial(
            update_step, objective=objective, cfg=cfg, microbatches=microbatches, tx=tx,
            schedule=learning_rate_schedule(opt), params_sharding=shardings.params,
        ),
        in_shardings=(shardings, batch_sharding(mesh, cfg.rules), frozen_shardings),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )

    def run(state: TrainState, batch: Batch, frozen: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
        with jax.set_mesh(mesh):
            return step(state, batch, frozen)

    run.jitted = step
    return run


def make_train_step(
    cfg: Qwen3Config, step_cfg: StepConfig, opt: OptimizerConfig, mesh: Mesh,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted language-modelling step (`lm_objective`); it donates the old state and runs
    under `mesh`. Cached, so asking again for the same configs and mesh reuses the compiled step."""
    return _make_train_step(cfg, step_cfg, opt, auto_mesh(mesh))


@functools.cache
def _make_train_step(cfg: Qwen3Config, step_cfg: StepConfig, opt: OptimizerConfig, mesh: Mesh):
    graphdef, _ = nnx.split(abstract_model(cfg))
    objective = functools.partial(lm_objective, graphdef=graphdef, cfg=cfg, step_cfg=step_cfg)
    return compile_update(objective, cfg, step_cfg.microbatches, opt, mesh)
