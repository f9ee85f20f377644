"""Prefill tokens/s of a Qwen3-0.6B-shaped model in float32, against transformers, in one run.

    python -m benchmarks.prefill [--batch 2 --length 256] [--smoke]
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
from benchmarks.common import (hf_qwen3_0_6b_shaped, matmul_peak_flops, parse_args, prefill_runner, recording, timeit,
                               torch_matmul_peak_flops)
from infer.engine import Engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--attention", default="auto", help="the model's attention implementation")
    args = parse_args(parser, argv)
    if args.smoke:
        args.batch, args.length = 2, 16
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_qwen3_0_6b_shaped(tmp, 2 if args.smoke else 28, smoke=args.smoke)
        model = q.from_hf(tmp, attention=args.attention)
    cfg = model.cfg
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    toks_j, toks_t = jnp.asarray(tokens), torch.tensor(tokens, dtype=torch.long)
    n_tok = args.batch * args.length
    with recording("prefill", args) as results:
        results["shape"] = f"qwen3-0.6b float32, batch {args.batch} x length {args.length}"
        results["attention"] = args.attention
        forward = nnx.jit(lambda m, t: m(t))
        ours_s = timeit(lambda: forward(model, toks_j).block_until_ready())
        with torch.inference_mode():
            hf_s = timeit(lambda: hf(toks_t).logits)
            ref = hf(toks_t).logits.numpy()
        results["max_abs_logit_diff"] = float(np.abs(np.asarray(forward(model, toks_j)) - ref).max())
        results.update({
            "ours_tokens_per_s": n_tok / ours_s,
            "transformers_tokens_per_s": n_tok / hf_s,
            "speedup_vs_transformers": hf_s / ours_s,
        })

        # Prefill as generation uses it: fill the KV cache, logits for the last position only.
        ours_gen_s = timeit(prefill_runner(Engine(model, forced_ids=[0]), args.batch, args.length, args.length + 128))
        with torch.inference_mode():
            hf_gen_s = timeit(lambda: hf(toks_t, use_cache=True, logits_to_keep=1).logits)
        results["generation_prefill_speedup_vs_transformers"] = hf_gen_s / ours_gen_s
        results["ours_generation_prefill_tokens_per_s"] = n_tok / ours_gen_s

        total, _ = count_params(cfg)
        # Forward FLOPs: 2 per weight per token (the vocab projection included) plus attention scores.
        attn = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * args.length * args.length / 2 * args.batch
        flops = 2 * total * n_tok + attn
        n = 256 if args.smoke else 2048
        peak, torch_peak = matmul_peak_flops(n), torch_matmul_peak_flops(n)
        results.update({
            "ours_flops_utilisation_vs_measured_matmul_peak": flops / ours_s / peak,
            "transformers_flops_utilisation": flops / hf_s / peak,
            "measured_matmul_peak_gflops": peak / 1e9,
            "torch_matmul_peak_gflops_same_gemm": torch_peak / 1e9,
        })


if __name__ == "__main__":
    main()
