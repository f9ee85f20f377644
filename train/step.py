"""The compiled update step: sharded train state, optimizer, gradient accumulation, `update_step`.

Train state = float32 master params + optax state + step, each leaf sharded like its parameter.
`update_step` differentiates any `objectives.Objective`; token sums are normalised by the global
batch's loss-mask token count, so accumulating microbatches (a scan inside the step) gives the big
batch's gradient, while the MoE aux loss (a ratio of router statistics) is averaged over them.
A mesh from `jax.make_mesh` (Explicit axes) gives the same step as its `auto_mesh` twin.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen3_jax.config import Qwen3Config
from qwen3_jax.model import Qwen3, abstract_model, abstract_params
from qwen3_jax.sharding import ShardingRules, auto_mesh, constrain
from train.config import OptimizerConfig, StepConfig
from train.objectives import Batch, Objective, Params, lm_objective


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: updates applied so far
    params: Params
    opt_state: optax.OptState


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


def params_shardings(cfg: Qwen3Config, mesh: Mesh) -> Params:
    """Each parameter's NamedSharding on `mesh`, as the rule table places it."""
    return jax.tree.map(lambda x: x.sharding, abstract_params(cfg, mesh))


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


def init_train_state(
    cfg: Qwen3Config, opt: OptimizerConfig, mesh: Mesh, *, seed: int = 0, params: Params | None = None,
) -> TrainState:
    """Step 0 state built on the mesh: from `params` (consumed) or a fresh init from `seed`
    (the same values as `init_model(cfg, seed=seed)`)."""
    mesh = auto_mesh(mesh)
    tx = make_optimizer(opt, cfg)
    shardings = train_state_shardings(cfg, opt, mesh)

    def from_params(p: Params) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))

    if params is not None:
        return jax.jit(from_params, in_shardings=(shardings.params,), out_shardings=shardings,
                       donate_argnums=0)(params)

    def fresh(seed: jax.Array) -> TrainState:
        return from_params(nnx.to_pure_dict(nnx.state(Qwen3(cfg, rngs=nnx.Rngs(jax.random.key(seed))))))

    return jax.jit(fresh, out_shardings=shardings)(jnp.int32(seed))


def batch_sharding(mesh: Mesh, rules: ShardingRules) -> NamedSharding:
    mesh = auto_mesh(mesh)
    return NamedSharding(mesh, rules.spec(("batch", "seq"), mesh.axis_names))


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
    prepare: Callable[[Batch], Batch] | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update of `objective` over `batch` ([B, ...] arrays with a `loss_mask`).

    `prepare(batch) -> batch` runs on the whole global batch before the microbatch split, e.g. to
    add per-token loss weights whose normaliser is the global batch's (RL's per-sequence means).
    Metrics: each of the objective's `sums` divided by the global loss-mask token count,
    `grad_norm`, `learning_rate`, `loss_tokens`, and `aux_loss` for MoE models.
    """
    M = microbatches
    if prepare is not None:
        batch = prepare(batch)
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
    frozen_shardings: Any = None, prepare: Callable[[Batch], Batch] | None = None,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """`update_step` jitted with explicit shardings: the state (donated) as the trainer shards it,
    every batch array split over the batch axes, `frozen` as `frozen_shardings` (not donated),
    `prepare` as `update_step` takes it.
    The returned function runs under `mesh` (an Explicit-axes mesh is used as its `auto_mesh`
    twin); `.jitted` is the jax.jit object (for AOT lowering under `jax.set_mesh(mesh)`)."""
    mesh = auto_mesh(mesh)
    tx = make_optimizer(opt, cfg)
    shardings = train_state_shardings(cfg, opt, mesh)
    step = jax.jit(
        functools.partial(
            update_step, objective=objective, cfg=cfg, microbatches=microbatches, tx=tx,
            schedule=learning_rate_schedule(opt), params_sharding=shardings.params, prepare=prepare,
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
    """The jitted language-modelling step (`objectives.lm_objective`); it donates the old state
    and runs under `mesh`. Each call compiles anew: keep the returned step for the run."""
    graphdef, _ = nnx.split(abstract_model(cfg))
    objective = functools.partial(lm_objective, graphdef=graphdef, cfg=cfg, step_cfg=step_cfg)
    return compile_update(objective, cfg, step_cfg.microbatches, opt, mesh)
