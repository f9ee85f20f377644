"""Compile time of a 28-layer Qwen3-0.6B-shaped forward: scanned layers against an unrolled loop.

Compiles from abstract shapes, so no parameters are allocated.

    python -m benchmarks.compile_time
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import report
from qwen3_jax.config import preset
from qwen3_jax.model import abstract_model


def compile_seconds(scan_layers: bool, batch: int = 1, length: int = 512) -> float:
    graphdef, state = nnx.split(abstract_model(preset("qwen3-0.6b", scan_layers=scan_layers)))
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    t = time.perf_counter()
    fn.lower(state, tokens).compile()
    return time.perf_counter() - t


def main() -> None:
    scanned, unrolled = compile_seconds(True), compile_seconds(False)
    report("compile_time", {
        "shape": "qwen3-0.6b (28 layers) forward, batch 1 x 512, float32",
        "scanned_compile_s": scanned,
        "unrolled_compile_s": unrolled,
        "unrolled_over_scanned": unrolled / scanned,
    })


if __name__ == "__main__":
    main()
