"""Causal GQA attention kernels: the einsum reference, blockwise (flash-style), splash (TPU), cuDNN (GPU).

All compute softmax(q k^T / sqrt(H) + mask) v with one mask: a query at cache slot q_slot sees key
slots <= q_slot (and, for packed rows, only its own segment's). `auto` picks per call: splash on
TPU and cuDNN on GPU where they apply (no KV cache; cuDNN also bf16/f16 and unpacked), blockwise
otherwise; rows that fit one tile run the einsum reference. Shapes: B batch, T queries, S key
slots, K kv heads, G query heads per kv head (N = K*G), H head_dim; keys [B, K, H, S], values [B, K, S, H].
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen3_jax.config import Qwen3Config
from qwen3_jax.sharding import current_mesh_axes, target_platform

_F32 = jnp.float32
_MASKED = jnp.finfo(jnp.float32).min


class Mask(NamedTuple):
    """What a query may see: key slot s <= q_slots_BxT[b, t], and equal segment ids when given.

    Segment ids of keys are those of the queries (calls without a cache, where S == T).
    """

    q_slots_BxT: jax.Array
    segment_ids_BxT: jax.Array | None = None

    def block(self, q_lo, bq: int, k_lo, bk: int) -> jax.Array:
        """[B, bq, bk] visibility of keys [k_lo, k_lo + bk) to queries [q_lo, q_lo + bq)."""
        q_slots = jax.lax.dynamic_slice_in_dim(self.q_slots_BxT, q_lo, bq, axis=1)
        visible = k_lo + jnp.arange(bk)[None, None, :] <= q_slots[:, :, None]
        if self.segment_ids_BxT is not None:
            q_seg = jax.lax.dynamic_slice_in_dim(self.segment_ids_BxT, q_lo, bq, axis=1)
            k_seg = jax.lax.dynamic_slice_in_dim(self.segment_ids_BxT, k_lo, bk, axis=1)
            visible &= q_seg[:, :, None] == k_seg[:, None, :]
        return visible


# ------------------------------------------------------------------------------- einsum


def einsum_attention(q_BxTxKxGxH, k_BxKxHxS, v_BxKxSxH, mask: Mask) -> jax.Array:
    """The reference: full float32 scores, masked, softmax, weighted values. Returns [B, T, K, G, H]."""
    B, T = q_BxTxKxGxH.shape[:2]
    visible_BxTxS = mask.block(0, T, 0, k_BxKxHxS.shape[-1])
    scale = q_BxTxKxGxH.shape[-1] ** -0.5
    if T == 1:
        # T squeezed out of the contractions: with it, XLA:CPU adds transposes and copies around both dots.
        q_BxKxGxH = q_BxTxKxGxH[:, 0]
        scores = jnp.einsum("BKGH,BKHS->BKGS", q_BxKxGxH, k_BxKxHxS, preferred_element_type=_F32)
        scores = jnp.where(visible_BxTxS[:, None], scores * scale, _MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
        return jnp.einsum("BKGS,BKSH->BKGH", probs, v_BxKxSxH)[:, None]
    # Queries laid out like the scores: XLA:CPU has no kernel for a bfloat16 x bfloat16 -> float32
    # dot whose output reorders the free dims ("Unsupported element type for DotThunk").
    q_BxKxGxTxH = jnp.transpose(q_BxTxKxGxH, (0, 2, 3, 1, 4))
    scores = jnp.einsum("BKGTH,BKHS->BKGTS", q_BxKxGxTxH, k_BxKxHxS, preferred_element_type=_F32)
    scores = jnp.where(visible_BxTxS[:, None, None], scores * scale, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxH.dtype)
    return jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BxKxSxH)


# ---------------------------------------------------------------------------- blockwise


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _tile_scores(q_BxKxGxTxH, k_BxKxHxS, visible_BxTxS, scale):
    """Scaled float32 scores of one tile, -inf-like where masked: [B, K, G, bq, bk]."""
    if q_BxKxGxTxH.shape[3] == 1:  # decode: T out of the contraction, as in einsum_attention
        s = jnp.einsum("BKGH,BKHS->BKGS", q_BxKxGxTxH[:, :, :, 0], k_BxKxHxS, preferred_element_type=_F32)[:, :, :, None]
    else:
        s = jnp.einsum("BKGTH,BKHS->BKGTS", q_BxKxGxTxH, k_BxKxHxS, preferred_element_type=_F32)
    return jnp.where(visible_BxTxS[:, None, None], s * scale, _MASKED)


def _tile_values(p_BxKxGxTxS, v_BxKxSxH):
    """Probability-weighted values of one tile, float32: [B, K, G, bq, H]."""
    p = p_BxKxGxTxS.astype(v_BxKxSxH.dtype)
    if p.shape[3] == 1:
        return jnp.einsum("BKGS,BKSH->BKGH", p[:, :, :, 0], v_BxKxSxH, preferred_element_type=_F32)[:, :, :, None]
    return jnp.einsum("BKGTS,BKSH->BKGTH", p, v_BxKxSxH, preferred_element_type=_F32)


def _tiles(mask: Mask, bq: int, bk: int, nk: int):
    """Per query tile: the number of key tiles it needs (the last key tile any of its queries sees)."""
    last_slot_nq = jnp.max(mask.q_slots_BxT.reshape(mask.q_slots_BxT.shape[0], -1, bq), axis=(0, 2))
    return jnp.minimum(last_slot_nq // bk + 1, nk)


def _flash_forward(q_BxKxGxTxH, k_BxKxHxS, v_BxKxSxH, mask: Mask, bq: int, bk: int):
    """Output [B, K, G, T, H] (input dtype) and log-sum-exp [B, K, G, T] (float32)."""
    B, K, G, T, H = q_BxKxGxTxH.shape
    nq, nk = T // bq, k_BxKxHxS.shape[-1] // bk
    scale = H**-0.5
    needed_nq = _tiles(mask, bq, bk, nk)

    def q_tile(i):
        q = jax.lax.dynamic_slice_in_dim(q_BxKxGxTxH, i * bq, bq, axis=3)

        def kv_tile(carry, j):
            def update(carry):
                m, l, acc = carry
                k = jax.lax.dynamic_slice_in_dim(k_BxKxHxS, j * bk, bk, axis=3)
                v = jax.lax.dynamic_slice_in_dim(v_BxKxSxH, j * bk, bk, axis=2)
                visible = mask.block(i * bq, bq, j * bk, bk)
                s = _tile_scores(q, k, visible, scale)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(visible[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                l = l * correction + jnp.sum(p, axis=-1)
                return m_new, l, acc * correction[..., None] + _tile_values(p, v)

            return jax.lax.cond(j < needed_nq[i], update, lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), _MASKED, _F32), jnp.zeros((B, K, G, bq), _F32), jnp.zeros((B, K, G, bq, H), _F32))
        (m, l, acc), _ = jax.lax.scan(kv_tile, init, jnp.arange(nk))
        l_safe = jnp.where(l > 0, l, 1.0)  # a padding query sees no key: output 0, not NaN
        return (acc / l_safe[..., None]).astype(q_BxKxGxTxH.dtype), m + jnp.log(l_safe)

    out_nq, lse_nq = jax.lax.map(q_tile, jnp.arange(nq))
    out = jnp.moveaxis(out_nq, 0, 3).reshape(B, K, G, T, H)
    lse = jnp.moveaxis(lse_nq, 0, 3).reshape(B, K, G, T)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_BxKxGxTxH, k_BxKxHxS, v_BxKxSxH, mask: Mask, bq: int, bk: int):
    return _flash_forward(q_BxKxGxTxH, k_BxKxHxS, v_BxKxSxH, mask, bq, bk)[0]


def _flash_fwd(q, k, v, mask, bq, bk):
    out, lse = _flash_forward(q, k, v, mask, bq, bk)
    return out, (q, k, v, mask, out, lse)


def _flash_bwd(bq, bk, residuals, d_out_BxKxGxTxH):
    """FlashAttention-2's backward: per key tile, accumulate dK, dV over query tiles, and dQ in a carry."""
    q, k, v, mask, out, lse = residuals
    B, K, G, T, H = q.shape
    nq, nk = T // bq, k.shape[-1] // bk
    scale = H**-0.5
    needed_nq = _tiles(mask, bq, bk, nk)
    # D_i = rowsum(dO_i * O_i), the softmax Jacobian's correction term.
    delta = jnp.einsum("BKGTH,BKGTH->BKGT", d_out_BxKxGxTxH.astype(_F32), out.astype(_F32))

    def kv_tile(dq_acc, j):
        k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=3)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)

        def q_tile(carry, i):
            def update(carry):
                dq_acc, dk_j, dv_j = carry
                sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=axis)  # noqa: E731
                q_i, do_i, lse_i, delta_i = sl(q, 3), sl(d_out_BxKxGxTxH, 3), sl(lse, 3), sl(delta, 3)
                visible = mask.block(i * bq, bq, j * bk, bk)
                s = _tile_scores(q_i, k_j, visible, scale)
                p = jnp.where(visible[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(do_i.dtype), do_i, preferred_element_type=_F32)
                dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, v_j, preferred_element_type=_F32)
                ds = p * (dp - delta_i[..., None]) * scale
                dk_j = dk_j + jnp.einsum("BKGTS,BKGTH->BKHS", ds.astype(q_i.dtype), q_i, preferred_element_type=_F32)
                dq_i = jnp.einsum("BKGTS,BKHS->BKGTH", ds.astype(k_j.dtype), k_j, preferred_element_type=_F32)
                dq_acc = jax.lax.dynamic_update_slice_in_dim(dq_acc, sl(dq_acc, 3) + dq_i, i * bq, axis=3)
                return dq_acc, dk_j, dv_j

            return jax.lax.cond(j < needed_nq[i], update, lambda c: c, carry), None

        init = (dq_acc, jnp.zeros((B, K, H, bk), _F32), jnp.zeros((B, K, bk, H), _F32))
        (dq_acc, dk_j, dv_j), _ = jax.lax.scan(q_tile, init, jnp.arange(nq))
        return dq_acc, (dk_j, dv_j)

    dq, (dk_nk, dv_nk) = jax.lax.scan(kv_tile, jnp.zeros(q.shape, _F32), jnp.arange(nk))
    dk = jnp.moveaxis(dk_nk, 0, 3).reshape(k.shape)  # [nk, B, K, H, bk] -> [B, K, H, S]
    dv = jnp.moveaxis(dv_nk, 0, 2).reshape(v.shape)  # [nk, B, K, bk, H] -> [B, K, S, H]
    no_grad = jax.tree.map(lambda _: None, mask)  # slots and segment ids are integers
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), no_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_BxTxKxGxH, k_BxKxHxS, v_BxKxSxH, mask: Mask, block_q: int, block_kv: int) -> jax.Array:
    """Flash-style attention, never holding more than one [B, K, G, block_q, block_kv] score tile
    (forward and backward). Returns [B, T, K, G, H]; rows fitting one tile run `einsum_attention`.

    T and S need not divide the blocks: queries are padded with slot -1 (they see nothing) and keys
    with slots past S (no query sees them).
    """
    B, T = q_BxTxKxGxH.shape[:2]
    S = k_BxKxHxS.shape[-1]
    if T <= block_q and S <= block_kv:
        return einsum_attention(q_BxTxKxGxH, k_BxKxHxS, v_BxKxSxH, mask)
    bq, bk = min(block_q, T), min(block_kv, S)
    q = _pad_to(jnp.transpose(q_BxTxKxGxH, (0, 2, 3, 1, 4)), 3, bq)
    k, v = _pad_to(k_BxKxHxS, 3, bk), _pad_to(v_BxKxSxH, 2, bk)
    padded = Mask(_pad_to(mask.q_slots_BxT, 1, bq, -1),
                  None if mask.segment_ids_BxT is None else _pad_to(mask.segment_ids_BxT, 1, max(bq, bk), -1))
    out = _flash(q, k, v, padded, bq, bk)[:, :, :, :T]
    return jnp.transpose(out, (0, 3, 1, 2, 4))


# ------------------------------------------------------------------------- splash, cuDNN


def _shard_over_batch_and_heads(fn, cfg: Qwen3Config, *arrays_BxTxNxH, segment_ids_BxT):
    """Runs a per-device kernel on the local [b, T, n, H] blocks: batch over the batch axes, heads over `tensor`."""
    names = current_mesh_axes()
    if not names:
        return fn(*arrays_BxTxNxH, segment_ids_BxT)
    heads = cfg.rules.spec(("batch", "seq", "act_heads", None), names)
    kv_heads = cfg.rules.spec(("batch", "seq", "act_kv_heads", None), names)
    seg = cfg.rules.spec(("batch", "seq"), names)
    specs = (heads, kv_heads, kv_heads) + ((seg,) if segment_ids_BxT is not None else ())
    args = arrays_BxTxNxH + ((segment_ids_BxT,) if segment_ids_BxT is not None else ())

    def local(q, k, v, *seg_ids):
        return fn(q, k, v, seg_ids[0] if seg_ids else None)

    return jax.shard_map(local, in_specs=specs, out_specs=heads, check_vma=False)(*args)


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, cfg: Qwen3Config,
                     *, interpret: bool = False) -> jax.Array:
    """Causal self-attention (no KV cache) with the Pallas TPU splash kernel. Returns [B, T, N, H].

    T must be a multiple of the block size min(cfg.attention_block_q, T) (the kernel tiles exactly);
    raises ValueError otherwise. `interpret=True` runs the kernel in the Pallas interpreter (any backend).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    T, H = q_BxTxNxH.shape[1], q_BxTxNxH.shape[-1]
    block = min(cfg.attention_block_q, cfg.attention_block_kv, T)
    if T % block:
        raise ValueError(f"splash attention needs the sequence length ({T}) to be a multiple of its block ({block}); "
                         "pad the rows or use attention='blockwise'")
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)

    def kernel_on_device(q, k, v, seg):
        n = q.shape[2]
        kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.CausalMask((T, T))] * n), block_sizes=sizes,
                                        head_shards=1, q_seq_shards=1, interpret=interpret)

        def one_row(q_TxNxH, k_TxKxH, v_TxKxH, seg_T):
            ids = None if seg_T is None else splash.SegmentIds(q=seg_T, kv=seg_T)
            out_NxTxH = kernel(jnp.swapaxes(q_TxNxH, 0, 1) * jnp.asarray(H**-0.5, q.dtype),
                               jnp.swapaxes(k_TxKxH, 0, 1), jnp.swapaxes(v_TxKxH, 0, 1), segment_ids=ids)
            return jnp.swapaxes(out_NxTxH, 0, 1)

        if seg is None:
            return jax.vmap(lambda a, b, c: one_row(a, b, c, None))(q, k, v)
        return jax.vmap(one_row)(q, k, v, seg.astype(jnp.int32))

    return _shard_over_batch_and_heads(kernel_on_device, cfg, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                       segment_ids_BxT=segment_ids_BxT)


def cudnn_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, cfg: Qwen3Config) -> jax.Array:
    """Causal self-attention (no KV cache, no packed segments) with cuDNN's fused kernel. Returns [B, T, N, H]."""

    def on_device(q, k, v, _):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    return _shard_over_batch_and_heads(on_device, cfg, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None)


# ------------------------------------------------------------------------------ dispatch


def choose(cfg: Qwen3Config, *, cached: bool, packed: bool, queries: int | None = None,
           kv_slots: int | None = None, backend: str | None = None) -> str:
    """The implementation a call runs: `cfg.attention`, with `auto` resolved for `backend` (default:
    `target_platform()`, the installed mesh's platform), `queries` (T) and the cache's `kv_slots` (S).
    On CPU a decode step (T = 1) over at most 2 x attention_block_kv slots runs einsum, faster there
    than blockwise's tile loop (benchmarks.attention). Raises ValueError for an explicit choice that
    cannot run the call."""
    backend = backend or target_platform()
    impl = cfg.attention
    if impl == "auto":
        if not cached and backend == "tpu":
            return "splash"
        if not cached and not packed and backend == "gpu" and cfg.dtype in ("bfloat16", "float16"):
            return "cudnn"
        if (cached and backend == "cpu" and queries == 1 and kv_slots is not None
                and kv_slots <= 2 * cfg.attention_block_kv):
            return "einsum"
        return "blockwise"
    if impl in ("splash", "cudnn") and cached:
        raise ValueError(f"attention={impl!r} has no KV-cache path (prefill and decode); "
                         "use attention='auto' or 'blockwise' for decoding")
    if impl == "cudnn" and packed:
        raise ValueError("attention='cudnn' does not take packed segment ids; use 'auto', 'blockwise' or 'splash'")
    if impl == "cudnn" and cfg.dtype not in ("bfloat16", "float16"):
        raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got {cfg.dtype!r}")
    return impl
