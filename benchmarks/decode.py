"""Decode throughput of a Qwen3-0.6B-shaped model in float32 against transformers' generate, at
batch 1 and 8: end to end (one generate call) and steady-state per step (the difference of two
generation lengths), each step against the memory-bandwidth roofline (every weight read once) and
against its matmul floor (the step's weight matmuls alone, in each library), plus prefill
throughput, compile time and compilation counts.

    python -m benchmarks.decode [--new_tokens 32]
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
from benchmarks.common import hf_qwen3_0_6b_shaped, memory_bandwidth, report, timeit
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--long_prompt_len", type=int, default=400)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_qwen3_0_6b_shaped(tmp)
        model = q.from_hf(tmp)
    engine = Engine(model)
    rng = np.random.RandomState(0)
    results: dict = {"shape": f"qwen3-0.6b float32, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy"}
    kw = dict(temperature=0.0, stop_token_ids=())

    t = time.perf_counter()
    engine.generate([[1] * args.prompt_len], max_new_tokens=args.new_tokens, **kw)
    results["first_call_s_including_compile_batch1"] = time.perf_counter() - t

    def ours(prompts, n):
        return lambda: engine.generate(prompts.tolist(), max_new_tokens=n, **kw)

    def theirs(prompts, n):
        def run():
            with torch.inference_mode():
                hf.generate(torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return run

    total, _ = count_params(model.cfg)
    short, long = 8, 8 + args.new_tokens

    def step_s(run, prompts, *, repeats, long_s=None):
        """Steady-state seconds per step: the difference of two lengths cancels prefill and dispatch."""
        long_s = timeit(run(prompts, long), repeats=repeats) if long_s is None else long_s
        return (long_s - timeit(run(prompts, short), repeats=repeats)) / (long - short)

    for batch in (1, 8):
        prompts = rng.randint(0, 151643, (batch, args.prompt_len))
        # This VM's bandwidth reading drifts up to 2x within minutes: probe it on both sides of the
        # measurement it is the roofline for, and take the higher reading as the peak.
        bw_before = memory_bandwidth()
        # End to end: one generate call (prefill + new_tokens steps), as a user sees it.
        ours_s, hf_s = timeit(ours(prompts, long), repeats=2), timeit(theirs(prompts, long), repeats=2)
        results[f"batch{batch}_generate_tokens_per_s"] = {"ours": batch * long / ours_s, "transformers": batch * long / hf_s}
        results[f"batch{batch}_generate_speedup_vs_transformers"] = hf_s / ours_s
        ours_step = step_s(ours, prompts, repeats=2, long_s=ours_s)
        hf_step = step_s(theirs, prompts, repeats=2, long_s=hf_s)
        results[f"batch{batch}_decode_step_ms"] = {"ours": ours_step * 1e3, "transformers": hf_step * 1e3}
        results[f"batch{batch}_decode_speedup_vs_transformers"] = hf_step / ours_step
        bw_after = memory_bandwidth()
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
    prompts = rng.randint(0, 151643, (8, args.long_prompt_len))
    ours_step, hf_step = step_s(ours, prompts, repeats=1), step_s(theirs, prompts, repeats=1)
    key = f"batch8_prompt{args.long_prompt_len}"
    results[f"{key}_decode_step_ms"] = {"ours": ours_step * 1e3, "transformers": hf_step * 1e3}
    results[f"{key}_decode_speedup_vs_transformers"] = hf_step / ours_step

    tokens = jnp.asarray(rng.randint(0, 151643, (4, 256)), jnp.int32)
    lengths = jnp.full((4,), 256, jnp.int32)

    def prefill():
        cache = engine.model.init_cache(4, 384)
        engine_lib._prefill(engine.graphdef, engine.params, tokens, lengths, cache)[1].block_until_ready()

    results["prefill_tokens_per_s_batch4x256"] = 4 * 256 / timeit(prefill)

    before = (engine_lib._prefill._cache_size(), engine_lib._decode._cache_size())
    lengths_mixed = rng.randint(4, 300, size=100)
    for i in range(0, 100, 8):
        engine.generate([rng.randint(0, 151643, n).tolist() for n in lengths_mixed[i:i + 8]], max_new_tokens=2, **kw)
    results["compilations_over_100_mixed_prompts"] = {
        "prefill": engine_lib._prefill._cache_size() - before[0], "decode": engine_lib._decode._cache_size() - before[1],
        "prompt_lengths": "4..300 in batches of 8",
    }
    report("decode", results)


if __name__ == "__main__":
    main()
