"""Shared benchmark helpers: device peaks measured in the same run, timing, reference models.

Figures are reported as ratios taken in one process (ours / transformers, achieved / measured
peak): these machines are noisy, ratios travel better than bare times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

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


RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser`'s arguments plus the ones every benchmark takes: `--smoke` (tiny shapes, a few
    iterations: checks that the benchmark still runs, its figures mean nothing) and `--results_dir`
    (default benchmarks/results; a smoke run writes no file unless given one)."""
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few iterations: checks the script runs")
    parser.add_argument("--results_dir", default=None, help="where <name>.json goes (default: benchmarks/results)")
    args = parser.parse_args(argv)
    if args.results_dir is None and not args.smoke:
        args.results_dir = RESULTS_DIR
    return args


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(__file__))
        # Results files written by earlier benchmarks do not make the code uncommitted.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(top,exclude)benchmarks/results"], capture_output=True, text=True, timeout=10,
                               cwd=os.path.dirname(__file__)).stdout.strip()
        return out.stdout.strip() + ("+uncommitted" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def report(name: str, results: dict, results_dir: str | None = RESULTS_DIR) -> None:
    """Prints the results and writes them to `results_dir`/<name>.json (nothing when None)."""
    results = {"benchmark": name, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "commit": _commit(), **results}
    print(json.dumps(results, indent=2), flush=True)
    if results_dir is None:
        return
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=2)


@contextlib.contextmanager
def recording(name: str, args: argparse.Namespace) -> Iterator[dict]:
    """A dict to fill section by section; reported on exit even when a later section raises, then
    with "incomplete" naming the error, so figures measured before a failure are kept."""
    results: dict = {"smoke": True} if args.smoke else {}
    try:
        yield results
    except BaseException as e:
        results["incomplete"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        report(name, results, args.results_dir)


# A transformers Qwen3 config small enough for smoke runs (same structure: GQA, tied embedding).
SMOKE_HF_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16)


def hf_qwen3_0_6b_shaped(path: str, num_layers: int = 28, *, smoke: bool = False):
    """A randomly initialised transformers Qwen3-0.6B-shaped model saved at `path` (float32); with
    `smoke`, `SMOKE_HF_SHAPE` instead of 0.6B's widths."""
    import torch
    import transformers

    shape = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128)
    cfg = transformers.Qwen3Config(
        **(SMOKE_HF_SHAPE if smoke else shape), num_hidden_layers=num_layers, rope_theta=1e6,
        tie_word_embeddings=True, max_position_embeddings=40960,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval().float()
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path)
    return model


def prefill_runner(engine, batch: int, prompt_len: int, slots: int) -> Callable[[], None]:
    """One generation prefill (fill a fresh KV cache of `slots` positions from `batch` random
    prompts of `prompt_len` tokens, logits at the last one), as `Engine.generate` compiles it
    (`Engine.lower`), compiled now; the returned function runs it and blocks."""
    from flax import nnx

    prefill = engine.lower(batch, prompt_len, 1, slots)[0].compile()
    params = jax.tree.map(lambda v: v.get_value(), engine.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, engine.cfg.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)

    def run():
        cache = engine.model.init_cache(batch, slots, jnp.dtype(engine.cfg.dtype))
        jax.block_until_ready(prefill(params, tokens, lengths, cache))

    return run
