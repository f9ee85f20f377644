"""What the SPMD partitioner makes of the model on 8-device meshes (issue 14).

XLA logs "[SPMD] Involuntary full rematerialization" (C++ logging, straight to file descriptor 2)
when it finds no collective from one sharding to the next and replicates the array instead: on a
pod, an all-gather of an activation in every layer. tests/helpers/compile_on_meshes.py compiles the train
step and the engine's prefill and decode in a subprocess whose stderr is read here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from qwen3_jax import make_mesh, preset
from qwen3_jax.moe import MoE
from qwen3_jax.sharding import constrain, state_shardings

REMAT = "Involuntary full rematerialization"
CASES = ("tiny-dense:data=2,fsdp=2,tensor=2", "tiny-moe:data=2,expert=2,tensor=2", "tiny-moe:fsdp=4,expert=2")
BATCH, SEQ = 8, 32


@pytest.fixture(scope="module")
def compiler_logs() -> dict[str, str]:
    """XLA's stderr per case of tests/helpers/compile_on_meshes.py, run in a fresh process (a cached
    executable compiles nothing and logs nothing; XLA's flags are fixed at process start)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "compile_on_meshes.py")
    proc = subprocess.run([sys.executable, script, *CASES], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs, case = {}, None
    for line in proc.stderr.splitlines():
        if line.startswith("CASE "):
            case = line[len("CASE "):]
            logs[case] = ""
        elif case is not None:
            logs[case] += line + "\n"
    assert "done" in logs, proc.stderr[-3000:]
    return logs


def remat_lines(log: str) -> list[str]:
    return [line[:400] for line in log.splitlines() if REMAT in line]


def test_the_warning_is_seen(compiler_logs):
    """The check below can fail: a reshard with no collective path is caught (else XLA's warnings
    do not reach stderr and the check would pass vacuously)."""
    assert remat_lines(compiler_logs["canary"])


@pytest.mark.parametrize("case", CASES)
def test_train_step_prefill_and_decode_compile_without_rematerialization(compiler_logs, case):
    assert not remat_lines(compiler_logs[case])


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo_text: str) -> Counter:
    """Collective ops of a compiled HLO module by kind (async -start halves counted once)."""
    pattern = re.compile(r"= \S.*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
    return Counter(m.group(1) for m in map(pattern.search, hlo_text.splitlines()) if m)


@pytest.mark.parametrize("mesh_shape, expected", [
    # all_gather of tokens, expert ids and weights over `expert`; psum over `tensor`;
    # psum_scatter over `expert`; the all-reduce of the router statistics over the batch axes.
    ({"data": 2, "expert": 2, "tensor": 2}, {"all-gather": 3, "all-reduce": 2, "reduce-scatter": 1}),
    # The same without `tensor`, plus FSDP's all-gathers of the router and the three expert weights.
    ({"fsdp": 4, "expert": 2}, {"all-gather": 3 + 4, "all-reduce": 1, "reduce-scatter": 1}),
])
def test_moe_layer_collectives_are_the_designed_ones(mesh_shape, expected):
    """One MoE layer's forward has exactly the collectives `qwen3_jax.moe` documents: in particular
    no all-gather of the router probabilities over the batch axes (for top_k) and no all-to-all."""
    cfg = preset("tiny-moe")
    mesh = make_mesh(mesh_shape)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, rngs=nnx.Rngs(0))))
    abstract = jax.tree.map(lambda s, v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            state_shardings(state, mesh, cfg.rules), state,
                            is_leaf=lambda x: isinstance(x, NamedSharding))
    act = NamedSharding(mesh, cfg.rules.spec(("batch", "seq", "act_embed"), mesh.axis_names))

    def layer(s, x_BxTxD):
        out, stats = nnx.merge(graphdef, s)(x_BxTxD, None)
        return constrain(out, ("batch", "seq", "act_embed"), cfg.rules), stats

    with jax.set_mesh(mesh):
        x = jax.ShapeDtypeStruct((BATCH, SEQ, cfg.hidden_size), jnp.float32, sharding=act)
        hlo = jax.jit(layer).lower(abstract, x).compile().as_text()
    assert collectives(hlo) == Counter(expected)


@pytest.mark.parametrize("objective", ["cross_entropy", "distillation"])
def test_unembedding_is_gathered_once_not_per_loss_chunk(objective):
    """The chunked losses' all-gathers do not grow with the chunk count: the fsdp-sharded [D, V]
    unembedding is gathered once outside the chunk loop (XLA does not hoist a loop-invariant
    all-gather out of a scan; per chunk, at 32,768-token rows it was most of a step's traffic).
    The weight gradient's all-reduce is left to XLA, whose TPU pipeline moves it out of the loop
    (benchmarks.tpu_aot shows it once per microbatch); XLA:CPU keeps it per chunk."""
    from benchmarks.hlo_stats import collective_bytes
    from train.distill.divergence import DistillLoss, chunked_sums
    from train.objectives import chunked_cross_entropy

    cfg = preset("tiny-dense")
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    B, T, D, V = 8, 64, 32, 512
    spec = lambda *names: NamedSharding(mesh, cfg.rules.spec(names, mesh.axis_names))  # noqa: E731
    h = jax.ShapeDtypeStruct((B, T, D), jnp.float32, sharding=spec("batch", "seq", "act_embed"))
    w = jax.ShapeDtypeStruct((D, V), jnp.float32, sharding=spec("embed", "vocab"))
    y = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=spec("batch", "seq"))

    def traffic(chunk_len: int) -> float:
        if objective == "cross_entropy":
            loss = lambda h, w, y: chunked_cross_entropy(h, w, y, jnp.ones(y.shape), chunk_len=chunk_len,  # noqa: E731
                                                           rules=cfg.rules)[0]
        else:
            loss = lambda h, w, y: chunked_sums(h, w, h, w, y, jnp.ones(y.shape), loss=DistillLoss(),  # noqa: E731
                                                chunk_len=chunk_len, rules=cfg.rules).loss
        with jax.set_mesh(mesh):
            hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w, y).compile().as_text()
        return collective_bytes(hlo)["all-gather"]

    one, eight = traffic(T), traffic(T // 8)
    assert one > 0 and eight <= 1.05 * one, (one, eight)
