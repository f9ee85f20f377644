"""Compiles the train step and the engine's prefill and decode of presets on 8-CPU-device meshes.

Run as a fresh process by tests/test_sharding_hlo.py, which reads XLA's warnings from its stderr:

    python tests/helpers/compile_on_meshes.py tiny-moe:data=2,expert=2,tensor=2 ...

Each case prints `CASE <name>:<mesh>` to stderr before compiling, so the warnings can be told
apart; a first case, `canary`, compiles a reshard XLA can only do by full rematerialisation, to
show its warnings reach stderr. Layers are cut to one (the sharding of a layer does not depend on
their number) and XLA:CPU codegen runs unoptimised: only the SPMD partitioning is under test.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = " ".join([
    "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
])
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"  # warnings on, info off
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from infer.engine import Engine  # noqa: E402
from qwen3_jax import make_mesh, preset  # noqa: E402
from qwen3_jax.model import abstract_model  # noqa: E402
from qwen3_jax.sharding import state_shardings  # noqa: E402
from train import step as step_lib  # noqa: E402
from train.config import OptimizerConfig, StepConfig  # noqa: E402

OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, decay_steps=10, end_learning_rate_ratio=0.1)
BATCH, SEQ = 8, 32


def canary() -> None:
    """The reshard of issue 14's report: D split over `tensor` to batch split over data x expert."""
    def reshard(x):
        x = jnp.sin(jax.lax.with_sharding_constraint(x, P(None, None, "tensor")))
        return jax.lax.with_sharding_constraint(x, P(("data", "expert"), None, None))

    with jax.set_mesh(make_mesh({"data": 2, "expert": 2, "tensor": 2})):
        jax.jit(reshard).lower(jax.ShapeDtypeStruct((4, 37, 64), jnp.float32)).compile()


def compile_case(name: str, mesh_shape: dict[str, int]) -> None:
    cfg = preset(name, num_layers=1, **({"moe_impl": "ragged_dot"} if preset(name).is_moe else {}))
    mesh = make_mesh(mesh_shape)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=step_lib.batch_sharding(mesh, cfg.rules))
    batch = {k: jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32 if k == "loss_mask" else jnp.int32,
                                     sharding=tokens.sharding)
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    train_step = step_lib.make_train_step(cfg, StepConfig(ce_chunk_len=SEQ), OPT, mesh)
    with jax.set_mesh(mesh):
        train_step.jitted.lower(step_lib.abstract_train_state(cfg, OPT, mesh), batch, None).compile()

    # Zero parameters placed by the rules (no init to compile); the engine compiles and runs its
    # prefill and its decode loop once.
    graphdef, state = nnx.split(abstract_model(cfg))
    params = jax.tree.map(lambda s, v: jax.device_put(np.zeros(v.shape, v.dtype), s),
                          state_shardings(state, mesh, cfg.rules), state,
                          is_leaf=lambda x: isinstance(x, NamedSharding))
    Engine(nnx.merge(graphdef, params), mesh=mesh, forced_ids=[1]).generate(
        [[5, 6, 7]], max_new_tokens=2, temperature=0.0, stop_token_ids=[0])


def main(cases: list[str]) -> None:
    print("CASE canary", file=sys.stderr, flush=True)
    canary()
    for case in cases:
        name, mesh_text = case.split(":")
        print(f"CASE {case}", file=sys.stderr, flush=True)
        compile_case(name, {k: int(v) for k, v in (kv.split("=") for kv in mesh_text.split(","))})
    print("CASE done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
