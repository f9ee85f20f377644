"""One MoE layer at Qwen3-30B-A3B shapes: the dropless grouped path against the masked reference.

The masked reference runs all 128 experts on every token; the grouped path should cost what the
8 active experts cost, i.e. about as much as a dense SwiGLU of width 8 x 768 on the same tokens.

    python -m benchmarks.moe_layer [--tokens 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import matmul_peak_flops, report, timeit
from qwen3_jax import moe as moe_lib
from qwen3_jax.config import preset


def masked_reference(x_BxTxD, router_DxE, gate_ExDxI, up_ExDxI, down_ExIxD, k: int, normalize: bool) -> jax.Array:
    """Every expert on every token, weighted by the (zero outside top-k) routing weights.

    The plain definition the dropless path is benchmarked here and tested against (tests/test_model.py).
    """
    logits = jnp.einsum("BTD,DE->BTE", x_BxTxD, router_DxE)
    _, weights, idx = moe_lib.route(logits, k, normalize)
    dense_w_BxTxE = jnp.einsum("BTK,BTKE->BTE", weights, jax.nn.one_hot(idx, router_DxE.shape[1]))
    h = jax.nn.silu(jnp.einsum("BTD,EDI->BTEI", x_BxTxD, gate_ExDxI)) * jnp.einsum("BTD,EDI->BTEI", x_BxTxD, up_ExDxI)
    y = jnp.einsum("BTEI,EID->BTED", h, down_ExIxD)
    return jnp.einsum("BTED,BTE->BTD", y, dense_w_BxTxE.astype(y.dtype))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    cfg = preset("qwen3-30b-a3b")
    D, E, I, K = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (1, args.tokens, D), jnp.float32)
    router = jax.random.normal(keys[1], (D, E)) * 0.02
    gate, up = (jax.random.normal(k, (E, D, I)) * 0.02 for k in keys[2:4])
    down = jax.random.normal(keys[4], (E, I, D)) * 0.02

    @jax.jit
    def grouped(x):
        _, w, idx = moe_lib.route(jnp.einsum("BTD,DE->BTE", x, router), K, True)
        return moe_lib.local_experts(x[0], idx[0], w[0], gate, up, down, 0, "blocked")

    masked = jax.jit(lambda x: masked_reference(x, router, gate, up, down, K, True)[0])
    wg, wu, wd = gate[:K].transpose(1, 0, 2).reshape(D, K * I), up[:K].transpose(1, 0, 2).reshape(D, K * I), down[:K].reshape(K * I, D)
    dense_equiv = jax.jit(lambda x: (jax.nn.silu(x[0] @ wg) * (x[0] @ wu)) @ wd)

    diff = float(jnp.abs(grouped(x) - masked(x)).max())
    t_grouped = timeit(lambda: grouped(x).block_until_ready())
    t_masked = timeit(lambda: masked(x).block_until_ready(), repeats=2)
    t_dense = timeit(lambda: dense_equiv(x).block_until_ready())
    active_flops = 2 * 3 * args.tokens * K * D * I
    peak = matmul_peak_flops()
    report("moe_layer", {
        "shape": f"qwen3-30b-a3b MoE layer, {args.tokens} tokens, {E} experts top-{K}, float32, blocked grouped matmul",
        "grouped_speedup_vs_masked_reference": t_masked / t_grouped,
        "ideal_speedup_if_cost_tracks_active_params": E / K,
        "grouped_time_over_dense_swiglu_of_active_width": t_grouped / t_dense,
        "grouped_active_flops_utilisation_vs_matmul_peak": active_flops / t_grouped / peak,
        "max_abs_diff_vs_reference": diff,
        "grouped_s": t_grouped, "masked_s": t_masked, "dense_active_width_s": t_dense,
    })


if __name__ == "__main__":
    main()
