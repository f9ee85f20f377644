"""Qwen3's post-training recipe in miniature, end to end: a hybrid-thinking teacher and strong-to-weak
distillation into a smaller student, with the report's measurements, on a laptop CPU.

    python -m train.recipe --config configs/miniature.py --workdir runs/miniature [--config.<field>=<value>]

Stages, each checkpointed (WORKDIR/stages.json): a rerun resumes at the first unfinished stage,
and the training stages resume from their own checkpoints.

  1. data          a verifiable task with a difficulty knob (`train.task`): disjoint train /
                   validation / test problems; thinking-mode fusion SFT records of the train split
                   (thinking and non-thinking samples, /think and /no_think in user or system
                   messages, multi-turn, unflagged thinking samples); the distillation prompts.
  2. tokenizer     a sentencepiece model trained on the task's rendered chats with Qwen3's control
                   tokens (`train.spm`); Qwen's stop-thinking text is tokenised with it for the
                   budget. (`tokenizer.kind='qwen3'` uses the real Qwen3 tokenizer instead.)
  3. teacher       `train.train` on the fusion records (the flagship stand-in; dense by default, a MoE
                   by `teacher.preset` / `teacher.overrides`).
  4. teacher_eval  `train.evaluate` through the compiled decode engine on the test split:
                   accuracy by mode and difficulty, flag obedience (ThinkFollow), accuracy against
                   the thinking budget; per-expert load per layer for a MoE teacher.
  5. distilled     `train.distill`: off-policy (the teacher answers the prompts in both modes, the
                   student is fine-tuned on that), then on-policy (logit distillation on the
                   student's own samples).
  6. direct        the same student trained on the ground-truth fusion records for the same number
                   of update steps of the same size (rows x sequence length).
  7. student_eval  both students evaluated like the teacher; learning curves (accuracy on the
                   validation split at each saved step).
  8. report        WORKDIR/report.md with the tables, PNG plots in WORKDIR/plots, the three models
                   exported with `to_hf` to WORKDIR/export.

The default config (configs/miniature.py) is sized to finish in about a quarter of an hour on two
CPU cores; the same fields scale the recipe to real presets, a real tokenizer and a mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_dict

from qwen3_jax.checkpoint import load_any
from qwen3_jax.layout import trainer_steps
from qwen3_jax.chat import render
from qwen3_jax.config import ConfigError, Qwen3Config, preset
from qwen3_jax.hf import to_hf
from qwen3_jax.model import count_params
from qwen3_jax.ids import STOP_THINKING_TEXT
from qwen3_jax.tokenizer import Tokenizer
from train import distill as distill_lib
from train import evaluate as eval_lib
from train import task as task_lib
from train import train as train_lib
from train.spm import train_sentencepiece
from train.train import TrainConfigError, need

STAGES = ("data", "tokenizer", "teacher", "teacher_eval", "distilled", "direct", "student_eval", "report")
RECIPE_FILE, STAGES_FILE = "recipe.json", "stages.json"


# ------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """Every field of a recipe config, at the miniature's values (see configs/miniature.py)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dtype = "float32"  # compute dtype of every model: float32 on CPU, bfloat16 on TPU / GPU
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1})
    c.task = ml_collections.ConfigDict({
        "levels": (1, 2, 3, 4, 5, 6),  # difficulty = steps of the sequence asked for
        "sft_records": 16000,  # fusion records drawn from the train split's problems
        "prompts": 1000,  # distillation prompts (train split)
        "no_think_easy_share": 0.5,  # non-thinking samples on the easiest level (one-step answers need data)
        "validation_per_level": 20,  # learning curves (20 starting pairs per split)
        "test_per_level": 20,
        "follow_conversations": 200,  # flag obedience
        "budgets": (0, 4, 8, 16, 32, 64),  # thinking budgets (tokens); unlimited is always measured
        "no_flag": 0.3,  # fusion mix: user messages without a flag
        "system_flag": 0.2,  # ... conversations whose system message carries a flag
        "multi_turn": 0.3,  # ... conversations with an earlier turn
    })
    c.tokenizer = ml_collections.ConfigDict({
        "kind": "sentencepiece",  # trained on the task, or 'qwen3' (real presets)
        "vocab_size": 512,
        "corpus_records": 3000,
    })
    # Dense rather than MoE: at the same active width a MoE teacher (8 experts, top 2) took 1.14x
    # the time per step and was further from the answers after as many steps (thinking accuracy
    # 12% against 40% at step 400); measured, see the README. `preset` is any qwen3_jax preset
    # (mini-teacher / mini-student are the miniature's shapes); `overrides` change its fields (in a
    # config file: the command line can set only fields the config already has).
    c.teacher = ml_collections.ConfigDict({
        "preset": "mini-teacher",
        "overrides": ml_collections.ConfigDict(),
        "steps": 600,
        "batch_size": 16,
        "seq_len": 192,
        "learning_rate": 3e-3,
        "warmup_steps": 30,
    })
    c.student = ml_collections.ConfigDict({
        "preset": "mini-student",
        "overrides": ml_collections.ConfigDict(),
        "off_policy_steps": 500,  # distilled: SFT on the teacher's responses
        "on_policy_steps": 120,  # distilled: then logit distillation on its own samples
        "batch_size": 8,  # rows per update step, both students
        "learning_rate": 3e-3,
        "on_policy_learning_rate": 1e-3,
        "warmup_steps": 30,
    })
    c.distill = ml_collections.ConfigDict({
        "signal": "full", "beta": 1.0, "temperature": 1.0, "top_k": 64, "estimator_use": "reward",
        "think_fraction": 0.5,  # on-policy rollouts in thinking mode
        "thinking_budget": config_dict.placeholder(int),  # the student's, during rollouts
        "teacher_temperature": 0.0,  # off-policy responses (0: greedy)
        "keep_unfinished": False,  # train on teacher responses cut by eval.max_new_tokens too
        "rollout_temperature": 1.0,
    })
    c.eval = ml_collections.ConfigDict({"batch_size": 64, "max_new_tokens": 128, "curve_points": 4})
    c.train = ml_collections.ConfigDict({"ce_chunk_len": 64, "peak_flops": config_dict.placeholder(float)})
    return c


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe config."""

    config: ml_collections.ConfigDict
    teacher: Qwen3Config
    student: Qwen3Config
    levels: tuple[int, ...]
    budgets: tuple[int, ...]
    eval: eval_lib.EvalConfig


def _model(section: ml_collections.ConfigDict, vocab_size: int | None, dtype: str, who: str) -> Qwen3Config:
    overrides = dict(section.overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    try:
        return preset(section.preset, dtype=dtype, **overrides)
    except (ConfigError, TypeError) as e:
        raise TrainConfigError(f"{who}: {e}") from e


def validate(config: ml_collections.ConfigDict) -> Recipe:
    """Checks the recipe before anything runs; raises TrainConfigError naming the field."""
    tk = config.tokenizer
    need(tk.kind in ("sentencepiece", "qwen3"), f"tokenizer.kind must be 'sentencepiece' or 'qwen3', got {tk.kind!r}")
    vocab = tk.vocab_size if tk.kind == "sentencepiece" else None
    teacher = _model(config.teacher, vocab, config.dtype, "teacher")
    student = _model(config.student, vocab, config.dtype, "student")
    need(teacher.vocab_size == student.vocab_size,
         f"the teacher's vocab_size ({teacher.vocab_size}) and the student's ({student.vocab_size}) differ: "
         "logit distillation needs one vocabulary")
    t_total, s_total = count_params(teacher)[0], count_params(student)[0]
    need(s_total < t_total, f"the student ({s_total:,} parameters) is not smaller than the teacher ({t_total:,}): "
                            "strong-to-weak distillation goes from a larger model to a smaller one")
    levels = tuple(int(x) for x in config.task.levels)
    need(levels and all(1 <= d <= task_lib.MAX_DIFFICULTY for d in levels) and list(levels) == sorted(set(levels)),
         f"task.levels must be increasing difficulties in [1, {task_lib.MAX_DIFFICULTY}], got {levels}")
    budgets = tuple(int(b) for b in config.task.budgets)
    need(all(b >= 0 for b in budgets), f"task.budgets must be >= 0 (unlimited is always measured), got {budgets}")
    for name in ("sft_records", "prompts", "test_per_level", "validation_per_level"):
        need(config.task[name] >= 1, f"task.{name} must be >= 1, got {config.task[name]}")
    for name in ("steps", "batch_size", "seq_len"):
        need(config.teacher[name] >= 1, f"teacher.{name} must be >= 1, got {config.teacher[name]}")
    for name in ("off_policy_steps", "on_policy_steps", "batch_size"):
        need(config.student[name] >= 1, f"student.{name} must be >= 1, got {config.student[name]}")
    need(0 <= config.task.no_think_easy_share < 1,
         f"task.no_think_easy_share must be in [0, 1), got {config.task.no_think_easy_share}")
    need(config.eval.curve_points >= 1, f"eval.curve_points must be >= 1, got {config.eval.curve_points}")
    seq, chunk = config.teacher.seq_len, config.train.ce_chunk_len
    need(chunk >= 1 and seq % min(chunk, seq) == 0, f"train.ce_chunk_len={chunk} must divide teacher.seq_len={seq}")
    need(config.eval.max_new_tokens < seq,
         f"eval.max_new_tokens={config.eval.max_new_tokens} leaves no room for a prompt in teacher.seq_len={seq} "
         "(on-policy rows are prompt + completion)")
    mesh = train_lib.mesh_shape(config.mesh)
    for cfg in (teacher, student):
        train_lib.check_shardable(cfg, mesh)
    return Recipe(config, teacher, student, levels, budgets, eval_lib.EvalConfig(
        levels=levels, per_level=config.task.test_per_level, budgets=(*budgets, None),
        follow_conversations=config.task.follow_conversations, max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size, seed=config.seed))


# ------------------------------------------------------------------------- stage configs
# Each training stage is one of the library's own runs, configured from the recipe.


def _sft_config(r: Recipe, model: ml_collections.ConfigDict, w: "Workdir", *, steps: int, batch_size: int,
                seq_len: int, learning_rate: float, warmup: int, every: int) -> ml_collections.ConfigDict:
    c = train_lib.default_config()
    c.seed = r.config.seed
    c.model.preset = model.preset
    c.model.overrides = ml_collections.ConfigDict({**model.overrides.to_dict(), **_vocab(r, w)})
    c.model.dtype = r.config.dtype
    c.tokenizer = w.tokenizer
    c.mesh.update(r.config.mesh.to_dict())
    c.data.update(format="jsonl", kind="chat", paths=w.path("data", "sft.jsonl"), seq_len=seq_len,
                  batch_size=batch_size, packing="first_fit", num_threads=1, seed=r.config.seed)
    # Constant after warmup: in runs this short a decay cost accuracy (teacher at step 500: 35%
    # thinking accuracy at a constant rate, 28% decaying to half; measured).
    c.optimizer.update(learning_rate=learning_rate, warmup_steps=warmup, weight_decay=0.01, end_learning_rate_ratio=1.0)
    c.train.update(steps=steps, ce_chunk_len=r.config.train.ce_chunk_len, log_every=max(1, steps // 10),
                   peak_flops=r.config.train.peak_flops)
    c.checkpoint.update(every=every, keep=10_000)
    return c


def _vocab(r: Recipe, w: "Workdir") -> dict[str, int]:
    """Model fields a task-trained tokenizer sets: its size, and Qwen's bos / eos tokens at its ids
    (the presets carry the Qwen vocabulary's, which an exported config.json would otherwise name)."""
    if r.config.tokenizer.kind != "sentencepiece":
        return {}
    tokenizer = Tokenizer.from_sentencepiece(w.tokenizer)
    return {"vocab_size": r.teacher.vocab_size, "bos_token_id": tokenizer.token_to_id("<|endoftext|>"),
            "eos_token_id": tokenizer.token_to_id("<|im_end|>")}


def student_seq_len(r: Recipe) -> int:
    """Rows of both students: the on-policy rows (prompt + completion), so equal steps are equal tokens."""
    return r.config.teacher.seq_len


def teacher_config(r: Recipe, w: "Workdir") -> ml_collections.ConfigDict:
    t = r.config.teacher
    return _sft_config(r, t, w, steps=t.steps, batch_size=t.batch_size, seq_len=t.seq_len,
                       learning_rate=t.learning_rate, warmup=t.warmup_steps, every=t.steps)


def direct_config(r: Recipe, w: "Workdir") -> ml_collections.ConfigDict:
    s = r.config.student
    steps = s.off_policy_steps + s.on_policy_steps
    return _sft_config(r, s, w, steps=steps, batch_size=s.batch_size, seq_len=student_seq_len(r),
                       learning_rate=s.learning_rate, warmup=s.warmup_steps,
                       every=max(1, steps // r.config.eval.curve_points))


def distill_config(r: Recipe, w: "Workdir") -> ml_collections.ConfigDict:
    s, d = r.config.student, r.config.distill
    c = distill_lib.default_config()
    c.seed = r.config.seed
    c.model.preset = s.preset
    c.model.overrides = ml_collections.ConfigDict({**s.overrides.to_dict(), **_vocab(r, w)})
    c.model.dtype = r.config.dtype
    c.tokenizer = w.tokenizer
    c.mesh.update(r.config.mesh.to_dict())
    c.teacher.init_from = w.path("teacher")
    c.teacher.dtype = r.config.dtype
    c.prompts.update(paths=w.path("data", "prompts.jsonl"), batch_size=s.batch_size, seed=r.config.seed)
    max_prompt = r.config.teacher.seq_len - r.config.eval.max_new_tokens
    c.rollout.update(max_prompt_len=max_prompt, max_new_tokens=r.config.eval.max_new_tokens,
                     think_fraction=d.think_fraction, thinking_budget=d.thinking_budget,
                     temperature=d.rollout_temperature, top_k=0, top_p=1.0)
    c.distill.update(signal=d.signal, beta=d.beta, temperature=d.temperature, top_k=d.top_k,
                     estimator_use=d.estimator_use)
    # Both phases keep a constant rate like the teacher and direct runs; phase 1 also takes direct's
    # warmup, so distilled and direct differ only in their data until phase 2.
    c.optimizer.update(learning_rate=s.on_policy_learning_rate, warmup_steps=0, weight_decay=0.01,
                       end_learning_rate_ratio=1.0)
    c.off_policy.update(steps=s.off_policy_steps, modes="both", temperature=d.teacher_temperature,
                        keep_unfinished=d.keep_unfinished,
                        max_new_tokens=r.config.eval.max_new_tokens, seq_len=student_seq_len(r),
                        batch_size=s.batch_size, learning_rate=s.learning_rate, warmup_steps=s.warmup_steps)
    c.train.update(steps=s.on_policy_steps, ce_chunk_len=r.config.train.ce_chunk_len,
                   log_every=max(1, s.on_policy_steps // 10), peak_flops=r.config.train.peak_flops)
    every = max(1, (s.off_policy_steps + s.on_policy_steps) // r.config.eval.curve_points)
    c.checkpoint.update(every=every, keep=10_000)
    return c


# ------------------------------------------------------------------------------------ workdir


class Workdir:
    """WORKDIR's layout, the recipe it belongs to, and the stages it has finished."""

    def __init__(self, root: str, recipe: Recipe):
        self.root = os.path.abspath(root)
        need(not os.path.exists(self.root) or os.path.isdir(self.root), f"--workdir {self.root} is a file, not a directory")
        os.makedirs(self.root, exist_ok=True)
        self._claim(recipe.config)
        self.tokenizer = "qwen3" if recipe.config.tokenizer.kind == "qwen3" else self.path("tokenizer", "spm.model")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _claim(self, config: ml_collections.ConfigDict) -> None:
        """Records the config in a fresh workdir; refuses one that holds another recipe's run."""
        mine = json.loads(config.to_json_best_effort())
        path = self.path(RECIPE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                theirs = json.load(f)
            diff = sorted(_differences(theirs, mine))
            need(not diff, f"{self.root} holds another recipe's run (fields that differ: {', '.join(diff)}); use "
                           "another --workdir, or the config it was started with")
        else:
            with open(path, "w") as f:
                json.dump(mine, f, indent=2)
        if not os.path.exists(self.path(STAGES_FILE)):
            self._write_stages({})

    def stages(self) -> dict[str, dict[str, Any]]:
        with open(self.path(STAGES_FILE)) as f:
            return json.load(f)

    def _write_stages(self, stages: dict[str, Any]) -> None:
        tmp = self.path(STAGES_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(stages, f, indent=2)
        os.replace(tmp, self.path(STAGES_FILE))  # atomic: a kill never leaves a torn record

    def finish(self, stage: str, seconds: float, result: dict[str, Any]) -> None:
        stages = self.stages()
        stages[stage] = {"seconds": seconds, **result}
        self._write_stages(stages)


def _differences(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


# ------------------------------------------------------------------------------------- stages


def stage_data(r: Recipe, w: Workdir) -> dict[str, Any]:
    t = r.config.task
    os.makedirs(w.path("data"), exist_ok=True)
    by_level = {d: task_lib.problems("train", d, len(task_lib.STARTS), r.config.seed) for d in r.levels}
    train = [p for d in r.levels for p in by_level[d]]
    # Non-thinking replies: the easiest level gets `no_think_easy_share` of them, the rest share the rest.
    easy, rest = by_level[r.levels[0]], [p for d in r.levels[1:] for p in by_level[d]]
    n_easy = round(t.no_think_easy_share * len(rest) / (1 - t.no_think_easy_share)) if rest else len(easy)
    no_think_train = [easy[i % len(easy)] for i in range(n_easy)] + rest
    rng = np.random.default_rng([r.config.seed, 1])
    mix = task_lib.FusionMix(no_flag=t.no_flag, system_flag=t.system_flag, multi_turn=t.multi_turn)
    records = list(task_lib.fusion_records(rng, train, t.sft_records, mix, no_think_train))
    _write_jsonl(w.path("data", "sft.jsonl"), records)
    prompts = [train[i] for i in rng.integers(len(train), size=t.prompts)]
    _write_jsonl(w.path("data", "prompts.jsonl"),
                 [{"messages": [{"role": "user", "content": p.question}], "answer": p.answer} for p in prompts])
    with open(w.path("data", "corpus.txt"), "w") as f:
        # One rendered chat per line (sentencepiece trains on lines), plus the texts the budget and
        # the switches add, so the tokenizer spells them compactly.
        for rec in records[: r.config.tokenizer.corpus_records]:
            f.write(render(rec["messages"]).replace("\n", " ") + "\n")
        f.write((STOP_THINKING_TEXT.replace("\n", " ") + " /think /no_think\n") * 20)
    modes = [rec["mode"] for rec in records]
    return {"train_problems": len(train), "sft_records": len(records), "think_share": modes.count("think") / len(modes),
            "prompts": len(prompts)}


def stage_tokenizer(r: Recipe, w: Workdir) -> dict[str, Any]:
    if r.config.tokenizer.kind == "qwen3":
        tokenizer = Tokenizer.qwen3()
    else:
        os.makedirs(w.path("tokenizer"), exist_ok=True)
        train_sentencepiece([w.path("data", "corpus.txt")], w.path("tokenizer", "spm"), r.config.tokenizer.vocab_size)
        tokenizer = Tokenizer.from_sentencepiece(w.tokenizer)
    # Every SFT record must fit a row whole (the loader never cuts one): say so now, naming the
    # longest, rather than when a training stage meets it.
    longest = max((len(tokenizer.encode(render(rec["messages"]))), i + 1)
                  for i, rec in enumerate(_read_jsonl(w.path("data", "sft.jsonl"))))
    need(longest[0] <= r.config.teacher.seq_len,
         f"record {longest[1]} of {w.path('data', 'sft.jsonl')} has {longest[0]} tokens with this tokenizer, more "
         f"than teacher.seq_len={r.config.teacher.seq_len} (the rows of every training stage): raise it")
    sample = task_lib.problems("test", r.levels[-1], 1, r.config.seed)[0]
    return {"vocab_size": tokenizer.vocab_size, "stop_thinking_tokens": len(tokenizer.stop_thinking_ids),
            "longest_sft_record_tokens": longest[0],
            "hardest_thinking_reply_tokens": len(tokenizer.encode(sample.trace + "\n" + sample.final))}


def stage_teacher(r: Recipe, w: Workdir) -> dict[str, Any]:
    return train_lib.run(teacher_config(r, w), w.path("teacher"))


def _evaluate(r: Recipe, w: Workdir, path: str, name: str) -> dict[str, Any]:
    model = load_any(path)
    tokenizer = Tokenizer.from_checkpoint(path)
    result = eval_lib.evaluate(model, tokenizer, r.eval, progress=sys.stderr.isatty())
    if model.cfg.is_moe:
        result["expert_load"] = eval_lib.expert_load(model, tokenizer, r.eval).tolist()
    os.makedirs(w.path("eval"), exist_ok=True)
    with open(w.path("eval", f"{name}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return {"accuracy_think": result["accuracy"]["think"]["all"],
            "accuracy_no_think": result["accuracy"]["no_think"]["all"], "think_follow": result["think_follow"]}


def stage_teacher_eval(r: Recipe, w: Workdir) -> dict[str, Any]:
    return _evaluate(r, w, w.path("teacher"), "teacher")


def stage_distilled(r: Recipe, w: Workdir) -> dict[str, Any]:
    return distill_lib.run(distill_config(r, w), w.path("student_distilled"))


def stage_direct(r: Recipe, w: Workdir) -> dict[str, Any]:
    return train_lib.run(direct_config(r, w), w.path("student_direct"))


def curve_checkpoints(w: Workdir, name: str) -> list[tuple[int, str, int]]:
    """(update step, checkpoint dir, step in that dir) of a student's saved steps, in order; the
    distilled student's on-policy steps continue its off-policy ones."""
    if name == "direct":
        root = w.path("student_direct", "checkpoints")
        return [(s, w.path("student_direct"), s) for s in trainer_steps(root)]
    off = trainer_steps(w.path("student_distilled", "off_policy", "checkpoints"))
    on = trainer_steps(w.path("student_distilled", "checkpoints"))
    last_off = max(off)
    return ([(s, w.path("student_distilled", "off_policy"), s) for s in off]
            + [(last_off + s, w.path("student_distilled"), s) for s in on])


def stage_student_eval(r: Recipe, w: Workdir) -> dict[str, Any]:
    out = {"off_policy": _evaluate(r, w, w.path("student_distilled", "off_policy"), "student_off_policy")}
    for name in ("distilled", "direct"):
        out[name] = _evaluate(r, w, w.path(f"student_{name}"), f"student_{name}")
    curves: dict[str, list[dict[str, Any]]] = {}
    curve_cfg = dataclasses.replace(r.eval, per_level=r.config.task.validation_per_level)
    tokenizer = Tokenizer.from_checkpoint(w.path("student_direct"))
    for name in ("distilled", "direct"):
        curves[name] = []
        for update, path, step in curve_checkpoints(w, name):
            acc = eval_lib.evaluate(load_any(path, step=step), tokenizer, curve_cfg, split="validation",
                                    follow=False, budgets=False)["accuracy"]
            curves[name].append({"step": update, "think": acc["think"]["all"], "no_think": acc["no_think"]["all"]})
    with open(w.path("eval", "curves.json"), "w") as f:
        json.dump(curves, f, indent=2)
    return {f"{name}_{k}": v for name, result in out.items() for k, v in result.items()}


def stage_report(r: Recipe, w: Workdir) -> dict[str, Any]:
    from train import report as report_lib

    for name, path in (("teacher", "teacher"), ("student_distilled", "student_distilled"),
                       ("student_direct", "student_direct")):
        out = w.path("export", name)
        if not os.path.exists(os.path.join(out, "config.json")):
            to_hf(load_any(w.path(path)), out)
            Tokenizer.from_checkpoint(w.path(path)).save(out)
    return report_lib.write(r, w)


STAGE_FNS: dict[str, Callable[[Recipe, Workdir], dict[str, Any]]] = {
    "data": stage_data, "tokenizer": stage_tokenizer, "teacher": stage_teacher, "teacher_eval": stage_teacher_eval,
    "distilled": stage_distilled, "direct": stage_direct, "student_eval": stage_student_eval, "report": stage_report,
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
    """Runs the stages WORKDIR has not finished; returns every stage's record."""
    recipe = validate(config)
    w = Workdir(workdir, recipe)
    for i, stage in enumerate(STAGES, 1):
        if stage in w.stages():
            print(f"[{i}/{len(STAGES)}] {stage}: done already ({w.stages()[stage]['seconds']:.0f} s)", flush=True)
            continue
        print(f"[{i}/{len(STAGES)}] {stage} ...", flush=True)
        start = time.perf_counter()
        result = STAGE_FNS[stage](recipe, w)
        w.finish(stage, time.perf_counter() - start, {k: v for k, v in result.items() if _is_scalar(v)})
        print(f"[{i}/{len(STAGES)}] {stage}: {time.perf_counter() - start:.0f} s", flush=True)
    return w.stages()


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- main

USER_ERRORS = distill_lib.USER_ERRORS


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    stages = train_lib.run_command(run, argv, USER_ERRORS)
    total = sum(s["seconds"] for s in stages.values())
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min (all stages: {total / 60:.1f} min): "
          f"{os.path.join(os.path.abspath(flags.FLAGS.workdir), 'report.md')}")


if __name__ == "__main__":
    train_lib.define_command_flags("Recipe config file (configs/miniature.py).", "Where every stage writes; rerunning resumes.")
    app.run(main)
