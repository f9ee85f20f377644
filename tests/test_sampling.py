"""Tests for infer/sampling.py: filters against an HF-semantics numpy reference, the
draw, the no-sort fast path, validation, and the thinking-budget state machine."""

from functools import partial

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from infer import sampling
from infer.sampling import (
    NON_THINKING_SAMPLING,
    THINKING_SAMPLING,
    UNLIMITED_BUDGET,
    SamplingParams,
    budget_apply,
    budget_init,
    kept_mask,
    prompt_think_open,
    sample,
    update_seen,
)
from qwen3_jax.ids import END_THINK_ID as THINK_END_ID
from qwen3_jax.ids import IM_END_ID, IM_START_ID
from qwen3_jax.ids import THINK_ID as THINK_START_ID

# STOP_THINKING_TEXT encoded with the Qwen3 tokenizer (qwen.tiktoken ranks plus
# the Qwen3 added tokens); </think> is at index 22.
QWEN3_STOP_THINKING_IDS = np.array(
    [271, 82796, 279, 7199, 882, 553, 279, 1196, 11, 358, 614, 311, 2968, 279, 6291, 3118,
     389, 279, 7274, 5961, 1431, 624, THINK_END_ID, 271],
    np.int32,
)


def _keys(seed: int, batch: int) -> jax.Array:
    return jax.random.split(jax.random.key(seed), batch)


def _params(rows: list[tuple[float, int, float, float, float]]) -> SamplingParams:
    t, k, p, m, pp = zip(*rows)
    return SamplingParams.make(len(rows), temperature=t, top_k=k, top_p=p, min_p=m, presence_penalty=pp)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_kept(z: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Kept set of tempered logits z, written the way HF's warpers do it (float64)."""
    keep = np.ones(z.size, bool)
    if top_k > 0:
        keep &= z >= np.sort(z)[::-1][min(top_k, z.size) - 1]
    if top_p < 1:
        order = np.argsort(np.where(keep, z, -np.inf), kind="stable")  # ascending; tied ids ascending
        remove = np.cumsum(_softmax(np.where(keep, z, -np.inf)[order])) <= 1 - top_p
        remove[-1] = False
        keep[order[remove]] = False
    if min_p > 0:
        probs = _softmax(np.where(keep, z, -np.inf))
        keep &= probs >= min_p * probs.max()
    return keep


def ref_draw(z_V: np.ndarray, keep_V: np.ndarray, key: jax.Array) -> int:
    """Gumbel-max over the kept set with noise indexed by token id, as documented."""
    noise = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(jnp.arange(z_V.size))
    return int(np.argmax(np.where(keep_V, z_V.astype(np.float32) + np.asarray(noise), -np.inf)))


# (temperature, top_k, top_p, min_p, presence_penalty); max_candidates = 16, V = 300.
MIXED_ROWS = [
    (0.7, 1, 1.0, 0.0, 0.0),
    (0.7, 10, 1.0, 0.0, 0.5),
    (1.0, 16, 0.9, 0.0, 0.0),  # top_k == max_candidates: still the candidate path
    (0.6, 12, 0.5, 0.05, 1.0),
    (1.3, 8, 1.0, 0.3, 0.0),
    (0.6, 0, 0.95, 0.0, 0.0),  # full path from here down
    (1.0, 0, 1.0, 0.0, 0.5),
    (0.8, 0, 1.0, 0.1, 0.0),
    (1.0, 40, 0.9, 0.0, 0.0),
    (1.5, 300, 0.99, 0.0, 0.0),
    (0.0, 5, 0.5, 0.0, 1.0),  # greedy
]
NUM_CANDS = 16
# One compiled sampler shared by the tests, so that same-shaped calls compile once.
draw = jax.jit(partial(sample, max_candidates=NUM_CANDS))


def _mixed_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((len(MIXED_ROWS), 300)) * 2.0).astype(np.float32)
    seen = rng.random(logits.shape) < 0.1
    penalty = np.array([r[4] for r in MIXED_ROWS], np.float32)
    return logits, seen, _params(MIXED_ROWS), logits - penalty[:, None] * seen


def test_reference_matches_hf_warpers():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = np.random.default_rng(1).standard_normal((1, 200)) * 2.0
    for t, k, p, m, _ in MIXED_ROWS:
        if t == 0:
            continue
        scores = torch.tensor(logits)
        warpers = [TemperatureLogitsWarper(t)]
        warpers += [TopKLogitsWarper(k)] if k else []
        warpers += [TopPLogitsWarper(p)] if p < 1 else []
        warpers += [MinPLogitsWarper(m)] if m else []
        for w in warpers:
            scores = w(None, scores)
        np.testing.assert_array_equal(ref_kept(logits[0] / t, k, p, m), torch.isfinite(scores)[0].numpy())


def test_kept_set_matches_reference_on_both_paths():
    logits, seen, params, penalised = _mixed_batch()
    got = np.asarray(jax.jit(partial(kept_mask, max_candidates=NUM_CANDS))(logits, params, seen))
    for b, (t, k, p, m, _) in enumerate(MIXED_ROWS):
        if t == 0:
            want = np.arange(300) == np.argmax(penalised[b])
        else:
            want = ref_kept(penalised[b].astype(np.float64) / t, k, p, m)
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}: {MIXED_ROWS[b]}")
    # The full-path rows really need more than the candidates.
    assert got[5].sum() > NUM_CANDS and got[6].sum() == 300


def test_sample_draws_from_reference_kept_set():
    logits, seen, params, penalised = _mixed_batch()
    temps = [r[0] for r in MIXED_ROWS]
    for seed in range(4):
        keys = _keys(seed, len(MIXED_ROWS))
        got = np.asarray(draw(logits, params, keys, seen))
        assert got.dtype == np.int32
        for b, (t, k, p, m, _) in enumerate(MIXED_ROWS):
            if t == 0:
                assert got[b] == np.argmax(penalised[b])
            else:
                z = penalised[b] / np.float32(temps[b])
                assert got[b] == ref_draw(z, ref_kept(z.astype(np.float64), k, p, m), keys[b]), (seed, b)


def _hf_top_k_top_p(logits_BxV: np.ndarray, top_k: int, top_p: float, stable: bool) -> np.ndarray:
    """Kept mask of transformers' TopK then TopP warpers; `stable` runs them under a stable
    torch.sort, whose order among tied logits (ascending ids) the sampler documents."""
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    sort = torch.sort
    if stable:
        torch.sort = partial(sort, stable=True)
    try:
        scores = torch.tensor(logits_BxV, dtype=torch.float32)
        scores = TopKLogitsWarper(top_k)(None, scores) if top_k else scores
        return torch.isfinite(TopPLogitsWarper(top_p)(None, scores)).numpy()
    finally:
        torch.sort = sort


# top_k 0 takes the full-sort path, 12 the candidate path (room left below NUM_CANDS for the
# tokens tied at the top-k cutoff, which top-k keeps).
@pytest.mark.parametrize("top_k", [0, 12])
def test_top_p_cuts_tied_logits_as_transformers_does(top_k):
    """Issue 16: [2, 1, 1, 1, 0] with top_p 0.6 keeps 2 tokens in transformers, and so here (row 0,
    padded with logits too small to matter); also for bf16 logits (rounded, so ties at the top-p
    boundary are common)."""
    rng = np.random.default_rng(2)
    top_ps = [0.6] + [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99] * 3
    logits_BxV = rng.standard_normal((len(top_ps), 300)) * 0.5
    logits_BxV[0] = [2.0, 1.0, 1.0, 1.0, 0.0] + [-30.0] * 295
    logits_BxV = jnp.asarray(logits_BxV, jnp.bfloat16)
    params = SamplingParams.make(len(top_ps), top_k=top_k, top_p=top_ps)
    got = np.asarray(jax.jit(partial(kept_mask, max_candidates=NUM_CANDS))(logits_BxV, params))
    assert np.flatnonzero(got[0]).tolist() == [0, 3]
    z_BxV = np.asarray(logits_BxV.astype(jnp.float32))
    cut_ties = 0
    for b, top_p in enumerate(top_ps):
        want = _hf_top_k_top_p(z_BxV[b : b + 1], top_k, top_p, stable=True)[0]
        np.testing.assert_array_equal(got[b], want, err_msg=f"row {b}, top_p {top_p}")
        # The count does not depend on torch's order among ties.
        assert got[b].sum() == _hf_top_k_top_p(z_BxV[b : b + 1], top_k, top_p, stable=False).sum()
        tied_B = z_BxV[b] == z_BxV[b][got[b]].min()
        cut_ties += tied_B.sum() > tied_B[got[b]].sum()
    assert cut_ties >= 4  # rows where top-p cut through a run of ties, the included
    # The draw stays inside the kept set.
    for seed in range(3):
        tokens = np.asarray(draw(logits_BxV, params, _keys(seed, len(top_ps))))
        assert got[np.arange(len(top_ps)), tokens].all()


def test_candidate_and_full_paths_draw_the_same_token():
    logits, seen, _, _ = _mixed_batch(seed=2)
    params = SamplingParams.make(len(logits), temperature=0.9, top_k=12, top_p=0.8)
    keys = _keys(3, len(logits))
    via_candidates = draw(logits, params, keys, seen)
    via_full_sort = jax.jit(partial(sample, max_candidates=8))(logits, params, keys, seen)  # top_k > 8
    np.testing.assert_array_equal(via_candidates, via_full_sort)


def test_greedy_is_argmax_and_top_k_1_matches_it():
    logits, seen, _, _ = _mixed_batch(seed=3)
    batch, keys = len(logits), _keys(0, len(logits))
    greedy = draw(logits, SamplingParams.make(batch, temperature=0.0, top_p=0.5, top_k=7), keys, seen)
    np.testing.assert_array_equal(greedy, np.argmax(logits, axis=-1))
    top1 = draw(logits, SamplingParams.make(batch, temperature=1.5, top_k=1), keys, seen)
    np.testing.assert_array_equal(top1, greedy)


def test_same_key_same_sample_different_key_different_sample():
    logits, seen, _, _ = _mixed_batch()
    batch = len(logits)
    params = SamplingParams.make(batch, temperature=1.0, top_k=[0, 16] * (batch // 2) + [0])
    flat = np.zeros_like(logits)
    first = np.asarray(draw(flat, params, _keys(0, batch), seen))
    np.testing.assert_array_equal(first, draw(flat, params, _keys(0, batch), seen))
    assert (first != np.asarray(draw(flat, params, _keys(1, batch), seen))).sum() >= batch - 2


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (3, 1.0), (0, 0.8)])
def test_empirical_distribution(top_k, top_p):
    n, temperature = 20_000, 0.7
    logits_V = np.array([1.0, 0.5, 0.0, -0.5, -2.0], np.float32)
    z = logits_V.astype(np.float64) / temperature
    keep = ref_kept(z, top_k, top_p, 0.0)
    want = _softmax(np.where(keep, z, -np.inf))
    params = SamplingParams.make(n, temperature=temperature, top_k=top_k, top_p=top_p)
    tokens = draw(np.broadcast_to(logits_V, (n, 5)), params, _keys(7, n))
    freq = np.bincount(np.asarray(tokens), minlength=5) / n
    np.testing.assert_allclose(freq, want, atol=5 * np.sqrt(want * (1 - want) / n).max() + 1e-9)


def test_presence_penalty_changes_argmax():
    logits = np.zeros((3, 8), np.float32)
    logits[:, 3], logits[:, 1] = 2.0, 1.5
    seen = update_seen(jnp.zeros((3, 8), bool), jnp.array([3, 3, 0]))
    assert np.asarray(seen).sum() == 3 and seen[0, 3] and seen[2, 0]
    params = SamplingParams.make(3, temperature=[0.0, 0.0, 0.5], top_k=[0, 0, 1], presence_penalty=[1.0, 0.0, 1.0])
    np.testing.assert_array_equal(draw(logits, params, _keys(0, 3), seen), [1, 3, 3])


def test_penalty_and_seen_in_a_jitted_loop():
    """A huge penalty makes greedy decoding walk down the logits without repeating."""
    logits = jnp.arange(8, dtype=jnp.float32)[::-1][None]
    params = SamplingParams.make(1, temperature=0.0, presence_penalty=100.0)

    @jax.jit
    def decode(seen):
        def step(seen, _):
            token = sample(logits, params, _keys(0, 1), seen)
            return update_seen(seen, token), token[0]

        return jax.lax.scan(step, seen, length=6)[1]

    np.testing.assert_array_equal(decode(jnp.zeros((1, 8), bool)), np.arange(6))


def test_rows_do_not_depend_on_the_rest_of_the_batch():
    logits, seen, params, _ = _mixed_batch(seed=4)
    keys = _keys(5, len(MIXED_ROWS))
    batch = np.asarray(draw(logits, params, keys, seen))
    for b in range(len(MIXED_ROWS)):
        row_params = jax.tree.map(lambda x: x[b : b + 1], params)
        alone = draw(logits[b : b + 1], row_params, keys[b : b + 1], seen[b : b + 1])
        assert alone[0] == batch[b], b


def _sort_counts(jaxpr, inside_cond=False, counts=None):
    """(sorts outside any cond, sorts inside a cond branch) in a jaxpr, recursively."""
    counts = counts if counts is not None else [0, 0]
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sort":
            counts[inside_cond] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _sort_counts(sub, inside_cond or eqn.primitive.name == "cond", counts)
    return counts


def test_candidate_rows_never_sort_the_vocab(monkeypatch):
    logits, seen, mixed_params, _ = _mixed_batch()
    cand_rows = MIXED_ROWS[:5] * 2 + MIXED_ROWS[-1:]  # 0 < top_k <= NUM_CANDS, or greedy
    cand_args = (logits, _params(cand_rows), _keys(0, len(logits)), seen)

    # Statically: the only sort over V sits in a cond branch.
    jaxpr = jax.make_jaxpr(partial(sample, max_candidates=NUM_CANDS))(*cand_args).jaxpr
    outside, inside = _sort_counts(jaxpr)
    assert outside == 0 and inside >= 1
    if jax.default_backend() == "cpu":  # and XLA:CPU keeps top_k a TopK, not a full sort of [B, V]
        hlo = jax.jit(partial(sample, max_candidates=NUM_CANDS)).lower(*cand_args).compile().as_text()
        assert 'custom_call_target="TopK"' in hlo
        assert not [line for line in hlo.splitlines() if " sort(" in line and "top_k" in line]

    # At run time: that branch runs only for batches with a row that needs it.
    calls = []
    full_cutoff = sampling._full_cutoff

    def counted_full_cutoff(logits_BxV, params):
        jax.debug.callback(lambda: calls.append(1))
        return full_cutoff(logits_BxV, params)

    monkeypatch.setattr(sampling, "_full_cutoff", counted_full_cutoff)
    counted_draw = jax.jit(partial(sample, max_candidates=NUM_CANDS))
    counted_draw(*cand_args).block_until_ready()
    jax.effects_barrier()
    assert calls == []
    counted_draw(logits, mixed_params, _keys(0, len(logits)), seen).block_until_ready()
    jax.effects_barrier()
    assert calls == [1]


def test_make_broadcasts_and_defaults():
    params = SamplingParams.make(3, **THINKING_SAMPLING)
    assert params.temperature.shape == (3,) and params.top_k.dtype == jnp.int32
    np.testing.assert_allclose(params.top_p, 0.95)
    np.testing.assert_array_equal(params.top_k, 20)
    assert dict(NON_THINKING_SAMPLING) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
    np.testing.assert_allclose(SamplingParams.make(2, temperature=[0.0, 1.5]).temperature, [0.0, 1.5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, r"temperature must be >= 0.*row 0"),
        ({"temperature": [0.5, -1.0, 0.5, 0.5]}, r"temperature must be >= 0.*row 1"),
        ({"temperature": float("inf")}, r"temperature must be finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": [1.0, 1.0, 1.0, 1.5]}, r"top_p must be in \(0, 1\].*row 3"),
        ({"top_k": -1}, r"top_k must be an int >= 0"),
        ({"top_k": 2.5}, r"top_k must be an int >= 0"),
        ({"min_p": 1.0}, r"min_p must be in \[0, 1\)"),
        ({"min_p": -0.1}, r"min_p must be in \[0, 1\)"),
        ({"presence_penalty": [0.0, float("nan"), 0.0, 0.0]}, r"presence_penalty must be finite.*row 1"),
        ({"top_p": [0.9, 0.9]}, r"top_p must be a scalar or have 4 values"),
        ({"top_k": "20"}, r"top_k must be a real number"),
    ],
)
def test_make_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.make(4, **kwargs)


def test_make_rejects_bad_batch():
    with pytest.raises(ValueError, match="batch"):
        SamplingParams.make(0)


# ------------------------------------------------------------------- thinking budget


def test_prompt_think_open():
    assert prompt_think_open([1, 2, THINK_START_ID, 198])
    assert prompt_think_open([THINK_START_ID, 5, THINK_END_ID, 7, THINK_START_ID])
    assert not prompt_think_open([1, THINK_START_ID, 271, THINK_END_ID, 271])  # thinking off
    assert not prompt_think_open([1, 2, 3])
    assert not prompt_think_open([])
    # Issue 13, case 4: only the turn being generated (after the last <|im_start|>) decides.
    user_mentions_think = [IM_START_ID, 872, 198, 3838, THINK_START_ID, 4310, IM_END_ID, 198, IM_START_ID, 77091, 198]
    assert not prompt_think_open(user_mentions_think)
    assert prompt_think_open(user_mentions_think + [THINK_START_ID, 198])
    assert not prompt_think_open(user_mentions_think + [THINK_START_ID, 271, THINK_END_ID, 271])
    earlier_turn_open = [IM_START_ID, 77091, 198, THINK_START_ID, 5, IM_END_ID, IM_START_ID, 872, 198, 9]
    assert not prompt_think_open(earlier_turn_open)
    # Another vocabulary's ids (a sentencepiece model trained with the control tokens).
    assert prompt_think_open([3, 7, 1, 5], think_id=1, end_think_id=2, turn_start_id=3)
    assert not prompt_think_open([1, 3, 7], think_id=1, end_think_id=2, turn_start_id=3)


def _run_budget(rows, sampled_TxB, forced_F, **ids):
    @jax.jit
    def run(state, sampled_TxB):
        return jax.lax.scan(lambda st, s: budget_apply(st, s, jnp.asarray(forced_F))[::-1], state, sampled_TxB)

    state = budget_init([r[0] for r in rows], [r[1] for r in rows], **ids)
    final, emitted = run(state, jnp.asarray(sampled_TxB, jnp.int32))
    return final, np.asarray(emitted)


def test_budget_is_the_replys_over_every_think_block_under_jit_scan():
    """Issue 13, case 5: thinking tokens count over all blocks of the reply; a block opened once the
    budget is spent is closed at once; after a natural close a new block counts on. Sibling:
    vllm-project/vllm#53572 (answer tokens after a natural close counted and the stop text forced
    into the answer)."""
    steps, forced = 40, QWEN3_STOP_THINKING_IDS
    F = forced.size
    # (prompt leaves <think> open, budget, {step: sampled think tag}, steps where forcing starts)
    rows = [
        (True, 0, {}, [0]),  # budget 0: forced from the first token
        (True, 3, {}, [3]),
        (True, UNLIMITED_BUDGET, {5: THINK_END_ID, 9: THINK_START_ID}, []),
        (False, 0, {}, []),  # thinking off: no block, nothing forced
        (False, 2, {2: THINK_START_ID}, [5]),  # opens <think> at 2, then counts steps 3 and 4
        (True, 6, {2: THINK_END_ID, 4: THINK_START_ID}, [8]),  # 3 counted (0-2), then 5, 6, 7
        (True, 1, {26: THINK_START_ID}, [1, 27]),  # reopened after the budget ran out: closed at once
        (True, 10, {2: THINK_END_ID}, []),  # answer tokens after a natural close do not count
        (True, 2, {1: THINK_END_ID, 3: THINK_START_ID}, [4]),  # closed exactly at the budget, reopened
    ]
    sampled = 1000 + 100 * np.arange(len(rows))[None, :] + np.arange(steps)[:, None]
    want = sampled.copy()
    for b, (_, _, tags, starts) in enumerate(rows):
        for step, tag in tags.items():
            sampled[step, b] = want[step, b] = tag
        for s in starts:
            want[s: s + F, b] = forced[: steps - s]
    final, emitted = _run_budget(rows, sampled, forced)
    np.testing.assert_array_equal(emitted, want)
    np.testing.assert_array_equal(final.in_think, [False, False, True, False, False, False, True, False, False])
    np.testing.assert_array_equal(np.asarray(final.count)[[1, 4, 5, 7, 8]], [3, 2, 6, 3, 2])
    np.testing.assert_array_equal(final.forcing_pos, [-1, -1, -1, -1, -1, -1, 13, -1, -1])
    # done: the budget is spent, so any block the row opens is closed at once.
    np.testing.assert_array_equal(final.done, [True, True, False, True, True, True, True, False, True])


def test_forced_ids_without_end_think_still_close_the_block():
    """Forcing ends the block even when the forced ids hold no </think> (a custom stop text): the
    row is not forced over and over."""
    forced = np.array([7, 8, 9])
    sampled = 1000 + np.arange(12)[:, None]
    final, emitted = _run_budget([(True, 1)], sampled, forced)
    assert emitted[:, 0].tolist() == [1000, 7, 8, 9] + list(range(1004, 1012))
    assert not bool(final.in_think[0]) and bool(final.done[0])


def test_budget_with_another_vocabularys_think_ids():
    sampled = np.array([[5], [2], [6], [1], [6], [6]])  # think id 1, end-think id 2 in this vocabulary
    final, emitted = _run_budget([(True, 2)], sampled, np.array([40, 2]), think_id=1, end_think_id=2)
    # 5 and the sampled 2 (which closes the block) spend the budget; the reopened block is closed at once.
    assert emitted[:, 0].tolist() == [5, 2, 6, 1, 40, 2]
    assert not bool(final.in_think[0])
