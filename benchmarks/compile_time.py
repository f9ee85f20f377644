"""Compile time of a 28-layer Qwen3-0.6B-shaped forward: scanned layers against an unrolled loop.

Compiles from abstract shapes, so no parameters are allocated.

    python -m benchmarks.compile_time [--smoke]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import parse_args, recording
from qwen3_jax.config import preset
from qwen3_jax.model import abstract_model


def compile_seconds(scan_layers: bool, batch: int = 1, length: int = 512, name: str = "qwen3-0.6b") -> float:
    graphdef, state = nnx.split(abstract_model(preset(name, scan_layers=scan_layers)))
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    t = time.perf_counter()
    fn.lower(state, tokens).compile()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argparse.ArgumentParser(), argv)
    kw = dict(length=16, name="tiny-dense") if args.smoke else {}
    with recording("compile_time", args) as results:
        results["shape"] = "qwen3-0.6b (28 layers) forward, batch 1 x 512, float32"
        results["scanned_compile_s"] = compile_seconds(True, **kw)
        results["unrolled_compile_s"] = compile_seconds(False, **kw)
        results["unrolled_over_scanned"] = results["unrolled_compile_s"] / results["scanned_compile_s"]


if __name__ == "__main__":
    main()
