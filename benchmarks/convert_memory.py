"""Host memory of the checkpoint converter at Qwen3-235B-A22B shapes, in both directions.

Builds a synthetic Hugging Face checkpoint with the released 235B-A22B tensor shapes and layout
(hidden 4096, 64 query / 4 KV heads of 128, 128 experts of width 1536 stored one tensor per expert
and projection, vocab 151936, untied lm_head, bfloat16, split into ~4 GB safetensors files with an
index) but only `--layers` decoder layers, writing it a block at a time. Then runs
`python -m qwen3_jax.convert` in a fresh process HF -> Orbax and Orbax -> HF, and reports each
run's peak resident set (the kernel's ru_maxrss of that child: anonymous and file-backed pages)
against the largest single tensor and the model's bytes, with wall times. A converter that holds
the model peaks near the model's bytes; a streaming one near the largest tensor, whatever the
number of layers. Finally checks that HF -> Orbax -> HF gave back identical bytes for a spread of
tensors. The files (about 3x the model's bytes) live under --dir and are deleted afterwards.

    python -m benchmarks.convert_memory [--layers 2] [--dir /tmp/convert_memory]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 64, 4, 128
EXPERTS, MOE_WIDTH, VOCAB, FULL_LAYERS = 128, 1536, 151936, 94
BF16 = np.dtype(ml_dtypes.bfloat16)
SHARD_BYTES = 4 << 30
BLOCK_BYTES = 64 << 20


def hf_tensors(layers: int, experts: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Qwen3-235B-A22B checkpoint with `layers` layers, in the
    order of the released files (embedding, layers, final norm, lm_head)."""
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "self_attn.q_norm.weight", (HEAD_DIM,)), (p + "self_attn.k_norm.weight", (HEAD_DIM,)),
            (p + "mlp.gate.weight", (experts, HIDDEN)),
        ]
        for e in range(experts):
            out += [(p + f"mlp.experts.{e}.gate_proj.weight", (MOE_WIDTH, HIDDEN)),
                    (p + f"mlp.experts.{e}.up_proj.weight", (MOE_WIDTH, HIDDEN)),
                    (p + f"mlp.experts.{e}.down_proj.weight", (HIDDEN, MOE_WIDTH))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def _bf16_block(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` random finite non-zero bfloat16 values with |x| in [2^-7, 2), from random bits: sign and
    mantissa kept, exponent drawn from 8 values (cheap: no float conversion)."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    return ((bits & 0x807F) | ((120 + ((bits >> 7) & 7)) << 7)).astype(np.uint16).view(BF16)


def write_checkpoint(path: str, layers: int, experts: int) -> int:
    """Writes the synthetic checkpoint a block at a time; returns its number of safetensors files."""
    os.makedirs(path)
    tensors = hf_tensors(layers, experts)
    shards, acc = [[]], 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and acc + nbytes > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append((name, shape))
        acc += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for seed, (fname, shard) in enumerate(zip(files, shards)):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        rng = np.random.default_rng(seed)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for _, shape in shard:
                left = math.prod(shape)
                while left:
                    n = min(left, BLOCK_BYTES // 2)
                    f.write(_bf16_block(rng, n).tobytes())
                    left -= n
    total = sum(math.prod(s) * 2 for _, s in tensors)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": 12288, "moe_intermediate_size": MOE_WIDTH,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "num_experts": experts, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "hidden_act": "silu",
        "attention_bias": False, "torch_dtype": "bfloat16",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return len(files)


def run_converter(args: list[str]) -> tuple[float, int]:
    """Runs the converter in a fresh process; returns (wall seconds, that process's peak RSS bytes)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qwen3_jax.convert", *args], env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"converter {' '.join(args)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024  # Linux reports KiB


def baseline_rss() -> int:
    """Peak RSS of a process that only imports the converter (jax, orbax, tensorstore): the
    constant part of every run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", "import qwen3_jax.convert"], env=env, cwd=ROOT)
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss * 1024


def spot_check(a: str, b: str, names: list[str]) -> None:
    """Raises unless tensors `names` hold identical bytes in the checkpoints `a` and `b`."""
    sys.path.insert(0, ROOT)
    from qwen3_jax.safetensors import SafetensorsReader

    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    for name in names:
        x, y = ra.get(name), rb.get(name)
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
            raise SystemExit(f"round trip changed {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=EXPERTS, help="fewer for a quick trial; the figures use 128")
    parser.add_argument("--dir", default="/tmp/convert_memory", help="scratch directory (about 3x the model's bytes)")
    parser.add_argument("--no_report", action="store_true", help="do not write benchmarks/results/convert_memory.json")
    args = parser.parse_args()
    if os.path.exists(args.dir):
        raise SystemExit(f"--dir {args.dir} exists; remove it or pick another")
    tensors = hf_tensors(args.layers, args.experts)
    model_bytes = sum(math.prod(s) * 2 for _, s in tensors)
    largest = max(tensors, key=lambda t: math.prod(t[1]))
    largest_bytes = math.prod(largest[1]) * 2
    parent = os.path.dirname(os.path.abspath(args.dir))
    free_disk = shutil.disk_usage(parent).free
    if free_disk < 3.3 * model_bytes:
        raise SystemExit(f"{parent} has {free_disk / 2**30:.1f} GiB free; this run needs {3.3 * model_bytes / 2**30:.1f}")
    with open("/proc/meminfo") as f:
        available = int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    print(f"model {model_bytes / 2**30:.2f} GiB, largest tensor {largest[0]} {largest_bytes / 2**30:.2f} GiB, "
          f"{available / 2**30:.1f} GiB memory available, {free_disk / 2**30:.0f} GiB disk free", flush=True)

    hf_in, orbax, hf_out = (os.path.join(args.dir, n) for n in ("hf", "orbax", "hf_out"))
    try:
        t = time.perf_counter()
        n_files = write_checkpoint(hf_in, args.layers, args.experts)
        build_s = time.perf_counter() - t
        base = baseline_rss()
        to_orbax_s, to_orbax_rss = run_converter(["--src", hf_in, "--dst", orbax])
        to_hf_s, to_hf_rss = run_converter(["--src", orbax, "--dst", hf_out, "--max_shard_gb", "4"])
        last = args.layers - 1
        checked = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                   f"model.layers.{last}.self_attn.q_proj.weight", f"model.layers.{last}.self_attn.o_proj.weight",
                   "model.layers.0.self_attn.k_norm.weight", "model.layers.0.mlp.gate.weight",
                   "model.layers.0.mlp.experts.0.gate_proj.weight",
                   f"model.layers.{last}.mlp.experts.{args.experts - 1}.down_proj.weight",
                   f"model.layers.{last}.mlp.experts.{args.experts // 2}.up_proj.weight"]
        spot_check(hf_in, hf_out, checked)
        orbax_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(orbax) for f in fs)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

    def figures(seconds: float, rss: int) -> dict:
        return {"wall_s": round(seconds, 1), "peak_rss_gib": round(rss / 2**30, 3),
                "peak_rss_over_largest_tensor": round(rss / largest_bytes, 3),
                "peak_rss_over_model_bytes": round(rss / model_bytes, 3),
                "peak_rss_above_import_baseline_over_largest_tensor": round((rss - base) / largest_bytes, 3)}

    full = hf_tensors(FULL_LAYERS, EXPERTS)
    results = {
        "shape": (f"Qwen3-235B-A22B tensors (hidden {HIDDEN}, {HEADS}/{KV_HEADS} heads of {HEAD_DIM}, "
                  f"{args.experts} experts of {MOE_WIDTH} stored per expert, vocab {VOCAB}, untied), "
                  f"{args.layers} of {FULL_LAYERS} layers, bfloat16, ~4 GiB safetensors shards with an index"),
        "command": f"python -m benchmarks.convert_memory --layers {args.layers}"
                   + (f" --experts {args.experts}" if args.experts != EXPERTS else ""),
        "model_gib": round(model_bytes / 2**30, 3),
        "full_235b_model_gib": round(sum(math.prod(s) * 2 for _, s in full) / 2**30, 1),
        "largest_tensor": largest[0], "largest_tensor_gib": round(largest_bytes / 2**30, 3),
        "safetensors_files": n_files,
        "orbax_checkpoint_gib": round(orbax_bytes / 2**30, 3),
        "import_baseline_rss_gib": round(base / 2**30, 3),
        "build_synthetic_checkpoint_s": round(build_s, 1),
        "hf_to_orbax": figures(to_orbax_s, to_orbax_rss),
        "orbax_to_hf": figures(to_hf_s, to_hf_rss),
        "round_trip_identical_tensors": checked,
        "memory_available_gib_at_start": round(available / 2**30, 1),
    }
    print(json.dumps(results, indent=2))
    if not args.no_report:
        with open(os.path.join(ROOT, "benchmarks", "results", "convert_memory.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
