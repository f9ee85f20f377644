"""Continuous batching (infer.continuous) against the static engine on a serving mix: 64 requests
whose output lengths are drawn from 8 to 256 tokens, arriving all at once and at a steady rate.

    python -m benchmarks.serve [--layers 4] [--requests 64] [--slots 16] [--chunk 8] [--smoke]

The model is Qwen3-0.6B-shaped (random weights, float32) with `--layers` layers, so the CPU finishes.
Both engines decode greedily without stop tokens, so every request writes exactly its length. The
static engine takes the requests that have arrived, up to `slots` of them, and streams them in
chunks of `chunk` steps until the longest ends (what `Engine.generate` does for a batch); the
continuous engine admits each request into a free row between chunks of the same size. Per
engine and arrival pattern: output tokens/s (all output tokens over the time from the first arrival
to the last token), time to first token and inter-token latency (a chunk's time over its tokens)
p50/p99, and continuous over static throughput. The steady rate is `--load` times the requests per
second the continuous engine served all at once, so the queue neither empties nor grows without end.
All at once is also `infer.batch`'s case (it used to run `slots` rows per static call). Last, the
rollouts' case: every request in one static call, as `train.rollout` runs a step's rows, against the
continuous engine's all-at-once run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import qwen3_jax as q
from benchmarks.common import parse_args, recording
from infer.continuous import ContinuousEngine, Request
from infer.engine import Engine


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def _summary(arrivals: np.ndarray, times: list[list[float]], lengths: np.ndarray) -> dict:
    """Figures from each request's arrival and token timestamps (one per token)."""
    assert all(len(t) == n for t, n in zip(times, lengths)), "a request got the wrong number of tokens"
    ttft = [t[0] - a for t, a in zip(times, arrivals)]
    itl = [b - a for t in times for a, b in zip(t, t[1:])]
    span = max(t[-1] for t in times) - float(np.min(arrivals))
    return {"output_tokens_per_s": float(np.sum(lengths)) / span, "seconds": span,
            "time_to_first_token_s": _percentiles(ttft), "inter_token_latency_s": _percentiles(itl)}


def _stamp(times: list[float], count: int, start: float, now: float) -> None:
    """Spreads a chunk's `count` tokens evenly over the chunk (they arrive together)."""
    times.extend(start + (now - start) * (k + 1) / count for k in range(count))


def run_static(engine: Engine, prompts: list[list[int]], lengths: np.ndarray, arrivals: np.ndarray, *, slots: int,
               chunk: int, max_new: int, t0: float) -> list[list[float]]:
    """Batches of the requests that have arrived (padded to `slots` rows by repeating the first, as
    `rollout.generate_chat` pads, so one program serves every batch), each streamed until its
    longest request has all its tokens."""
    times: list[list[float]] = [[] for _ in prompts]
    pending = list(range(len(prompts)))
    while pending:
        now = time.perf_counter() - t0
        if arrivals[pending[0]] > now:
            time.sleep(arrivals[pending[0]] - now)
        now = time.perf_counter() - t0
        batch = [i for i in pending if arrivals[i] <= now][:slots]
        pending = [i for i in pending if i not in batch]
        start = time.perf_counter() - t0
        rows = [prompts[i] for i in batch] + [prompts[batch[0]]] * (slots - len(batch))
        for new in engine.stream(rows, max_new_tokens=max_new, chunk=chunk, temperature=0.0, stop_token_ids=()):
            now = time.perf_counter() - t0
            for i, toks in zip(batch, new):
                _stamp(times[i], min(len(toks), int(lengths[i]) - len(times[i])), start, now)
            start = now
            if all(len(times[i]) == lengths[i] for i in batch):
                break  # the static engine's batch ends with its longest row
    return times


def run_continuous(engine: ContinuousEngine, prompts: list[list[int]], lengths: np.ndarray, arrivals: np.ndarray,
                   t0: float) -> list[list[float]]:
    times: list[list[float]] = [[] for _ in prompts]
    chunk_start = [0.0]  # when the step that is delivering tokens began

    def callback(i):
        def on_tokens(ids, forced, done):
            _stamp(times[i], len(ids), chunk_start[0], time.perf_counter() - t0)
        return on_tokens

    order = list(np.argsort(arrivals, kind="stable"))
    while order or not engine.idle():
        now = time.perf_counter() - t0
        while order and arrivals[order[0]] <= now:
            i = order.pop(0)
            engine.submit(Request(prompts[i], int(lengths[i]), callback(i), {"temperature": 0.0}))
        chunk_start[0] = time.perf_counter() - t0
        if not engine.step() and order:
            time.sleep(max(0.0, arrivals[order[0]] - (time.perf_counter() - t0)))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--min_len", type=int, default=8)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--load", type=float, default=0.8, help="steady arrival rate / all-at-once throughput")
    args = parse_args(parser, argv)
    if args.smoke:
        args.layers, args.requests, args.slots, args.chunk, args.min_len, args.max_len = 1, 6, 2, 4, 2, 12
        cfg = q.preset("tiny-dense", vocab_size=512, hidden_size=32, intermediate_size=48, num_layers=1)
    else:
        cfg = q.preset("qwen3-0.6b", num_layers=args.layers)
    engine = Engine(q.init_model(cfg, seed=0), forced_ids=[0])
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_len, args.max_len + 1, size=args.requests)
    longest_prompt = 20 if args.smoke else 128
    prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist()
               for n in rng.integers(16, longest_prompt, size=args.requests)]
    continuous = ContinuousEngine(engine, slots=args.slots, chunk=args.chunk, max_len=longest_prompt + args.max_len,
                                  stop_token_ids=())
    static = dict(slots=args.slots, chunk=args.chunk, max_new=args.max_len)

    with recording("serve", args) as results:
        results["setup"] = (f"qwen3-0.6b-shaped, {cfg.num_layers} layers, float32; {args.requests} requests, prompts "
                            f"16-{longest_prompt - 1} tokens, outputs {args.min_len}-{args.max_len} tokens, greedy, "
                            f"no stop tokens; {args.slots} slots, chunks of {args.chunk} steps")
        # Warm-up, so that neither engine compiles while timed: every prompt bucket, and for the
        # continuous engine every admitted-row count.
        t = time.perf_counter()
        by_bucket: dict[int, list[list[int]]] = {}
        for p in prompts:
            by_bucket.setdefault(continuous._padded(len(p)), []).append(p)
        for group in by_bucket.values():
            run_static(engine, group[:1], np.ones(1, int), np.zeros(1), t0=time.perf_counter(), **static)
            rows = 1
            while rows <= args.slots:
                continuous.generate([group[k % len(group)] for k in range(rows)], max_new_tokens=1, temperature=0.0)
                rows *= 2
        results["warm_up_compile_s"] = time.perf_counter() - t

        for name, rate in (("all_at_once", None), ("steady_rate", "from all_at_once")):
            if rate is None:
                arrivals = np.zeros(args.requests)
            else:  # a fraction of what the continuous engine served all at once
                rate = args.load * args.requests / results["all_at_once"]["continuous"]["seconds"]
                arrivals = np.arange(args.requests) / rate
            cont = _summary(arrivals, run_continuous(continuous, prompts, lengths, arrivals, time.perf_counter()),
                            lengths)
            stat = _summary(arrivals, run_static(engine, prompts, lengths, arrivals, t0=time.perf_counter(), **static),
                            lengths)
            results[name] = {"requests_per_s": rate, "continuous": cont, "static": stat,
                             "throughput_ratio": cont["output_tokens_per_s"] / stat["output_tokens_per_s"]}
        # Rollouts and batch jobs know every row up front. `train.rollout` runs them as one static
        # call (every row decodes until the longest ends); the continuous engine runs them through
        # its `slots` rows, refilling a finished row's slot at once.
        rows = dict(slots=args.requests, chunk=args.chunk, max_new=args.max_len)
        arrivals = np.zeros(args.requests)
        run_static(engine, prompts, lengths, arrivals, t0=time.perf_counter(), **rows)  # compiles the one call
        one_call = _summary(arrivals, run_static(engine, prompts, lengths, arrivals, t0=time.perf_counter(), **rows),
                            lengths)
        cont = results["all_at_once"]["continuous"]
        results["one_static_call"] = {"static": one_call, "continuous_over_static": cont["output_tokens_per_s"]
                                      / one_call["output_tokens_per_s"]}
        results["compilations"] = continuous.compilations()


if __name__ == "__main__":
    main()
