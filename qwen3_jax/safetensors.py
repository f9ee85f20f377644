"""Safetensors files: a validated, memory-mapped reader and the pieces of a streaming writer.

Not the `safetensors` package (0.8.0): its numpy backend rejects BF16, its flax one copies whole tensors to a device.
Every claim of a file is checked before a read (CheckpointError naming the file and tensor); nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from qwen3_jax.errors import CheckpointError

_ST_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


INDEX = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


class SafetensorsReader:
    """Lazy, memory-mapped view of every tensor in a checkpoint directory (one file or an index).

    What a checkpoint claims is checked before any tensor is read, and every violation is a
    CheckpointError naming the file (and tensor): the header length against the file size, the
    header a JSON object, each tensor a supported float dtype (F32, F16, BF16, F64) with a shape
    of non-negative ints and data offsets inside the file that span exactly dtype size x shape
    bytes without overlapping another tensor's (a truncated file fails here); an index must be a
    JSON object whose `weight_map` sends tensor names to shard files inside `path` (no absolute
    path, `..` or symlink out of it) that exist and hold those tensors. Only safetensors are read:
    nothing is ever unpickled.
    """

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        weight_map = _read_index(index) if os.path.exists(index) else None
        if weight_map is not None:
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        self._entries: dict[str, tuple[str, str, list[int], int, int]] = {}
        found_in: dict[str, str] = {}
        for name in files:
            fpath = _shard_path(path, name, index)
            for key, entry in _read_header(fpath).items():
                if key in found_in:
                    raise CheckpointError(f"tensor {key} is stored twice, in {found_in[key]} and in {name}")
                found_in[key] = name
                self._entries[key] = entry
        for key, name in (weight_map or {}).items():
            if found_in.get(key) != name:
                raise CheckpointError(f"{index} says tensor {key} is in {name}, but {name} does not hold it")

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2])

    def get(self, name: str) -> np.ndarray:
        """A read-only memory map of tensor `name` alone: its pages are read when touched and
        unmapped once the array and its views are dropped."""
        if name not in self._entries:
            raise CheckpointError(f"missing tensor {name} in {self.path}")
        fpath, dtype, shape, begin, end = self._entries[name]
        if end == begin:  # mmap refuses empty ranges
            return np.empty(shape, _ST_DTYPES[dtype])
        return np.memmap(fpath, dtype=_ST_DTYPES[dtype], mode="r", offset=begin, shape=tuple(shape))


def _read_index(index: str) -> dict[str, str]:
    """The `weight_map` of a safetensors index file, checked to map names to file names."""
    try:
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
    except (ValueError, AttributeError) as e:  # not JSON, or not an object
        raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names, got {weight_map!r:.200}")
    return weight_map


def _shard_path(path: str, name: str, index: str) -> str:
    """`path`/`name` for a shard the index lists, refused unless it stays inside `path`."""
    root = os.path.realpath(path)
    resolved = os.path.realpath(os.path.join(path, name))
    if os.path.isabs(name) or os.path.commonpath([root, resolved]) != root:
        raise CheckpointError(f"{index} lists shard {name!r}, which is outside the checkpoint directory {path}")
    if not os.path.isfile(resolved):
        raise CheckpointError(f"{index} lists shard {name}, which is missing from {path}")
    return resolved


def _read_header(fpath: str) -> dict[str, tuple[str, str, list[int], int, int]]:
    """(file, dtype, shape, begin, end) per tensor of one safetensors file, every claim checked."""
    size = os.path.getsize(fpath)
    with open(fpath, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{fpath} has {size} bytes, too few for a safetensors header (truncated?)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{fpath}: the header length field says {header_len} bytes, but the file has {size - 8} after it "
                "(truncated, or not a safetensors file)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as e:  # JSON or UTF-8
        raise CheckpointError(f"{fpath}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fpath}: the safetensors header is a JSON {type(header).__name__}, not an object")
    data_bytes = size - 8 - header_len
    entries, spans = {}, []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        where = f"{fpath}: tensor {key}"
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where}: its header entry is not an object")
        dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{where} has dtype {dtype!r}; Qwen3 weights are one of {sorted(_ST_DTYPES)}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointError(
                f"{where}: data_offsets {offsets!r} do not lie within the file's {data_bytes} data bytes (a truncated "
                "file, or a header that lies)")
        begin, end = offsets
        needed = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if end - begin != needed:
            raise CheckpointError(
                f"{where}: data_offsets span {end - begin} bytes, but {dtype} of shape {shape} is {needed} bytes")
        entries[key] = (fpath, dtype, shape, 8 + header_len + begin, 8 + header_len + end)
        if end > begin:
            spans.append((begin, end, key))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{fpath}: tensors {a} and {b} claim overlapping bytes")
    return entries


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def header_bytes(tensors: list[tuple[str, np.dtype, tuple[int, ...]]]) -> bytes:
    """The length prefix and JSON header of a file holding `tensors` (name, dtype, shape) in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


_WRITE_BLOCK_BYTES = 64 << 20


def write_rows(f, arr: np.ndarray, dtype: np.dtype) -> None:
    """Writes `arr` (any strides) as C-order `dtype` bytes, converting a block of rows at a time so
    a transposed view costs one block of extra memory, not a second copy of the tensor."""
    if arr.ndim == 0 or arr.size == 0:
        f.write(np.ascontiguousarray(arr, dtype).tobytes())
        return
    rows = max(1, _WRITE_BLOCK_BYTES // max(1, arr[0].size * dtype.itemsize))
    for i in range(0, arr.shape[0], rows):
        f.write(np.ascontiguousarray(arr[i: i + rows], dtype).view(np.uint8).data)
