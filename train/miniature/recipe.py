"""Qwen3's post-training recipe in miniature: a hybrid-thinking teacher distilled into a smaller student.

    python -m train.miniature --config configs/miniature.py --workdir runs/miniature [--config.<field>=<value>]

Stages (`STAGES`): data, tokenizer, teacher, teacher_eval, distilled (off-policy then on-policy),
rl (GRPO on the task's verifier from the same off-policy student, as many update steps and rollout
rows as on-policy distillation), direct (the same student on the ground truth, as many update steps
as the distilled one), student_eval, report. Each finished stage is recorded in WORKDIR/stages.json:
a rerun resumes at the first unfinished one.
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

from qwen3_jax.checkpoint import load_any
from qwen3_jax.chat import render
from qwen3_jax.config import Qwen3Config, preset
from qwen3_jax.errors import ConfigError
from qwen3_jax.hf import to_hf
from qwen3_jax.ids import STOP_THINKING_TEXT
from qwen3_jax.layout import trainer_steps
from qwen3_jax.model import count_params
from qwen3_jax.tokenizer import Tokenizer
from train import train as train_lib
from train.config import (
    CheckpointConfig, MeshConfig, ModelConfig, OptimizerConfig, StepConfig, TrainConfig, check_shardable, resolve_mesh,
)
from train.data.config import DataConfig, PromptConfig
from train.distill import run as distill_lib
from train.distill.config import DistillConfig, OffPolicyConfig, check_sampled_signal
from train.distill.config import TeacherConfig as DistillTeacherConfig
from train.distill.divergence import DistillLoss
from train.rl import run as run_rl
from train.rl.config import RLConfig, RLLoss
from train.rollout import RolloutConfig
from train.miniature import evaluate as eval_lib
from train.miniature import report as report_lib
from train.miniature import task as task_lib
from train.miniature.spm import train_sentencepiece
from train.schema import config_dict, from_config_dict, need

# The miniature's own model shapes, as overrides of the `tiny-dense` preset. head_dim 64 and RoPE
# base 10,000 let the copy heads the task needs form within its few hundred steps.
SHAPES: dict[str, dict[str, Any]] = {
    "mini-teacher": dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                         head_dim=64, rope_theta=10_000.0),
    "mini-student": dict(hidden_size=96, intermediate_size=256, num_layers=3, num_heads=2, num_kv_heads=1,
                         head_dim=64, rope_theta=10_000.0),
}


def model_preset(name: str, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(library preset, its overrides) of a model section: a miniature shape or any qwen3_jax preset."""
    if name in SHAPES:
        return "tiny-dense", {**SHAPES[name], **overrides}
    return name, dict(overrides)


STAGES = ("data", "tokenizer", "teacher", "teacher_eval", "distilled", "rl", "direct", "student_eval", "report")
RECIPE_FILE, STAGES_FILE = "recipe.json", "stages.json"


# ------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    levels: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # difficulty = steps of the sequence asked for
    sft_records: int = 16000  # fusion records drawn from the train split's problems
    prompts: int = 1000  # distillation prompts (train split)
    no_think_easy_share: float = 0.5  # non-thinking samples on the easiest level (one-step answers need data)
    validation_per_level: int = 20  # learning curves (20 starting pairs per split)
    test_per_level: int = 20
    follow_conversations: int = 200  # flag obedience
    budgets: tuple[int, ...] = (0, 4, 8, 16, 32, 64)  # thinking budgets (tokens); unlimited is always measured
    no_flag: float = 0.3  # fusion mix: user messages without a flag
    system_flag: float = 0.2  # ... conversations whose system message carries a flag
    multi_turn: float = 0.3  # ... conversations with an earlier turn
    # ... single-turn thinking replies cut by Qwen's stop-thinking text, then answered: without them a
    # spent budget's forced text is followed by more trace, not an answer (README).
    stop_thinking: float = 0.3
    split_by: str = "start"  # what the test split holds out: 'start' pairs or 'question's (task.SPLIT_UNITS)

    def __post_init__(self):
        levels = self.levels
        need(levels and all(1 <= d <= task_lib.MAX_DIFFICULTY for d in levels) and list(levels) == sorted(set(levels)),
             f"task.levels must be increasing difficulties in [1, {task_lib.MAX_DIFFICULTY}], got {levels}")
        need(all(b >= 0 for b in self.budgets),
             f"task.budgets must be >= 0 (unlimited is always measured), got {self.budgets}")
        for name in ("sft_records", "prompts", "test_per_level", "validation_per_level"):
            need(getattr(self, name) >= 1, f"task.{name} must be >= 1, got {getattr(self, name)}")
        need(self.split_by in task_lib.SPLIT_UNITS,
             f"task.split_by must be one of {task_lib.SPLIT_UNITS}, got {self.split_by!r}")
        for name in ("no_flag", "system_flag", "multi_turn", "stop_thinking"):
            need(0 <= getattr(self, name) <= 1, f"task.{name} must be in [0, 1], got {getattr(self, name)}")
        need(0 <= self.no_think_easy_share < 1,
             f"task.no_think_easy_share must be in [0, 1), got {self.no_think_easy_share}")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "sentencepiece"  # trained on the task, or 'qwen3' (real presets)
    vocab_size: int = 512
    corpus_records: int = 3000

    def __post_init__(self):
        need(self.kind in ("sentencepiece", "qwen3"),
             f"tokenizer.kind must be 'sentencepiece' or 'qwen3', got {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Dense by default (the README says why). `preset` is a `SHAPES` name or any qwen3_jax preset;
    `overrides` change its fields (in a config file: the command line sets only existing fields)."""

    preset: str = "mini-teacher"
    overrides: dict = dataclasses.field(default_factory=dict)
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 192
    learning_rate: float = 3e-3
    warmup_steps: int = 30

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            need(getattr(self, name) >= 1, f"teacher.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    preset: str = "mini-student"
    overrides: dict = dataclasses.field(default_factory=dict)
    off_policy_steps: int = 500  # distilled: SFT on the teacher's responses
    on_policy_steps: int = 120  # distilled: then logit distillation on its own samples
    batch_size: int = 8  # rows per update step, both students
    learning_rate: float = 3e-3
    # A fresh Adam at 1e-3 without warmup undid part of off-policy (README: 47.5% against 66.7% at 3e-4).
    on_policy_learning_rate: float = 3e-4
    warmup_steps: int = 30
    seed: int | None = None  # the student stages' (init, data order, rollouts); None: the recipe's seed

    def __post_init__(self):
        for name in ("off_policy_steps", "on_policy_steps", "batch_size"):
            need(getattr(self, name) >= 1, f"student.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class RecipeDistillConfig(DistillLoss):
    """The distilled stage: its loss (the fields of `train.distill`'s `distill` section) and rollouts."""

    think_fraction: float = 0.5  # on-policy rollouts in thinking mode
    thinking_budget: int | None = None  # the student's, during rollouts
    teacher_temperature: float = 0.0  # off-policy responses (0: greedy)
    keep_unfinished: bool = False  # train on teacher responses cut by eval.max_new_tokens too
    rollout_temperature: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        try:  # checked here, before the stages before the distilled one run
            check_sampled_signal(self.loss, self.rollout(max_prompt_len=1, max_new_tokens=1))
        except ConfigError as e:
            raise ConfigError(f"distill (rollout.temperature is distill.rollout_temperature here): {e}") from None

    @property
    def loss(self) -> DistillLoss:
        return DistillLoss(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DistillLoss)})

    def rollout(self, *, max_prompt_len: int, max_new_tokens: int) -> RolloutConfig:
        """The student's rollouts: softmax at rollout_temperature over the whole vocabulary."""
        return RolloutConfig(max_prompt_len=max_prompt_len, max_new_tokens=max_new_tokens,
                             think_fraction=self.think_fraction, thinking_budget=self.thinking_budget,
                             temperature=self.rollout_temperature, top_k=0, top_p=1.0)


@dataclasses.dataclass(frozen=True)
class RecipeRLConfig(RLLoss):
    """The rl stage: its loss (the fields of `train.rl`'s `rl` section; DAPO / Dr. GRPO defaults) and
    group size. Its steps, rows, learning rate and rollouts are on-policy distillation's."""

    samples: int = 8  # K completions per prompt; prompts per step = student.batch_size / K
    # Rollouts in thinking mode (None: distill.think_fraction). 1.0 as the report's reasoning RL
    # (§4.2): the verifier scores answers only, so a /no_think rollout that thinks is rewarded, and
    # with distillation's mix RL taught /no_think replies to think (README).
    think_fraction: float | None = 1.0

    def __post_init__(self):
        super().__post_init__()
        need(self.samples >= 2, f"rl.samples (the group size K) must be >= 2, got {self.samples}")
        need(self.think_fraction is None or 0 <= self.think_fraction <= 1,
             f"rl.think_fraction must be in [0, 1] or unset, got {self.think_fraction}")

    @property
    def loss(self) -> RLLoss:
        return RLLoss(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RLLoss)})


@dataclasses.dataclass(frozen=True)
class EvalSection:
    batch_size: int = 64
    max_new_tokens: int = 128
    curve_points: int = 4
    samples: int = 8  # sampled replies per test problem and mode: pass@1 and pass@samples

    def __post_init__(self):
        need(self.curve_points >= 1, f"eval.curve_points must be >= 1, got {self.curve_points}")
        need(self.samples >= 1, f"eval.samples must be >= 1 (pass@1 needs one), got {self.samples}")


@dataclasses.dataclass(frozen=True)
class RecipeTrainConfig:
    ce_chunk_len: int = 64
    peak_flops: float | None = None


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The miniature recipe (`configs/miniature.py`); the stages' train and distill jobs are composed from it."""

    seed: int = 0
    dtype: str = "float32"  # compute dtype of every model: float32 on CPU, bfloat16 on TPU / GPU
    mesh: MeshConfig = MeshConfig()
    task: TaskConfig = TaskConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    distill: RecipeDistillConfig = RecipeDistillConfig()
    rl: RecipeRLConfig = RecipeRLConfig()
    eval: EvalSection = EvalSection()
    train: RecipeTrainConfig = RecipeTrainConfig()

    def __post_init__(self):
        seq, chunk = self.teacher.seq_len, self.train.ce_chunk_len
        need(chunk >= 1 and seq % min(chunk, seq) == 0, f"train.ce_chunk_len={chunk} must divide teacher.seq_len={seq}")
        need(self.eval.max_new_tokens < seq,
             f"eval.max_new_tokens={self.eval.max_new_tokens} leaves no room for a prompt in teacher.seq_len={seq} "
             "(on-policy rows are prompt + completion)")
        need(self.student.batch_size % self.rl.samples == 0,
             f"student.batch_size={self.student.batch_size} must be a multiple of rl.samples={self.rl.samples}: the rl "
             "stage samples as many rows per step as on-policy distillation, in groups of rl.samples")


def default_config() -> ml_collections.ConfigDict:
    """Every field of a recipe config, at the miniature's values (see configs/miniature.py)."""
    return config_dict(RecipeConfig)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe config and what is derived from it."""

    config: RecipeConfig
    teacher: Qwen3Config
    student: Qwen3Config
    levels: tuple[int, ...]
    budgets: tuple[int, ...]
    eval: eval_lib.EvalConfig


def _model(section: TeacherConfig | StudentConfig, vocab_size: int | None, dtype: str, who: str) -> Qwen3Config:
    name, overrides = model_preset(section.preset, section.overrides)
    if vocab_size is not None:
        overrides["vocab_size"] = vocab_size
    try:
        return preset(name, dtype=dtype, **overrides)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{who}: {e}") from e


def validate(cd: RecipeConfig | ml_collections.ConfigDict) -> Recipe:
    """The recipe checked before anything runs; raises ConfigError naming the field."""
    config = cd if isinstance(cd, RecipeConfig) else from_config_dict(RecipeConfig, cd)
    vocab = config.tokenizer.vocab_size if config.tokenizer.kind == "sentencepiece" else None
    teacher = _model(config.teacher, vocab, config.dtype, "teacher")
    student = _model(config.student, vocab, config.dtype, "student")
    need(teacher.vocab_size == student.vocab_size,
         f"the teacher's vocab_size ({teacher.vocab_size}) and the student's ({student.vocab_size}) differ: "
         "logit distillation needs one vocabulary")
    t_total, s_total = count_params(teacher)[0], count_params(student)[0]
    need(s_total < t_total, f"the student ({s_total:,} parameters) is not smaller than the teacher ({t_total:,}): "
                            "strong-to-weak distillation goes from a larger model to a smaller one")
    mesh = resolve_mesh(config.mesh, None)
    for cfg in (teacher, student):
        check_shardable(cfg, mesh)
    levels, budgets = config.task.levels, config.task.budgets
    return Recipe(config, teacher, student, levels, budgets, eval_lib.EvalConfig(
        levels=levels, per_level=config.task.test_per_level, budgets=(*budgets, None),
        follow_conversations=config.task.follow_conversations, max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size, seed=config.seed, split_by=config.task.split_by,
        samples=config.eval.samples))


# ------------------------------------------------------------------------- stage configs
# Each training stage is one of the library's own jobs, composed from the recipe.


def _model_section(r: Recipe, w: "Workdir", model: TeacherConfig | StudentConfig) -> ModelConfig:
    name, overrides = model_preset(model.preset, model.overrides)
    return ModelConfig(preset=name, overrides={**overrides, **_vocab(r, w)}, dtype=r.config.dtype)


def seed_of(r: Recipe, model: TeacherConfig | StudentConfig) -> int:
    """The seed of a model's stages: a student's own when set, else the recipe's."""
    own = getattr(model, "seed", None)
    return r.config.seed if own is None else own


def _job_sections(r: Recipe, w: "Workdir", model: TeacherConfig | StudentConfig, *, steps: int, learning_rate: float,
                  warmup: int, every: int) -> dict[str, Any]:
    """The sections the recipe's train and distill jobs share. Constant learning rate after warmup:
    in runs this short a decay cost accuracy (README)."""
    return dict(
        seed=seed_of(r, model), tokenizer=w.tokenizer, model=_model_section(r, w, model), mesh=r.config.mesh,
        optimizer=OptimizerConfig(learning_rate=learning_rate, warmup_steps=warmup, weight_decay=0.01,
                                  end_learning_rate_ratio=1.0),
        train=StepConfig(steps=steps, ce_chunk_len=r.config.train.ce_chunk_len, log_every=max(1, steps // 10),
                         peak_flops=r.config.train.peak_flops),
        checkpoint=CheckpointConfig(every=every, keep=10_000))


def _sft_config(r: Recipe, w: "Workdir", model: TeacherConfig | StudentConfig, *, steps: int, batch_size: int,
                seq_len: int, learning_rate: float, warmup: int, every: int) -> TrainConfig:
    data = DataConfig(format="jsonl", kind="chat", paths=w.path("data", "sft.jsonl"), seq_len=seq_len,
                      batch_size=batch_size, packing="first_fit", num_threads=1, seed=seed_of(r, model))
    return TrainConfig(**_job_sections(r, w, model, steps=steps, learning_rate=learning_rate, warmup=warmup,
                                       every=every), data=data)


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


def teacher_config(r: Recipe, w: "Workdir") -> TrainConfig:
    t = r.config.teacher
    return _sft_config(r, w, t, steps=t.steps, batch_size=t.batch_size, seq_len=t.seq_len,
                       learning_rate=t.learning_rate, warmup=t.warmup_steps, every=t.steps)


def direct_config(r: Recipe, w: "Workdir") -> TrainConfig:
    s = r.config.student
    steps = s.off_policy_steps + s.on_policy_steps
    return _sft_config(r, w, s, steps=steps, batch_size=s.batch_size, seq_len=student_seq_len(r),
                       learning_rate=s.learning_rate, warmup=s.warmup_steps,
                       every=max(1, steps // r.config.eval.curve_points))


def distill_config(r: Recipe, w: "Workdir") -> DistillConfig:
    s, d, e = r.config.student, r.config.distill, r.config.eval
    # Both phases keep a constant rate like the teacher and direct runs; phase 1 also takes direct's
    # warmup, so distilled and direct differ only in their data until phase 2.
    sections = _job_sections(r, w, s, steps=s.on_policy_steps, learning_rate=s.on_policy_learning_rate, warmup=0,
                             every=max(1, (s.off_policy_steps + s.on_policy_steps) // e.curve_points))
    return DistillConfig(
        **sections,
        teacher=DistillTeacherConfig(init_from=w.path("teacher"), dtype=r.config.dtype),
        prompts=PromptConfig(paths=w.path("data", "prompts.jsonl"), batch_size=s.batch_size, seed=seed_of(r, s)),
        rollout=d.rollout(max_prompt_len=r.config.teacher.seq_len - e.max_new_tokens, max_new_tokens=e.max_new_tokens),
        distill=d.loss,
        off_policy=OffPolicyConfig(steps=s.off_policy_steps, modes="both", temperature=d.teacher_temperature,
                                   keep_unfinished=d.keep_unfinished, max_new_tokens=e.max_new_tokens,
                                   seq_len=student_seq_len(r), batch_size=s.batch_size, learning_rate=s.learning_rate,
                                   warmup_steps=s.warmup_steps))


def rl_config(r: Recipe, w: "Workdir") -> RLConfig:
    """GRPO from the off-policy student with on-policy distillation's steps, rows, learning rate and
    rollouts (softmax at distill.rollout_temperature over the whole vocabulary, the same mode mix)."""
    s, d, e = r.config.student, r.config.distill, r.config.eval
    sections = _job_sections(r, w, s, steps=s.on_policy_steps, learning_rate=s.on_policy_learning_rate, warmup=0,
                             every=max(1, (s.off_policy_steps + s.on_policy_steps) // e.curve_points))
    sections["model"] = dataclasses.replace(sections["model"], preset=None,
                                            init_from=w.path("student_distilled", "off_policy"))
    rollout = RolloutConfig(
        max_prompt_len=r.config.teacher.seq_len - e.max_new_tokens, max_new_tokens=e.max_new_tokens,
        think_fraction=d.think_fraction if r.config.rl.think_fraction is None else r.config.rl.think_fraction,
        thinking_budget=d.thinking_budget, temperature=d.rollout_temperature, top_k=0, top_p=1.0, min_p=0.0)
    return RLConfig(**sections, rollout=rollout, rl=r.config.rl.loss, samples=r.config.rl.samples,
                    reward="train.rl.rewards:miniature_answer",
                    prompts=PromptConfig(paths=w.path("data", "prompts.jsonl"),
                                         batch_size=s.batch_size // r.config.rl.samples, seed=seed_of(r, s)))


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

    def _claim(self, config: RecipeConfig) -> None:
        """Records the config in a fresh workdir; refuses one that holds another recipe's run."""
        mine = json.loads(config_dict(config).to_json_best_effort())
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
    by_level = {d: task_lib.problems("train", d, len(task_lib.STARTS), r.config.seed, t.split_by) for d in r.levels}
    train = [p for d in r.levels for p in by_level[d]]
    # Non-thinking replies: the easiest level gets `no_think_easy_share` of them, the rest share the rest.
    easy, rest = by_level[r.levels[0]], [p for d in r.levels[1:] for p in by_level[d]]
    n_easy = round(t.no_think_easy_share * len(rest) / (1 - t.no_think_easy_share)) if rest else len(easy)
    no_think_train = [easy[i % len(easy)] for i in range(n_easy)] + rest
    rng = np.random.default_rng([r.config.seed, 1])
    mix = task_lib.FusionMix(no_flag=t.no_flag, system_flag=t.system_flag, multi_turn=t.multi_turn,
                             stop_thinking=t.stop_thinking)
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
    return {"train_problems": len(train), "sft_records": len(records),
            "think_share": (len(modes) - modes.count("no_think")) / len(modes),
            "stop_thinking_share": modes.count("stop_thinking") / len(modes),
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
    sample = task_lib.problems("test", r.levels[-1], 1, r.config.seed, r.config.task.split_by)[0]
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


def stage_rl(r: Recipe, w: Workdir) -> dict[str, Any]:
    return run_rl(rl_config(r, w), w.path("student_rl"))


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
    for name in ("distilled", "rl", "direct"):
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
    for name, path in (("teacher", "teacher"), ("student_distilled", "student_distilled"),
                       ("student_direct", "student_direct")):
        out = w.path("export", name)
        if not os.path.exists(os.path.join(out, "config.json")):
            to_hf(load_any(w.path(path)), out)
            Tokenizer.from_checkpoint(w.path(path)).save(out)
    return report_lib.write(r, w)


STAGE_FNS: dict[str, Callable[[Recipe, Workdir], dict[str, Any]]] = {
    "data": stage_data, "tokenizer": stage_tokenizer, "teacher": stage_teacher, "teacher_eval": stage_teacher_eval,
    "distilled": stage_distilled, "rl": stage_rl, "direct": stage_direct, "student_eval": stage_student_eval, "report": stage_report,
}


def run(config: RecipeConfig | ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
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
