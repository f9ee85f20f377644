"""Every released preset's real steps compiled ahead of time for the TPU slice its config names.

From a CPU host through libtpu's topology descriptions (no TPU is used; libtpu must be installed,
e.g. `jax[tpu]` of the same jax version in a separate environment):

    python -m benchmarks.tpu_aot                                   # all presets, kinds and lengths
    python -m benchmarks.tpu_aot --preset qwen3-8b --kind train --length 4096
    python -m benchmarks.tpu_aot --readme                          # re-render the README table only
    python -m benchmarks.tpu_aot --smoke                           # one small case, printed, nothing saved

Training compiles `train.step.make_train_step` (float32 master weights and AdamW state sharded
as the trainer shards them, bfloat16 compute, the config's remat policy, microbatches and
cross-entropy chunks) for `configs/qwen3_*.py` on its `topology`, at 4,096 and 32,768 tokens per
row. At 32,768 a step keeps the config's tokens per step (rows / 8), with at least one row per
data-parallel shard and the microbatch count cut to what the rows allow. Serving compiles
`infer.engine.Engine.lower`'s prefill and decode (bfloat16 weights, Qwen's YaRN x4 over 32,768
positions) on the config's `serving` slice and mesh, for a cache of 32,768 and 131,072 slots:
batch 8 and 2 (the same cached tokens), padded to the data-parallel degree as the engine pads,
prompts of slots - 1,024 tokens, 1,024 new tokens.

Per row, per chip: memory from `compiled.memory_analysis()` (arguments + outputs + temporaries -
aliased) against HBM; FLOPs counted three ways (see `benchmarks.hlo_stats`): the model formula
(`train.metrics.flops_per_token`: 6 x matmul parameters + 12 x layers x heads x head_dim x T per
trained token, PaLM appendix B, full T x T attention, no causal halving; a third of it per token
forward), the matmuls of the lowered program with its loops' trip counts divided by the chips (plus,
for splash attention, whose Pallas kernel carries no cost estimate, the formula's attention term; for
MoE, the grouped matmuls over the rows in their expert shard's groups, balanced routing assumed, with
the every-row count kept as `program_flops_every_row_per_chip`), and
XLA's `cost_analysis()` flops, which are per device but count each loop body once (listed for
reference, not comparable); step-time lower bound = max(program matmul FLOPs / peak, bytes that
must move / HBM bandwidth), the bytes being the step's arguments and outputs (decode: its
arguments, read once per generated token); the implied MFU ceiling = model FLOPs / (peak x that
bound); collective bytes of the compiled per-device HLO; the partitioner's involuntary-
rematerialisation warnings; for MoE, the compiled instructions that produce the expert weights'
gradients, grouped kernels (megablox's `tgmm`) or dense convolutions over every local expert
(`benchmarks.hlo_stats.expert_weight_ops`). A row that does not fit in HBM (or that libtpu refuses to compile for
lack of it) is compiled again on slices of twice the chips (`growth_axis`) until one fits.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks.hlo_stats import COLLECTIVES, collective_bytes, expert_weight_ops, matmul_flops
from infer.engine import Engine
from qwen3_jax.config import YarnScaling, preset
from qwen3_jax.model import abstract_model
from qwen3_jax.sharding import MESH_AXES, auto_mesh, make_mesh
from train.step import abstract_train_state, batch_sharding, make_train_step
from train.config import model_config, resolve_shared, topology_chips, train_config
from train.metrics import flops_per_token


# libtpu's C++ warnings (the SPMD partitioner's among them) reach stderr only at this level.
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "1")
REMAT_WARNING = "Involuntary full rematerialization"


@dataclasses.dataclass(frozen=True)
class Chip:
    device_kind: str  # jax's name for it
    hbm_bytes: float
    peak_bf16_flops: float  # FLOP/s
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # all inter-chip links together
    slices: tuple[str, ...]  # slice shapes jax.experimental.topologies accepts, by chip count


# Google Cloud TPU documentation, system architecture pages for TPU v5p, v5e and v6e (Trillium):
# HBM capacity per chip, peak bf16 compute per chip, HBM bandwidth per chip, inter-chip interconnect
# bandwidth per chip (4,800 / 1,600 / 3,584 Gbps).
CHIPS = {
    "v5p": Chip("TPU v5", 95 * 2**30, 459e12, 2765e9, 600e9,
                ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16")),
    "v5e": Chip("TPU v5 lite", 16 * 2**30, 197e12, 819e9, 200e9, ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v6e": Chip("TPU v6 lite", 32 * 2**30, 918e12, 1640e9, 448e9, ("2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
}
PRESETS = ("qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b", "qwen3-30b-a3b",
           "qwen3-235b-a22b")
TRAIN_LENGTHS = (4096, 32768)
SERVE_CONTEXTS = (32768, 131072)
SERVE_BATCH = {32768: 8, 131072: 2}
NEW_TOKENS = 1024
YARN = YarnScaling(factor=4.0, original_max_position_embeddings=32768)  # Qwen's long-context recipe
RESULTS = os.path.join(os.path.dirname(__file__), "results", "tpu_aot.json")


def _commit() -> str | None:
    """The code a row is compiled from: HEAD, with "-dirty" when tracked files other than the
    results and the README (which this benchmark writes) differ from it; None outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                    ":(top,exclude)benchmarks/results", ":(top,exclude)README.md")
    except OSError:
        return None
    return (head + ("-dirty" if dirty else "")) or None


COMMIT = _commit()
README = os.path.join(os.path.dirname(__file__), "..", "README.md")
TABLE_BEGIN, TABLE_END = "<!-- tpu_aot table: generated by benchmarks.tpu_aot -->", "<!-- end tpu_aot table -->"


def kernels(platform: str, cached: bool) -> dict[str, str]:
    """The kernels "auto" picks for the platform compiled for, pinned so that a row names them: on
    TPU megablox MoE, splash attention without a KV cache (training), blockwise with one
    (prefill, decode). `tests/test_tpu_aot.py` checks that "auto" under the slice's mesh agrees."""
    if platform == "cpu":
        return {"moe_impl": "blocked", "attention": "auto"}
    return {"moe_impl": "megablox", "attention": "blockwise" if cached else "splash"}


def expert_weight_shapes(cfg, mesh) -> set[tuple[int, ...]]:
    """The shapes of one device's expert weights inside the MoE `shard_map` ([El, D, I/tensor] and
    [El, I/tensor, D]); empty for a dense model."""
    if not cfg.is_moe:
        return set()
    names = tuple(mesh.axis_names)

    def local(logical, dims):
        spec = cfg.rules.spec(logical, names)
        return tuple(d // math.prod(mesh.shape[a] for a in ((p,) if isinstance(p, str) else p or ()))
                     for d, p in zip(dims, spec))

    E, D, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    return {local(("experts", None, "moe_mlp"), (E, D, I)), local(("experts", "moe_mlp", None), (E, I, D))}


def released_config(name: str) -> ml_collections.ConfigDict:
    module = importlib.import_module("configs." + name.replace("-", "_").replace(".", "_"))
    return module.get_config()


def topology_mesh(topology: str, shape: dict[str, int]):
    """(mesh over the slice's chips, generation), the chips from libtpu's topology description."""
    from jax.experimental import topologies

    generation = topology.split(":")[0]
    devices = topologies.get_topology_desc(topology, platform="tpu").devices
    if math.prod(shape.values()) != topology_chips(topology):
        raise ValueError(f"mesh {shape} does not use the {topology_chips(topology)} chips of {topology}")
    return make_mesh(shape, devices=devices), generation


def larger(topology: str, shape: dict[str, int], axis: str) -> tuple[str, dict[str, int]] | None:
    """The next slice of the same generation with twice the chips, mesh `axis` doubled."""
    generation, dims = topology.split(":")
    slices = CHIPS[generation].slices
    chips = [math.prod(int(d) for d in s.split("x")) for s in slices]
    want = 2 * topology_chips(topology)
    if want not in chips:
        return None
    return f"{generation}:{slices[chips.index(want)]}", {**shape, axis: 2 * shape.get(axis, 1)}


def growth_axis(kind: str, shape: dict[str, int], num_kv_heads: int, rows: int) -> str | None:
    """The mesh axis a larger slice doubles, or None when none would lower the memory per chip:
    training adds FSDP shards; serving splits the KV heads (and the weights) further while
    `tensor` can still take them, then the `rows` of the batch while `data` can still split them
    (beyond that the engine pads the batch with empty rows)."""
    if kind == "train":
        return "fsdp"
    if 2 * shape.get("tensor", 1) <= num_kv_heads:
        return "tensor"
    batch_shards = math.prod(shape.get(a, 1) for a in ("data", "fsdp", "expert"))
    return "data" if 2 * batch_shards <= rows else None


# ------------------------------------------------------------------------------------- lowering


def lower_train(config: ml_collections.ConfigDict, seq_len: int, mesh, platform: str):
    """(lowered step, row facts) for the config's train step with rows of `seq_len` tokens."""
    config = copy.deepcopy(config)
    config.model.update(kernels(platform, cached=False))
    shape = {a: mesh.shape.get(a, 1) for a in MESH_AXES}
    dp = shape["data"] * shape["fsdp"] * shape["expert"]
    rows = max(config.data.batch_size * config.data.seq_len // seq_len, dp)
    micro = max(m for m in range(1, config.train.microbatches + 1)
                if config.train.microbatches % m == 0 and rows % (dp * m) == 0)
    config.train.microbatches = micro
    config.data.seq_len = seq_len
    if config.data.format != "synthetic" and not config.data.paths:  # released configs take them on the command line
        config.data.paths = "compile-only/*.arrayrecord"  # never read: the step is compiled on abstract batches
    train_cfg = train_config(config)
    model = model_config(train_cfg.model)
    optimizer, step_cfg = resolve_shared(train_cfg, shape, batch_size=rows, seq_len=seq_len,
                                         batch_field="data.batch_size", seq_field="data.seq_len")
    step = make_train_step(model, step_cfg, optimizer, mesh)
    sharding = batch_sharding(mesh, model.rules)
    batch = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sharding)
             for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    state = abstract_train_state(model, optimizer, mesh)
    with jax.set_mesh(auto_mesh(mesh)):
        lowered = step.jitted.lower(state, batch, None)
    facts = {"rows": rows, "microbatches": micro, "remat": model.remat,
             "model_flops": flops_per_token(model, seq_len) * rows * seq_len,
             "expert_weight_shapes": expert_weight_shapes(model, mesh),
             # The formula's attention term, standing in for kernels whose FLOPs the program hides.
             "attention_flops": 12.0 * model.num_layers * model.num_heads * model.head_dim * seq_len * rows * seq_len}
    return lowered, facts


def lower_serve(name: str, context: int, batch: int, mesh, platform: str, new_tokens: int = NEW_TOKENS):
    """{'prefill': (lowered, facts), 'decode': (lowered, facts)} for the engine serving preset
    `name` with a cache of `context` slots, `batch` rows (padded to the data-parallel degree)."""
    cfg = preset(name, dtype="bfloat16", param_dtype="bfloat16", rope_scaling=YARN, **kernels(platform, cached=True))
    engine = Engine(abstract_model(cfg), mesh=mesh)
    dp = engine._batch_multiple()
    batch = -(-batch // dp) * dp
    prompt = context - new_tokens
    prefill, decode = engine.lower(batch, prompt, new_tokens, context)
    common = {"rows": batch, "prompt": prompt, "slots": context, "expert_weight_shapes": expert_weight_shapes(cfg, mesh)}
    return {
        "prefill": (prefill, {**common, "model_flops": flops_per_token(cfg, prompt) / 3 * batch * prompt}),
        # One iteration of decode's while loop: one token per row attending to up to `context` slots.
        "decode": (decode, {**common, "model_flops": flops_per_token(cfg, context) / 3 * batch}),
    }


# ------------------------------------------------------------------------------------- analysis


@contextlib.contextmanager
def compiler_log():
    """Yields a list that receives what XLA's C++ code writes to file descriptor 2 during the
    block (passed on to stderr as well): the SPMD partitioner's warnings. libtpu writes warnings
    there with TPU_STDERR_LOG_LEVEL <= 1 (set on import of this module)."""
    sys.stderr.flush()
    saved = os.dup(2)
    log: list[str] = []
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            log.append(f.read().decode(errors="replace"))
            sys.stderr.write(log[0])


def analyse(lowered, kind: str, mesh, generation: str, model_flops: float, attention_flops: float = 0.0,
            expert_weight_shapes: set[tuple[int, ...]] = frozenset()) -> dict:
    """Compiles `lowered` and measures it per chip against `model_flops` (all chips together)
    (see the module docstring). When the program holds Pallas kernels without a cost estimate
    (splash attention), `attention_flops` is added to its count in their place. For an MoE
    (`expert_weight_shapes`, see `expert_weight_shapes`) the row counts the compiled instructions
    that produce arrays of an expert weight's shape, the weight gradients: grouped kernels and
    dense convolutions (`hlo_stats.expert_weight_ops`). A program libtpu refuses to compile for
    lack of HBM gives a short row: `fits` False and the `compile_error`."""
    chip = CHIPS.get(generation)
    t = time.perf_counter()
    try:
        with compiler_log() as log:
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:  # libtpu refuses a program whose buffers exceed HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"chips": mesh.devices.size, "fits": False, "compile_error": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    chips = mesh.devices.size
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    program = matmul_flops(lowered.compiler_ir("stablehlo"), dict(mesh.shape))
    hlo_text = compiled.as_text()
    collectives = collective_bytes(hlo_text)
    cost = compiled.cost_analysis()
    # MoE: each expert shard's grouped matmuls take the pairs of its whole expert group, its own
    # experts' sorted first; megablox's kernels visit only the tiles of the rows in its groups (its
    # tile metadata), 1 / expert-shards of them under balanced routing. Every row: the upper bound.
    ragged, in_groups = program["grouped_flops"], 1 / mesh.shape.get("expert", 1)
    program_flops = (program["flops"] - ragged * (1 - in_groups)
                     + (attention_flops if program["kernels_without_cost_estimate"] else 0.0))
    row = {
        "chips": chips,
        "memory_gib": {"arguments": mem.argument_size_in_bytes / 2**30, "outputs": mem.output_size_in_bytes / 2**30,
                       "temporaries": mem.temp_size_in_bytes / 2**30, "aliased": mem.alias_size_in_bytes / 2**30,
                       "total": total / 2**30},
        "model_flops_per_chip": model_flops / chips,
        "program_flops_per_chip": program_flops / chips,
        "program_flops_every_row_per_chip": (program_flops + ragged * (1 - in_groups)) / chips,
        "xla_cost_analysis_flops_per_chip": cost.get("flops"),
        "collective_bytes_per_chip": {k: collectives[k] for k in COLLECTIVES},
        "loops_without_trip_count": max(program["loops_without_trip_count"], collectives["loops_without_trip_count"]),
        "kernels_without_cost_estimate": program["kernels_without_cost_estimate"],
        "compile_s": compile_s,
        "involuntary_remat": log[0].count(REMAT_WARNING),
    }
    if expert_weight_shapes:
        row["expert_weight_gradient_ops"] = expert_weight_ops(hlo_text, set(expert_weight_shapes))
    if chip is not None:
        moved = mem.argument_size_in_bytes + (0 if kind == "decode" else mem.output_size_in_bytes)
        t_compute, t_memory = row["program_flops_per_chip"] / chip.peak_bf16_flops, moved / chip.hbm_bytes_per_s
        row.update(hbm_gib=chip.hbm_bytes / 2**30, fits=total <= chip.hbm_bytes, bytes_moved_per_chip=moved,
                   t_compute_s=t_compute, t_memory_s=t_memory, step_time_lower_bound_s=max(t_compute, t_memory),
                   bound="compute" if t_compute >= t_memory else "memory",
                   mfu_ceiling=model_flops / chips / (chip.peak_bf16_flops * max(t_compute, t_memory)),
                   mfu_ceiling_every_row=model_flops / chips / max(
                       row["program_flops_every_row_per_chip"], chip.peak_bf16_flops * t_memory))
    return row


def run_case(name: str, kind: str, length: int) -> list[dict]:
    """Rows for one preset, kind ("train" or "serve") and length on the slice its config names or,
    when they do not fit its HBM, on the smallest larger slice that does (`growth_axis` doubled per
    step; the last one tried when none does). Each row has `fits_on` (that slice, or None) and
    `named`: the config's slice and mesh, whether it fits and, if not, by what measure."""
    config = released_config(name)
    topology, shape = ((config.topology, {a: v for a, v in config.mesh.items() if v != 1}) if kind == "train"
                       else (config.serving.topology, dict(config.serving.mesh)))
    kv_heads = preset(config.model.preset).num_kv_heads
    named = None
    while True:
        mesh, generation = topology_mesh(topology, shape)
        cases = ({"train": lower_train(config, length, mesh, "tpu")} if kind == "train"
                 else lower_serve(name, length, SERVE_BATCH[length], mesh, "tpu"))
        measured = []
        for k, (lowered, facts) in cases.items():
            model_flops, attention_flops = facts.pop("model_flops"), facts.pop("attention_flops", 0.0)
            shapes = facts.pop("expert_weight_shapes")
            row = {"preset": config.model.preset, "kind": k, "length": length, "topology": topology, "mesh": shape,
                   "commit": COMMIT, "moe_impl": kernels("tpu", k != "train")["moe_impl"] if shapes else None,
                   **facts, **analyse(lowered, k, mesh, generation, model_flops, attention_flops, shapes)}
            measured.append(row)
            print(json.dumps(row), flush=True)
        fits = all(r["fits"] for r in measured)
        if named is None:
            named = {"topology": topology, "mesh": shape, "fits": fits,
                     "why": "; ".join(f"{r['kind']}: " + (r["compile_error"] if "compile_error" in r else
                                      f"{r['memory_gib']['total']:.1f} GiB per chip") for r in measured if not r["fits"])}
        axis = None if fits else growth_axis(kind, shape, kv_heads, SERVE_BATCH.get(length, 0))
        bigger = None if axis is None else larger(topology, shape, axis)
        if bigger is None:
            break
        topology, shape = bigger
    for r in measured:
        r.update(fits_on=topology if fits else None, named=named)
    return measured


# -------------------------------------------------------------------------------------- results


def save(rows: list[dict], path: str = RESULTS) -> list[dict]:
    """Merges `rows` into the results file (a row replaces the one with its preset, kind and length)."""
    old = json.load(open(path))["rows"] if os.path.exists(path) else []
    key = lambda r: (r["preset"], r["kind"], r["length"])  # noqa: E731
    merged = {key(r): r for r in old} | {key(r): r for r in rows}
    out = sorted(merged.values(), key=lambda r: (PRESETS.index(r["preset"]) if r["preset"] in PRESETS else 99,
                                                  ("train", "prefill", "decode").index(r["kind"]), r["length"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": "tpu_aot", "jax": jax.__version__, "chips": {k: dataclasses.asdict(v) for k, v in CHIPS.items()},
                   "rows": out}, f, indent=1)
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def _seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def _mfu(r: dict) -> str:
    every = r.get("mfu_ceiling_every_row", r["mfu_ceiling"])
    return f"{100 * r['mfu_ceiling']:.0f}%" + (f" ({100 * every:.0f}% every row)" if every < 0.995 * r["mfu_ceiling"] else "")


def _expert_grads(r: dict) -> str:
    ops = r.get("expert_weight_gradient_ops")
    return f"{ops['grouped_kernels']} / {ops['dense_convolutions']}" if ops and r["kind"] == "train" else ""


def render(rows: list[dict]) -> str:
    """The README's markdown table of the results rows."""
    head = ("| preset | step | length | slice (mesh) | rows x tokens | per-chip GiB: args / temp / out = total "
            "(HBM) | fits / smallest slice that fits | model / program TFLOP per chip (XLA, loops once) | "
            "lower bound (bound) | MFU ceiling | collectives GB per chip (AG / AR / RS / A2A / CP) | "
            "collectives at ICI peak | SPMD remat warnings | expert weight gradients: grouped kernels / dense |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        named = r.get("named", {"topology": r["topology"], "fits": r["fits"]})
        if named["fits"]:
            fit = "yes"
        else:
            fit = f"**no** on {named['topology']} ({named.get('why', '')})" + (
                f"; fits {r['fits_on']}" if r["fits_on"] else "; none tried fits")
        if "compile_error" in r:
            lines.append(f"| {r['preset']} | {r['kind']} | {r['length']:,} | {r['topology']} | | | {fit} |" + " |" * 7)
            continue
        m = r["memory_gib"]
        mesh = " x ".join(f"{a} {n}" for a, n in r["mesh"].items())
        tokens = r.get("prompt", r["length"]) if r["kind"] != "decode" else 1
        micro = f", {r['microbatches']} micro" if r["kind"] == "train" else ""
        c = r["collective_bytes_per_chip"]
        lines.append(
            f"| {r['preset']} | {r['kind']} | {r['length']:,} | {r['topology']} ({mesh}) | {r['rows']} x {tokens:,}{micro} "
            f"| {m['arguments']:.1f} / {m['temporaries']:.1f} / {m['outputs']:.1f} = {m['total']:.1f} ({r['hbm_gib']:.0f}) "
            f"| {fit} | {r['model_flops_per_chip'] / 1e12:.3g} / {r['program_flops_per_chip'] / 1e12:.3g} "
            f"({r['xla_cost_analysis_flops_per_chip'] / 1e12:.3g}) "
            f"| {_seconds(r['step_time_lower_bound_s'])} ({r['bound']}) | {_mfu(r)} "
            f"| {' / '.join(_gb(c[k]) for k in COLLECTIVES)} "
            f"| {_seconds(sum(c[k] for k in COLLECTIVES) / CHIPS[r['topology'].split(':')[0]].ici_bytes_per_s)} "
            f"| {r.get('involuntary_remat', 'not read')} | {_expert_grads(r)} |"
        )
    return "\n".join(lines)


def write_readme(rows: list[dict], path: str = README) -> None:
    text = open(path).read()
    start, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + render(rows) + "\n" + text[end:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", action="append", choices=PRESETS, help="repeatable; default: all")
    parser.add_argument("--kind", choices=("train", "serve"), action="append", help="default: both")
    parser.add_argument("--length", type=int, action="append",
                        help=f"train: {TRAIN_LENGTHS}, serve: {SERVE_CONTEXTS}; default: both of the kind's")
    parser.add_argument("--readme", action="store_true", help="only re-render the README table from the results")
    parser.add_argument("--smoke", action="store_true", help="one small case (qwen3-0.6b serving), printed, not saved")
    args = parser.parse_args(argv)
    if not args.readme and importlib.util.find_spec("libtpu") is None:
        raise SystemExit(f"benchmarks.tpu_aot compiles through libtpu, which is not installed: pip install "
                         f"'jax[tpu]=={jax.__version__}' (in a separate environment; no TPU is needed)")
    # Compiling only opens no TPU, so another process holding libtpu's lock (a test) is no conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if args.smoke:
        print(json.dumps(run_case("qwen3-0.6b", "serve", SERVE_CONTEXTS[0]), indent=2, default=str))
        return
    if not args.readme:
        for name in args.preset or PRESETS:
            for kind in args.kind or ("train", "serve"):
                allowed = TRAIN_LENGTHS if kind == "train" else SERVE_CONTEXTS
                for length in args.length or allowed:
                    if length in allowed:
                        save(run_case(name, kind, length))
    write_readme(json.load(open(RESULTS))["rows"])


if __name__ == "__main__":
    main()
