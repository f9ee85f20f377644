"""Logical axis names -> mesh axes, in one table, plus mesh construction.

Mesh axes are Auto: parameters get NamedShardings at jit boundaries, activations are pinned by
`constrain`, and the MoE block and embedding lookup use `jax.shard_map`. The model reads the mesh
installed by `jax.set_mesh` (none: every constraint is a no-op). Public functions taking a mesh
convert it with `auto_mesh`; a mesh installed around a model call must have Auto axes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert")

Logical = tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Maps each logical dimension name to the mesh axes it is split over (hashable, static).

    Mesh axes absent from the current mesh are dropped, so the same rules serve any mesh that has
    a subset of data / fsdp / tensor / expert.
    """

    table: tuple[tuple[str, tuple[str, ...]], ...] = (
        # activations
        ("batch", ("data", "fsdp", "expert")),
        ("seq", ()),
        ("act_embed", ()),
        ("act_heads", ("tensor",)),
        ("act_kv_heads", ("tensor",)),
        ("act_mlp", ("tensor",)),
        ("act_vocab", ("tensor",)),
        ("cache_seq", ()),
        # parameters
        ("layers", ()),
        ("vocab", ("tensor",)),
        ("embed", ("fsdp",)),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("head_dim", ()),
        ("mlp", ("tensor",)),
        ("experts", ("expert",)),
        ("moe_mlp", ("tensor",)),
        ("router_experts", ()),
        ("norm", ()),
    )

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        for name, axes in self.table:
            if name == logical:
                return axes
        raise KeyError(f"no sharding rule for logical axis {logical!r}")

    def spec(self, logical: Logical, mesh_axis_names: Sequence[str]) -> P:
        """PartitionSpec for `logical` on a mesh with `mesh_axis_names`; raises on collisions."""
        used: dict[str, str | None] = {}
        parts = []
        for name in logical:
            axes = tuple(a for a in self.mesh_axes(name) if a in mesh_axis_names)
            for a in axes:
                if a in used:
                    raise ValueError(
                        f"mesh axis {a!r} is used by both logical axes {used[a]!r} and {name!r} in {logical}"
                    )
                used[a] = name
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*parts)


_MESH_HOWTO = (
    "build one with qwen3_jax.make_mesh({'data': 2, 'tensor': 4}) or "
    "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))"
)


def auto_mesh(mesh: Mesh | None) -> Mesh | None:
    """`mesh` with every axis Auto: the same devices, axis names and shape (None stays None).

    `jax.make_mesh` makes Explicit axes, under which this library's gathers and constraints are
    type errors; every public function that takes a mesh calls this first. Raises TypeError for
    something that is not a `jax.sharding.Mesh` and ValueError for axis names outside MESH_AXES.
    """
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh ({_MESH_HOWTO}), got {type(mesh).__name__}")
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not qwen3-jax mesh axes (allowed: {MESH_AXES}); {_MESH_HOWTO}")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def current_mesh_axes() -> tuple[str, ...]:
    """Axis names of the mesh installed by `jax.set_mesh`, or () when running unsharded.

    Raises ValueError for an installed mesh with Explicit axes, which the model is not written for.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    if any(t == AxisType.Explicit for t in mesh.axis_types):
        raise ValueError(
            "the mesh installed with jax.set_mesh has Explicit axes (jax.make_mesh's default); qwen3-jax "
            "needs Auto axes: install qwen3_jax.sharding.auto_mesh(mesh) instead"
        )
    return tuple(mesh.axis_names)


def target_platform() -> str:
    """The platform ("cpu", "gpu", "tpu") the code being traced will run on: that of the mesh installed
    with `jax.set_mesh` (so compiling ahead of time for a TPU slice from a CPU host picks TPU kernels),
    else `jax.default_backend()`."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def constrain(x: jax.Array, logical: Logical, rules: ShardingRules) -> jax.Array:
    """Pins an activation's sharding by logical names; identity with no mesh installed."""
    names = current_mesh_axes()
    if not names:
        return x
    return jax.lax.with_sharding_constraint(x, rules.spec(logical, names))


def make_mesh(shape: dict[str, int] | Mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds an Auto-axes mesh from `{axis: size}`; -1 once means 'all remaining devices'.

    Axes of size 1 are kept so rules still resolve; unknown names and sizes that do not divide the
    device count are errors. Given a `Mesh` (e.g. from `jax.make_mesh`), returns `auto_mesh(mesh)`.
    """
    if isinstance(shape, Mesh):
        if devices is not None:
            raise ValueError("devices cannot be given with a Mesh: the mesh already has its devices")
        return auto_mesh(shape)
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; allowed: {MESH_AXES}")
    names = [a for a in MESH_AXES if a in shape]
    sizes = [int(shape[a]) for a in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {shape} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    total = math.prod(sizes)
    if total > len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {total} devices but only {len(devices)} exist")
    if total < len(devices):
        devices = devices[:total]
    try:
        dev_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        dev_array = np.asarray(devices).reshape(sizes)
    return Mesh(dev_array, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Joins this process to a multi-process job (`jax.distributed.initialize`); a no-op when it
    has joined already, so nested entry points (distillation's SFT phase) may each call it.

    On Cloud TPU, SLURM and Open MPI every argument is discovered; elsewhere (a GPU cluster, or
    several CPU processes on one machine) give `coordinator_address` ('host:port' where process
    0 listens), `num_processes` and this process's `process_id` in [0, num_processes). Must run
    before anything touches the devices; CPU processes exchange collectives over gloo (jax's
    default `jax_cpu_collectives_implementation`).
    """
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def to_host(tree):
    """Every array of `tree` whole, as numpy, on every process.

    An array sharded over several processes (not fully addressable) cannot be read with
    `np.asarray`; it is all-gathered with `multihost_utils.process_allgather`, a collective that
    every process must call, in the same order. Fully addressable arrays are copied locally.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def state_shardings(state, mesh: Mesh, rules: ShardingRules):
    """NamedShardings for every parameter of an nnx State (abstract or concrete) on `auto_mesh(mesh)`."""
    # Not nnx.get_named_sharding: Flax 0.12.8's rule lookup keeps mesh axes the mesh lacks and never reports collisions.
    mesh = auto_mesh(mesh)

    def one(v):
        return NamedSharding(mesh, rules.spec(tuple(v.get_metadata()["axes"]), mesh.axis_names))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
