"""What each student stage spent: FLOPs of rollouts, of teacher scoring and of updates, and wall seconds.

Read from what the stages wrote (metrics.jsonl of each loop, the off-policy teacher responses).
FLOPs are model FLOPs (`train.metrics.flops_per_token`, PaLM's count): an update is the forward and
backward of every token of its padded rows (6N + attention); a forward pass (rollout, prefill,
teacher scoring) a third of that, per token it covers. Rollout FLOPs count the prompt and the
generated tokens once each (a KV-cached decode), at the rows' length for attention.
"""

from __future__ import annotations

import json
import os
from typing import Any

from qwen3_jax.chat import render
from qwen3_jax.config import Qwen3Config
from qwen3_jax.tokenizer import Tokenizer
from train.metrics import flops_per_token


def forward_flops(cfg: Qwen3Config, seq_len: int) -> float:
    """Model FLOPs of one token's forward pass (a third of a training token's)."""
    return flops_per_token(cfg, seq_len) / 3


def _metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_tokens(tokenizer: Tokenizer, prompts_path: str) -> float:
    """Mean tokens of a prompt file's rendered prompts (thinking mode's soft switch)."""
    with open(prompts_path) as f:
        records = [json.loads(line) for line in f]
    ids = [tokenizer.encode(render(rec["messages"], add_generation_prompt=True)) for rec in records]
    return sum(map(len, ids)) / len(ids) + 2  # + the ' /think' or ' /no_think' flag


def off_policy(student: Qwen3Config, teacher: Qwen3Config, workdir: str, *, rows: int, seq_len: int,
               tokenizer: Tokenizer) -> dict[str, float]:
    """Phase 1 of distillation in `workdir`: the teacher's responses (its rollouts) and the SFT updates."""
    rollout_tokens = 0
    with open(os.path.join(workdir, "teacher_responses.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            prompt = tokenizer.encode(render(rec["messages"][:-1], add_generation_prompt=True))
            rollout_tokens += len(prompt) + rec["num_tokens"]
    steps = _metrics(os.path.join(workdir, "metrics.jsonl"))
    return {"steps": len(steps), "rollout_flops": forward_flops(teacher, seq_len) * rollout_tokens,
            "teacher_flops": 0.0, "update_flops": flops_per_token(student, seq_len) * rows * seq_len * len(steps),
            "loop_seconds": sum(m["step_time"] for m in steps)}


def on_policy(student: Qwen3Config, scorer: Qwen3Config | None, workdir: str, *, rows: int, seq_len: int,
              prompt_tokens: float) -> dict[str, float]:
    """A loop on the student's own samples in `workdir` (on-policy distillation, or RL with
    `scorer` None: a verifier scores, no model): rollouts, the scorer's forward over the update
    rows, and the updates. `rows` per step; `prompt_tokens` the mean prompt length."""
    steps = _metrics(os.path.join(workdir, "metrics.jsonl"))
    generated = sum(m["completion_len"] for m in steps) * rows
    update_tokens = rows * seq_len * len(steps)
    return {"steps": len(steps), "rollout_tokens": generated,
            "rollout_flops": forward_flops(student, seq_len) * (generated + prompt_tokens * rows * len(steps)),
            "teacher_flops": 0.0 if scorer is None else forward_flops(scorer, seq_len) * update_tokens,
            "update_flops": flops_per_token(student, seq_len) * update_tokens,
            "loop_seconds": sum(m["step_time"] for m in steps)}

