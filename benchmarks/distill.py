"""On-policy distillation: memory of the chunked update against full logits, what each signal costs,
the update's MFU, the rollout's tokens/s against plain decoding, and the host time between them.

    python -m benchmarks.distill [--layers 2 --batch 2 --length 256 --memory_length 2048] [--smoke]

Shapes: a Qwen3-0.6B-shaped student and a Qwen3-1.7B-shaped teacher (real widths, real 151,936
vocabulary) with `--layers` layers each, float32. In one run:

- compiled peak memory (`memory_analysis`, nothing executed) of the update at `--memory_length`
  tokens per row: chunked (train.divergence.chunked_sums) against a naive update that holds both
  models' [B, T, V] float32 logits, and for each signal (full, top_k, k1, k3); and the part the
  distillation adds: temporaries above the student's own SFT update at the same shape;
- update step time per signal at `--length`, and the full signal's MFU against the measured
  matmul peak (model FLOPs: student forward + backward, teacher forward);
- rollout tokens/s of the student's sampling phase (DistillStep.roller, train.rollout.Roller) against the decode engine
  generating greedily for the same full-depth Qwen3-0.6B shape, batch and lengths as
  benchmarks/decode.py (batch 8, prompt 32, 32 new tokens);
- host time (prompt rendering, batch assembly) as a fraction of a whole distillation step, the
  cost of running rollout and update as two jitted functions.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwen3_jax as q
from benchmarks.common import matmul_peak_flops, parse_args, recording, timeit
from infer.engine import Engine
from qwen3_jax.model import abstract_model
from qwen3_jax.tokenizer import Tokenizer
from train import step as step_lib
from train.config import OptimizerConfig, StepConfig
from train.distill import config as distill_config
from train import rollout as distill_rollout
from train.distill import run as distill_run
from train.distill.divergence import DistillLoss, divergence
from train.objectives import Terms, lm_objective

OPT = OptimizerConfig(learning_rate=1e-5, warmup_steps=0, decay_steps=1000, end_learning_rate_ratio=0.1)
SIGNALS = {
    "full": DistillLoss("full", beta=1.0),
    "top_k": DistillLoss("top_k", top_k=64),
    "k1_reward": DistillLoss("k1", estimator_use="reward"),
    "k3_loss": DistillLoss("k3", estimator_use="loss"),
}


def naive_objective(params, batch, teacher_params, *, graphdef, cfg, teacher_graphdef, loss, chunk_len):
    """The update without chunking: both models' full [B, T, V] float32 logits, then `divergence`."""
    del chunk_len
    teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(teacher_params))
    student = nnx.merge(graphdef, params)
    kw = dict(positions_BxT=batch["positions"], segment_ids_BxT=batch["segment_ids"])
    s = student(batch["tokens"], **kw).astype(jnp.float32)
    t = teacher(batch["tokens"], **kw).astype(jnp.float32)
    total = jnp.sum(batch["loss_mask"])
    value = divergence(s, t, batch["loss_mask"], beta=loss.beta, temperature=loss.temperature) * total
    return Terms(value, jnp.zeros(()), {"loss": value})


def abstract_inputs(student, teacher, B, T, mesh):
    state = step_lib.abstract_train_state(student, OPT, mesh)
    t_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(abstract_model(teacher))), step_lib.params_shardings(teacher, mesh))
    spec = step_lib.batch_sharding(mesh, student.rules)
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=spec)
             for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    return state, batch, t_params


def compile_update(student, teacher, loss, mesh, objective=distill_run.distill_objective, chunk_len=256):
    fn = functools.partial(
        objective, graphdef=nnx.graphdef(abstract_model(student)), cfg=student,
        teacher_graphdef=nnx.graphdef(abstract_model(teacher)), loss=loss, chunk_len=chunk_len,
    )
    return step_lib.compile_update(fn, student, 1, OPT, mesh, step_lib.params_shardings(teacher, mesh))


def memory_mib(update, inputs, mesh) -> tuple[float, float]:
    """(compiled peak, temporaries) in MiB."""
    with jax.set_mesh(mesh):
        mem = update.jitted.lower(*inputs).compile().memory_analysis()
    peak = mem.temp_size_in_bytes + mem.output_size_in_bytes + mem.argument_size_in_bytes - mem.alias_size_in_bytes
    return peak / 2**20, mem.temp_size_in_bytes / 2**20


def sft_update_temp_mib(student, inputs, mesh, chunk_len=256) -> float:
    """Temporaries of the student's own SFT update at the same shape: what distillation adds to."""
    objective = functools.partial(lm_objective, graphdef=nnx.graphdef(abstract_model(student)), cfg=student,
                                  step_cfg=StepConfig(ce_chunk_len=chunk_len))
    state, batch, _ = inputs
    return memory_mib(step_lib.compile_update(objective, student, 1, OPT, mesh), (state, batch, None), mesh)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--memory_length", type=int, default=2048)
    args = parse_args(parser, argv)
    mesh = q.make_mesh({"data": 1})
    # The smoke run keeps the real vocabulary: the rollout renders prompts with Qwen3's tokenizer.
    small = dict(vocab_size=151936, num_layers=1)
    if args.smoke:
        args.layers, args.batch, args.length, args.memory_length = 1, 2, 32, 64
        student = teacher = full = q.preset("tiny-dense", **small)
    else:
        student = q.preset("qwen3-0.6b", num_layers=args.layers)
        teacher = q.preset("qwen3-1.7b", num_layers=args.layers)
        full = q.preset("qwen3-0.6b")
    with recording("distill", args) as results:
        sections(args, mesh, student, teacher, full, results)


def sections(args, mesh, student, teacher, full, results: dict) -> None:
    """Fills `results` section by section (see the module docstring)."""
    results["shape"] = (
        f"student qwen3-0.6b-shaped, teacher qwen3-1.7b-shaped, {args.layers} layers each, vocab 151936, "
        f"float32; memory at batch {args.batch} x {args.memory_length}, timing at batch {args.batch} x {args.length}")

    # The smoke run compiles two signals (one of them the full divergence), not four.
    signals = {k: SIGNALS[k] for k in ("full", "top_k")} if args.smoke else SIGNALS

    # ---- compiled memory: chunked vs naive, and per signal
    # The peak also holds what any update of this student holds (state, activations, attention
    # scores, optimizer temporaries); the distillation's own share is the temporaries above the
    # student's SFT update at the same shape.
    abstract = abstract_inputs(student, teacher, args.batch, args.memory_length, mesh)
    memory, temp = {}, {}
    memory["naive_full_logits"], temp["naive_full_logits"] = memory_mib(
        compile_update(student, teacher, SIGNALS["full"], mesh, naive_objective), abstract, mesh)
    for name, loss in signals.items():
        memory[f"chunked_{name}"], temp[f"chunked_{name}"] = memory_mib(
            compile_update(student, teacher, loss, mesh), abstract, mesh)
    sft_temp = sft_update_temp_mib(student, abstract, mesh)
    results["compiled_peak_memory_mib"] = memory
    results["naive_over_chunked_memory"] = memory["naive_full_logits"] / memory["chunked_full"]
    results["student_sft_update_temp_mib"] = sft_temp
    results["distillation_temp_above_sft_mib"] = {k: v - sft_temp for k, v in temp.items()}
    results["naive_over_chunked_distillation_temp"] = (temp["naive_full_logits"] - sft_temp) / (temp["chunked_full"] - sft_temp)
    logits_mib = 2 * args.batch * args.memory_length * student.vocab_size * 4 / 2**20
    results["both_models_full_logits_mib"] = logits_mib

    # ---- update time per signal, MFU of the full signal
    rng = np.random.default_rng(0)
    B, T = args.batch, args.length
    P = T // 4
    host = distill_rollout.rollout_batch([list(rng.integers(0, 151643, P))] * B,
                                 [list(rng.integers(0, 151643, T - P))] * B, seq_len=T)
    batch = jax.device_put(host, step_lib.batch_sharding(mesh, student.rules))
    t_params = nnx.to_pure_dict(nnx.state(q.init_model(teacher, seed=1, mesh=mesh), nnx.Param))
    params = nnx.to_pure_dict(nnx.state(q.init_model(student, seed=0, mesh=mesh), nnx.Param))
    step_s = {}
    for name, loss in signals.items():
        update = compile_update(student, teacher, loss, mesh)
        holder = {"state": step_lib.init_train_state(student, OPT, mesh, params=jax.tree.map(jnp.copy, params))}

        def one():
            holder["state"], metrics = update(holder["state"], batch, t_params)
            jax.block_until_ready(metrics)

        step_s[name] = timeit(one, repeats=3)
    peak = matmul_peak_flops(256 if args.smoke else 2048)
    flops = distill_run.update_flops(student, teacher, T) * B * T
    results["update_step_s"] = step_s
    results["update_time_over_full"] = {k: v / step_s["full"] for k, v in step_s.items()}
    results["update_mfu_vs_measured_matmul_peak"] = flops / step_s["full"] / peak
    results["measured_matmul_peak_gflops"] = peak / 1e9
    del t_params, params, holder

    # ---- rollout vs plain decode, host overhead: full-depth Qwen3-0.6B shape, as benchmarks/decode.py
    tokenizer = Tokenizer.qwen3()
    with tempfile.TemporaryDirectory() as tmp:
        model = q.init_model(full, seed=0, mesh=mesh)
        q.save_model(q.init_model(q.preset("tiny-dense", vocab_size=151936), seed=1), os.path.join(tmp, "t"))
        tokenizer.save(os.path.join(tmp, "t"))
        with open(os.path.join(tmp, "prompts.jsonl"), "w") as f:
            for i in range(8):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]})
                        + "\n")
        config = distill_config.default_config()
        config.model.preset = "tiny-dense" if args.smoke else "qwen3-0.6b"
        if args.smoke:
            config.model.overrides = dict(vocab_size=151936, num_layers=1)
        config.teacher.init_from = os.path.join(tmp, "t")
        config.prompts.paths = os.path.join(tmp, "prompts.jsonl")
        config.prompts.batch_size = 8
        config.rollout.max_prompt_len, config.rollout.max_new_tokens = 32, 32
        config.rollout.thinking_budget = 16
        config.train.ce_chunk_len = 64
        exp = distill_config.resolve_distill(distill_config.distill_config(config))
        teacher_params = nnx.to_pure_dict(nnx.state(distill_run.load_teacher(exp, mesh), nnx.Param))
    step_fn = distill_run.DistillStep(exp, mesh, tokenizer, teacher_params)
    records = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}], "tools": None}
               for i in range(8)]
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    step_fn.roller(params, records, 0)  # compile
    start = time.perf_counter()
    rollout = step_fn.roller(params, records, 1)
    rollout_tps = sum(len(c.token_ids) for c in rollout.completions) / (time.perf_counter() - start)
    engine = Engine(model, mesh=mesh)
    n_new = 32
    engine.generate(rollout.prompts, max_new_tokens=n_new, temperature=0.0, stop_token_ids=())  # compile
    start = time.perf_counter()
    engine.generate(rollout.prompts, max_new_tokens=n_new, temperature=0.0, stop_token_ids=())
    decode_tps = 8 * n_new / (time.perf_counter() - start)
    results["rollout_tokens_per_s"] = rollout_tps
    results["decode_engine_greedy_tokens_per_s"] = decode_tps
    results["rollout_over_decode"] = rollout_tps / decode_tps

    state = step_lib.init_train_state(full, exp.student.optimizer, mesh, params=params)
    times = []
    for i in range(3):
        state, metrics = step_fn(state, records)
        times.append({k: float(metrics[k]) for k in ("host_time", "rollout_time", "update_time", "step_time")})
    steady = times[1:]
    results["distill_step_times_s"] = steady
    results["host_overhead_fraction"] = float(np.mean([t["host_time"] / t["step_time"] for t in steady]))



if __name__ == "__main__":
    main()
