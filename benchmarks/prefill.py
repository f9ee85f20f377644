"""Prefill tokens/s of a Qwen3-0.6B-shaped model in float32, against transformers, in one run.

    python -m benchmarks.prefill [--batch 2 --length 256]
"""

from __future__ import annotations

import argparse
import tempfile

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import qwen3_jax as q
from qwen3_jax.model import count_params
from benchmarks.common import hf_qwen3_0_6b_shaped, matmul_peak_flops, report, timeit, torch_matmul_peak_flops
from infer import engine as engine_lib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_qwen3_0_6b_shaped(tmp)
        model = q.from_hf(tmp)
    cfg = model.cfg
    tokens = np.random.RandomState(0).randint(0, 151643, (args.batch, args.length)).astype(np.int32)
    toks_j, toks_t = jnp.asarray(tokens), torch.tensor(tokens, dtype=torch.long)

    forward = nnx.jit(lambda m, t: m(t))
    ours_s = timeit(lambda: forward(model, toks_j).block_until_ready())
    with torch.inference_mode():
        hf_s = timeit(lambda: hf(toks_t).logits)
        ref = hf(toks_t).logits.numpy()
    max_diff = float(np.abs(np.asarray(forward(model, toks_j)) - ref).max())

    # Prefill as generation uses it: fill the KV cache, logits for the last position only.
    graphdef, params = nnx.split(model)
    lengths = jnp.full((args.batch,), args.length, jnp.int32)

    def ours_cache_prefill():
        cache = model.init_cache(args.batch, args.length + 128)
        engine_lib._prefill(graphdef, params, toks_j, lengths, cache)[1].block_until_ready()

    ours_gen_s = timeit(ours_cache_prefill)
    with torch.inference_mode():
        hf_gen_s = timeit(lambda: hf(toks_t, use_cache=True, logits_to_keep=1).logits)

    n_tok = args.batch * args.length
    total, _ = count_params(cfg)
    # Forward FLOPs: 2 per weight per token (the vocab projection included) plus attention scores.
    attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.length * args.length / 2 * args.batch
    flops = 2 * total * n_tok + attn
    peak, torch_peak = matmul_peak_flops(), torch_matmul_peak_flops()
    report("prefill", {
        "shape": f"qwen3-0.6b float32, batch {args.batch} x length {args.length}",
        "ours_tokens_per_s": n_tok / ours_s,
        "transformers_tokens_per_s": n_tok / hf_s,
        "speedup_vs_transformers": hf_s / ours_s,
        "ours_flops_utilisation_vs_measured_matmul_peak": flops / ours_s / peak,
        "transformers_flops_utilisation": flops / hf_s / peak,
        "generation_prefill_speedup_vs_transformers": hf_gen_s / ours_gen_s,
        "ours_generation_prefill_tokens_per_s": n_tok / ours_gen_s,
        "measured_matmul_peak_gflops": peak / 1e9,
        "torch_matmul_peak_gflops_same_gemm": torch_peak / 1e9,
        "max_abs_logit_diff": max_diff,
    })


if __name__ == "__main__":
    main()
