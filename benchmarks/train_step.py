"""Train-step throughput against transformers + torch AdamW on the same machine, MFU against the
measured matmul peak, and compiled peak memory with and without remat, in one run.

    python -m benchmarks.train_step [--layers 4 --batch 4 --length 128] [--smoke]

The model is Qwen3-0.6B-shaped (real vocab, hidden 1024, 16/8 heads) with fewer layers so a step
takes seconds on 2 CPU cores; both frameworks train the same weights on the same batch in float32.
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import qwen3_jax as q
from benchmarks.common import (hf_qwen3_0_6b_shaped, matmul_peak_flops, parse_args, recording, timeit,
                               torch_matmul_peak_flops)
from qwen3_jax.sharding import make_mesh
from train.config import OptimizerConfig, StepConfig
from train.metrics import flops_per_token
from train.step import init_train_state, make_train_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--attention", default="auto", help="the model's attention implementation")
    args = parse_args(parser, argv)
    if args.smoke:
        args.layers, args.batch, args.length = 1, 2, 16
    B, T = args.batch, args.length

    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_qwen3_0_6b_shaped(tmp, num_layers=args.layers, smoke=args.smoke).train()
        model = q.from_hf(tmp, attention=args.attention)
    cfg = model.cfg
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, cfg.vocab_size, (B, T + 1))
    batch = {
        "tokens": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask": jnp.ones((B, T), jnp.float32), "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
    }
    opt = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, decay_steps=1000, end_learning_rate_ratio=0.1,
                          weight_decay=0.1, max_grad_norm=1.0)
    mesh = make_mesh({"data": 1})

    with recording("train_step", args) as results:
        results["shape"] = f"qwen3-0.6b-shaped, {args.layers} layers, float32, batch {B} x {T}, AdamW"
        results["attention"] = args.attention
        memory = {}
        for remat in ("none", "full"):
            c = cfg.replace(remat=remat)
            step = make_train_step(c, StepConfig(ce_chunk_len=min(T, 128)), opt, mesh)
            params = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))  # consumed (donated)
            state = init_train_state(c, opt, mesh, params=params)
            with jax.set_mesh(mesh):
                mem = step.jitted.lower(state, batch, None).compile().memory_analysis()  # no frozen inputs
            memory[remat] = mem.temp_size_in_bytes / 2**20
            if remat == "none":
                holder = {"state": state}

                def one_step():
                    holder["state"], metrics = step(holder["state"], batch)
                    jax.block_until_ready(metrics)

                ours_s = timeit(one_step)
        results["compiled_temp_memory_mib"] = memory
        results["remat_full_memory_over_none"] = memory["full"] / memory["none"]
        results["ours_tokens_per_s"] = B * T / ours_s

        torch_tokens = torch.tensor(tokens[:, :-1]), torch.tensor(tokens[:, 1:])
        optim = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def torch_step():
            logits = hf(torch_tokens[0]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch_tokens[1].reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            optim.step()
            optim.zero_grad(set_to_none=True)

        hf_s = timeit(torch_step)
        results["transformers_tokens_per_s"] = B * T / hf_s
        results["speedup_vs_transformers"] = hf_s / ours_s
        n = 256 if args.smoke else 2048
        peak, torch_peak = matmul_peak_flops(n), torch_matmul_peak_flops(n)
        flops = flops_per_token(cfg, T) * B * T
        results.update({
            "ours_mfu_vs_measured_matmul_peak": flops / ours_s / peak,
            "transformers_mfu_vs_torch_matmul_peak": flops / hf_s / torch_peak,
            "measured_matmul_peak_gflops": peak / 1e9,
            "torch_matmul_peak_gflops": torch_peak / 1e9,
        })


if __name__ == "__main__":
    main()
