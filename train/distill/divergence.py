"""Student-teacher divergences over next-token distributions, for strong-to-weak distillation.

p_s / p_t: softmax(logits / temperature) of student / teacher. `DistillLoss.signal`: 'full' is the
generalised JSD(beta) over the vocabulary (0: forward KL(t || s), 1: reverse KL(s || t); TRL's GKD
convention, Agarwal et al. 2024 eq. 2); 'top_k' the forward KL from the teacher's renormalised
top-k; 'k1' / 'k3' Schulman's (2020) estimators from the sampled token y, with log r = log p_t(y) -
log p_s(y): k1 = -log r, k3 = r - 1 - log r. Position i compares the distributions of token i + 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen3_jax.errors import ConfigError
from qwen3_jax.sharding import ShardingRules, constrain
from train.objectives import scan_vocab_chunks

SIGNALS = ("full", "top_k", "k1", "k3")
ESTIMATOR_USES = ("loss", "reward")


@dataclasses.dataclass(frozen=True)
class DistillLoss:
    """What the student is trained to minimise per completion token (static, hashable).

    signal: 'full' (exact generalised JSD over the vocabulary), 'top_k', 'k1' or 'k3' (module doc).
      k1/k3 need y drawn from p_s itself; two uses have a divergence's gradient in expectation:
      k1 as a 'reward' (loss = stop_grad(k1) * log p_s(y); E = grad KL(s || t), Lu et al. 2025)
      and k3 as a 'loss' (E[grad k3] = grad KL(t || s), GRPO's KL term). The other two are refused:
      E[grad k1] = 0, and k3 as a reward gives grad KL(s || t) - grad KL(t || s).
    beta: for 'full', 0 = forward KL, 1 = reverse KL, between = generalised JSD.
    temperature: both models' logits are divided by it before every softmax.
    top_k: teacher logits kept by 'top_k'.
    estimator_use: for 'k1'/'k3', 'loss' or 'reward' (see signal).
    """

    signal: str = "full"
    beta: float = 1.0
    temperature: float = 1.0
    top_k: int = 64
    estimator_use: str = "reward"

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ConfigError(f"distill signal must be one of {SIGNALS}, got {self.signal!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"distill beta must be in [0, 1], got {self.beta}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"distill temperature must be positive and finite, got {self.temperature}")
        if self.top_k < 1:
            raise ConfigError(f"distill top_k must be >= 1, got {self.top_k}")
        if self.estimator_use not in ESTIMATOR_USES:
            raise ConfigError(f"distill estimator_use must be one of {ESTIMATOR_USES}, got {self.estimator_use!r}")
        if (self.signal, self.estimator_use) in (("k1", "loss"), ("k3", "reward")):
            raise ConfigError(
                f"distill signal={self.signal!r} with estimator_use={self.estimator_use!r} has no divergence's gradient "
                "in expectation: use signal='k1' with estimator_use='reward' (reverse KL) or signal='k3' "
                "with estimator_use='loss' (forward KL)")


class DistillSums(NamedTuple):
    """Sums over masked positions (divide by the mask's sum for means)."""

    loss: jax.Array  # what the gradient is taken of
    divergence: jax.Array  # the signal's value: the exact divergence ('full'), or its estimate
    student_entropy: jax.Array  # entropy of p_s, nats
    teacher_entropy: jax.Array  # entropy of p_t, nats


# --------------------------------------------------------------------------- per-token kernels


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from finite log-probabilities (an underflowed p counts 0)."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _generalised_jsd(log_s: jax.Array, log_t: jax.Array, beta: float) -> jax.Array:
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = jnp.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _entropy(log_p: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def token_terms(
    student_logits_xV: jax.Array, teacher_logits_xV: jax.Array, targets_x: jax.Array, loss: DistillLoss,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(loss, divergence, student entropy, teacher entropy) per position, from float32 logits [..., V].

    `targets_x` is the sampled next token of each position (used by 'k1'/'k3').
    """
    log_s = jax.nn.log_softmax(student_logits_xV / loss.temperature, axis=-1)
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits_xV) / loss.temperature, axis=-1)
    entropies = (_entropy(jax.lax.stop_gradient(log_s)), _entropy(log_t))
    if loss.signal == "full":
        div = _generalised_jsd(log_s, log_t, loss.beta)
        return (div, jax.lax.stop_gradient(div), *entropies)
    if loss.signal == "top_k":
        top_logits_xK, top_ids_xK = jax.lax.top_k(log_t, loss.top_k)
        log_q_xK = jax.nn.log_softmax(top_logits_xK, axis=-1)
        log_s_xK = jnp.take_along_axis(log_s, top_ids_xK, axis=-1)
        div = _kl(log_q_xK, log_s_xK)
        return (div, jax.lax.stop_gradient(div), *entropies)
    # Sampled-token estimators: select-and-sum keeps a vocab-sharded axis local (no gather).
    at_target = jnp.arange(log_s.shape[-1]) == targets_x[..., None]
    log_s_y = jnp.sum(jnp.where(at_target, log_s, 0.0), axis=-1)
    log_t_y = jnp.sum(jnp.where(at_target, log_t, 0.0), axis=-1)
    log_r = log_t_y - log_s_y
    estimate = -log_r if loss.signal == "k1" else jnp.expm1(log_r) - log_r
    if loss.estimator_use == "loss":
        value = estimate
    else:  # policy gradient with per-token reward -estimate
        value = jax.lax.stop_gradient(estimate) * log_s_y
    return (value, jax.lax.stop_gradient(estimate), *entropies)


# ------------------------------------------------------------------------------ full logits


def divergence(
    student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array, mask_BxT: jax.Array, *, beta: float,
    temperature: float = 1.0,
) -> jax.Array:
    """Mean over mask tokens of the per-token generalised JSD(beta) summed over the vocabulary.

    Both logits are divided by `temperature`. beta = 0 is forward KL(teacher || student), beta = 1
    reverse KL(student || teacher), between them beta KL(teacher || M) + (1 - beta) KL(student || M)
    with M = beta teacher + (1 - beta) student (TRL's GKD convention). Gradients reach the student
    logits only. Holds both [B, T, V] logits: the reference for `chunked_sums`, which training uses.
    A mask with no token gives 0.
    """
    loss = DistillLoss(signal="full", beta=beta, temperature=temperature)
    per_token_BxT = token_terms(
        student_logits_BxTxV.astype(jnp.float32), teacher_logits_BxTxV.astype(jnp.float32),
        jnp.zeros(mask_BxT.shape, jnp.int32), loss,
    )[0]
    mask_BxT = mask_BxT.astype(jnp.float32)
    return jnp.sum(mask_BxT * per_token_BxT) / jnp.maximum(jnp.sum(mask_BxT), 1.0)


# ------------------------------------------------------------------------------ chunked


def chunked_sums(
    student_hidden_BxTxD: jax.Array, student_w_DxV: jax.Array, teacher_hidden_BxTxE: jax.Array,
    teacher_w_ExV: jax.Array, targets_BxT: jax.Array, mask_BxT: jax.Array, *, loss: DistillLoss, chunk_len: int,
    rules: ShardingRules,
) -> DistillSums:
    """`DistillSums` over mask tokens from the two models' final hidden states and unembeddings.

    Never holds [B, T, V] logits: the sequence is cut into chunks of `chunk_len` positions, each
    chunk's [B, C, V] float32 logits of both models exist only inside it, and the backward pass
    recomputes them (`jax.checkpoint`) rather than keeping them. The teacher side is constant
    (`stop_gradient`). Student and teacher may differ in width (D != E) and dtype, not in vocab.
    Raises ConfigError when the vocabularies differ, ValueError when `chunk_len` does not divide T.
    """
    B, T, _ = student_hidden_BxTxD.shape
    if student_w_DxV.shape[-1] != teacher_w_ExV.shape[-1]:
        raise ConfigError(
            f"student and teacher vocabularies differ ({student_w_DxV.shape[-1]} vs {teacher_w_ExV.shape[-1]}): "
            "distillation over logits needs one vocabulary"
        )
    if teacher_hidden_BxTxE.shape[:2] != (B, T):
        raise ConfigError(f"teacher hidden {teacher_hidden_BxTxE.shape} does not cover the student's [B, T] = {(B, T)}")
    teacher_hidden_BxTxE = jax.lax.stop_gradient(teacher_hidden_BxTxE)
    teacher_w_ExV = jax.lax.stop_gradient(teacher_w_ExV)

    def chunk_sums(weights, hs_BxCxD, ht_BxCxE, y_BxC, m_BxC):
        w_s, w_t = weights
        f32 = jnp.float32
        s_BxCxV = jnp.einsum("BCD,DV->BCV", hs_BxCxD, w_s, preferred_element_type=f32)
        t_BxCxV = jnp.einsum("BCE,EV->BCV", ht_BxCxE, w_t, preferred_element_type=f32)
        s_BxCxV = constrain(s_BxCxV, ("batch", "seq", "act_vocab"), rules)
        t_BxCxV = constrain(t_BxCxV, ("batch", "seq", "act_vocab"), rules)
        terms = token_terms(s_BxCxV, t_BxCxV, y_BxC, loss)
        return DistillSums(*(jnp.sum(m_BxC * x_BxC) for x_BxC in terms))

    return scan_vocab_chunks(
        chunk_sums, (student_w_DxV, teacher_w_ExV),
        (student_hidden_BxTxD, teacher_hidden_BxTxE, targets_BxT, mask_BxT.astype(jnp.float32)),
        chunk_len=chunk_len, rules=rules)
