"""Hugging Face Qwen3 / Qwen3-MoE safetensors checkpoints <-> qwen3-jax models.

One table (`_hf_tensor`) maps each parameter of the abstract model to its Hugging Face tensor name.
Loading builds each device shard from a memory map, reading only the tensors (and rows) it needs;
export streams file by file, a block of rows at a time: host memory stays about one HF tensor.
MoE experts load per expert (`mlp.experts.{e}.gate_proj.weight`, what `to_hf` writes) or fused
per layer (transformers v5: `mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I]).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen3_jax.config import Qwen3Config
from qwen3_jax.hf_config import from_hf_config, to_hf_config
from qwen3_jax.errors import CheckpointError
from qwen3_jax.model import Qwen3, abstract_model
from qwen3_jax.safetensors import INDEX, SafetensorsReader, header_bytes, write_rows
from qwen3_jax.sharding import auto_mesh, state_shardings


# ------------------------------------------------------------------------- name mapping


def _layer_offsets(cfg: Qwen3Config) -> list[int]:
    offsets, total = [], 0
    for _, n in cfg.layer_runs:
        offsets.append(total)
        total += n
    return offsets


_LAYER_NAMES = {
    ("input_norm", "weight"): ("input_layernorm.weight", None),
    ("post_attn_norm", "weight"): ("post_attention_layernorm.weight", None),
    ("attn", "q_proj"): ("self_attn.q_proj.weight", 1),
    ("attn", "k_proj"): ("self_attn.k_proj.weight", 1),
    ("attn", "v_proj"): ("self_attn.v_proj.weight", 1),
    ("attn", "o_proj"): ("self_attn.o_proj.weight", 2),
    ("attn", "q_norm", "weight"): ("self_attn.q_norm.weight", None),
    ("attn", "k_norm", "weight"): ("self_attn.k_norm.weight", None),
    ("mlp", "router"): ("mlp.gate.weight", 1),
}


class _Tensor:
    """How one model parameter is stored in the Hugging Face checkpoint.

    `template` names the tensor (with {layer} and {expert} fields for stacked dims); `n_in` is the
    number of leading input dims of a Linear kernel (HF stores [out, in]); None means same layout.
    """

    def __init__(self, template: str, n_in: int | None, stacked: int, layer0: int = 0):
        self.template, self.n_in, self.stacked, self.layer0 = template, n_in, stacked, layer0

    def name(self, idx: tuple[int, ...]) -> str:
        fields = dict(zip(("layer", "expert"), idx))
        if "layer" in fields:
            fields["layer"] += self.layer0
        return self.template.format(**fields)

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        if self.n_in is None:
            return ours
        return (math.prod(ours[self.n_in:]), math.prod(ours[: self.n_in]))

    def to_ours(self, hf: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        return hf if self.n_in is None else hf.T.reshape(ours)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.n_in is None:
            return ours
        return ours.reshape(math.prod(ours.shape[: self.n_in]), -1).T


def _hf_tensor(path: tuple, cfg: Qwen3Config) -> _Tensor:
    if path == ("embed",):
        return _Tensor("model.embed_tokens.weight", None, 0)
    if path == ("norm", "weight"):
        return _Tensor("model.norm.weight", None, 0)
    if path == ("lm_head",):
        return _Tensor("lm_head.weight", 1, 0)
    assert path[0] == "runs", path
    run, rest = path[1], tuple(path[2:])
    layer0 = _layer_offsets(cfg)[run]
    prefix = "model.layers.{layer}."
    if rest in _LAYER_NAMES:
        name, n_in = _LAYER_NAMES[rest]
        return _Tensor(prefix + name, n_in, 1, layer0)
    moe = cfg.layer_runs[run][0]
    proj = rest[1]
    if moe:
        return _Tensor(prefix + "mlp.experts.{expert}." + proj + ".weight", 1, 2, layer0)
    return _Tensor(prefix + "mlp." + proj + ".weight", 1, 1, layer0)


class _Source(NamedTuple):
    """Where one HF-layout matrix is stored: tensor `name` of shape `shape` (as the config implies),
    or, for fused experts, expert `expert` of it, rows [rows[0], rows[1]) when given."""

    name: str
    shape: tuple[int, ...]
    expert: int | None = None
    rows: tuple[int, int] | None = None

    def view(self, stored: np.ndarray) -> np.ndarray:
        if self.expert is None:
            return stored
        matrix = stored[self.expert]
        return matrix if self.rows is None else matrix[self.rows[0]: self.rows[1]]


def _fused_sources(spec: _Tensor, path: tuple, ix: tuple[int, ...], cfg: Qwen3Config) -> _Source:
    """The per-expert matrix `spec.name(ix)` inside a layer's fused v5 expert tensors."""
    layer, expert = spec.layer0 + ix[0], ix[1]
    E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    prefix = f"model.layers.{layer}.mlp.experts."
    proj = path[-1]
    if proj == "down_proj":
        return _Source(prefix + "down_proj", (E, H, I), expert)
    return _Source(prefix + "gate_up_proj", (E, 2 * I, H), expert, (0, I) if proj == "gate_proj" else (I, 2 * I))


def _fused_layers(keys: set[str], cfg: Qwen3Config) -> set[int]:
    """MoE layers whose experts the checkpoint stores fused; errors for a layer that has both."""
    fused = set()
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        has_fused = [k for k in (prefix + "gate_up_proj", prefix + "down_proj") if k in keys]
        if not has_fused:
            continue
        per_expert = sorted(k for k in keys if k.startswith(prefix) and k not in has_fused)
        if per_expert:
            raise CheckpointError(
                f"layer {layer} holds its experts both fused ({has_fused[0]}) and per expert ({per_expert[0]}, ...); "
                "keep one layout per layer"
            )
        fused.add(layer)
    return fused


_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tensors_equal(reader: SafetensorsReader, a: str, b: str, rows: int = 4096) -> bool:
    """Exact equality of two checkpoint tensors, compared a block of rows at a time."""
    if reader.shape(a) != reader.shape(b):
        return False
    x, y = reader.get(a), reader.get(b)
    return all(
        np.array_equal(x[i: i + rows].astype(np.float32), y[i: i + rows].astype(np.float32))
        for i in range(0, x.shape[0], rows)
    )


def _tie_like_transformers(cfg: Qwen3Config, reader: SafetensorsReader, path: str) -> Qwen3Config:
    """transformers ties lm_head to the embedding only if the checkpoint does not hold two different
    matrices: with both present and different it loads them untied (and warns), so we do too."""
    if not cfg.tie_word_embeddings or not {_EMBED, _HEAD} <= reader.keys() or _tensors_equal(reader, _EMBED, _HEAD):
        return cfg
    warnings.warn(
        f"{path}: config.json ties the word embeddings but the checkpoint's {_HEAD} differs from {_EMBED}; "
        "loading them untied, as transformers does (set tie_word_embeddings=false to silence this)",
        stacklevel=3,
    )
    return cfg.replace(tie_word_embeddings=False)


def _params(model_or_abstract: Qwen3) -> Iterator[tuple[tuple, nnx.Variable]]:
    for path, var in nnx.to_flat_state(nnx.state(model_or_abstract, nnx.Param)):
        yield tuple(path), var


# ------------------------------------------------------------------------------- loading


def from_hf(
    path: str, *, dtype=jnp.float32, param_dtype=None, mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[str], None] | None = None, **config_overrides,
) -> Qwen3:
    """Loads a Hugging Face Qwen3 / Qwen3-MoE checkpoint directory as a sharded model.

    `dtype` is the compute dtype and, unless `param_dtype` is given, the stored parameter dtype;
    other runtime fields (scan_layers, remat, ...) go in `config_overrides`. `progress` is called
    with each parameter path as it loads. Experts may be stored per expert or fused (see the module
    docstring). Word embeddings are tied as transformers ties them: a tied config whose checkpoint
    holds an `lm_head.weight` different from the embedding loads untied, with a warning, and one
    holding only `lm_head.weight` uses it as the embedding. Raises CheckpointError naming a missing,
    misshapen or unexpected tensor, ConfigError for a config.json it cannot serve.
    """
    overrides = {
        "dtype": jnp.dtype(dtype).name, "param_dtype": jnp.dtype(param_dtype or dtype).name, **config_overrides,
    }
    mesh = auto_mesh(mesh)
    cfg, reads = hf_param_readers(path, from_hf_config(path, **overrides))
    graphdef, state = nnx.split(abstract_model(cfg))
    shardings = (
        state_shardings(state, mesh, cfg.rules) if mesh is not None else None
    )
    flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = []
    for path_, var in nnx.to_flat_state(state):
        path_ = tuple(path_)
        sharding = flat_shardings.get(path_, single)
        if isinstance(sharding, nnx.Variable):
            sharding = sharding.get_value()
        value = jax.make_array_from_callback(tuple(var.shape), sharding, reads[path_])
        flat.append((path_, var.replace(value)))
        if progress is not None:
            progress("/".join(map(str, path_)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_param_readers(
    path: str, cfg: Qwen3Config,
) -> tuple[Qwen3Config, dict[tuple, Callable[[tuple[slice, ...]], np.ndarray]]]:
    """Checks the checkpoint at `path` against `cfg` and says how to read each parameter.

    Returns `cfg` with its word embeddings tied as transformers ties them (see `from_hf`) and, per
    parameter path of `abstract_model(cfg)`, a function from an index (one slice per dim, as
    `jax.make_array_from_callback` passes) to that block of the parameter, in our layout and
    `cfg.param_dtype`; it reads only the tensors (and rows) the block needs. Raises CheckpointError
    naming a missing, misshapen or unexpected tensor before anything is read.
    """
    reader = SafetensorsReader(path)
    cfg = _tie_like_transformers(cfg, reader, path)
    fused_layers = _fused_layers(reader.keys(), cfg) if cfg.is_moe else set()
    used: set[str] = set()
    reads = {}
    for path_, var in _params(abstract_model(cfg)):
        spec = _hf_tensor(path_, cfg)
        shape = tuple(var.shape)
        stacked, inner = shape[: spec.stacked], shape[spec.stacked:]
        sources = {
            ix: _fused_sources(spec, path_, ix, cfg) if spec.stacked == 2 and spec.layer0 + ix[0] in fused_layers
            else _Source(spec.name(ix), spec.hf_shape(inner))
            for ix in np.ndindex(*stacked)
        }
        if path_ == ("embed",) and cfg.tie_word_embeddings and _EMBED not in reader.keys() and _HEAD in reader.keys():
            sources = {(): _Source(_HEAD, spec.hf_shape(inner))}  # transformers ties to the matrix that exists
        for src in set(sources.values()):
            if src.name not in reader.keys():
                raise CheckpointError(
                    f"missing tensor {src.name} in {path} (needed for parameter {'/'.join(map(str, path_))})"
                )
            if reader.shape(src.name) != src.shape:
                raise CheckpointError(
                    f"tensor {src.name} has shape {list(reader.shape(src.name))} in the checkpoint but the config "
                    f"needs {list(src.shape)}"
                )
        used.update(src.name for src in sources.values())

        def read(index, spec=spec, sources=sources, stacked=stacked, inner=inner, target=np.dtype(var.dtype)):
            outer = [range(n)[s] for s, n in zip(index[: len(stacked)], stacked)]
            rest = index[len(stacked):]
            out = np.empty([len(r) for r in outer] + [len(range(n)[s]) for s, n in zip(rest, inner)], target)
            for pos in np.ndindex(*[len(r) for r in outer]):
                src = sources[tuple(r[p] for r, p in zip(outer, pos))]
                # Views of the memory map down to `rest`: only this block's rows are read.
                out[pos] = spec.to_ours(src.view(reader.get(src.name)), inner)[rest].astype(target)
            return out

        reads[path_] = read

    unexpected = reader.keys() - used
    if cfg.tie_word_embeddings:
        unexpected.discard(_HEAD)  # tied checkpoints may carry a copy of the embedding (checked equal above)
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if unexpected:
        raise CheckpointError(f"unexpected tensors in {path}: {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return cfg, reads


# ------------------------------------------------------------------------------- export


def stacked_dims(path: tuple, cfg: Qwen3Config) -> int:
    """How many leading dims of parameter `path` index separate HF tensors: 0, 1 (layers) or 2
    (layers, experts)."""
    return _hf_tensor(path, cfg).stacked


def to_hf(model: Qwen3, path: str, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
          progress: Callable[[str], None] | None = None) -> None:
    """Writes config.json and safetensors (sharded with an index above `max_shard_bytes`) of
    `model`, one HF tensor at a time (see `write_hf`)."""
    params = dict(_params(model))

    def read(path_, index):
        return np.asarray(jax.device_get(params[path_].get_value()[index]))

    write_hf(model.cfg, read, path, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)


def write_hf(cfg: Qwen3Config, read: Callable[[tuple, tuple[slice, ...]], np.ndarray], path: str, *,
             dtype=None, max_shard_bytes: int = 5 * 2**30, progress: Callable[[str], None] | None = None) -> None:
    """Writes config.json and the safetensors of the model `cfg` describes, reading its parameters
    through `read(param_path, index)`: the block at `index` (one slice per dim) in our layout.

    Files are planned from shapes (sharded, with an index, above `max_shard_bytes`), then each is
    written header first and tensor by tensor, each read as one HF tensor (one layer, or one
    layer's expert) and converted to `dtype` (default `cfg.param_dtype`) a block of rows at a
    time: host memory stays about one HF tensor. `progress` is called with each file written.
    """
    out_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    os.makedirs(path, exist_ok=True)
    tensors = []  # (name, param path, stacked index, HF shape, rank of the parameter), in file order
    for path_, var in _params(abstract_model(cfg)):
        spec = _hf_tensor(path_, cfg)
        shape = tuple(var.shape)
        for ix in np.ndindex(*shape[: spec.stacked]):
            tensors.append((spec.name(ix), path_, ix, spec.hf_shape(shape[spec.stacked:]), len(shape)))
    shards: list[list[tuple]] = [[]]
    acc = 0
    for t in tensors:
        nbytes = math.prod(t[3]) * out_dtype.itemsize
        if shards[-1] and acc + nbytes > max_shard_bytes:
            shards.append([])
            acc = 0
        shards[-1].append(t)
        acc += nbytes
    files = (
        ["model.safetensors"] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for fname, shard in zip(files, shards):
        with open(os.path.join(path, fname), "wb") as f:
            f.write(header_bytes([(name, out_dtype, hf_shape) for name, _, _, hf_shape, _ in shard]))
            for _, path_, ix, _, rank in shard:
                block = read(path_, tuple(slice(i, i + 1) for i in ix) + (slice(None),) * (rank - len(ix)))
                write_rows(f, _hf_tensor(path_, cfg).to_hf(block.reshape(block.shape[len(ix):])), out_dtype)
                del block  # before the next read, or two tensors are held at once
        if progress is not None:
            progress(fname)
    if len(files) > 1:
        total = sum(math.prod(t[3]) for t in tensors) * out_dtype.itemsize
        file_of = {t[0]: fname for fname, shard in zip(files, shards) for t in shard}
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": file_of}, f, indent=2)
    hf_cfg = to_hf_config(cfg)
    hf_cfg["torch_dtype"] = out_dtype.name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
