"""Orbax checkpoints of a model's parameters, and loading whichever checkpoint format a path holds.

Three formats are read: Hugging Face (config.json + *.safetensors), qwen3-jax (below), and the
trainer's (`train/checkpoint.py` writes WORKDIR/checkpoints/<step>/{state,data,model_config}; the
params are read back here, so inference and conversion need not import the trainer).

A qwen3-jax checkpoint directory holds:

    params/          Orbax (OCDBT) tree of the parameters, the nested dict of `nnx.state(model, nnx.Param)`
    config.json      the architecture in Hugging Face form, so one config reader serves both formats
    qwen3_jax.json   runtime fields HF config.json has no place for (dtypes, scan, remat, MoE and attention kernels)

Tensors are stored whole (Orbax records only how they were sharded), and each one is restored
straight into the shards of its target sharding, so a checkpoint written on 8 devices loads on any
mesh, or on one device, without a host copy of the model. Training state (optimizer, data
iterator, step) lives in the trainer's own checkpoints; `load_any` restores only their params.

Storage chunks never span two layers or two experts (nor exceed `CHUNK_BYTES`), so a checkpoint
can also be read and written a block at a time without the model in host memory: `save_streamed`
writes one from a block reader (the converter's path, for models larger than host memory), and
`open_params` reads any of the three formats a block at a time through TensorStore. Both use
Orbax's own TensorStore specs, so what `save_streamed` writes is an ordinary Orbax checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import flags, logging
from etils import epath
from flax import nnx
# Orbax's own spec builder and metadata store, so streamed arrays are stored as Orbax stores
# arrays; neither has a public path in the pinned orbax-checkpoint (tests/test_convert.py checks).
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from qwen3_jax.config import Qwen3Config
from qwen3_jax.hf_config import from_hf_config, to_hf_config
from qwen3_jax.hf import CheckpointError, from_hf, hf_param_readers, stacked_dims
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.sharding import auto_mesh, state_shardings

PARAMS_DIR = "params"
MARKER = "qwen3_jax.json"  # written last: its presence means the checkpoint is complete
FORMAT_VERSION = 1
RUNTIME_FIELDS = ("scan_layers", "remat", "moe_impl", "moe_chunk_tokens", "dtype", "param_dtype", "attention",
                  "attention_block_q", "attention_block_kv")
# The trainer's layout: WORKDIR/checkpoints/<step>/{state,data,data_info,model_config} (train/checkpoint.py).
TRAINER_CHECKPOINTS = "checkpoints"
TRAINER_STATE, TRAINER_DATA, TRAINER_MODEL_CONFIG = "state", "data", "model_config"
TRAINER_DATA_INFO = "data_info"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # formats never read
FORMAT_HELP = (
    f"a Hugging Face checkpoint (config.json + *.safetensors), a qwen3-jax checkpoint ({MARKER} + "
    f"{PARAMS_DIR}/) or a trainer checkpoint (a workdir, its {TRAINER_CHECKPOINTS}/ directory or one step folder)"
)
CHUNK_BYTES = 256 << 20  # storage chunk limit: the unit of block-wise reads and writes
Reader = Callable[[tuple, tuple[slice, ...]], np.ndarray]  # (param path, one slice per dim) -> block


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
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), params, save_args=_save_args(model.cfg, params))
        ckptr.wait_until_finished()
    if jax.process_index() == 0:
        _write_model_files(model.cfg, path)


def save_streamed(cfg: Qwen3Config, read: Reader, path: str | os.PathLike) -> None:
    """Writes the checkpoint `save_model` would write for a model of `cfg` whose parameters
    `read(param_path, index)` returns block by block (in `cfg.param_dtype`), without the model.

    Each storage chunk is read, written and dropped in turn, so host memory stays about one chunk
    (at most CHUNK_BYTES, and one layer or expert of a stacked parameter) plus what `read` holds.
    Single-process only. Raises FileExistsError if `path` already holds a checkpoint.
    """
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, PARAMS_DIR)) or os.path.exists(os.path.join(path, MARKER)):
        raise FileExistsError(f"{path} already holds a checkpoint; save to a new directory")
    os.makedirs(path, exist_ok=True)
    flat = {
        tuple(p): _Streamed(tuple(v.shape), np.dtype(v.dtype), lambda index, p=tuple(p): read(p, index))
        for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param))
    }
    params = nnx.to_pure_dict(nnx.from_flat_state(flat))
    # Orbax takes the ArrayMetadata store (write shapes in _METADATA) from the jax.Array handler.
    store = array_metadata_store.Store()
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=store)), (_Streamed, _StreamedHandler(store)))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), args=ocp.args.PyTreeSave(params, _save_args(cfg, params)))
    _write_model_files(cfg, path)


def _save_args(cfg: Qwen3Config, params: dict) -> dict:
    """Per parameter, chunks of one layer (and one expert) of a stacked parameter, each at most
    CHUNK_BYTES, so that block-wise readers (`open_params`) read each chunk once."""
    def args(keypath, _):
        path = tuple(k.key for k in keypath)
        return ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=tuple(range(stacked_dims(path, cfg))))

    return jax.tree_util.tree_map_with_path(args, params)


def _write_model_files(cfg: Qwen3Config, path: str) -> None:
    _write_json(os.path.join(path, "config.json"), to_hf_config(cfg))
    runtime = {name: getattr(cfg, name) for name in RUNTIME_FIELDS}
    _write_json(os.path.join(path, MARKER), {"format_version": FORMAT_VERSION, "runtime": runtime})


class _Streamed:
    """A parameter `save_streamed` writes block by block: `read(index)` gives the block at `index`."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, read: Callable[[tuple[slice, ...]], np.ndarray]):
        self.shape, self.dtype, self.read = shape, dtype, read


class _StreamedHandler(ocp.type_handlers.ArrayHandler):
    """Writes `_Streamed` leaves exactly as Orbax writes a one-device jax.Array of that shape and
    dtype (same TensorStore spec, chunk shape and metadata, recorded as a jax.Array so the plain
    ArrayHandler restores it), but one chunk at a time, each written before the next is read."""

    def __init__(self, store: array_metadata_store.Store):
        super().__init__(enable_write_sharding_file=False, array_metadata_store=store)

    async def serialize(self, values: Sequence[_Streamed], infos: Sequence[ocp.type_handlers.ParamInfo],
                        args: Sequence[ocp.SaveArgs] | None = None) -> list:
        args = args or [ocp.SaveArgs()] * len(values)
        metadatas = []
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ts_utils.build_array_write_spec(
                info, arg, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                use_ocdbt=info.is_ocdbt_checkpoint, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
            )
            store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=info.ts_context)
            chunk = spec.metadata.chunk_shape
            for pos in np.ndindex(*(-(-n // c) for n, c in zip(value.shape, chunk))):
                index = tuple(slice(p * c, min((p + 1) * c, n)) for p, c, n in zip(pos, chunk, value.shape))
                block = value.read(index)
                if block.shape != tuple(s.stop - s.start for s in index) or block.dtype != value.dtype:
                    raise ValueError(f"{info.name}: the reader gave {block.dtype}{list(block.shape)} for block {index}")
                await store[index].write(block)
            metadatas.append(spec.metadata)
        await self._array_metadata_store.write(
            checkpoint_dir=infos[0].parent_dir, array_metadatas=metadatas, process_index=jax.process_index())
        return []


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
    cfg = load_config(path, **_dtype_overrides(dtype, config_overrides))
    params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)

    def restore(target):
        _check_shapes(_saved_params("orbax", params_dir), target, params_dir)
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
    cfg = load_any_config(weights_dir, **_dtype_overrides(jnp.float32 if dtype is None else dtype, config_overrides))
    state_dir = os.path.abspath(os.path.join(weights_dir, TRAINER_STATE))  # Orbax takes absolute paths only

    def restore(target):
        _check_shapes(_saved_params("trainer", state_dir), target, state_dir)
        return ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
            partial_restore=True,  # the params only, not the optimizer state
        ))["params"]

    return _restore_model(cfg, mesh, restore)


def open_params(
    path: str | os.PathLike, *, step: int | None = None, dtype=None, **config_overrides: Any,
) -> tuple[str, Qwen3Config, Reader]:
    """Opens the checkpoint at `path` (any format, as `load_any`) for reading a block at a time.

    Returns the format ("hf", "orbax" or "trainer"), the config (dtypes as `load_any` gives them)
    and `read(param_path, index)`: the block of that parameter at `index` (one slice per dim) as a
    host array in our layout and `cfg.param_dtype`. Only the tensors (HF) or storage chunks
    (Orbax, through TensorStore with no data cache) that the block overlaps are read, so host
    memory stays about one block plus one chunk. Raises what `load_any` raises for a checkpoint
    that does not match its config, before anything is read.
    """
    fmt, weights_dir = locate_checkpoint(path, step=step)
    if fmt == "hf":
        cfg = from_hf_config(weights_dir, **_dtype_overrides(jnp.float32 if dtype is None else dtype, config_overrides))
        cfg, reads = hf_param_readers(weights_dir, cfg)
        return fmt, cfg, lambda param, index: reads[param](index)
    if fmt == "orbax":
        cfg = load_config(weights_dir, **_dtype_overrides(dtype, config_overrides))
        directory, prefix = os.path.join(os.path.abspath(weights_dir), PARAMS_DIR), ()
    else:
        cfg = load_any_config(weights_dir, **_dtype_overrides(jnp.float32 if dtype is None else dtype, config_overrides))
        directory, prefix = os.path.join(os.path.abspath(weights_dir), TRAINER_STATE), ("params",)
    abstract = nnx.state(abstract_model(cfg), nnx.Param)
    _check_shapes(_saved_params(fmt, directory), nnx.to_pure_dict(abstract), directory)
    with open(os.path.join(directory, "_METADATA")) as f:  # how Orbax stored the arrays
        use_zarr3 = json.load(f).get("use_zarr3", False)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(directory))
    context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
    dtypes = {tuple(p): np.dtype(v.dtype) for p, v in nnx.to_flat_state(abstract)}
    stores: dict[tuple, ts.TensorStore] = {}

    def read(param: tuple, index: tuple[slice, ...]) -> np.ndarray:
        if param not in stores:  # Orbax names an array by its tree path joined with dots
            spec = ts_utils.ArrayReadSpec(directory, ".".join(map(str, prefix + param)), use_zarr3, use_ocdbt=use_ocdbt)
            stores[param] = ts.open(ts.Spec(spec.json), open=True, context=context).result()
        return stores[param][index].read().result().astype(dtypes[param], copy=False)

    return fmt, cfg, read


def _saved_params(fmt: str, directory: str):
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


def trainer_steps(root: str | os.PathLike) -> list[int]:
    """The saved steps (ascending) in a trainer `checkpoints/` directory: committed step folders
    holding the train state (Orbax renames a step's folder into place once it is fully written)."""
    steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
    return sorted(s for s in steps if os.path.isdir(os.path.join(root, str(s), TRAINER_STATE)))


def checkpoint_dirs(path: str | os.PathLike) -> list[str]:
    """Where files that ship with the checkpoint at `path` (its tokenizer) are looked for, innermost
    first: `path`, then, for a trainer step folder or `checkpoints/` directory, the directories
    above it up to the run's workdir (the trainer writes its tokenizer at the workdir's root)."""
    path = os.path.abspath(path)
    dirs = [path]
    if os.path.isdir(os.path.join(path, TRAINER_STATE)):
        path = os.path.dirname(path)
        dirs.append(path)
    if os.path.basename(path) == TRAINER_CHECKPOINTS:
        dirs.append(os.path.dirname(path))
    return dirs


# ------------------------------------------------------------------------------- helpers


def _dtype_overrides(dtype, config_overrides: dict[str, Any]) -> dict[str, Any]:
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
    mesh = auto_mesh(mesh)
    graphdef, state = nnx.split(abstract_model(cfg))
    abstract = nnx.to_pure_dict(state)
    if mesh is None:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, abstract)
    else:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh, cfg.rules))
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
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


def quiet_orbax_logs() -> None:
    """For command lines: Orbax logs every save and restore at absl INFO; show warnings only,
    unless the user asked for a level with --verbosity (--verbosity=0 shows them)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
