"""Token sampling and the Qwen3 thinking budget, as pure jit-friendly array functions.

Both run inside the compiled decode loop for a batch of B rows over V logits. Every
per-request setting is a per-row array, so changing settings between calls never
recompiles; only `max_candidates` and the length of the forced stop-thinking ids are
static.

Sampling order follows Hugging Face: presence penalty, temperature, top-k, top-p,
min-p, then a categorical draw. Every filter keeps a prefix of the tokens ranked by
tempered logit, ties ranked by larger token id first, so a row's kept set is "all
tokens ranked at or above a per-row (cutoff logit, tie id)".

Ties, as Hugging Face's warpers treat them: top-k and min-p compare values, so they
keep every token tied at their cutoff. Top-p keeps a count, as TopPLogitsWarper does:
the fewest top-ranked tokens whose mass reaches top_p, cutting through a run of equal
logits (bf16 logits tie often). Logits [2, 1, 1, 1, 0] with top_p 0.6 keep 2 tokens,
not 4. Which of the tied tokens survive is the larger ids, the order a stable
ascending sort (HF's `torch.sort`, stable on small inputs) leaves them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from qwen3_jax.ids import END_THINK_ID, IM_START_ID, THINK_ID

UNLIMITED_BUDGET = -1  # any negative thinking budget means "no limit"

# Qwen's recommended settings: `SamplingParams.make(B, **THINKING_SAMPLING)`.
THINKING_SAMPLING: Mapping[str, float] = MappingProxyType(
    {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
)
NON_THINKING_SAMPLING: Mapping[str, float] = MappingProxyType(
    {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
)


# --------------------------------------------------------------------------- sampling


@struct.dataclass
class SamplingParams:
    """Per-row sampling settings, each an array of shape [B].

    temperature: f32, 0 = greedy. top_k: i32, 0 = off. top_p: f32 in (0, 1], 1 = off.
    min_p: f32 in [0, 1), 0 = off. presence_penalty: f32, 0 = off.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    presence_penalty: jax.Array

    @classmethod
    def make(cls, batch: int, **settings: float | Sequence[float]) -> SamplingParams:
        """Validates host-side values (a scalar for all rows or one per row; the settings and
        defaults are `check`'s)."""
        t, k, p, m, pp = cls.check(batch, **settings)
        return cls(
            temperature=jnp.asarray(t, jnp.float32),
            top_k=jnp.asarray(k, jnp.int32),
            top_p=jnp.asarray(p, jnp.float32),
            min_p=jnp.asarray(m, jnp.float32),
            presence_penalty=jnp.asarray(pp, jnp.float32),
        )

    @staticmethod
    def check(
        batch: int,
        *,
        temperature: float | Sequence[float] = 1.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        min_p: float | Sequence[float] = 0.0,
        presence_penalty: float | Sequence[float] = 0.0,
    ) -> tuple[np.ndarray, ...]:
        """`make`'s validation alone, on the host (no device arrays, so config checks at import
        time leave the backend uninitialised): the float64 [batch] columns in `make`'s order.
        Raises ValueError naming the setting and row."""
        if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        t = _per_row("temperature", temperature, batch)
        k = _per_row("top_k", top_k, batch)
        p = _per_row("top_p", top_p, batch)
        m = _per_row("min_p", min_p, batch)
        pp = _per_row("presence_penalty", presence_penalty, batch)
        _check("temperature", t, t >= 0, "must be >= 0 (0 = greedy)")
        _check("top_k", k, (k >= 0) & (k < 2**31) & (k == np.round(k)), "must be an int >= 0 (0 = off)")
        _check("top_p", p, (p > 0) & (p <= 1), "must be in (0, 1] (1 = off)")
        _check("min_p", m, (m >= 0) & (m < 1), "must be in [0, 1) (0 = off)")
        return t, k, p, m, pp


def _per_row(name: str, value: Any, batch: int) -> np.ndarray:
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)):
        raise ValueError(f"{name} must be a real number or a sequence of them, got {value!r}")
    if arr.ndim == 0:
        arr = np.full(batch, arr)
    elif arr.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have {batch} values (one per row), got shape {arr.shape}")
    arr = arr.astype(np.float64)
    _check(name, arr, np.isfinite(arr), "must be finite")
    return arr


def _check(name: str, values: np.ndarray, ok: np.ndarray, rule: str) -> None:
    bad = np.flatnonzero(~ok)
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{name} {rule}; row {row} has {values[row]}")


def update_seen(seen_BxV: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """Marks each row's emitted token in the presence-penalty mask.

    The loop starts from `jnp.zeros((B, V), bool)` (the penalty covers generated tokens
    only, not the prompt, as in vLLM) and calls this with the tokens it actually emits
    each step, i.e. after `budget_apply`.
    """
    rows_B = jnp.arange(seen_BxV.shape[0])
    return seen_BxV.at[rows_B, tokens_B].set(True)


def sample(
    logits_BxV: jax.Array,
    params: SamplingParams,
    keys_B: jax.Array,
    seen_BxV: jax.Array | None = None,
    *,
    max_candidates: int = 64,
) -> jax.Array:
    """Draws one token per row; returns int32 [B].

    keys_B: one PRNG key per row ([B] typed keys, or raw uint32 [B, 2]). A row's token
    depends only on its own logits, params, seen mask and key, so derive the key from
    the request's own seed and step (e.g. `fold_in(request_key, step)`) for results that
    do not depend on batch composition.

    Cost: rows with 0 < top_k <= max_candidates (static) are filtered and drawn exactly
    within the `lax.top_k` candidates; a full sort over V and a draw over all V tokens
    run only when some row needs them (top_k == 0 or top_k > max_candidates), under
    `lax.cond`. Do not `vmap` this function: that turns the cond into a select and the
    sort would always run. (A candidate-path row whose cutoff value ties past position
    max_candidates draws only among the candidates, which hold the lower tied ids.)
    """
    s = _support(logits_BxV, params, seen_BxV, max_candidates)
    # Gumbel-max with noise indexed by (row key, token id): both paths give the same
    # token for a row with the same kept set, whatever the candidate count.
    noise_BxK = jax.vmap(_gumbel_at)(keys_B, s.cand_ids_BxK)
    kept_BxK = _ranked_at_or_above(s.cand_logits_BxK, s.cand_ids_BxK, s.cutoff_B, s.tie_id_B)
    cand_BxK = jnp.where(kept_BxK, s.cand_logits_BxK + noise_BxK, -jnp.inf)
    cand_tokens_B = jnp.take_along_axis(s.cand_ids_BxK, jnp.argmax(cand_BxK, axis=-1)[:, None], axis=-1)[:, 0]
    full_tokens_B = jax.lax.cond(
        jnp.any(s.needs_full_B),
        _draw_full,
        lambda *_: jnp.zeros_like(cand_tokens_B),
        s.logits_BxV,
        s.cutoff_B,
        s.tie_id_B,
        keys_B,
    )
    sampled_B = jnp.where(s.needs_full_B, full_tokens_B, cand_tokens_B)
    greedy_B = jnp.argmax(s.logits_BxV, axis=-1).astype(jnp.int32)
    return jnp.where(params.temperature > 0, sampled_B, greedy_B)


def kept_mask(
    logits_BxV: jax.Array,
    params: SamplingParams,
    seen_BxV: jax.Array | None = None,
    *,
    max_candidates: int = 64,
) -> jax.Array:
    """Bool [B, V]: the tokens `sample` can draw for each row (its argmax for greedy rows).

    For inspecting or testing the filters; the decode loop only needs `sample`.
    """
    s = _support(logits_BxV, params, seen_BxV, max_candidates)
    vocab = logits_BxV.shape[-1]
    greedy_BxV = jax.nn.one_hot(jnp.argmax(s.logits_BxV, axis=-1), vocab, dtype=jnp.bool_)
    ids_BxV = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), s.logits_BxV.shape)
    sampled_BxV = _ranked_at_or_above(s.logits_BxV, ids_BxV, s.cutoff_B, s.tie_id_B)
    return jnp.where((params.temperature > 0)[:, None], sampled_BxV, greedy_BxV)


@struct.dataclass
class _Support:
    logits_BxV: jax.Array  # penalised, tempered f32 logits (only penalised for greedy rows)
    cand_logits_BxK: jax.Array  # the K largest of logits_BxV, descending
    cand_ids_BxK: jax.Array
    # kept set = {v : logits_BxV[v] > cutoff_B, or == cutoff_B with v >= tie_id_B}
    cutoff_B: jax.Array
    tie_id_B: jax.Array
    needs_full_B: jax.Array  # sampled row whose kept set may extend past the candidates


def _support(
    logits_BxV: jax.Array, params: SamplingParams, seen_BxV: jax.Array | None, max_candidates: int
) -> _Support:
    logits_BxV = logits_BxV.astype(jnp.float32)
    if seen_BxV is not None:
        logits_BxV = logits_BxV - jnp.where(seen_BxV, params.presence_penalty[:, None], 0.0)
    greedy_B = params.temperature <= 0
    logits_BxV = logits_BxV / jnp.where(greedy_B, 1.0, params.temperature)[:, None]

    num_cands = min(max_candidates, logits_BxV.shape[-1])
    # The barrier keeps XLA:CPU from turning top_k into a full sort of [B, V] when its
    # values feed several slices (measured 265 ms -> 2 ms at B=8, V=151,936).
    cand_logits_BxK, cand_ids_BxK = jax.lax.optimization_barrier(jax.lax.top_k(logits_BxV, num_cands))
    needs_full_B = ~greedy_B & ((params.top_k <= 0) | (params.top_k > num_cands))
    # A row with no filter keeps every token: its cutoff is its smallest logit, what the sort
    # would give, without the sort (measured 250 ms of a 300 ms draw at B=8, V=151,936 on CPU).
    unfiltered_B = ((params.top_k <= 0) | (params.top_k >= logits_BxV.shape[-1])) & (params.top_p >= 1) & (
        params.min_p <= 0)
    full_cutoff_B, full_tie_id_B = jax.lax.cond(
        jnp.any(needs_full_B & ~unfiltered_B),
        _full_cutoff,
        lambda x, _: (jnp.zeros(x.shape[:1], x.dtype), jnp.zeros(x.shape[:1], jnp.int32)),
        logits_BxV,
        params,
    )
    cand_cutoff_B, cand_tie_id_B = _prefix_cutoff(cand_logits_BxK, cand_ids_BxK, params)
    full_cutoff_B = jnp.where(unfiltered_B, jnp.min(logits_BxV, axis=-1), full_cutoff_B)
    full_tie_id_B = jnp.where(unfiltered_B, 0, full_tie_id_B)
    cutoff_B = jnp.where(needs_full_B, full_cutoff_B, cand_cutoff_B)
    tie_id_B = jnp.where(needs_full_B, full_tie_id_B, cand_tie_id_B)
    return _Support(logits_BxV, cand_logits_BxK, cand_ids_BxK, cutoff_B, tie_id_B, needs_full_B)


def _ranked_at_or_above(logits: jax.Array, ids: jax.Array, cutoff_B: jax.Array, tie_id_B: jax.Array) -> jax.Array:
    """Tokens ranked at or above (cutoff, tie id): a larger logit, or the same with an id >= it."""
    cutoff, tie_id = cutoff_B[:, None], tie_id_B[:, None]
    return (logits > cutoff) | ((logits == cutoff) & (ids >= tie_id))


def _full_cutoff(logits_BxV: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    ids_BxV = jnp.broadcast_to(jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32), logits_BxV.shape)
    # Stable sort on the negated logits: descending, ties in ascending id order, as lax.top_k gives.
    neg_sorted_BxV, sorted_ids_BxV = jax.lax.sort((-logits_BxV, ids_BxV), num_keys=1, is_stable=True)
    return _prefix_cutoff(-neg_sorted_BxV, sorted_ids_BxV, params)


def _prefix_cutoff(
    sorted_BxN: jax.Array, ids_BxN: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """(cutoff logit, tie id) of the lowest-ranked kept token after top-k, top-p, min-p,
    given each row's N largest logits in descending order with ties in ascending id
    order (as lax.top_k gives them); exact when the row's kept set lies within those N."""
    n = sorted_BxN.shape[-1]
    k_B = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, n), n)
    cut_k_B = jnp.take_along_axis(sorted_BxN, (k_B - 1)[:, None], axis=-1)[:, 0]

    # top-p on the top-k-renormalised distribution: keep a token while the mass of the
    # tokens ranked above it is < top_p (HF: drop where ascending cumsum <= 1 - top_p).
    probs_BxN = jax.nn.softmax(jnp.where(sorted_BxN >= cut_k_B[:, None], sorted_BxN, -jnp.inf), axis=-1)
    # Shifted cumsum, not "cumsum - probs", which rounding can make non-monotone.
    mass_above_BxN = jnp.pad(jnp.cumsum(probs_BxN, axis=-1)[:, :-1], ((0, 0), (1, 0)))
    num_p_B = jnp.maximum(jnp.sum(mass_above_BxN < params.top_p[:, None], axis=-1), 1)
    cut_p_B = jnp.take_along_axis(sorted_BxN, (num_p_B - 1)[:, None], axis=-1)[:, 0]
    # top-p keeps num_p tokens even when that cuts a run of ties: of the tokens tied at
    # cut_p (ascending ids at positions [num_above, num_at_or_above)), the ones with the
    # largest ids, from position num_at_or_above - (num_p - num_above) on.
    num_above_B = jnp.sum(sorted_BxN > cut_p_B[:, None], axis=-1)
    num_at_or_above_B = jnp.sum(sorted_BxN >= cut_p_B[:, None], axis=-1)
    first_tied_kept_B = num_at_or_above_B - (num_p_B - num_above_B)
    tie_id_p_B = jnp.take_along_axis(ids_BxN, first_tied_kept_B[:, None], axis=-1)[:, 0]
    cut_p_B = jnp.where(params.top_p < 1, cut_p_B, -jnp.inf)

    # min-p: p < min_p * p_max  <=>  logit < max_logit + log(min_p); renormalising by
    # the earlier filters does not change the ratio. log(0) = -inf turns it off.
    cut_m_B = sorted_BxN[:, 0] + jnp.log(params.min_p)
    cutoff_B = jnp.maximum(jnp.maximum(cut_k_B, cut_p_B), cut_m_B)
    # top-k and min-p keep every token tied at their cutoff (id 0 and up); top-p may not.
    tie_id_B = jnp.where((params.top_p < 1) & (cut_p_B == cutoff_B), tie_id_p_B, 0)
    return cutoff_B, tie_id_B


def _gumbel_at(key: jax.Array, ids_N: jax.Array) -> jax.Array:
    """Gumbel noise for one row at the given token ids, a function of (key, id) only."""
    return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(ids_N)


def _draw_full(logits_BxV: jax.Array, cutoff_B: jax.Array, tie_id_B: jax.Array, keys_B: jax.Array) -> jax.Array:
    ids_V = jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32)
    noise_BxV = jax.vmap(_gumbel_at, in_axes=(0, None))(keys_B, ids_V)
    kept_BxV = _ranked_at_or_above(logits_BxV, ids_V[None, :], cutoff_B, tie_id_B)
    scores_BxV = jnp.where(kept_BxV, logits_BxV + noise_BxV, -jnp.inf)
    return jnp.argmax(scores_BxV, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------- thinking budget
#
# The budget belongs to the reply. Thinking tokens are the tokens a row samples while a <think>
# block is open (the </think> that closes a block included, forced tokens excluded), counted over
# every block of the reply. Once the count reaches the budget inside an open block, the row emits
# the forced stop-thinking ids, one per step, and forcing ends the block. A block opened after a
# natural close with budget left counts on from where the reply stood. Once the budget is spent and
# no block is open, the row may not think again: `budget_mask` removes <think> and </think> from its
# logits, so the rest of the reply is answer. Whether the reply starts inside a block is read from
# the turn being generated only (`prompt_think_open`).


class ThinkTags(NamedTuple):
    """Ids of the tags the thinking budget reads, in one vocabulary (default: Qwen3's).

    A tag the vocabulary lacks can be given as -1, which no token matches.
    """

    think: int = THINK_ID
    end_think: int = END_THINK_ID
    turn_start: int = IM_START_ID


@struct.dataclass
class BudgetState:
    """Per-row thinking-budget state, each an array of shape [B].

    budget: i32 thinking tokens allowed in the reply; negative = unlimited.
    in_think: bool, a <think> block is open.
    count: i32 thinking tokens the reply has generated, over all its blocks (forced ones excluded).
    forcing_pos: i32 index into the forced ids of this step's forced token; -1 = not forcing.
    done: bool, the budget is spent: an open block is closed by forcing, and no block opens again.
    think_id, end_think_id: i32 ids of <think> and </think> in the row's vocabulary.
    """

    budget: jax.Array
    in_think: jax.Array
    count: jax.Array
    forcing_pos: jax.Array
    done: jax.Array
    think_id: jax.Array
    end_think_id: jax.Array


def prompt_think_open(
    prompt_ids: Sequence[int] | np.ndarray, *, think_id: int = THINK_ID, end_think_id: int = END_THINK_ID,
    turn_start_id: int = IM_START_ID,
) -> bool:
    """Whether the reply starts inside a <think> block: the turn being generated (the ids after
    the prompt's last `turn_start_id`, <|im_start|>; the whole prompt without one) has a <think>
    after its last </think>. A <think> in an earlier turn, such as a user message asking about
    the tag, does not count. A generation prompt ending in the empty block (thinking off) gives
    False, as does a plain `<|im_start|>assistant\n`, after which the model may open the block itself.
    """
    ids = np.asarray(prompt_ids).reshape(-1)
    turns = np.flatnonzero(ids == turn_start_id)
    turn = ids[turns[-1] + 1:] if turns.size else ids
    starts = np.flatnonzero(turn == think_id)
    ends = np.flatnonzero(turn == end_think_id)
    return bool(starts.size) and (not ends.size or starts[-1] > ends[-1])


def budget_init(
    prompt_in_think_B: jax.Array | Sequence[bool], budget_B: jax.Array | Sequence[int], *,
    think_id: int = THINK_ID, end_think_id: int = END_THINK_ID,
) -> BudgetState:
    """State before the first generated token: `prompt_in_think_B` from `prompt_think_open`,
    `budget_B` per row (`UNLIMITED_BUDGET` for none), the vocabulary's think-tag ids."""
    in_think_B = jnp.asarray(prompt_in_think_B, jnp.bool_)
    budget_B = jnp.broadcast_to(jnp.asarray(budget_B, jnp.int32), in_think_B.shape)
    count_B = jnp.zeros_like(budget_B)
    return BudgetState(
        budget=budget_B,
        in_think=in_think_B,
        count=count_B,
        forcing_pos=jnp.full_like(budget_B, -1),
        done=_spent(budget_B, count_B),
        think_id=jnp.full_like(budget_B, think_id),
        end_think_id=jnp.full_like(budget_B, end_think_id),
    )


def _spent(budget_B: jax.Array, count_B: jax.Array) -> jax.Array:
    return (budget_B >= 0) & (count_B >= budget_B)


def budget_forces(state: BudgetState) -> jax.Array:
    """Bool [B]: the rows whose next token `budget_apply` forces rather than takes from sampling."""
    return (state.done & state.in_think) | (state.forcing_pos >= 0)


def budget_mask(state: BudgetState, logits_BxV: jax.Array) -> jax.Array:
    """`logits_BxV` with <think> and </think> set to -inf in the rows whose budget is spent while no
    block is open, for `sample` to draw from: such a row answers for the rest of the reply. A
    </think> is masked too because parsers split the reply at its last </think>, so a stray one would
    turn the answer before it into thinking. A tag id of -1 masks nothing.
    """
    ids_V = jnp.arange(logits_BxV.shape[-1], dtype=jnp.int32)
    tags_BxV = (ids_V == state.think_id[:, None]) | (ids_V == state.end_think_id[:, None])
    closed_B = state.done & ~state.in_think
    return jnp.where(closed_B[:, None] & tags_BxV, -jnp.inf, logits_BxV)


def budget_apply(
    state: BudgetState, sampled_B: jax.Array, forced_ids_F: jax.Array
) -> tuple[jax.Array, BudgetState]:
    """Returns the tokens to emit this step and the state after emitting them.

    A row whose budget is spent while a block is open emits `forced_ids_F` (static length >= 1),
    one per step, instead of its samples; the block is closed when the forced ids end (by their
    </think>, or by their end if they hold none) and sampling resumes, from logits passed through
    `budget_mask`. Budget 0 forces from the first token generated with a block open. See the
    section comment for the counting rules.
    """
    num_forced = forced_ids_F.shape[0]
    start_B = state.done & state.in_think & (state.forcing_pos < 0)
    pos_B = jnp.where(start_B, 0, state.forcing_pos)
    forcing_B = budget_forces(state)
    last_forced_B = forcing_B & (pos_B + 1 >= num_forced)
    tokens_B = jnp.where(forcing_B, forced_ids_F[jnp.maximum(pos_B, 0)], sampled_B).astype(jnp.int32)
    opened_B = jnp.where(tokens_B == state.think_id, True, state.in_think)
    in_think_B = jnp.where((tokens_B == state.end_think_id) | last_forced_B, False, opened_B)
    count_B = state.count + (state.in_think & ~forcing_B).astype(jnp.int32)
    new_state = state.replace(
        in_think=in_think_B,
        count=count_B,
        forcing_pos=jnp.where(forcing_B & ~last_forced_B, pos_B + 1, -1),
        done=_spent(state.budget, count_B),
    )
    return tokens_B, new_state
