"""Block-wise checkpoint I/O for models larger than host memory (the converter's path).

`save_streamed` writes the checkpoint `save_model` writes from a block reader; `open_params` reads
any format a block at a time (TensorStore for Orbax arrays). The only user of private Orbax APIs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
# Orbax's own spec builder and metadata store, so streamed arrays are stored as Orbax stores
# arrays; neither has a public path in the pinned orbax-checkpoint (tests/test_convert.py checks).
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

from qwen3_jax.checkpoint import (
    PARAMS_DIR, check_shapes, dtype_overrides, load_any_config, load_config, locate_checkpoint, new_checkpoint_dir,
    save_args, saved_params, write_model_files,
)
from qwen3_jax.config import Qwen3Config
from qwen3_jax.hf import hf_param_readers
from qwen3_jax.hf_config import from_hf_config
from qwen3_jax.layout import TRAINER_STATE
from qwen3_jax.model import abstract_model, abstract_params

Reader = Callable[[tuple, tuple[slice, ...]], np.ndarray]  # (param path, one slice per dim) -> block


def save_streamed(cfg: Qwen3Config, read: Reader, path: str | os.PathLike) -> None:
    """Writes the checkpoint `save_model` would write for a model of `cfg` whose parameters
    `read(param_path, index)` returns block by block (in `cfg.param_dtype`), without the model.

    Each storage chunk is read, written and dropped in turn, so host memory stays about one chunk
    (at most CHUNK_BYTES, and one layer or expert of a stacked parameter) plus what `read` holds.
    Single-process only. Raises FileExistsError if `path` already holds a checkpoint.
    """
    path = new_checkpoint_dir(path)
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
        ckptr.save(os.path.join(path, PARAMS_DIR), args=ocp.args.PyTreeSave(params, save_args(cfg, params)))
    write_model_files(cfg, path)


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
        cfg = from_hf_config(weights_dir, **dtype_overrides(jnp.float32 if dtype is None else dtype, config_overrides))
        cfg, reads = hf_param_readers(weights_dir, cfg)
        return fmt, cfg, lambda param, index: reads[param](index)
    if fmt == "orbax":
        cfg = load_config(weights_dir, **dtype_overrides(dtype, config_overrides))
        directory, prefix = os.path.join(os.path.abspath(weights_dir), PARAMS_DIR), ()
    else:
        cfg = load_any_config(weights_dir, **dtype_overrides(jnp.float32 if dtype is None else dtype, config_overrides))
        directory, prefix = os.path.join(os.path.abspath(weights_dir), TRAINER_STATE), ("params",)
    abstract = abstract_params(cfg)
    check_shapes(saved_params(fmt, directory), abstract, directory)
    with open(os.path.join(directory, "_METADATA")) as f:  # how Orbax stored the arrays
        use_zarr3 = json.load(f).get("use_zarr3", False)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(directory))
    context = ts_utils.get_ts_context(use_ocdbt=use_ocdbt)
    dtypes = {tuple(p): np.dtype(v.dtype) for p, v in nnx.to_flat_state(nnx.State(abstract))}
    stores: dict[tuple, ts.TensorStore] = {}

    def read(param: tuple, index: tuple[slice, ...]) -> np.ndarray:
        if param not in stores:  # Orbax names an array by its tree path joined with dots
            spec = ts_utils.ArrayReadSpec(directory, ".".join(map(str, prefix + param)), use_zarr3, use_ocdbt=use_ocdbt)
            stores[param] = ts.open(ts.Spec(spec.json), open=True, context=context).result()
        return stores[param][index].read().result().astype(dtypes[param], copy=False)

    return fmt, cfg, read
