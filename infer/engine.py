"""Compiled prefill + KV-cache decode with per-row sampling and thinking budgets.

One prefill call fills the cache for a batch of right-padded prompts (lengths padded to power-of-
two buckets, so mixed workloads compile a bounded number of times). The decode loop is a
`lax.while_loop` inside one jit: it samples, applies the thinking budget, writes each row's token
at that row's own cache slot, and stops when every row has finished or after `steps` iterations
(a traced value), so streaming runs the same executable chunk by chunk. Sampling parameters,
budgets and seeds are per-row arrays: changing them never recompiles.

Shapes: B batch, P padded prompt length, S cache slots, V vocab, N max new tokens, F forced ids.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer import checks
from infer.sampling import (
    UNLIMITED_BUDGET, BudgetState, SamplingParams, ThinkTags, budget_apply, budget_forces, budget_init,
    budget_mask, prompt_think_open, sample, update_seen,
)
from qwen3_jax.errors import RequestError
from qwen3_jax.layers import CACHE_AXES, KVCache
from qwen3_jax.model import Qwen3, unstack_layers
from qwen3_jax.sharding import ShardingRules, auto_mesh, to_host
from qwen3_jax.ids import END_THINK_ID, ENDOFTEXT_ID, IM_END_ID
from qwen3_jax.tokenizer import Tokenizer

DEFAULT_STOP_IDS = (IM_END_ID, ENDOFTEXT_ID)
# STOP_THINKING_TEXT in the Qwen3 vocabulary (tests check it against the tokenizer).
QWEN3_STOP_THINKING_IDS = (271, 82796, 279, 7199, 882, 553, 279, 1196, 11, 358, 614, 311, 2968, 279, 6291, 3118, 389,
                           279, 7274, 5961, 1431, 624, END_THINK_ID, 271)
MIN_BUCKET = 16
CACHE_ROUND = 128


class DecodeState(NamedTuple):
    cache: tuple  # Qwen3.init_cache structure
    logits_BxV: jax.Array  # float32 logits for the next token of each row
    slot_B: jax.Array  # cache slot where the next token is written
    num_generated_B: jax.Array
    out_BxN: jax.Array  # generated ids (valid up to num_generated_B)
    forced_BxN: jax.Array  # bool: the thinking budget forced that id (it was not sampled)
    logprob_BxN: jax.Array  # float32 log_softmax(logits / temperature) at each emitted id (`token_logprobs`)
    done_B: jax.Array
    seen_BxV: jax.Array  # presence-penalty mask over generated tokens
    budget: BudgetState


class Generation(NamedTuple):
    """`Engine.generate(..., return_logprobs=True)`: per prompt, its new ids, whether the thinking
    budget forced each id, and each id's float32 log-probability (`token_logprobs`)."""

    tokens: list[list[int]]
    forced: list[list[bool]]
    logprobs: list[list[float]]


class RowSettings(NamedTuple):
    """Per-row, per-call values: traced arrays, so new values never recompile."""

    sampling: SamplingParams
    keys_B: jax.Array
    max_new_B: jax.Array
    stop_ids: jax.Array  # [num_stop]
    forced_ids_F: jax.Array


def bucket(n: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return b


def _row_keys(seed, n: int, batch: int) -> jax.Array:
    """[batch] PRNG keys: split from one int seed, or each row's own (padding rows get seed 0)."""
    if np.ndim(seed) == 0:
        return jax.random.split(jax.random.key(checks.seed(seed)), batch)
    seeds = list(seed)
    if len(seeds) != n:
        raise RequestError(f"seed has {len(seeds)} values for {n} prompts")
    for i, s in enumerate(seeds):
        if not checks.is_int(s) or not 0 <= s < 2**32:
            raise RequestError(f"seed must be an int or one int in [0, 2**32) per prompt; prompt {i} has {s!r}")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds + [0] * (batch - n), jnp.uint32))


def _cache_shardings(abstract_cache, mesh: jax.sharding.Mesh, rules: ShardingRules):
    def one(c: KVCache) -> KVCache:  # stacked on a leading layers axis, or one layer's
        def spec(x, axes):
            logical = ("layers",) * (x.ndim - len(axes)) + axes
            return jax.sharding.NamedSharding(mesh, rules.spec(logical, mesh.axis_names))

        return KVCache(*map(spec, c, CACHE_AXES))

    return jax.tree.map(one, abstract_cache, is_leaf=lambda x: isinstance(x, KVCache))


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(4,))
def _prefill(graphdef, params, tokens_BxP, lengths_B, cache, chunk: int):
    """(cache, [B, V] float32 logits at each row's last prompt token). A prompt longer than
    `chunk` (P a multiple of it) is prefilled `chunk` positions at a time, each chunk attending
    to the cache the ones before it wrote: activations, and the MoE dispatch's gathered token
    pairs, then scale with the chunk rather than the prompt (vLLM's and SGLang's chunked prefill)."""
    model = nnx.merge(graphdef, params)
    B, P = tokens_BxP.shape

    def step(cache, start):
        tokens_BxC = jax.lax.dynamic_slice_in_dim(tokens_BxP, start, min(chunk, P), axis=1)
        out = model.forward(tokens_BxC, cache=cache, cache_start_B=jnp.full((B,), start, jnp.int32))
        at_B = jnp.clip(lengths_B - 1 - start, 0, tokens_BxC.shape[1] - 1)
        return out.cache, jnp.take_along_axis(out.hidden_BxTxD, at_B[:, None, None], axis=1)

    if P <= chunk:
        cache, last_BxD = step(cache, 0)
    else:
        def body(carry, start):
            cache, last_Bx1xD = carry
            cache, h_Bx1xD = step(cache, start)
            ends_here_B = (lengths_B - 1 >= start) & (lengths_B - 1 < start + chunk)
            return (cache, jnp.where(ends_here_B[:, None, None], h_Bx1xD, last_Bx1xD)), None

        D = model.cfg.hidden_size
        last = jnp.zeros((B, 1, D), jnp.dtype(model.cfg.dtype))
        (cache, last_BxD), _ = jax.lax.scan(body, (cache, last), jnp.arange(0, P, chunk, dtype=jnp.int32))
    return cache, model.logits(last_BxD)[:, 0].astype(jnp.float32)


def token_logprobs(logits_BxV: jax.Array, temperature_B: jax.Array, tokens_B: jax.Array) -> jax.Array:
    """[B] float32 log_softmax(logits / T) at `tokens_B`, T the row's temperature (0, greedy, reads
    as 1): the model's own distribution at the sampling temperature, before the thinking budget's mask,
    the presence penalty and top-k / top-p / min-p, so a trainer recomputes it from the logits alone
    (it equals the sampler's probability exactly when those are off and the budget masks nothing)."""
    t_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
    scaled_BxV = logits_BxV.astype(jnp.float32) / t_B[:, None]
    at_B = jnp.take_along_axis(scaled_BxV, tokens_B[:, None], axis=-1)[:, 0]
    return at_B - jax.nn.logsumexp(scaled_BxV, axis=-1)


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def _decode(graphdef, params, state: DecodeState, rows: RowSettings, steps, max_candidates: int):
    model = nnx.merge(graphdef, params)
    B, N = state.out_BxN.shape
    row_ids = jnp.arange(B)

    def body(carry):
        s, i = carry
        keys = jax.vmap(jax.random.fold_in)(rows.keys_B, s.num_generated_B)
        logits_BxV = budget_mask(s.budget, s.logits_BxV)
        sampled = sample(logits_BxV, rows.sampling, keys, s.seen_BxV, max_candidates=max_candidates)
        forced_B = budget_forces(s.budget)
        tok_B, budget = budget_apply(s.budget, sampled, rows.forced_ids_F)
        active = ~s.done_B
        tok_B = jnp.where(active, tok_B, 0)
        budget = jax.tree.map(lambda new, old: jnp.where(active, new, old), budget, s.budget)
        write_at = jnp.minimum(s.num_generated_B, N - 1)
        out = s.out_BxN.at[row_ids, write_at].set(jnp.where(active, tok_B, s.out_BxN[row_ids, write_at]))
        forced = s.forced_BxN.at[row_ids, write_at].set(jnp.where(active, forced_B, s.forced_BxN[row_ids, write_at]))
        lp_B = token_logprobs(s.logits_BxV, rows.sampling.temperature, tok_B)
        logprob = s.logprob_BxN.at[row_ids, write_at].set(jnp.where(active, lp_B, s.logprob_BxN[row_ids, write_at]))
        seen = jnp.where(active[:, None], update_seen(s.seen_BxV, tok_B), s.seen_BxV)
        num_generated = s.num_generated_B + active
        done = s.done_B | (active & (jnp.isin(tok_B, rows.stop_ids) | (num_generated >= rows.max_new_B)))
        # Finished rows keep running in the batch; their writes land on their own last slot.
        fwd = model.forward(tok_B[:, None], cache=s.cache, cache_start_B=s.slot_B)
        logits = model.logits(fwd.hidden_BxTxD)[:, 0].astype(jnp.float32)
        slot = s.slot_B + active
        return DecodeState(fwd.cache, logits, slot, num_generated, out, forced, logprob, done, seen, budget), i + 1

    def cond(carry):
        s, i = carry
        return (i < steps) & ~jnp.all(s.done_B)

    state, _ = jax.lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))
    return state


def _validate_prompts(
    prompts: Sequence[Sequence[int]], vocab_size: int, max_new_tokens: int, context: int, context_name: str,
) -> list[list[int]]:
    max_new_tokens = checks.positive_int(max_new_tokens, "max_new_tokens")
    out = []
    for i, p in enumerate(checks.non_empty_list(prompts, "prompts")):
        ids = checks.token_ids(p, f"prompt {i}", vocab_size)
        if not ids:
            raise RequestError(f"prompt {i} is empty")
        if len(ids) + max_new_tokens > context:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds {context_name}"
            )
        out.append(ids)
    return out


def _budgets(thinking_budget, batch: int) -> np.ndarray:
    if not isinstance(thinking_budget, (list, tuple, np.ndarray)):  # one value for every prompt
        budget = checks.optional_budget(thinking_budget, "thinking_budget")
        return np.full(batch, UNLIMITED_BUDGET if budget is None else budget, np.int32)
    if len(thinking_budget) != batch:
        raise RequestError(f"thinking_budget has {len(thinking_budget)} values for {batch} prompts")
    budgets = [checks.optional_budget(v, f"thinking_budget[{i}]") for i, v in enumerate(thinking_budget)]
    return np.asarray([UNLIMITED_BUDGET if b is None else b for b in budgets], np.int32)


class Engine:
    """Holds a model split into (graphdef, params) and runs batched generation on it.

    A prompt plus its max_new_tokens must fit in `max_len` positions when given (the user's choice
    wins, above or below the model's), else in the model's `cfg.context_length` (with YaRN, factor x
    original_max_position_embeddings); longer requests raise ValueError before anything runs.

    Prompts longer than `prefill_chunk` positions are prefilled that many at a time (see `_prefill`).

    Thinking budgets (see `infer.sampling`) force `forced_ids` (default: Qwen3's stop-thinking ids
    when the vocabulary holds them, else none, and a budget is refused) and read the tags
    `think_tags` names (default: Qwen3's ids). `Engine.for_tokenizer` takes both from a tokenizer.
    On CPU the constructor copies the weights into per-layer arrays (`unstack_layers`).
    """

    def __init__(self, model: Qwen3, *, mesh: jax.sharding.Mesh | None = None,
                 forced_ids: Sequence[int] | None = None, max_candidates: int = 64, max_len: int | None = None,
                 think_tags: ThinkTags | None = None, prefill_chunk: int = 4096):
        if max_len is not None and (not isinstance(max_len, (int, np.integer)) or isinstance(max_len, bool)
                                    or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        if not isinstance(prefill_chunk, (int, np.integer)) or prefill_chunk < MIN_BUCKET or prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two >= {MIN_BUCKET} (prompt buckets are), got {prefill_chunk!r}")
        mesh = auto_mesh(mesh)
        # The platform the steps compile for: the mesh's devices (a TPU topology's when compiling
        # ahead of time from a CPU host), else the default backend.
        platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        if platform == "cpu":
            model = unstack_layers(model)  # see unstack_layers: halves the bytes a CPU decode step moves
        self.graphdef, self.params = nnx.split(model)
        self.model = model
        self.cfg = model.cfg
        self.mesh = mesh  # jax.make_mesh's Explicit axes -> the Auto axes the model is written for
        self.max_candidates = max_candidates
        self.max_len = max_len
        self.prefill_chunk = int(prefill_chunk)
        self.think_tags = ThinkTags() if think_tags is None else ThinkTags(*think_tags)
        if forced_ids is None:
            fits = max(QWEN3_STOP_THINKING_IDS) < self.cfg.vocab_size
            self.forced_ids = np.asarray(QWEN3_STOP_THINKING_IDS, np.int32) if fits else None
        else:
            self.forced_ids = np.asarray(checks.token_ids(
                checks.non_empty_list(forced_ids, "forced_ids"), "forced_ids", self.cfg.vocab_size), np.int32)

    @property
    def context(self) -> int:
        """Positions a prompt plus its new tokens may use: `max_len`, else the model's context."""
        return self.cfg.context_length if self.max_len is None else self.max_len

    def prompt_positions(self, n: int) -> int:
        """Cache positions a prompt of n tokens fills after prefill padding: its bucket, or a
        multiple of `prefill_chunk` past it (the chunks `_prefill` runs)."""
        b = bucket(n)
        return b if b <= self.prefill_chunk else -(-n // self.prefill_chunk) * self.prefill_chunk

    @classmethod
    def for_tokenizer(cls, model: Qwen3, tokenizer: Tokenizer, **kwargs) -> "Engine":
        """An engine whose thinking budget speaks `tokenizer`'s vocabulary: it forces the
        tokenizer's stop-thinking ids and reads its <think>, </think> and <|im_start|> ids (-1 for
        a tag the vocabulary lacks). `kwargs` are `Engine`'s other arguments."""
        ids = (tokenizer.think_id, tokenizer.end_think_id, tokenizer.token_to_id("<|im_start|>"))
        return cls(model, forced_ids=tokenizer.stop_thinking_ids,
                   think_tags=ThinkTags(*(-1 if i is None else i for i in ids)), **kwargs)

    def _batch_multiple(self) -> int:
        if self.mesh is None:
            return 1
        spec = self.cfg.rules.spec(("batch",), self.mesh.axis_names)[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
        return int(np.prod([self.mesh.shape[a] for a in axes]))

    def stream(self, prompts: Sequence[Sequence[int]], **kwargs) -> Iterator[list[list[int]]]:
        """Yields, after each compiled chunk of `chunk` steps, the new tokens of every row.

        Keyword arguments as `generate`'s (but `return_forced` and `return_logprobs`), plus `chunk`:
        decode steps per compiled chunk (default: all of max_new_tokens at once).
        """
        for tokens, _, _ in self._stream(prompts, **kwargs):
            yield tokens

    def generate(self, prompts: Sequence[Sequence[int]], *, return_forced: bool = False,
                 return_logprobs: bool = False, **kwargs):
        """The new tokens of every prompt (a stop token included when one ended the row).

        `seed`: one int for the batch, or one int in [0, 2**32) per prompt, so that a row's samples
        do not depend on which rows share its batch. With `return_forced`, returns (tokens,
        forced): per token, whether the thinking budget forced it rather than sampling it. With
        `return_logprobs` (either way of `return_forced`), returns a `Generation` (tokens, forced,
        logprobs): each token's float32 log_softmax(logits / temperature) (`token_logprobs`; a
        forced token gets the model's log-probability of it too, though it was not drawn: leave it
        out of any estimator by `forced`).
        Bad arguments raise before anything runs: `qwen3_jax.errors.RequestError` (a ValueError)
        naming the argument and prompt (also for a thinking budget on an engine without
        stop-thinking ids), ValueError from `SamplingParams.make` for sampling values (NaN included).
        """
        out: Generation | None = None  # built from the first chunk: `_stream` validates `prompts`
        for chunk in self._stream(prompts, **kwargs):
            if out is None:
                out = Generation(*([[] for _ in chunk[0]] for _ in Generation._fields))
            for whole, new in zip(out, chunk):
                for row, values in zip(whole, new):
                    row.extend(values)
        if return_logprobs:
            return out
        return (out.tokens, out.forced) if return_forced else out.tokens

    def _stream(
        self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature=0.6, top_k=20, top_p=0.95,
        min_p=0.0, presence_penalty=0.0, stop_token_ids: Sequence[int] = DEFAULT_STOP_IDS, thinking_budget=None,
        seed: int | Sequence[int] = 0, chunk: int | None = None,
    ) -> Iterator[tuple[list[list[int]], list[list[bool]], list[list[float]]]]:
        name = f"the model's context of {self.context} positions" if self.max_len is None else f"max_len={self.max_len}"
        prompts = _validate_prompts(prompts, self.cfg.vocab_size, max_new_tokens, self.context, name)
        n = len(prompts)
        sampling = SamplingParams.make(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       presence_penalty=presence_penalty)
        budgets = _budgets(thinking_budget, n)
        if self.forced_ids is None and np.any(budgets >= 0):
            raise RequestError("thinking_budget needs stop-thinking ids this vocabulary lacks: build the engine with "
                               "forced_ids, or with Engine.for_tokenizer")
        stop_ids = tuple(checks.token_ids(stop_token_ids, "stop_token_ids", self.cfg.vocab_size))
        if chunk is not None:
            checks.positive_int(chunk, "chunk")

        # Pad the batch to the data-parallel degree with rows that start finished.
        tokens, lengths, S = self._pad(prompts, max_new_tokens)
        B = tokens.shape[0]
        pad = B - n
        sampling = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad)]), sampling)
        tags = self.think_tags
        in_think = [
            prompt_think_open(p, think_id=tags.think, end_think_id=tags.end_think, turn_start_id=tags.turn_start)
            for p in prompts
        ] + [False] * pad
        budgets = np.concatenate([budgets, np.full(pad, UNLIMITED_BUDGET, np.int32)])
        keys = _row_keys(seed, n, B)
        rows = RowSettings(sampling, keys, jnp.full((B,), max_new_tokens, jnp.int32),
                           jnp.asarray(stop_ids or (-1,), jnp.int32), self._forced_ids())

        with self._mesh_context():
            cache, logits = self._prefill_padded(tokens, lengths, S)
            state = self._decode_state(cache, logits, jnp.asarray(lengths), n, max_new_tokens, in_think, budgets)
            emitted = np.zeros(n, np.int64)
            steps = jnp.asarray(chunk or max_new_tokens, jnp.int32)
            while True:
                state = _decode(self.graphdef, self.params, state, rows, steps, self.max_candidates)
                # Rows are sharded over the data axes, across processes on a multi-host mesh: every
                # process gathers them all, and every process yields the whole batch.
                counts, out, forced, logprob, done = to_host((state.num_generated_B, state.out_BxN, state.forced_BxN,
                                                              state.logprob_BxN, state.done_B))
                yield tuple([a[i, emitted[i]: counts[i]].tolist() for i in range(n)] for a in (out, forced, logprob))
                emitted = counts
                if bool(np.all(done)):
                    return

    def prefill(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 1) -> jax.Array:
        """Runs only the prefill `generate` would run for `prompts` (same buckets, chunks, batch
        padding and cache size for `max_new_tokens`), for timing it; returns the float32 [B, V]
        logits of each row's last prompt token, B the padded batch, without waiting for them.
        Raises RequestError as `generate` does for bad prompts."""
        name = f"the model's context of {self.context} positions" if self.max_len is None else f"max_len={self.max_len}"
        prompts = _validate_prompts(prompts, self.cfg.vocab_size, max_new_tokens, self.context, name)
        tokens, lengths, S = self._pad(prompts, max_new_tokens)
        with self._mesh_context():
            return self._prefill_padded(tokens, lengths, S)[1]

    def _pad(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """([B, P] right-padded tokens, [B] lengths, S cache slots): the batch padded to the data-parallel
        degree with 1-token rows, P a prompt bucket."""
        B = -(-len(prompts) // self._batch_multiple()) * self._batch_multiple()
        P = bucket(max(len(p) for p in prompts))
        S = -(-(P + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
        tokens = np.zeros((B, P), np.int32)
        lengths = np.ones((B,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        return tokens, lengths, S

    def _prefill_padded(self, tokens_BxP: np.ndarray, lengths_B: np.ndarray, slots: int):
        cache = self._init_cache(tokens_BxP.shape[0], slots)
        return _prefill(self.graphdef, self.params, jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), cache,
                        self.prefill_chunk)

    def _forced_ids(self) -> jax.Array:
        # Without stop-thinking ids no budget is allowed, so the placeholder is never emitted.
        return jnp.asarray(self.forced_ids if self.forced_ids is not None else [0], jnp.int32)

    def _decode_state(self, cache, logits_BxV, lengths_B, n: int, max_new_tokens: int, in_think, budgets) -> DecodeState:
        """The state before the first decode step; rows n.. are padding and start finished."""
        B = lengths_B.shape[0]
        tags = self.think_tags
        return DecodeState(
            cache, logits_BxV, lengths_B, jnp.zeros((B,), jnp.int32),
            jnp.zeros((B, max_new_tokens), jnp.int32), jnp.zeros((B, max_new_tokens), jnp.bool_),
            jnp.zeros((B, max_new_tokens), jnp.float32), jnp.arange(B) >= n,
            jnp.zeros((B, self.cfg.vocab_size), jnp.bool_),
            budget_init(in_think, budgets, think_id=tags.think, end_think_id=tags.end_think),
        )

    def lower(self, batch: int, prompt_len: int, max_new_tokens: int, slots: int) -> tuple[jax.stages.Lowered, ...]:
        """(prefill, decode) lowered, not run, for `batch` rows of `prompt_len`-token prompts, a
        KV cache of `slots` positions and `max_new_tokens` outputs per row: the functions
        `generate` calls, with its shardings (parameters and cache by the config's rules, the
        per-row arrays replicated) and abstract inputs, so `.compile()` works for any devices
        the mesh holds, e.g. a TPU slice's from `jax.experimental.topologies` on a CPU host.

        `batch` must be a multiple of the mesh's data-parallel degree (`generate` pads to one);
        a prompt longer than `prefill_chunk` is padded to a multiple of it, as `generate`'s
        buckets are; decode's step count is traced, so its while loop is one token per row per
        iteration. Raises ValueError when the prompt and the new tokens, or the padded prompt, do
        not fit in `slots`.
        """
        if prompt_len + max_new_tokens > slots:
            raise ValueError(f"prompt_len={prompt_len} + max_new_tokens={max_new_tokens} exceeds slots={slots}")
        if prompt_len > self.prefill_chunk:
            padded = -(-prompt_len // self.prefill_chunk) * self.prefill_chunk
            if padded > slots:
                raise ValueError(f"prompt_len={prompt_len} padded to prefill_chunk={self.prefill_chunk} "
                                 f"multiples ({padded}) exceeds slots={slots}")
            prompt_len = padded
        if batch % self._batch_multiple():
            raise ValueError(f"batch={batch} is not a multiple of the data-parallel degree {self._batch_multiple()}")
        replicated = None if self.mesh is None else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def abstract(tree, shardings=None):
            shardings = jax.tree.map(lambda _: replicated, tree) if shardings is None else shardings
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        def param(v: nnx.Variable) -> jax.ShapeDtypeStruct:
            value = v.get_value()
            if self.mesh is None or isinstance(value, jax.Array):  # placed weights keep their layout
                return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(value, "sharding", None))
            # An abstract model's weights get the config's rules; a layer `unstack_layers` split
            # off its stack keeps the stack's axis names, "layers" first.
            axes = tuple(v.get_metadata()["axes"])[len(v.get_metadata()["axes"]) - len(v.shape):]
            spec = self.cfg.rules.spec(axes, self.mesh.axis_names)
            return jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(self.mesh, spec))

        params = jax.tree.map(param, self.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        make_cache = lambda: self.model.init_cache(batch, slots, jnp.dtype(self.cfg.dtype))  # noqa: E731
        cache = jax.eval_shape(make_cache)
        cache = abstract(cache, None if self.mesh is None else _cache_shardings(cache, self.mesh, self.cfg.rules))
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated)
        tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=replicated)
        logits = jax.ShapeDtypeStruct((batch, self.cfg.vocab_size), jnp.float32, sharding=replicated)
        in_think, budgets = [False] * batch, np.full(batch, UNLIMITED_BUDGET, np.int32)
        state = jax.eval_shape(
            lambda c, lg, ln: self._decode_state(c, lg, ln, batch, max_new_tokens, in_think, budgets),
            cache, logits, lengths,
        )
        state = state._replace(**{f: abstract(getattr(state, f)) for f in DecodeState._fields if f != "cache"},
                               cache=cache)
        rows = abstract(RowSettings(
            SamplingParams.make(batch), _row_keys(0, batch, batch), jnp.full((batch,), max_new_tokens, jnp.int32),
            jnp.asarray(DEFAULT_STOP_IDS, jnp.int32), self._forced_ids(),
        ))
        steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        with self._mesh_context():
            return (_prefill.lower(self.graphdef, params, tokens, lengths, cache, self.prefill_chunk),
                    _decode.lower(self.graphdef, params, state, rows, steps, self.max_candidates))

    def _init_cache(self, batch: int, slots: int):
        dtype = jnp.dtype(self.cfg.dtype)
        if self.mesh is None:
            return self.model.init_cache(batch, slots, dtype)
        make = lambda: self.model.init_cache(batch, slots, dtype)  # noqa: E731
        shardings = _cache_shardings(jax.eval_shape(make), self.mesh, self.cfg.rules)
        return jax.jit(make, out_shardings=shardings)()

    def _mesh_context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)


def generate(
    model: Qwen3, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float | Sequence[float] = 0.6,
    top_k=20, top_p=0.95, min_p=0.0, presence_penalty=0.0, stop_token_ids: Sequence[int] = DEFAULT_STOP_IDS,
    thinking_budget: int | Sequence[int | None] | None = None, seed: int | Sequence[int] = 0,
    mesh: jax.sharding.Mesh | None = None, forced_ids: Sequence[int] | None = None, max_len: int | None = None,
) -> list[list[int]]:
    """Generates for a batch of token-id prompts; one list of new ids per prompt.

    temperature=0.0 is greedy. A stop token is included when one was generated. thinking_budget:
    None (unlimited), an int for every prompt, or one value (int or None) per prompt. seed: an int,
    or one int in [0, 2**32) per prompt (a row's tokens then depend on its own seed only).
    `forced_ids` overrides the stop-thinking ids (e.g. for a sentencepiece vocabulary). `max_len`
    replaces the model's context as the limit on prompt + max_new_tokens (see `Engine`).
    """
    # A fresh split each call sees the model's current parameters; jit reuses compilations
    # because equal graphdefs hash equal.
    return Engine(model, mesh=mesh, forced_ids=forced_ids, max_len=max_len).generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        presence_penalty=presence_penalty, stop_token_ids=stop_token_ids, thinking_budget=thinking_budget, seed=seed,
    )
