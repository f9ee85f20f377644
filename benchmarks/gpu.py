"""The GPU check (run by benchmarks/gpu.sh on one GPU): bf16 train-step MFU at Qwen3-0.6B and 1.7B
shapes, decode tokens/s at batch 1 and 32 against the HBM-bandwidth roofline, and cuDNN attention at
32K tokens against einsum and blockwise attention, in one process so every ratio shares its machine.

    python -m benchmarks.gpu              # on a GPU; about 5 minutes on an H100/H200
    python -m benchmarks.gpu --smoke      # tiny shapes on any backend: checks the script itself

Peaks are measured in the same run (a bf16 GEMM; a bf16 matrix-vector product over 4 GiB for the
bandwidth); the nominal figures for the device, where known, are printed beside them.
"""

from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import qwen3_jax as q
from qwen3_jax.model import count_params
from benchmarks.common import report, timeit
from infer.engine import Engine
from qwen3_jax import attention as A
from qwen3_jax.sharding import make_mesh
from train.step import OptimizerConfig, StepConfig, init_train_state, make_train_step
from train.train import flops_per_token

# Dense bf16 tensor-core FLOP/s and HBM bytes/s from NVIDIA's datasheets (SXM parts).
NOMINAL = {"h200": (989e12, 4.8e12), "h100": (989e12, 3.35e12), "a100": (312e12, 2.04e12)}


def nominal(kind: str) -> tuple[float | None, float | None]:
    return next((v for k, v in NOMINAL.items() if k in kind.lower()), (None, None))


def bf16_matmul_peak(n: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / timeit(lambda: f(a, a).block_until_ready(), repeats=10, warmup=2)


def hbm_bandwidth(nbytes: int) -> float:
    rows = nbytes // (2 * 8192)
    w = jnp.ones((rows, 8192), jnp.bfloat16)
    v = jnp.ones((8192,), jnp.bfloat16)
    f = jax.jit(lambda w, v: w @ v)
    return w.size * 2 / timeit(lambda: f(w, v).block_until_ready(), repeats=10, warmup=2)


def train_mfu(name: str, layers: int | None, batch: int, length: int, peak: float) -> dict:
    """One real train step (AdamW, float32 master weights, bf16 compute) timed after compilation."""
    overrides = dict(dtype="bfloat16", param_dtype="float32")
    if layers is not None:
        overrides["num_layers"] = layers
    out: dict = {"model": name, "batch": batch, "length": length}
    for remat in ("none", "full"):  # the first that fits
        cfg = q.preset(name, remat=remat, **overrides)
        mesh = make_mesh({"data": 1})
        opt = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, decay_steps=1000, end_learning_rate_ratio=0.1,
                              weight_decay=0.1, max_grad_norm=1.0)
        try:
            step = make_train_step(cfg, StepConfig(ce_chunk_len=min(length, 1024)), opt, mesh)
            state = init_train_state(cfg, opt, mesh)
            tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, cfg.vocab_size)
            data = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": jnp.ones((batch, length)),
                    "segment_ids": jnp.ones((batch, length), jnp.int32),
                    "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))}
            state, metrics = step(state, data)  # compile
            jax.block_until_ready(metrics)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                state, metrics = step(state, data)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t)
        except Exception as e:  # out of memory: try with remat
            out[f"remat_{remat}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        seconds = float(np.median(times))
        model_flops = flops_per_token(cfg, length) * batch * length
        out.update(remat=remat, step_s=seconds, tokens_per_s=batch * length / seconds, mfu=model_flops / seconds / peak,
                   attention=A.choose(cfg, cached=False, packed=True), loss=float(metrics["loss"]))
        return out
    return out


def decode_rate(name: str, layers: int | None, batch: int, prompt: int, new: int, bandwidth: float) -> dict:
    """Steady-state decode: the time difference of two generation lengths over the extra steps."""
    overrides = dict(dtype="bfloat16", param_dtype="bfloat16")
    if layers is not None:
        overrides["num_layers"] = layers
    cfg = q.preset(name, **overrides)
    engine = Engine(q.init_model(cfg), max_len=prompt + 2 * new)
    prompts = np.random.RandomState(0).randint(0, 151643 if cfg.vocab_size > 151643 else cfg.vocab_size,
                                               (batch, prompt)).tolist()
    kw = dict(temperature=0.0, stop_token_ids=())
    run = lambda n: (lambda: engine.generate(prompts, max_new_tokens=n, **kw))  # noqa: E731
    short, long = new // 4, new
    step_s = (timeit(run(long), repeats=3) - timeit(run(short), repeats=3)) / (long - short)
    total, _ = count_params(cfg)
    # Every weight read once per step, plus the KV cache up to the mean context of the timed steps.
    context = prompt + (short + long) / 2
    cache_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * batch * 2
    roofline_s = (total * 2 + cache_bytes) / bandwidth
    return {"model": name, "batch": batch, "prompt": prompt, "step_ms": step_s * 1e3, "tokens_per_s": batch / step_s,
            "roofline_step_ms": roofline_s * 1e3, "fraction_of_roofline": roofline_s / step_s}


def attention_32k(T: int, peak: float) -> dict:
    """One attention core (16 query / 8 kv heads, head_dim 128, batch 1, bf16), forward + gradient."""
    B, N, K, H = 1, 16, 8, 128
    keys = jax.random.split(jax.random.key(2), 3)
    q_, k, v = (jax.random.normal(kk, (B, T, n, H), jnp.bfloat16) for kk, n in zip(keys, (N, K, K)))
    cfg = q.preset("qwen3-0.6b", dtype="bfloat16")
    mask = A.Mask(jnp.arange(T)[None], None)

    def core(impl):
        def f(a, b, c):
            if impl == "cudnn":
                return A.cudnn_attention(a, b, c, cfg)
            args = (a.reshape(B, T, K, N // K, H), jnp.transpose(b, (0, 2, 3, 1)), jnp.swapaxes(c, 1, 2), mask)
            out = A.einsum_attention(*args) if impl == "einsum" else A.blockwise_attention(*args, 512, 1024)
            return out.reshape(B, T, N, H)
        return jax.jit(jax.value_and_grad(lambda a, b, c: jnp.sum(f(a, b, c).astype(jnp.float32)), argnums=(0, 1, 2)))

    flops = 7 * 2 * T * T * H * N / 2  # causal forward + backward (see benchmarks/attention.py)
    out: dict = {"tokens": T}
    for impl in ("cudnn", "blockwise", "einsum"):
        try:
            f = core(impl)
            out[f"{impl}_temp_gib"] = f.lower(q_, k, v).compile().memory_analysis().temp_size_in_bytes / 2**30
            out[f"{impl}_ms"] = 1e3 * timeit(lambda: jax.block_until_ready(f(q_, k, v)), repeats=3)
            out[f"{impl}_causal_flops_utilisation"] = flops / (out[f"{impl}_ms"] / 1e3) / peak
        except Exception as e:
            out[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if "cudnn_ms" in out and "einsum_ms" in out:
        out["einsum_over_cudnn_time"] = out["einsum_ms"] / out["cudnn_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script on any backend")
    args = parser.parse_args()
    smoke = args.smoke
    kind = jax.devices()[0].device_kind
    print(f"device: {kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    nominal_flops, nominal_bw = nominal(kind)
    peak = bf16_matmul_peak(256 if smoke else 8192)
    bandwidth = hbm_bandwidth(2**24 if smoke else 2**32)
    results: dict = {"measured_bf16_matmul_tflops": peak / 1e12, "nominal_bf16_tflops": (nominal_flops or 0) / 1e12,
                     "measured_hbm_gb_s": bandwidth / 1e9, "nominal_hbm_gb_s": (nominal_bw or 0) / 1e9}
    print(results, flush=True)

    sections = {
        "train": lambda: [train_mfu(m, 2 if smoke else None, 2 if smoke else 8, 64 if smoke else 2048, peak)
                          for m in ("qwen3-0.6b", "qwen3-1.7b")],
        "decode": lambda: [decode_rate("qwen3-0.6b", 2 if smoke else None, b, 16 if smoke else 512, 8 if smoke else 128,
                                       bandwidth) for b in (1, 32)],
        "attention": lambda: attention_32k(256 if smoke else 32768, peak),
    }
    for name, run in sections.items():
        t = time.perf_counter()
        try:
            results[name] = run()
        except Exception:  # one failing section must not hide the others' figures
            results[name] = {"error": traceback.format_exc(limit=3)[-1500:]}
        print(name, f"({time.perf_counter() - t:.0f} s):", results[name], flush=True)
    report("gpu_smoke" if smoke else "gpu", results)


if __name__ == "__main__":
    main()
