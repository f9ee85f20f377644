"""benchmarks.tpu_aot's code path: the real train step and engine steps lowered, compiled and counted.

The CPU tests run everywhere on the 8 simulated devices; the TPU test needs libtpu (it compiles for
a v5p / v5e topology from this host, no TPU used) and is skipped without it.
"""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from benchmarks import tpu_aot
from configs import tiny_pretrain
from qwen3_jax import attention, moe, preset
from qwen3_jax.sharding import make_mesh


def _train_config(preset="tiny-dense"):
    config = tiny_pretrain.get_config()
    config.model.preset = preset
    config.train.microbatches = 2
    return config


def test_train_step_on_cpu_mesh_counts_every_loop():
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    lowered, facts = tpu_aot.lower_train(_train_config(), 128, mesh, "cpu")
    row = tpu_aot.analyse(lowered, "train", mesh, "cpu", facts["model_flops"])
    assert facts["rows"] == 16 and facts["microbatches"] == 2
    assert row["memory_gib"]["total"] > 0 and row["loops_without_trip_count"] == 0
    # Matmul FLOPs of the program (2 microbatches x 3 scanned layers x 2 cross-entropy chunks, each
    # loop weighted by its trip count) = the model formula + the rematerialised logits of the
    # chunked cross-entropy (2 x D x V per token: 5% at tiny-dense's shapes).
    ratio = row["program_flops_per_chip"] * row["chips"] / facts["model_flops"]
    assert 1.0 < ratio < 1.1, ratio
    assert row["collective_bytes_per_chip"]["all-gather"] > 0  # fsdp gathers the parameters


def test_engine_steps_on_cpu_mesh():
    mesh = make_mesh({"data": 2, "tensor": 2})
    cases = tpu_aot.lower_serve("tiny-dense", 256, 3, mesh, "cpu", new_tokens=64)
    prefill, decode = (tpu_aot.analyse(cases[k][0], k, mesh, "cpu", cases[k][1]["model_flops"])
                       for k in ("prefill", "decode"))
    assert cases["decode"][1]["rows"] == 4  # padded to the data-parallel degree, as the engine pads
    assert prefill["loops_without_trip_count"] == 0
    assert decode["loops_without_trip_count"] == 1  # the token loop runs a traced number of steps
    ratios = [row["program_flops_per_chip"] * row["chips"] / facts["model_flops"]
              for (_, facts), row in ((cases["prefill"], prefill), (cases["decode"], decode))]
    # Prefill computes logits for each row's last token only; the formula counts every token's.
    assert 0.9 < ratios[0] < 1.0 and 0.95 < ratios[1] < 1.2, ratios


def test_compiles_for_a_tpu_topology():
    pytest.importorskip("libtpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    mesh, generation = tpu_aot.topology_mesh("v5p:2x2x1", {"fsdp": 2, "expert": 2})
    cfg = preset("tiny-moe")
    with jax.set_mesh(mesh):  # what the benchmark pins is what "auto" picks under the slice's mesh
        for cached in (False, True):
            assert tpu_aot.kernels("tpu", cached) == {"moe_impl": moe.default_impl(),
                                                      "attention": attention.choose(cfg, cached=cached, packed=not cached)}
    lowered, facts = tpu_aot.lower_train(_train_config("tiny-moe"), 128, mesh, "tpu")
    row = tpu_aot.analyse(lowered, "train", mesh, generation, facts["model_flops"], 0.0, facts["expert_weight_shapes"])
    assert row["fits"] and row["hbm_gib"] == 95 and 0 < row["mfu_ceiling"] < 1
    # megablox: gate, up and down's weight gradients are grouped kernels (tgmm), none a dense convolution.
    assert row["expert_weight_gradient_ops"] == {"grouped_kernels": 3, "dense_convolutions": 0}
    assert row["involuntary_remat"] == 0  # read off libtpu's log: the canary below shows it would be seen
    assert row["program_flops_per_chip"] > row["xla_cost_analysis_flops_per_chip"]  # XLA: loop bodies once
    # Expert shards of 2: half the gathered rows are in a shard's groups under balanced routing.
    assert row["program_flops_per_chip"] < row["program_flops_every_row_per_chip"] < 2 * row["program_flops_per_chip"]
    mesh, generation = tpu_aot.topology_mesh("v5e:2x2", {"data": 2, "tensor": 2})
    decode, facts = tpu_aot.lower_serve("tiny-moe", 256, 2, mesh, "tpu", new_tokens=64)["decode"]
    row = tpu_aot.analyse(decode, "decode", mesh, generation, facts["model_flops"])
    assert row["fits"] and row["bound"] == "memory" and row["hbm_gib"] == 16 and row["involuntary_remat"] == 0

    # The canary: a reshard the partitioner can only do by replicating is logged and counted.
    def reshard(x):
        x = jnp.sin(jax.lax.with_sharding_constraint(x, P(None, None, "tensor")))
        return jax.lax.with_sharding_constraint(x, P(("data", "expert"), None, None))

    mesh, _ = tpu_aot.topology_mesh("v5p:2x2x2", {"data": 2, "expert": 2, "tensor": 2})
    with jax.set_mesh(mesh), tpu_aot.compiler_log() as log:
        jax.jit(reshard).lower(jax.ShapeDtypeStruct((4, 37, 64), jnp.float32)).compile()
    assert tpu_aot.REMAT_WARNING in log[0]


def test_expert_weight_gradients_told_apart_in_compiled_hlo():
    """Lines of libtpu's compiled HLO for the weight gradient of one grouped matmul (8,192 rows,
    16 experts of [2048, 768]): megablox's `tgmm` kernel, and `ragged_dot`'s lowering, a dense
    convolution over every expert; a row kernel (`gmm`, 2-D) is not a weight gradient."""
    from benchmarks.hlo_stats import expert_weight_ops

    megablox = """
  %gmm.2 = bf16[8192,768]{1,0:T(8,128)(2,1)} custom-call(%fusion.18, %param.34), custom_call_target="tpu_custom_call"
  %tgmm.1 = bf16[16,2048,768]{2,1,0:T(8,128)(2,1)} custom-call(%get-tuple-element.355, %fusion.12), custom_call_target="tpu_custom_call"
"""
    ragged_dot = """
  ROOT %convolution-base-dilated = bf16[16,2048,768]{2,1,0:T(8,128)(2,1)} convolution(%fusion.3, %fusion.4), window={size=16 stride=15 lhs_dilate=16}, dim_labels=0fb_0io->0bf
  %fusion.7 = f32[4,2048,768]{2,1,0} convolution(%a, %b), dim_labels=0fb_0io->0bf
"""
    shapes = tpu_aot.expert_weight_shapes(preset("tiny-moe", num_experts=16, hidden_size=2048, moe_intermediate_size=768),
                                          make_mesh({"data": 8}))
    assert shapes == {(16, 2048, 768), (16, 768, 2048)}
    assert expert_weight_ops(megablox, shapes) == {"grouped_kernels": 1, "dense_convolutions": 0}
    assert expert_weight_ops(ragged_dot, shapes) == {"grouped_kernels": 0, "dense_convolutions": 1}
    # Under expert and tensor parallelism: El = E / expert, I / tensor.
    assert tpu_aot.expert_weight_shapes(preset("tiny-moe"), make_mesh({"expert": 2, "tensor": 2, "data": 2})) == {
        (4, 96, 24), (4, 24, 96)}


def test_collectives_after_a_multi_line_pallas_kernel_are_counted():
    """libtpu prints a Pallas kernel's backend_config over several lines (splash attention's JSON
    holds newlines); a continuation line starting with "}" does not end the computation, so the
    all-gather after it, in a loop of 4, counts."""
    from benchmarks.hlo_stats import collective_bytes

    hlo = """
%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %k = bf16[8,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"a":
"{\"block_q\": 512}
}}, metadata={op_name="splash"}
  %ag = bf16[64,128]{1,0} all-gather(%k), dimensions={0}
  ROOT %t = (s32[], bf16[8,128]) tuple(%i, %k)
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {
  %w = (s32[], bf16[8,128]) while(%t0), condition=%cond, body=%body
  ROOT %r = bf16[8,128] get-tuple-element(%w), index=1
}
"""
    assert collective_bytes(hlo)["all-gather"] == 4 * 64 * 128 * 2


def test_a_slice_that_does_not_fit_grows_along_the_kinds_axis():
    assert tpu_aot.larger("v5p:2x2x2", {"fsdp": 8}, "fsdp") == ("v5p:2x2x4", {"fsdp": 16})
    assert tpu_aot.larger("v5e:2x2", {"tensor": 4}, "tensor") == ("v5e:2x4", {"tensor": 8})
    assert tpu_aot.larger("v5e:16x16", {"tensor": 8, "data": 32}, "data") is None  # the largest v5e slice
    assert tpu_aot.growth_axis("train", {"fsdp": 8}, num_kv_heads=8, rows=0) == "fsdp"
    assert tpu_aot.growth_axis("serve", {"tensor": 4}, num_kv_heads=8, rows=8) == "tensor"
    assert tpu_aot.growth_axis("serve", {"tensor": 8}, num_kv_heads=8, rows=8) == "data"  # no KV head left to split
    # Every row on its own batch shard already: a larger slice would only pad the batch.
    assert tpu_aot.growth_axis("serve", {"expert": 2, "tensor": 4, "data": 4}, num_kv_heads=4, rows=8) is None


def test_committed_moe_rows_run_grouped_kernels_and_fit():
    """The MoE rows of benchmarks/results/tpu_aot.json (compiled with libtpu, which CI lacks): on
    TPU the MoE runs megablox, each weight gradient (gate, up, down) a grouped kernel and none a
    dense convolution over the experts; training's matmul FLOPs within 1.3x of the model's; no
    involuntary rematerialisation; every row fits the slice its config names."""
    import json

    rows = [r for r in json.load(open(tpu_aot.RESULTS))["rows"] if preset(r["preset"]).is_moe]
    assert {(r["preset"], r["kind"], r["length"]) for r in rows} == {
        (p, k, n) for p in ("qwen3-30b-a3b", "qwen3-235b-a22b")
        for k, lengths in (("train", tpu_aot.TRAIN_LENGTHS), ("prefill", tpu_aot.SERVE_CONTEXTS),
                           ("decode", tpu_aot.SERVE_CONTEXTS)) for n in lengths}
    for r in rows:
        where = (r["preset"], r["kind"], r["length"])
        assert r["moe_impl"] == "megablox" and r["named"]["fits"] and r["involuntary_remat"] == 0, where
        if r["kind"] == "train":
            ops = r["expert_weight_gradient_ops"]  # XLA may duplicate a loop body's kernels (235B 32K: 6)
            assert ops["grouped_kernels"] >= 3 and ops["dense_convolutions"] == 0, where
            assert r["program_flops_per_chip"] < 1.3 * r["model_flops_per_chip"], where
