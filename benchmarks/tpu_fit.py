"""Ahead-of-time compile for a TPU slice from a CPU host, to show a preset fits in HBM.

Needs `jax[tpu]` of the same jax version (it brings libtpu; no TPU is used):

    python -m benchmarks.tpu_fit --preset qwen3-8b --topology v5p:2x2x2 --mesh fsdp=8 --batch 8 --length 4096
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh, NamedSharding

from benchmarks.common import report
from qwen3_jax.config import preset
from qwen3_jax.model import abstract_model
from qwen3_jax.sharding import state_shardings


# Published HBM per chip (memory_stats is only available on attached devices).
HBM_GIB = {"v5 lite": 16, "v5e": 16, "v5": 95, "v6": 32, "v4": 32}  # first match wins; "TPU v5" is v5p


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-8b")
    parser.add_argument("--topology", default="v5p:2x2x2")
    parser.add_argument("--mesh", default="fsdp=8", help="comma-separated axis=size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()

    topo = topologies.get_topology_desc(args.topology, platform="tpu")
    shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
    mesh = Mesh(np.asarray(topo.devices).reshape(list(shape.values())), tuple(shape), axis_types=(AxisType.Auto,) * len(shape))
    cfg = preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", remat=args.remat)
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = state_shardings(state, mesh, cfg.rules)
    abstract = jax.tree.map(lambda s, v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), shardings, state,
                            is_leaf=lambda x: isinstance(x, NamedSharding))
    tokens = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32,
                                  sharding=NamedSharding(mesh, cfg.rules.spec(("batch", None), mesh.axis_names)))

    def loss(params, tokens_BxT):
        model = nnx.merge(graphdef, params)
        hidden = model.forward(tokens_BxT).hidden_BxTxD
        return jnp.mean(jnp.square(hidden.astype(jnp.float32)))  # a scalar through the full stack

    with jax.set_mesh(mesh):
        # Gradients sharded like the parameters, as a train step would keep them.
        step = jax.jit(jax.value_and_grad(loss), out_shardings=(NamedSharding(mesh, jax.sharding.PartitionSpec()), shardings))
        compiled = step.lower(abstract, tokens).compile()
    mem = compiled.memory_analysis()
    per_device = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    kind = topo.devices[0].device_kind
    hbm_gib = next((v for k, v in HBM_GIB.items() if k in kind.lower()), None)
    report(f"tpu_fit_{args.preset}", {
        "what": f"{args.preset} bf16 forward+backward (remat={args.remat}), batch {args.batch} x {args.length}, "
                f"mesh {shape} on {args.topology}",
        "argument_gib_per_device": mem.argument_size_in_bytes / 2**30,
        "temp_gib_per_device": mem.temp_size_in_bytes / 2**30,
        "output_gib_per_device": mem.output_size_in_bytes / 2**30,
        "total_gib_per_device": per_device / 2**30,
        "device_kind": kind,
        "hbm_gib": hbm_gib,
        "fraction_of_hbm": None if hbm_gib is None else per_device / 2**30 / hbm_gib,
    })


if __name__ == "__main__":
    main()
