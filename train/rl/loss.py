"""The GRPO-family policy loss: clipped importance-ratio surrogate, KL penalty, loss aggregation, advantages.

Pure array functions. `policy_loss` is the stable reference on whole [B, T] arrays; the jitted
update computes the same per-token terms (`token_terms`) in sequence chunks and weighs them with
`relative_weights` computed over the whole global batch (train.step's `prepare` hook), so
microbatching and sharding never change a normaliser.

Shapes: B rows (completions), T positions. Position t of a row holds the log-probabilities of the
token at t + 1 (the training batch's `targets`), and `mask` is 1 where that token was sampled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Loss aggregation over the mask (see RLLoss in train/rl/config.py for the papers):
AGGREGATIONS = (
    "token_mean",  # sum over all mask tokens of the batch / their count (DAPO, arXiv 2503.14476 §3.3)
    "seq_mean_token_mean",  # mean over rows of each row's token mean (GRPO, DeepSeekMath arXiv 2402.03300 eq. 3)
    "seq_mean_token_sum_norm",  # sum over mask tokens / (rows x norm_len) (Dr. GRPO, arXiv 2503.20783 §3.2)
)
KL_ESTIMATORS = ("k1", "k3")  # Schulman, "Approximating KL divergence" (2020)


def check_names(aggregation: str, kl_estimator: str) -> None:
    """Raises ValueError naming an unknown aggregation or KL estimator."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")


def relative_weights(mask_BxT: jax.Array, aggregation: str, norm_len: int | None = None) -> jax.Array:
    """[B, T] float32 per-token weights w, relative to the token mean: the aggregated loss is
    sum(w * loss) / N, N = max(number of mask tokens, 1) (the divisor `train.step.update_step`
    applies). Rows without a mask token count in no per-row mean (GRPO); Dr. GRPO's normaliser is
    rows x norm_len (default T) whatever the mask. Raises ValueError for an unknown aggregation."""
    check_names(aggregation, "k3")
    mask_BxT = mask_BxT.astype(jnp.float32)
    B, T = mask_BxT.shape
    n = jnp.maximum(jnp.sum(mask_BxT), 1.0)
    if aggregation == "token_mean":
        return mask_BxT
    if aggregation == "seq_mean_token_mean":
        per_row_B = jnp.sum(mask_BxT, axis=1)
        rows = jnp.maximum(jnp.sum(per_row_B > 0), 1)
        return mask_BxT * (n / (jnp.maximum(per_row_B, 1.0) * rows))[:, None]
    return mask_BxT * (n / (B * (T if norm_len is None else norm_len)))


def token_terms(
    logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_BxT: jax.Array, *, clip_low: float, clip_high: float,
    ref_logp_BxT: jax.Array | None = None, kl_beta: float = 0.0, kl_estimator: str = "k3",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per token: (loss, clipped, kl). loss = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
    + kl_beta kl, r = exp(logp - old_logp) (PPO, arXiv 1707.06347 eq. 7); kl = k1 (logp - ref_logp)
    or k3 (exp(ref_logp - logp) - (ref_logp - logp) - 1), 0 without `ref_logp_BxT`; clipped = 1
    where the clip is active (its surrogate has no gradient there)."""
    ratio = jnp.exp(logp_BxT - old_logp_BxT)
    unclipped = ratio * advantages_BxT
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -jnp.minimum(unclipped, clipped_ratio * advantages_BxT)
    clipped = (clipped_ratio * advantages_BxT < unclipped).astype(jnp.float32)
    if ref_logp_BxT is None:
        return loss, clipped, jnp.zeros_like(loss)
    log_ratio = ref_logp_BxT - logp_BxT
    kl = -log_ratio if kl_estimator == "k1" else jnp.exp(log_ratio) - log_ratio - 1.0
    return loss + kl_beta * kl, clipped, kl


def policy_loss(
    logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array, mask_BxT: jax.Array, *,
    aggregation: str, clip_low: float = 0.2, clip_high: float = 0.2, ref_logp_BxT: jax.Array | None = None,
    kl_beta: float = 0.0, kl_estimator: str = "k3", norm_len: int | None = None,
) -> jax.Array:
    """The GRPO-family policy loss, a float32 scalar: `token_terms`' per-token loss aggregated over
    `mask_BxT` as `aggregation` says ("token_mean": DAPO; "seq_mean_token_mean": GRPO;
    "seq_mean_token_sum_norm": Dr. GRPO, dividing by rows x `norm_len`, default T).

    logp_BxT: the policy's log-probabilities of the sampled tokens; old_logp_BxT: the behaviour
    policy's (the rollout's); advantages_B: one per row; ref_logp_BxT: the reference policy's,
    for the `kl_beta` penalty (k1 or k3). Positions off the mask may hold anything finite or not.

    Raises:
      ValueError: an unknown aggregation or kl_estimator.
    """
    check_names(aggregation, kl_estimator)
    mask = mask_BxT.astype(jnp.float32) > 0
    safe = lambda x: None if x is None else jnp.where(mask, x, 0.0)  # noqa: E731  (no inf * 0 off the mask)
    A_BxT = jnp.broadcast_to(jnp.asarray(advantages_B, jnp.float32)[:, None], mask.shape)
    loss, _, _ = token_terms(safe(logp_BxT), safe(old_logp_BxT), A_BxT, clip_low=clip_low, clip_high=clip_high,
                             ref_logp_BxT=safe(ref_logp_BxT), kl_beta=kl_beta, kl_estimator=kl_estimator)
    w = relative_weights(mask, aggregation, norm_len)
    return jnp.sum(jnp.where(mask, w * loss, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def group_advantages(rewards: np.ndarray, group_size: int, *, scale_by_std: bool, eps: float = 1e-6) -> np.ndarray:
    """float32 [B] advantages of rewards in groups of `group_size` adjacent rows: the reward minus
    its group's mean (GRPO's outcome supervision, arXiv 2402.03300 §4.1.2), divided by the group's
    standard deviation (ddof 1, as TRL and verl compute it) + eps when `scale_by_std` (Dr. GRPO
    drops the division: it weights too-easy and too-hard questions up). A group whose rewards are
    all equal gets 0. Raises ValueError when B is not a multiple of group_size."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    a = g - g.mean(axis=1, keepdims=True)
    if scale_by_std:
        a = a / (g.std(axis=1, ddof=1, keepdims=True) + eps)
    return a.reshape(-1).astype(np.float32)
