"""Evaluation on the miniature's task (`train.miniature.task`), greedy, through `infer.rollout`.

What Qwen3's report measures of a hybrid-thinking model: accuracy by mode and difficulty, flag
obedience (ThinkFollow, Table 22: replies think exactly when the last flag asks; no flag: think),
and accuracy against the thinking budget. Rows run in fixed-size batches, the last one padded, so an
evaluation compiles a bounded number of decode programs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
import tqdm

from infer import rollout
from infer.engine import Engine
from infer.rollout import MODES, Mode
from qwen3_jax import chat
from qwen3_jax.model import Qwen3
from qwen3_jax.tokenizer import Tokenizer
from train.miniature import task

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to measure (static for a run). `budgets`: thinking budgets in tokens, None = no limit."""

    levels: tuple[int, ...]
    per_level: int  # test problems per difficulty level
    budgets: tuple[int | None, ...] = (0, 4, 8, 16, 32, 64, None)
    follow_conversations: int = 200  # conversations for flag obedience
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    split_by: str = "start"  # the split unit (task.SPLIT_UNITS)
    samples: int = 8  # sampled replies per test problem and mode for pass@k (k = 1 and `samples`); 0: none


@dataclasses.dataclass(frozen=True)
class Reply:
    thinking: str
    answer: str
    num_tokens: int


def replies(engine: Engine, tokenizer: Tokenizer, conversations: Sequence[Sequence[Mapping[str, Any]]], *,
            max_new_tokens: int, batch_size: int, budget: int | None = None, bar: tqdm.tqdm | None = None,
            mode: Mode | None = None, seeds: Sequence[int] | None = None) -> list[Reply]:
    """Replies to `conversations` as written (their own soft switches; the template's thinking
    stays on), through `infer.rollout.generate_chat`: greedy, or with `mode`'s Qwen sampling
    settings (`infer.rollout.mode_sampling`) and one seed per row when `mode` is given."""
    prompts = [tokenizer.encode(chat.render(m, add_generation_prompt=True)) for m in conversations]
    # Every row is a think row, so `budget` applies to all; greedy rows ignore the other settings.
    sampling = {"temperature": 0.0} if mode is None else rollout.mode_sampling(mode)
    out = rollout.generate_chat(engine, tokenizer, prompts, [Mode.THINK] * len(prompts), max_new_tokens=max_new_tokens,
                                thinking_budget=budget, sampling=sampling, batch_size=batch_size,
                                seed=0 if seeds is None else seeds, after_batch=None if bar is None else bar.update)
    return [Reply(c.thinking, c.answer, len(c.token_ids)) for c in out]


def pass_at_k(correct_PxN: np.ndarray, k: int) -> float:
    """Unbiased pass@k over problems from n >= k sampled replies each (Chen et al. 2021, eq. 1):
    mean over problems of 1 - C(n - c, k) / C(n, c) with c correct replies."""
    n = correct_PxN.shape[1]
    c = correct_PxN.sum(axis=1)
    return float(np.mean([1.0 - math.comb(n - ci, k) / math.comb(n, k) for ci in c]))


def split_problems(cfg: EvalConfig, split: str = "test") -> dict[int, list[task.Problem]]:
    return {d: task.problems(split, d, cfg.per_level, cfg.seed, cfg.split_by) for d in cfg.levels}


def evaluate(model: Qwen3, tokenizer: Tokenizer, cfg: EvalConfig, *, split: str = "test", mesh=None,
             follow: bool = True, budgets: bool = True, progress: bool = False) -> dict[str, Any]:
    """Accuracy by mode and level, flag obedience, accuracy by thinking budget (see module doc).

    Returns {"accuracy": {mode: {level: acc, "all": acc}}, "reply_tokens": {mode: mean tokens},
    "thought": {mode: fraction of replies with thinking}, "think_follow": fraction,
    "budget": {str(budget) or "unlimited": {level: acc, "all": acc}}, "budget_answered": {str(budget): share of
    replies that state an answer}, "problems": {level: count},
    "per_problem": {mode: [{start, k, ok, thinking, answer}]} (greedy), "pass_at": {mode: {"1": p, str(samples): p}}
    (sampled, Qwen's settings per mode)}; `follow` / `budgets` False skip those parts and pass@k
    (learning curves). `progress` shows a bar.
    """
    engine = Engine.for_tokenizer(model, tokenizer, mesh=mesh)
    by_level = split_problems(cfg, split)
    problems = [p for d in cfg.levels for p in by_level[d]]
    batches = -(-len(problems) // cfg.batch_size)
    total = batches * (len(MODES) + (len(cfg.budgets) - (None in cfg.budgets) if budgets else 0))
    total += -(-cfg.follow_conversations // cfg.batch_size) if follow else 0
    total += len(MODES) * -(-len(problems) * cfg.samples // cfg.batch_size) if budgets else 0
    bar = tqdm.tqdm(total=total, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True)
    kw = dict(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, bar=bar)

    def accuracy(rs: Sequence[Reply]) -> dict[Any, float]:
        ok = np.array([task.verify(r.answer, p) for r, p in zip(rs, problems)])
        levels = np.array([p.difficulty for p in problems])
        return {**{d: float(ok[levels == d].mean()) for d in cfg.levels}, "all": float(ok.mean())}

    out: dict[str, Any] = {"accuracy": {}, "reply_tokens": {}, "thought": {}, "per_problem": {},
                           "problems": {d: len(by_level[d]) for d in cfg.levels}}
    for mode in MODES:
        rs = replies(engine, tokenizer, [task.prompt_messages(p, mode) for p in problems], **kw)
        out["accuracy"][mode] = accuracy(rs)
        out["per_problem"][mode] = [{"start": list(p.start), "k": p.difficulty, "ok": task.verify(r.answer, p),
                                     "thinking": r.thinking, "answer": r.answer} for p, r in zip(problems, rs)]
        out["reply_tokens"][mode] = float(np.mean([r.num_tokens for r in rs]))
        out["thought"][mode] = float(np.mean([bool(r.thinking) for r in rs]))
    if follow:
        rng = np.random.default_rng([cfg.seed, 7])
        convs = [task.fusion_conversation(rng, problems, task.FusionMix()) for _ in range(cfg.follow_conversations)]
        rs = replies(engine, tokenizer, [c["messages"] for c in convs], **kw)
        out["think_follow"] = float(np.mean([bool(r.thinking) == (c["mode"] == "think") for r, c in zip(rs, convs)]))
    if budgets:
        out["budget"], out["budget_answered"] = {}, {}
        for budget in cfg.budgets:
            if budget is None:
                out["budget"]["unlimited"] = out["accuracy"]["think"]
                continue
            rs = replies(engine, tokenizer, [task.prompt_messages(p, "think") for p in problems], budget=budget, **kw)
            out["budget"][str(budget)] = accuracy(rs)
            out["budget_answered"][str(budget)] = float(np.mean([bool(task.ANSWER_RE.search(r.answer)) for r in rs]))
    if budgets and cfg.samples:
        out["pass_at"] = {}
        for mode in MODES:
            convs = [task.prompt_messages(p, mode) for p in problems for _ in range(cfg.samples)]
            seeds = [rollout.row_seed(cfg.seed, "pass@k", mode, i) for i in range(len(convs))]
            rs = replies(engine, tokenizer, convs, mode=Mode(mode), seeds=seeds, **kw)
            ok = np.array([task.verify(r.answer, p) for r, p in zip(rs, [p for p in problems for _ in range(cfg.samples)])])
            ok = ok.reshape(len(problems), cfg.samples)
            out["pass_at"][mode] = {str(k): pass_at_k(ok, k) for k in sorted({1, cfg.samples})}
    bar.close()
    return out


def expert_load(model: Qwen3, tokenizer: Tokenizer, cfg: EvalConfig, split: str = "test") -> np.ndarray:
    """[MoE layers, experts]: the share of top-k routing each expert receives, per layer, over
    the thinking-mode prompts and reference replies of `split` (a perfectly balanced router gives
    1 / experts everywhere)."""
    by_level = split_problems(cfg, split)
    texts = [chat.render([*task.prompt_messages(p, "think"), task.reply(p, True)]) for d in cfg.levels
             for p in by_level[d]]
    ids = [tokenizer.encode(t) for t in texts]
    counts = 0.0
    for start in range(0, len(ids), cfg.batch_size):
        chunk = ids[start: start + cfg.batch_size]
        T = max(map(len, chunk))
        tokens = np.zeros((len(chunk), T), np.int32)
        segments = np.zeros((len(chunk), T), np.int32)  # 0: padding, left out of the router statistics
        for i, row in enumerate(chunk):
            tokens[i, : len(row)], segments[i, : len(row)] = row, 1
        stats = model.forward(jnp.asarray(tokens), segment_ids_BxT=jnp.asarray(segments)).router_stats
        counts = counts + np.asarray(stats.expert_counts_E)
    return counts / counts.sum(axis=-1, keepdims=True)
