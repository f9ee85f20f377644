"""Decode throughput of a Qwen3-0.6B-shaped model in float32 against transformers' generate, at
batch 1 and 8: end to end (one generate call) and steady-state per step (the difference of two
generation lengths), each step against the memory-bandwidth roofline (every weight read once) and
against its matmul floor (the step's weight matmuls alone, in each library), plus prefill
throughput, compile time and compilation counts.

    python -m benchmarks.decode [--new_tokens 32] [--smoke]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import qwen3_jax as q
from qwen3_jax.model import count_params
from benchmarks.common import (hf_qwen3_0_6b_shaped, memory_bandwidth, parse_args, prefill_runner, recording,
                               timeit)
from infer import engine as engine_lib
from infer.engine import Engine


# How each weight of a dense model meets the [B, in] activation of a decode step: contracting its
# first dim ([in, ...out]), its leading dims ([...in, out]), or its last dim (the tied embedding).
_IN_FIRST = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
_IN_LEADING = {"o_proj", "down_proj"}


def matmul_floor_s(engine: Engine, hf, batch: int) -> dict[str, float]:
    """Seconds per decode step spent in the step's weight matmuls alone, ours and transformers'.

    Every weight meets a [batch, in] activation once, in the layout the model stores it, with
    nothing else of the step around it and no dependencies between the products. No decode step
    can beat this with the same matmul kernels, so transformers' step over our floor bounds the
    speedup that any change outside the kernels could reach.
    """
    kinds, weights = [], []
    for path, w in nnx.to_flat_state(engine.params):
        name = path[-1]
        if w.ndim < 2 or (name == "embed" and engine.model.lm_head is not None):
            continue  # norms; an untied model's logits read lm_head, not the embedding
        if name not in _IN_FIRST | _IN_LEADING | {"embed"}:
            raise ValueError(f"no decode matmul known for weight {path}")
        kinds.append(name)
        weights.append(w[...])

    @jax.jit
    def ours(weights):
        out = []
        for name, w in zip(kinds, weights):
            if name == "embed":
                out.append(jnp.einsum("BD,VD->BV", jnp.ones((batch, w.shape[1])), w))
            else:
                w2 = w.reshape(w.shape[0], -1) if name in _IN_FIRST else w.reshape(-1, w.shape[-1])
                out.append(jnp.ones((batch, w2.shape[0])) @ w2)
        return out

    linears = [m.weight for m in hf.modules() if isinstance(m, torch.nn.Linear)]  # lm_head included

    def theirs():
        with torch.inference_mode():
            for w in linears:
                torch.nn.functional.linear(torch.ones(batch, w.shape[1]), w)

    return {
        "ours": timeit(lambda: jax.block_until_ready(ours(weights)), repeats=5),
        "transformers": timeit(theirs, repeats=5),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--long_prompt_len", type=int, default=400)
    parser.add_argument("--attention", default="auto", help="the model's attention implementation")
    args = parse_args(parser, argv)
    smoke = args.smoke
    if smoke:
        args.new_tokens, args.prompt_len, args.long_prompt_len = 4, 8, 24
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_qwen3_0_6b_shaped(tmp, 2 if smoke else 28, smoke=smoke)
        model = q.from_hf(tmp, attention=args.attention)
    # The smoke model's vocabulary lacks Qwen3's stop-thinking ids (no budget is used here).
    engine = Engine(model, forced_ids=[0] if smoke else None)
    vocab = model.cfg.vocab_size
    rng = np.random.RandomState(0)
    kw = dict(temperature=0.0, stop_token_ids=())
    bandwidth = (lambda: memory_bandwidth(1 << 20)) if smoke else memory_bandwidth
    with recording("decode", args) as results:
        results["shape"] = f"qwen3-0.6b float32, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"
        results["attention"] = args.attention
        t = time.perf_counter()
        engine.generate([[1] * args.prompt_len], max_new_tokens=args.new_tokens, **kw)
        results["first_call_s_including_compile_batch1"] = time.perf_counter() - t

        def ours(prompts, n):
            return lambda: engine.generate(prompts.tolist(), max_new_tokens=n, **kw)

        def theirs(prompts, n):
            def run():
                with torch.inference_mode():
                    hf.generate(torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)
            return run

        total, _ = count_params(model.cfg)
        short, long = (2, 2 + args.new_tokens) if smoke else (8, 8 + args.new_tokens)

        def step_s(run, prompts, *, repeats, long_s=None):
            """Steady-state seconds per step: the difference of two lengths cancels prefill and dispatch."""
            long_s = timeit(run(prompts, long), repeats=repeats) if long_s is None else long_s
            return (long_s - timeit(run(prompts, short), repeats=repeats)) / (long - short)

        for batch in (1, 2) if smoke else (1, 8):
            prompts = rng.randint(0, vocab, (batch, args.prompt_len))
            # This VM's bandwidth reading drifts up to 2x within minutes: probe it on both sides of the
            # measurement it is the roofline for, and take the higher reading as the peak.
            bw_before = bandwidth()
            # End to end: one generate call (prefill + new_tokens steps), as a user sees it.
            ours_s, hf_s = timeit(ours(prompts, long), repeats=2), timeit(theirs(prompts, long), repeats=2)
            results[f"batch{batch}_generate_tokens_per_s"] = {"ours": batch * long / ours_s,
                                                              "transformers": batch * long / hf_s}
            results[f"batch{batch}_generate_speedup_vs_transformers"] = hf_s / ours_s
            ours_step = step_s(ours, prompts, repeats=2, long_s=ours_s)
            hf_step = step_s(theirs, prompts, repeats=2, long_s=hf_s)
            results[f"batch{batch}_decode_step_ms"] = {"ours": ours_step * 1e3, "transformers": hf_step * 1e3}
            results[f"batch{batch}_decode_speedup_vs_transformers"] = hf_step / ours_step
            bw_after = bandwidth()
            results[f"batch{batch}_measured_bandwidth_gb_s"] = {"before": bw_before / 1e9, "after": bw_after / 1e9}
            bw = max(bw_before, bw_after)
            results[f"batch{batch}_roofline_fraction"] = (total * 4 / bw) / ours_step  # weights read once per step
            floor = matmul_floor_s(engine, hf, batch)
            results[f"batch{batch}_matmul_floor_ms"] = {k: v * 1e3 for k, v in floor.items()}
            results[f"batch{batch}_step_over_matmul_floor"] = {
                "ours": ours_step / floor["ours"], "transformers": hf_step / floor["transformers"],
            }
            results[f"batch{batch}_speedup_ceiling_vs_transformers"] = hf_step / floor["ours"]

        # Steady-state step at a longer context: each step also reads the batch's KV cache (~0.9 GB here).
        B = 2 if smoke else 8
        prompts = rng.randint(0, vocab, (B, args.long_prompt_len))
        ours_step, hf_step = step_s(ours, prompts, repeats=1), step_s(theirs, prompts, repeats=1)
        key = f"batch{B}_prompt{args.long_prompt_len}"
        results[f"{key}_decode_step_ms"] = {"ours": ours_step * 1e3, "transformers": hf_step * 1e3}
        results[f"{key}_decode_speedup_vs_transformers"] = hf_step / ours_step

        B, P = (2, 16) if smoke else (4, 256)
        results[f"prefill_tokens_per_s_batch{B}x{P}"] = B * P / timeit(prefill_runner(engine, B, P, P + 128))

        # Compilations: `generate` buckets prompt lengths, so mixed lengths reuse a few programs.
        before = (engine_lib._prefill._cache_size(), engine_lib._decode._cache_size())
        n, top = (8, 40) if smoke else (100, 300)
        lengths_mixed = rng.randint(4, top, size=n)
        for i in range(0, n, 8):
            engine.generate([rng.randint(0, vocab, m).tolist() for m in lengths_mixed[i:i + 8]], max_new_tokens=2, **kw)
        results[f"compilations_over_{n}_mixed_prompts"] = {
            "prefill": engine_lib._prefill._cache_size() - before[0],
            "decode": engine_lib._decode._cache_size() - before[1],
            "prompt_lengths": f"4..{top} in batches of 8",
        }


if __name__ == "__main__":
    main()
