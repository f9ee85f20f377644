"""Writes small safetensors files for tests (the library only streams them, in `qwen3_jax.hf.write_hf`)."""

import numpy as np

from qwen3_jax.safetensors import header_bytes


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(header_bytes([(name, arr.dtype, arr.shape) for name, arr in tensors.items()]))
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
