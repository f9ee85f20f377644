"""Continuous batching on the compiled engine: requests join and leave a fixed set of cache rows.

A `ContinuousEngine` holds one `DecodeState` of `slots` rows over a KV cache of `cache_len`
positions. Each `step`: waiting requests are prefilled (grouped by prompt bucket, the group padded
to a power-of-two row count) straight into free rows; then every row decodes `chunk` tokens with the
static engine's own decode step (the same sampling, thinking budget and per-row cache slots); rows
that finished free their slot at once, and the next step admits into it. So a short request never
waits for a long one (Orca, OSDI '22; vLLM's scheduler).

Compilations are bounded: one admit per (prompt bucket, admitted-row bucket) pair, one decode, one
release and one read-back, whatever the mix of lengths, settings, seeds and budgets (per-row arrays).

A request's tokens depend on its own prompt, settings and seed only: its key is `jax.random.key(seed)`
as `Engine.generate` with per-row seeds makes it, so it samples the same tokens in any batch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from infer import checks
from infer.engine import (
    CACHE_ROUND, DEFAULT_STOP_IDS, DecodeState, Engine, RowSettings, _decode, _prefill,
)
from infer.sampling import UNLIMITED_BUDGET, SamplingParams, prompt_think_open
from qwen3_jax.errors import RequestError
from qwen3_jax.layers import KVCache
from qwen3_jax.sharding import to_host

# Called on the engine's thread after each decode chunk with the row's new ids, whether the
# thinking budget forced each, and whether the row has finished; returning True cancels the row.
OnTokens = Callable[[list[int], list[bool], bool], bool | None]


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests: try again later."""


class Draining(Exception):
    """The engine stopped admitting requests (it is shutting down)."""


@dataclasses.dataclass
class Request:
    """One generation request. `sampling`: `SamplingParams.make` keywords (scalars); `seed`: an
    int in [0, 2**32); `thinking_budget`: thinking tokens (None: no limit)."""

    prompt: list[int]
    max_new_tokens: int
    on_tokens: OnTokens
    sampling: Mapping[str, float] = dataclasses.field(default_factory=dict)
    thinking_budget: int | None = None
    seed: int = 0
    id: int = dataclasses.field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    failed: bool = False  # set before its last callback when a failed step ended it


def _batch_axis(x: jax.Array) -> int:
    return x.ndim - 4  # KVCache arrays end in [B, K, H, S] / [B, K, S, H], a layers axis may lead


def _cache_rows(cache, count: int):
    """A zeroed cache of `count` rows shaped like `cache`'s rows."""
    def one(c: KVCache) -> KVCache:
        return KVCache(*(jnp.zeros(x.shape[:_batch_axis(x)] + (count,) + x.shape[_batch_axis(x) + 1:], x.dtype)
                         for x in c))

    return jax.tree.map(one, cache, is_leaf=lambda x: isinstance(x, KVCache))


def _scatter_rows(big, new, idx_b: jax.Array, axis: Callable[[jax.Array], int] = lambda x: 0):
    """`big` with rows `idx_b` replaced by `new`'s; an index past the end (padding) is dropped."""
    def one(b, n):
        at = (slice(None),) * axis(b) + (idx_b,)
        return b.at[at].set(n, mode="drop")

    return jax.tree.map(one, big, new)


def _admit(engine: Engine, params, state: DecodeState, rows: RowSettings, tokens_bxP, lengths_b, idx_b,
           sampling: SamplingParams, keys_b, max_new_b, in_think_b, budgets_b):
    """Prefills `tokens_bxP` into fresh cache rows and writes them, with a fresh decode state and the
    rows' settings, into rows `idx_b` of `state` / `rows`. `engine` gives only static values (its
    graphdef, prefill chunk, vocabulary and think tags); the weights come in as `params`."""
    b = tokens_bxP.shape[0]
    N = state.out_BxN.shape[1]
    cache, logits_bxV = _prefill(engine.graphdef, params, tokens_bxP, lengths_b, _cache_rows(state.cache, b),
                                 engine.prefill_chunk)
    fresh = engine._decode_state(cache, logits_bxV, lengths_b, b, N, in_think_b, budgets_b)
    state = state._replace(
        cache=_scatter_rows(state.cache, fresh.cache, idx_b, _batch_axis),
        **{f: _scatter_rows(getattr(state, f), getattr(fresh, f), idx_b) for f in DecodeState._fields if f != "cache"},
    )
    rows = rows._replace(sampling=_scatter_rows(rows.sampling, sampling, idx_b),
                         keys_B=_scatter_rows(rows.keys_B, keys_b, idx_b),
                         max_new_B=_scatter_rows(rows.max_new_B, max_new_b, idx_b))
    return state, rows


def _release(state: DecodeState, rows: RowSettings, release_B: jax.Array) -> tuple[DecodeState, RowSettings]:
    """Marks rows free: finished, and greedy, so that an idle row never sends `sample` down its
    full-vocabulary path (a top_k=0 row left behind would sort the whole vocabulary every step)."""
    greedy = rows.sampling.replace(temperature=jnp.where(release_B, 0.0, rows.sampling.temperature))
    return state._replace(done_B=state.done_B | release_B), rows._replace(sampling=greedy)


def _window(state: DecodeState, start_B: jax.Array, width: int):
    """([B, width] ids, [B, width] forced flags, [B] counts, [B] done) from each row's `start_B`."""
    N = state.out_BxN.shape[1]
    at_BxW = jnp.minimum(start_B[:, None] + jnp.arange(width), N - 1)
    return (jnp.take_along_axis(state.out_BxN, at_BxW, axis=1), jnp.take_along_axis(state.forced_BxN, at_BxW, axis=1),
            state.num_generated_B, state.done_B)


class ContinuousEngine:
    """Continuous batching over an `Engine`'s model, thinking-budget ids and limits.

    `slots`: cache rows decoded together. `max_len`: prompt + new tokens per request (default the
    engine's `context`). `chunk`: decode steps between admissions (a new request waits at most one
    chunk to start). `max_queue`: waiting requests beyond the rows (`submit` raises QueueFull past it).
    Single-device: the engine must have no mesh.

    Drive it with `step()` (one admission and one decode chunk) or `start()` (a thread that steps
    while work remains). `submit` and `cancel` may be called from any thread; callbacks run on the
    stepping thread.
    """

    def __init__(self, engine: Engine, *, slots: int = 16, max_len: int | None = None, chunk: int = 8,
                 max_queue: int = 256, stop_token_ids: Sequence[int] = DEFAULT_STOP_IDS):
        self.engine = engine
        self.slots = checks.positive_int(slots, "slots")
        self.row_multiple = engine._batch_multiple()
        if self.slots % self.row_multiple:
            raise ValueError(f"slots={slots} is not a multiple of the mesh's data-parallel degree {self.row_multiple}")
        self.context = engine.context if max_len is None else checks.positive_int(max_len, "max_len")
        self.chunk = checks.positive_int(chunk, "chunk")
        self.max_queue = checks.positive_int(max_queue, "max_queue")
        self.cache_len = -(-self._padded(self.context) // CACHE_ROUND) * CACHE_ROUND
        stop = checks.token_ids(stop_token_ids, "stop_token_ids", engine.cfg.vocab_size)

        self._stop_ids = stop
        self._reset()
        # Per-instance jits: the engine's static values are closed over, its weights passed in.
        # Outputs keep the state's shardings, so that decode sees one layout and compiles once.
        layout = jax.tree.map(lambda x: x.sharding, (self._state, self._rows))
        self.admit_fn = jax.jit(functools.partial(_admit, engine), donate_argnums=(1, 2), out_shardings=layout)
        self.release_fn = jax.jit(_release, donate_argnums=(0, 1), out_shardings=layout)
        self.decode_fn = jax.jit(_decode.__wrapped__, static_argnums=(0, 5), donate_argnums=(2,),
                                 out_shardings=layout[0])
        self.window_fn = jax.jit(functools.partial(_window, width=self.chunk))

        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}  # slot -> request
        self._admitting: list[Request] = []  # taken off the queue by the current step, not yet active
        self._emitted = np.zeros(self.slots, np.int64)
        self._draining = False
        self._thread: threading.Thread | None = None
        self._stop = False
        self.tokens_per_second = 0.0  # over the last decode chunk

    def _reset(self) -> None:
        """Every row free (finished and greedy): the state before the first request, or after a failed step."""
        engine, B, N = self.engine, self.slots, self.context

        def initial():  # all but the cache
            state = engine._decode_state(
                None, jnp.zeros((B, engine.cfg.vocab_size), jnp.float32), jnp.zeros((B,), jnp.int32), 0, N,
                [False] * B, np.full(B, UNLIMITED_BUDGET, np.int32))
            rows = RowSettings(jax.tree.map(jnp.asarray, SamplingParams.make(B, temperature=0.0)),
                               jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32)), jnp.zeros((B,), jnp.int32),
                               jnp.asarray(self._stop_ids or [-1], jnp.int32), engine._forced_ids())
            return state, rows

        # Committed (to the weights' device, or replicated over the mesh), as every later state
        # is: otherwise the first admit and the later ones would compile apart.
        if engine.mesh is None:
            place = jax.tree.leaves(engine.params)[0].devices().pop()
        else:
            place = jax.sharding.NamedSharding(engine.mesh, jax.sharding.PartitionSpec())
        with engine._mesh_context():
            state, rows = jax.device_put(jax.jit(initial)(), place)
            cache = engine._init_cache(B, self.cache_len)  # sharded by the rules on a mesh
        if engine.mesh is None:
            cache = jax.device_put(cache, place)
        self._state, self._rows = state._replace(cache=cache), rows

    # ------------------------------------------------------------------------------ requests

    def _padded(self, n: int) -> int:
        """Positions a prompt of n tokens occupies after prefill padding (the chunks `_prefill` runs)."""
        return self.engine.prompt_positions(n)

    def check(self, request: Request) -> None:
        """Raises RequestError (naming the field) or ValueError (sampling) for a request that
        cannot run, before it is queued."""
        vocab = self.engine.cfg.vocab_size
        ids = checks.token_ids(request.prompt, "prompt", vocab)
        if not ids:
            raise RequestError("prompt is empty")
        max_new = checks.positive_int(request.max_new_tokens, "max_new_tokens")
        if len(ids) + max_new > self.context:
            raise RequestError(f"prompt has {len(ids)} tokens; with max_new_tokens={max_new} that exceeds "
                               f"the context of {self.context} positions")
        budget = checks.optional_budget(request.thinking_budget, "thinking_budget")
        if budget is not None and self.engine.forced_ids is None:
            raise RequestError("thinking_budget needs stop-thinking ids this vocabulary lacks")
        if not checks.is_int(request.seed) or not 0 <= request.seed < 2**32:
            raise RequestError(f"seed must be an int in [0, 2**32), got {request.seed!r}")
        SamplingParams.make(1, **request.sampling)

    def submit(self, request: Request) -> Request:
        """Queues `request` (checked first, see `check`). Raises QueueFull, Draining, RequestError."""
        self.check(request)
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stops `request` (waiting or running); its slot is freed at the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    @property
    def free_slots(self) -> int:
        with self._lock:
            return self.slots - len(self._active)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def draining(self) -> bool:
        return self._draining

    def idle(self) -> bool:
        with self._lock:
            return not self._waiting and not self._active

    # --------------------------------------------------------------------------------- steps

    def step(self) -> bool:
        """Frees cancelled rows, admits waiting requests into free rows, decodes one chunk and
        delivers the new tokens. Returns whether any row decoded."""
        with self.engine._mesh_context():
            return self._step()

    def _step(self) -> bool:
        with self._lock:
            cancelled = [s for s, r in self._active.items() if r.cancelled]
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            free = [s for s in range(self.slots) if s not in self._active or s in cancelled]
            admitted = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
            self._admitting = admitted
        if cancelled:
            self._free(cancelled)
        if admitted:
            self._admit_requests(admitted, free[:len(admitted)])
        self._admitting = []
        if not self._active:
            return False
        start = time.perf_counter()
        self._state = self.decode_fn(self.engine.graphdef, self.engine.params, self._state, self._rows,
                                     jnp.asarray(self.chunk, jnp.int32), self.engine.max_candidates)
        ids, forced, counts, done = to_host(self.window_fn(self._state, jnp.asarray(self._emitted, jnp.int32)))
        new = sum(int(counts[s] - self._emitted[s]) for s in self._active)
        self.tokens_per_second = new / (time.perf_counter() - start)
        delivered = list(self._active.items())
        finished = [s for s, _ in delivered if done[s]]
        if finished:  # freed before their requests hear they are done
            self._free(finished)
        for s, request in delivered:
            n = int(counts[s] - self._emitted[s])
            self._emitted[s] = counts[s]
            if request.on_tokens(ids[s, :n].tolist(), forced[s, :n].tolist(), bool(done[s])) and not done[s]:
                request.cancelled = True
        return True

    def _free(self, slots: list[int]) -> None:
        mask = np.zeros(self.slots, bool)
        mask[slots] = True
        self._state, self._rows = self.release_fn(self._state, self._rows, jnp.asarray(mask))
        with self._lock:
            for s in slots:
                del self._active[s]
            self._lock.notify_all()

    def _admit_requests(self, requests: list[Request], free: list[int]) -> None:
        groups: dict[int, list[tuple[Request, int]]] = collections.defaultdict(list)
        for request, slot in zip(requests, free):
            groups[self._padded(len(request.prompt))].append((request, slot))
        tags = self.engine.think_tags
        for P, group in groups.items():
            b = bucket_rows(len(group), self.slots, self.row_multiple)
            tokens = np.zeros((b, P), np.int32)
            lengths = np.ones(b, np.int32)
            idx = np.full(b, self.slots, np.int32)  # past the end: padding rows are dropped
            in_think = np.zeros(b, bool)
            budgets = np.full(b, UNLIMITED_BUDGET, np.int32)
            seeds = np.zeros(b, np.uint32)
            max_new = np.zeros(b, np.int32)
            settings = []
            for i, (r, slot) in enumerate(group):
                tokens[i, :len(r.prompt)] = r.prompt
                lengths[i], idx[i], seeds[i], max_new[i] = len(r.prompt), slot, r.seed, r.max_new_tokens
                in_think[i] = prompt_think_open(r.prompt, think_id=tags.think, end_think_id=tags.end_think,
                                                turn_start_id=tags.turn_start)
                if r.thinking_budget is not None:
                    budgets[i] = r.thinking_budget
                settings.append(r.sampling)
            settings += [settings[0]] * (b - len(group))
            sampling = SamplingParams.make(b, **{k: [s.get(k, d) for s in settings] for k, d in _SAMPLING_OFF.items()})
            self._state, self._rows = self.admit_fn(
                self.engine.params, self._state, self._rows, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(idx), sampling,
                jax.vmap(jax.random.key)(jnp.asarray(seeds)), jnp.asarray(max_new), jnp.asarray(in_think),
                jnp.asarray(budgets))
            with self._lock:
                for r, slot in group:
                    self._active[slot] = r
                    self._emitted[slot] = 0

    def compilations(self) -> dict[str, int]:
        """Executables compiled so far per function."""
        return {"admit": self.admit_fn._cache_size(), "decode": self.decode_fn._cache_size(),
                "release": self.release_fn._cache_size(), "window": self.window_fn._cache_size()}

    # -------------------------------------------------------------------------------- thread

    def start(self) -> None:
        """Steps on a daemon thread until `stop()`; sleeps while there is no work."""
        def loop():
            while True:
                with self._lock:
                    while not self._stop and not self._waiting and not self._active:
                        self._lock.wait()
                    if self._stop:
                        return
                try:
                    self.step()
                except Exception:  # noqa: BLE001 - the thread must outlive a failed step: end its requests
                    logging.getLogger(__name__).exception("a decode step failed; ending its requests")
                    self._fail_all()

        self._thread = threading.Thread(target=loop, name="continuous-engine", daemon=True)
        self._thread.start()

    def _fail_all(self) -> None:
        """Ends every running and waiting request (each gets a last, empty callback) and starts from free rows."""
        with self._lock:
            # A failed admission leaves its requests neither waiting nor active: they end too.
            requests = list({id(r): r for r in [*self._active.values(), *self._admitting, *self._waiting]}.values())
            self._waiting.clear()
            self._active.clear()
            self._admitting = []
            self._reset()
            self._lock.notify_all()
        for r in requests:
            r.failed = True
            with contextlib.suppress(Exception):  # the callback that failed may fail again
                r.on_tokens([], [], True)

    def drain(self) -> None:
        """Stops admitting: `submit` raises Draining from now on; queued and running requests finish."""
        with self._lock:
            self._draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Ends the stepping thread after its current step."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------ batch use

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 seeds: Sequence[int] | None = None, thinking_budget: int | None = None,
                 **sampling: float) -> list[list[int]]:
        """The new ids of every prompt, all submitted at once and stepped to the end on this
        thread (for batch jobs and benchmarks). `max_new_tokens`: one int or one per prompt;
        `seeds`: one per prompt (default fresh random ones)."""
        n = len(prompts)
        limits = [max_new_tokens] * n if checks.is_int(max_new_tokens) else list(max_new_tokens)
        out: list[list[int]] = [[] for _ in range(n)]
        requests = [Request(list(p), limits[i], lambda ids, f, d, i=i: out[i].extend(ids), dict(sampling),
                            thinking_budget, random_seed() if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
        for r in requests:
            self.check(r)
        with self._lock:
            self._waiting.extend(requests)
        while self.step() or self._waiting:
            pass
        return out


_SAMPLING_OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "presence_penalty": 0.0}


def bucket_rows(n: int, slots: int, multiple: int = 1) -> int:
    """Rows an admission of n requests is padded to: a power of two, at most `slots`, rounded up
    to a multiple of `multiple` (the data-parallel degree, which divides `slots`)."""
    return -(-min(1 << (n - 1).bit_length(), slots) // multiple) * multiple


def random_seed() -> int:
    """A fresh seed in [0, 2**32) for a request that gave none."""
    return secrets.randbits(32)

