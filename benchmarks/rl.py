"""Reasoning RL: a step's time split (rollout / reward / update), the update's MFU, rollout tokens/s
against plain decoding at the same shape, and what rebuilding the rollout engine each step costs.

    python -m benchmarks.rl [--layers 28 --prompts 2 --samples 4 --new_tokens 32] [--smoke]

Shape: a Qwen3-0.6B-shaped policy (real widths, real 151,936 vocabulary, the Qwen3 tokenizer) with
`--layers` layers, float32; `--prompts` x `--samples` rows (default 8, benchmarks/decode.py's
batch), 32-token prompt slots, `--new_tokens` new tokens at temperature 1 with no truncation, all
rows non-thinking so every row runs to the length (no stop token is likely from random weights).

- the RL step (`train.rl.trainer.RLStep`, 3 steps, the first compiling): seconds of rollout, reward
  (train.rl.rewards:miniature_answer) and update, and the update's MFU against the measured matmul
  peak (model FLOPs: policy forward + backward over the rows);
- rollout tokens/s (the step's own rollout) against `Engine.generate` sampling the same prompts at
  the same settings without log-probabilities, and greedy, as benchmarks/decode.py measures it;
- the engine rebuild: seconds to build the rollout engine from the train state's parameters
  (`Roller.engine`: a cast to the compute dtype, per-layer copies on CPU), against the rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import matmul_peak_flops, parse_args, recording, timeit
from infer.rollout import Mode
from qwen3_jax.sharding import make_mesh
from qwen3_jax.tokenizer import Tokenizer
from train import step as step_lib
from train.rl import config as rl_config
from train.rl import trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=32)
    args = parse_args(parser, argv)
    if args.smoke:
        args.layers, args.new_tokens = 1, 8
    tokenizer = Tokenizer.qwen3()
    with tempfile.TemporaryDirectory() as tmp, recording("rl", args) as results:
        prompts = os.path.join(tmp, "prompts.jsonl")
        with open(prompts, "w") as f:
            for i in range(args.prompts):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
                                    "answer": 2 * i}) + "\n")
        c = rl_config.default_config()
        c.model.preset = "tiny-dense" if args.smoke else "qwen3-0.6b"
        c.model.overrides = dict(vocab_size=151936, num_layers=args.layers)
        c.tokenizer = "qwen3"
        c.prompts.paths, c.prompts.batch_size = prompts, args.prompts
        c.samples = args.samples
        c.reward = "train.rl.rewards:miniature_answer"
        c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.think_fraction = 32, args.new_tokens, 0.0
        c.train.ce_chunk_len = 8
        c.optimizer.update(learning_rate=1e-6, warmup_steps=0, decay_steps=100)
        job = rl_config.resolve_rl(rl_config.rl_config(c))
        cfg = job.policy.model
        mesh = make_mesh(job.policy.mesh)
        results["shape"] = (f"{'tiny' if args.smoke else 'qwen3-0.6b'}-shaped, {args.layers} layers, float32, "
                            f"{args.prompts} prompts x {args.samples} samples, prompt slots 32, "
                            f"{args.new_tokens} new tokens, temperature 1, no thinking")
        step_fn = trainer.RLStep(job, mesh, tokenizer, None)
        state = step_lib.init_train_state(cfg, job.policy.optimizer, mesh, seed=0)
        records = [json.loads(line) for line in open(prompts)]
        times = []
        for _ in range(3):
            state, metrics = step_fn(state, records)
            times.append({k: float(metrics[k]) for k in
                          ("rollout_time", "reward_time", "update_time", "host_time", "step_time", "completion_len")})
        steady = times[1:]
        mean = {k: float(np.mean([t[k] for t in steady])) for k in steady[0]}
        results["rl_step_times_s"] = steady
        results["time_split"] = {k: mean[f"{k}_time"] / mean["step_time"] for k in ("rollout", "reward", "update", "host")}
        peak = matmul_peak_flops(512 if args.smoke else 2048)
        seq_len = job.config.rollout.seq_len
        flops = trainer.update_flops(cfg, seq_len, False) * job.rows * seq_len
        results["update_mfu"] = flops / mean["update_time"] / peak
        results["measured_matmul_peak_gflops"] = peak / 1e9
        rows = job.rows
        rollout_tps = rows * mean["completion_len"] / mean["rollout_time"]
        results["rollout_tokens_per_s"] = rollout_tps

        # The same prompts through the engine directly: sampled alike (no log-probs kept), and greedy.
        rollout = step_fn.roller(state.params, records, 0)
        engine = step_fn.roller.engine(state.params)
        rows_prompts = rollout.prompts
        n = args.new_tokens
        for name, kw in (("sampled", dict(temperature=1.0, top_k=0, top_p=1.0)), ("greedy", dict(temperature=0.0))):
            run = lambda kw=kw: engine.generate(rows_prompts, max_new_tokens=n, stop_token_ids=(), **kw)  # noqa: E731
            results[f"decode_engine_{name}_tokens_per_s"] = rows * n / timeit(run, repeats=2)
        results["rollout_over_decode_greedy"] = rollout_tps / results["decode_engine_greedy_tokens_per_s"]
        assert all(m is Mode.NO_THINK for m in rollout.modes)
        build = timeit(lambda: jax.block_until_ready(step_fn.roller.engine(state.params).params), repeats=3)
        results["engine_rebuild_s"] = build
        results["engine_rebuild_over_rollout"] = build / mean["rollout_time"]


if __name__ == "__main__":
    main()
