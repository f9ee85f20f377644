"""Shared benchmark helpers: device peaks measured in the same run, timing, reference models.

Figures are reported as ratios taken in one process (ours / transformers, achieved / measured
peak): these machines are noisy, ratios travel better than bare times.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def timeit(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
    """Measured matmul FLOP/s of the default device (the MFU denominator)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    dt = timeit(lambda: f(a, b).block_until_ready(), repeats=5)
    return 2 * n**3 / dt


def torch_matmul_peak_flops(n: int = 2048) -> float:
    """The same GEMM in torch: the ceiling transformers runs against on this machine."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timeit(lambda: a @ b, repeats=5)


def memory_bandwidth(nbytes: int = 1 << 30) -> float:
    """Measured read bandwidth (bytes/s) of a float32 matrix-vector product over `nbytes` of weights.

    A matvec is what batch-1 decode does, so it is the roofline's bandwidth.
    """
    rows = nbytes // (4 * 4096)
    w = jax.random.normal(jax.random.key(0), (rows, 4096), jnp.float32)
    v = jnp.ones((4096,), jnp.float32)
    f = jax.jit(lambda w, v: w @ v)
    dt = timeit(lambda: f(w, v).block_until_ready(), repeats=5)
    return w.size * 4 / dt


def report(name: str, results: dict) -> None:
    """Prints the results and writes them to benchmarks/results/<name>.json."""
    results = {"benchmark": name, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, **results}
    print(json.dumps(results, indent=2))
    out = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)


def hf_qwen3_0_6b_shaped(path: str, num_layers: int = 28):
    """A randomly initialised transformers Qwen3-0.6B-shaped model saved at `path` (float32)."""
    import torch
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=num_layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=True,
        max_position_embeddings=40960,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval().float()
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path)
    return model
