"""Orbax checkpoints of a model's parameters, and loading whichever checkpoint format a path holds.

A qwen3-jax checkpoint directory holds:

    params/          Orbax (OCDBT) tree of the parameters, the nested dict of `nnx.state(model, nnx.Param)`
    config.json      the architecture in Hugging Face form, so one config reader serves both formats
    qwen3_jax.json   runtime fields HF config.json has no place for (dtypes, scan, remat, MoE kernel)

Tensors are stored whole (Orbax records only how they were sharded), and each one is restored
straight into the shards of its target sharding, so a checkpoint written on 8 devices loads on any
mesh, or on one device, without a host copy of the model. Training state (optimizer, data
iterator, step) lives in the trainer's own checkpoints.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from qwen3_jax.config import Qwen3Config, from_hf_config, to_hf_config
from qwen3_jax.hf import CheckpointError, from_hf
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.sharding import auto_mesh, state_shardings

PARAMS_DIR = "params"
MARKER = "qwen3_jax.json"  # written last: its presence means the checkpoint is complete
FORMAT_VERSION = 1
RUNTIME_FIELDS = ("scan_layers", "remat", "moe_impl", "dtype", "param_dtype")


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MARKER)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    return (
        os.path.isdir(path)
        and os.path.isfile(os.path.join(path, "config.json"))
        and any(name.endswith(".safetensors") for name in os.listdir(path))
    )


def save_model(model: Qwen3, path: str | os.PathLike) -> None:
    """Writes the parameters and config of `model` to the directory `path` (created if needed).

    Every process of a multi-host job must call it (Orbax writes each host's shards); returns once
    the data is on disk.
    """
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, PARAMS_DIR)) or os.path.exists(os.path.join(path, MARKER)):
        raise FileExistsError(f"{path} already holds a checkpoint; save to a new directory")
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        cfg = model.cfg
        _write_json(os.path.join(path, "config.json"), to_hf_config(cfg))
        runtime = {name: getattr(cfg, name) for name in RUNTIME_FIELDS}
        _write_json(os.path.join(path, MARKER), {"format_version": FORMAT_VERSION, "runtime": runtime})


def load_config(path: str | os.PathLike, **config_overrides: Any) -> Qwen3Config:
    """The config a checkpoint was saved with; `config_overrides` replace fields of it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not is_orbax_checkpoint(path):
        hint = " (it is a Hugging Face checkpoint: use from_hf or load_any)" if is_hf_checkpoint(path) else ""
        raise CheckpointError(f"{path} is not a qwen3-jax checkpoint: no {MARKER} and {PARAMS_DIR}/{hint}")
    with open(os.path.join(path, MARKER)) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{os.path.join(path, MARKER)} has format_version {meta.get('format_version')!r}; "
            f"this code reads version {FORMAT_VERSION}"
        )
    return from_hf_config(path, **{**meta["runtime"], **config_overrides})


def load_model(
    path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype=None, **config_overrides: Any
) -> Qwen3:
    """Restores a checkpoint written by `save_model`, each parameter directly in its sharding on `mesh`.

    Without a mesh the parameters go to the first device. `dtype` sets both the parameter and the
    compute dtype (as in `from_hf`); by default both are what the model was saved with. A mesh with
    Explicit axes (jax.make_mesh) is used as its `auto_mesh` twin.
    """
    mesh = auto_mesh(mesh)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        config_overrides = {"param_dtype": name, "dtype": name, **config_overrides}
    cfg = load_config(path, **config_overrides)
    graphdef, state = nnx.split(abstract_model(cfg))
    abstract = nnx.to_pure_dict(state)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, abstract)
    else:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh, cfg.rules))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

    params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckptr:
        _check_shapes(ckptr.metadata(params_dir).item_metadata, target, params_dir)
        restored = ckptr.restore(params_dir, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def load_any(
    path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype=None, **config_overrides: Any
) -> Qwen3:
    """Loads a qwen3-jax checkpoint or a Hugging Face one, whichever `path` holds.

    `dtype=None` keeps a qwen3-jax checkpoint's saved dtypes and loads HF weights as float32.
    """
    path = os.fspath(path)
    if is_orbax_checkpoint(path):
        return load_model(path, mesh=mesh, dtype=dtype, **config_overrides)
    if is_hf_checkpoint(path):
        return from_hf(path, mesh=mesh, dtype=jnp.float32 if dtype is None else dtype, **config_overrides)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    raise CheckpointError(
        f"{path} is neither a qwen3-jax checkpoint ({MARKER} + {PARAMS_DIR}/) nor a Hugging Face "
        "checkpoint (config.json + *.safetensors)"
    )


# ------------------------------------------------------------------------------- helpers


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _flat(tree) -> dict[str, Any]:
    """Leaves by slash-joined path; dict keys may come back from Orbax metadata as strings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _check_shapes(saved_tree, target, where: str) -> None:
    """Names the parameters whose presence or shape differs, before Orbax fails less clearly."""
    saved, wanted = _flat(saved_tree), _flat(target)
    missing, unexpected = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not match the config: missing parameters {missing}, unexpected parameters {unexpected}"
        )
    for name, want in wanted.items():
        if tuple(saved[name].shape) != tuple(want.shape):
            raise CheckpointError(
                f"parameter {name} has shape {list(saved[name].shape)} in {where} but the config needs "
                f"{list(want.shape)}"
            )
