"""Saving and loading model checkpoints, and loading whichever format a path holds.

Formats read: Hugging Face (config.json + *.safetensors), qwen3-jax (`save_model`: params/ as an
Orbax tree, config.json, qwen3_jax.json for the runtime fields) and the trainer's step folders
(`qwen3_jax.layout`; their params only). Parameters are restored straight into their shardings on
any mesh. Block-wise reading and writing, for models larger than host memory, is `qwen3_jax.stream`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from qwen3_jax.config import Qwen3Config
from qwen3_jax.errors import CheckpointError
from qwen3_jax.hf import from_hf, stacked_dims
from qwen3_jax.hf_config import from_hf_config, to_hf_config
from qwen3_jax.layout import TRAINER_CHECKPOINTS, TRAINER_MODEL_CONFIG, TRAINER_STATE, trainer_steps
from qwen3_jax.model import Qwen3, abstract_model, abstract_params

PARAMS_DIR = "params"
MARKER = "qwen3_jax.json"  # written last: its presence means the checkpoint is complete
FORMAT_VERSION = 1
RUNTIME_FIELDS = ("scan_layers", "remat", "moe_impl", "moe_chunk_tokens", "dtype", "param_dtype", "attention",
                  "attention_block_q", "attention_block_kv")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # formats never read
FORMAT_HELP = (
    f"a Hugging Face checkpoint (config.json + *.safetensors), a qwen3-jax checkpoint ({MARKER} + "
    f"{PARAMS_DIR}/) or a trainer checkpoint (a workdir, its {TRAINER_CHECKPOINTS}/ directory or one step folder)"
)
# Storage chunks never span two layers or two experts, nor exceed this: the unit of block-wise I/O.
CHUNK_BYTES = 256 << 20


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
    path = new_checkpoint_dir(path)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), params, save_args=save_args(model.cfg, params))
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        write_model_files(model.cfg, path)


def new_checkpoint_dir(path: str | os.PathLike) -> str:
    """`path` made absolute and created. Raises FileExistsError if it already holds a checkpoint."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, PARAMS_DIR)) or os.path.exists(os.path.join(path, MARKER)):
        raise FileExistsError(f"{path} already holds a checkpoint; save to a new directory")
    os.makedirs(path, exist_ok=True)
    return path


def save_args(cfg: Qwen3Config, params: dict) -> dict:
    """Per parameter, chunks of one layer (and one expert) of a stacked parameter, each at most
    CHUNK_BYTES, so that block-wise readers (`qwen3_jax.stream.open_params`) read each chunk once."""
    def args(keypath, _):
        path = tuple(k.key for k in keypath)
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=tuple(range(stacked_dims(path, cfg))))

    return jax.tree_util.tree_map_with_path(args, params)


def write_model_files(cfg: Qwen3Config, path: str) -> None:
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
    try:
        with open(os.path.join(path, MARKER)) as f:
            meta = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise CheckpointError(f"{os.path.join(path, MARKER)} is not JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("runtime"), dict):
        raise CheckpointError(f"{os.path.join(path, MARKER)} must be a JSON object with a 'runtime' object")
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
    cfg = load_config(path, **dtype_overrides(dtype, config_overrides))
    params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)

    def restore(target):
        check_shapes(saved_params("orbax", params_dir), target, params_dir)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(params_dir, target)

    return _restore_model(cfg, mesh, restore)


def load_any(
    path: str | os.PathLike, *, step: int | None = None, mesh: jax.sharding.Mesh | None = None, dtype=None,
    **config_overrides: Any,
) -> Qwen3:
    """Loads the checkpoint at `path`, whichever format it holds (see `locate_checkpoint`).

    A trainer checkpoint yields its params only (no optimizer state): from its latest step, or
    from `step` when given (a trainer workdir or `checkpoints/` directory only). Parameters go
    straight into their shardings on `mesh` (the first device without one). `dtype` sets both the
    parameter and the compute dtype; `dtype=None` keeps a qwen3-jax checkpoint's saved dtypes and
    loads the other two formats as float32: HF weights are upcast, and a trainer's weights are
    its float32 master copy whatever compute dtype the run used (that is a training choice, and
    the saved model_config does not record it).

    Raises FileNotFoundError for a missing directory and CheckpointError for a directory in none
    of the formats, a `step` that is not saved (naming the saved ones) or parameters that do not
    match the config.
    """
    fmt, weights_dir = locate_checkpoint(path, step=step)
    if fmt == "orbax":
        return load_model(weights_dir, mesh=mesh, dtype=dtype, **config_overrides)
    if fmt == "hf":
        return from_hf(weights_dir, mesh=mesh, dtype=jnp.float32 if dtype is None else dtype, **config_overrides)
    cfg = load_any_config(weights_dir, **dtype_overrides(jnp.float32 if dtype is None else dtype, config_overrides))
    state_dir = os.path.abspath(os.path.join(weights_dir, TRAINER_STATE))  # Orbax takes absolute paths only

    def restore(target):
        check_shapes(saved_params("trainer", state_dir), target, state_dir)
        return ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
            partial_restore=True,  # the params only, not the optimizer state
        ))["params"]

    return _restore_model(cfg, mesh, restore)


def saved_params(fmt: str, directory: str):
    """The tree of parameter metadata (shapes) an Orbax `directory` holds: a qwen3-jax params/
    directory, or a trainer's state/ (whose params subtree it is)."""
    if fmt == "orbax":
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.metadata(directory).item_metadata
    # The handler's metadata: the checkpointer's would look for a step-level file in state/.
    return ocp.PyTreeCheckpointHandler().metadata(pathlib.Path(directory)).tree["params"]


def load_any_config(path: str | os.PathLike, *, step: int | None = None, **config_overrides: Any) -> Qwen3Config:
    """The config of the checkpoint at `path`, whichever format it holds (see `load_any`);
    `config_overrides` replace fields of it. A trainer checkpoint's runtime fields default to
    float32 and the other `Qwen3Config` defaults."""
    fmt, weights_dir = locate_checkpoint(path, step=step)
    if fmt == "orbax":
        return load_config(weights_dir, **config_overrides)
    if fmt == "hf":
        return from_hf_config(weights_dir, **config_overrides)
    item = os.path.join(weights_dir, TRAINER_MODEL_CONFIG)
    try:
        hf_config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item)
    except Exception as e:  # Orbax and json raise many types; each means the item is unreadable
        raise CheckpointError(f"{item} cannot be read: {type(e).__name__}: {e}") from e
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{item} holds a {type(hf_config).__name__}, not a config.json object")
    return from_hf_config(hf_config, **config_overrides)


def locate_checkpoint(path: str | os.PathLike, *, step: int | None = None) -> tuple[str, str]:
    """The format of the checkpoint at `path` and the directory holding its weights.

    Returns ("hf", path), ("orbax", path) or ("trainer", step folder): for a trainer workdir or
    its `checkpoints/` directory, the folder of `step`, or of the latest step when `step` is None.
    Raises FileNotFoundError if `path` is not a directory, and CheckpointError if it holds none of
    the formats, if a `checkpoints/` directory holds no saved step, if `step` is not saved (the
    message lists the saved steps), or if `step` is given for a checkpoint that has no steps.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    for fmt, found in (("orbax", is_orbax_checkpoint(path)), ("hf", is_hf_checkpoint(path))):
        if found:
            if step is not None:
                raise CheckpointError(f"step={step} picks a step of a trainer checkpoint, but {path} is a {fmt} checkpoint")
            return fmt, path
    if os.path.isdir(os.path.join(path, TRAINER_STATE)):  # one step folder
        if step is not None and os.path.basename(os.path.abspath(path)) != str(step):
            raise CheckpointError(
                f"{path} is one step folder; step={step} names another (pass the workdir or its "
                f"{TRAINER_CHECKPOINTS}/ directory to choose a step)"
            )
        return "trainer", path
    root = os.path.join(path, TRAINER_CHECKPOINTS)
    root = root if os.path.isdir(root) else path
    steps = trainer_steps(root)
    if not steps:
        if root != path:
            raise CheckpointError(f"{root} holds no saved step of the trainer (has the run saved a checkpoint yet?)")
        pickled = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
        if pickled:
            raise CheckpointError(
                f"{path} holds {', '.join(pickled)}: pickle-based PyTorch files, which qwen3-jax never loads (unpickling "
                "runs code from the file); convert them to safetensors (transformers: save_pretrained(..., "
                "safe_serialization=True))")
        raise CheckpointError(f"{path} holds no checkpoint: expected {FORMAT_HELP}")
    if step is not None and step not in steps:
        raise CheckpointError(f"{root} has no step {step}; the saved steps are {steps}")
    return "trainer", os.path.join(root, str(max(steps) if step is None else step))


# ------------------------------------------------------------------------------- helpers


def dtype_overrides(dtype, config_overrides: dict[str, Any]) -> dict[str, Any]:
    """`config_overrides` with `dtype` (if not None) as both parameter and compute dtype; explicit
    overrides win."""
    if dtype is None:
        return config_overrides
    name = jnp.dtype(dtype).name
    return {"param_dtype": name, "dtype": name, **config_overrides}


def _restore_model(cfg: Qwen3Config, mesh: jax.sharding.Mesh | None, restore) -> Qwen3:
    """The model of `cfg` with the params `restore(target)` returns, where `target` holds a
    ShapeDtypeStruct per param in its sharding on `mesh` (the first device without one). A mesh
    with Explicit axes (jax.make_mesh) is used as its `auto_mesh` twin."""
    graphdef, state = nnx.split(abstract_model(cfg))
    target = abstract_params(cfg, mesh)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), target)
    nnx.replace_by_pure_dict(state, restore(target))
    return nnx.merge(graphdef, state)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _flat(tree) -> dict[str, Any]:
    """Leaves by slash-joined path; dict keys may come back from Orbax metadata as strings."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def check_shapes(saved_tree, target, where: str) -> None:
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
