"""Attention at long context on this CPU: compiled memory of einsum vs blockwise attention (forward +
gradient) from 2K to 32K tokens, their step times where einsum fits, and a decode step over a long
KV cache, in one run.

    python -m benchmarks.attention [--lengths 2048,4096,8192,32768] [--time_lengths 2048,4096] [--smoke]

One layer's attention core at Qwen3-0.6B / 1.7B head shapes (16 query heads, 8 kv heads, head_dim
128), batch 1, float32, causal; the projections are not included. Einsum materialises [N, T, T]
float32 scores (at 32K: 4 GiB per head, 64 GiB for the 16 heads), so it is compiled there, not run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import matmul_peak_flops, parse_args, recording, timeit
from qwen3_jax import attention as A

K, G, H = 8, 2, 128
GIB = 2**30


def _inputs(T: int, S: int):
    key = jax.random.key(0)
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (1, T, K, G, H)), jax.random.normal(kk, (1, K, H, S)),
            jax.random.normal(kv, (1, K, S, H)))


def _abstract(T: int, S: int):
    return tuple(jax.ShapeDtypeStruct(x, jnp.float32) for x in ((1, T, K, G, H), (1, K, H, S), (1, K, S, H)))


def _train_fn(impl: str, T: int, block_q: int, block_kv: int):
    mask = A.Mask(jnp.arange(T)[None], None)

    def attend(q, k, v):
        if impl == "einsum":
            return A.einsum_attention(q, k, v, mask)
        return A.blockwise_attention(q, k, v, mask, block_q, block_kv)

    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))


def _decode_fn(impl: str, S: int, block_kv: int):
    def step(q, k, v, slot):
        mask = A.Mask(slot[None, None], None)
        if impl == "einsum":
            return A.einsum_attention(q, k, v, mask)
        return A.blockwise_attention(q, k, v, mask, 1, block_kv)

    return jax.jit(step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="2048,4096,8192,32768", help="compiled-memory lengths")
    parser.add_argument("--time_lengths", default="2048,4096", help="lengths timed for both implementations")
    parser.add_argument("--blockwise_time_lengths", default="8192", help="lengths timed for blockwise only")
    parser.add_argument("--decode_slots", default="32768", help="KV cache sizes of the decode step")
    parser.add_argument("--block_q", type=int, default=512)
    parser.add_argument("--block_kv", type=int, default=1024)
    args = parse_args(parser, argv)
    if args.smoke:
        args.lengths = args.time_lengths = "64"
        args.blockwise_time_lengths, args.decode_slots, args.block_q, args.block_kv = "", "64", 16, 32
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    with recording("attention", args) as results:
        results["what"] = (f"one attention core, {K * G} query / {K} kv heads, head_dim {H}, batch 1, float32, causal; "
                           f"blockwise tiles {args.block_q} x {args.block_kv}")
        rows = results["train_memory"] = []
        for T in ints(args.lengths):
            row = {"tokens": T, "scores_gib": K * G * T * T * 4 / GIB}
            for impl in ("einsum", "blockwise"):
                f = _train_fn(impl, T, args.block_q, args.block_kv)
                row[f"{impl}_temp_gib"] = f.lower(*_abstract(T, T)).compile().memory_analysis().temp_size_in_bytes / GIB
            row["memory_ratio"] = row["einsum_temp_gib"] / row["blockwise_temp_gib"]
            rows.append(row)
            print(row, flush=True)

        peak = matmul_peak_flops(256 if args.smoke else 2048)
        results["matmul_peak_gflops"] = peak / 1e9
        timed = results["train_time"] = []
        for T in ints(args.time_lengths) + ints(args.blockwise_time_lengths):
            # Causal attention forward + backward: 2 (QK^T, PV) + 5 (recomputed QK^T, dV, dP, dQ, dK) matmuls
            # of 2*T*T*H FLOPs per query head, half of them under the diagonal (what a causal kernel must do).
            flops = 7 * 2 * T * T * H * K * G / 2
            q, k, v = _inputs(T, T)
            row = {"tokens": T}
            for impl in ("einsum", "blockwise") if T in ints(args.time_lengths) else ("blockwise",):
                f = _train_fn(impl, T, args.block_q, args.block_kv)
                row[f"{impl}_s"] = timeit(lambda: jax.block_until_ready(f(q, k, v)), repeats=2)
                row[f"{impl}_causal_flops_utilisation"] = flops / row[f"{impl}_s"] / peak
            if "einsum_s" in row:
                row["blockwise_over_einsum_time"] = row["blockwise_s"] / row["einsum_s"]
            timed.append(row)
            print(row, flush=True)

        decodes = []
        for S in ints(args.decode_slots):
            q, k, v = _inputs(1, S)
            decode = {"cache_slots": S}
            for filled in (S // 8, S - 1):  # a cache 1/8 full (most tiles skipped) and a full one
                slot = jnp.asarray(filled, jnp.int32)
                for impl in ("einsum", "blockwise"):
                    f = _decode_fn(impl, S, args.block_kv)
                    decode[f"{impl}_temp_mib"] = f.lower(q, k, v, slot).compile().memory_analysis().temp_size_in_bytes / 2**20
                    decode[f"{impl}_ms_at_{filled + 1}"] = 1e3 * timeit(lambda: f(q, k, v, slot).block_until_ready(),
                                                                       repeats=5)
            decodes.append(decode)
            results["decode"] = decodes[0] if len(decodes) == 1 else decodes
            print(decode, flush=True)


if __name__ == "__main__":
    main()
