"""The main job's student stages over several seeds from one teacher: mean and spread of every accuracy it quotes.

    python -m benchmarks.miniature_seeds --teacher_workdir runs/miniature --workdir runs/seeds [--seeds 0,1,2] [--smoke]

`--teacher_workdir` is a main-job workdir whose teacher stages are done (data, tokenizer, teacher,
teacher_eval). For each seed, WORKDIR/seed_<s> reruns every stage after them (distilled, rl,
direct, student_eval, report) with `student.seed=s` (the students' initialisation, data order and
rollouts) against that teacher, its data and its tokenizer (linked, not copied). A seed equal to the
teacher workdir's own student seed reuses its finished students. Prints, for each figure, the mean,
standard deviation (n - 1), min, max and the per-seed values; XLA:CPU rounding differs across CPUs,
so the spread is per machine. `--smoke`: a tiny recipe built from scratch in a temporary directory,
seeds 0 (its own students) and 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from benchmarks.common import parse_args, recording
from train.miniature import recipe
from train.miniature.report import MODELS
from train.schema import config_dict, from_config_dict

TEACHER_STAGES = ("data", "tokenizer", "teacher", "teacher_eval")
LINKED = ("data", "tokenizer", "teacher")


def smoke_config():
    """A recipe that runs every stage in seconds (nothing learnt)."""
    c = recipe.default_config()
    c.task.update(levels=(1, 2), sft_records=100, prompts=8, test_per_level=2, validation_per_level=2,
                  follow_conversations=4, budgets=(0,))
    c.tokenizer.update(vocab_size=320, corpus_records=100)
    c.teacher.overrides.update(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                               intermediate_size=64)
    c.teacher.update(steps=2, batch_size=4, seq_len=320, warmup_steps=1)
    c.student.overrides.update(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                               intermediate_size=32)
    c.student.update(off_policy_steps=2, on_policy_steps=2, batch_size=4, warmup_steps=1)
    c.rl.update(samples=2)
    c.eval.update(batch_size=8, max_new_tokens=32, curve_points=1, samples=2)
    c.distill.keep_unfinished = True
    c.train.update(ce_chunk_len=32, peak_flops=1e10)
    return c


def seed_workdir(teacher_workdir: str, workdir: str, seed: int) -> tuple[recipe.RecipeConfig, str]:
    """(config, workdir) of `seed`'s students: the teacher workdir's config with student.seed=`seed`,
    and its teacher stages linked into a fresh workdir (or the teacher workdir itself when its own
    students are that seed's)."""
    with open(os.path.join(teacher_workdir, recipe.RECIPE_FILE)) as f:
        base = from_config_dict(recipe.RecipeConfig, json.load(f))
    own = base.seed if base.student.seed is None else base.student.seed
    with open(os.path.join(teacher_workdir, recipe.STAGES_FILE)) as f:
        stages = json.load(f)
    missing = [s for s in TEACHER_STAGES if s not in stages]
    if missing:
        raise SystemExit(f"{teacher_workdir} has not finished {missing}: run the main job there first")
    if seed == own:
        return base, teacher_workdir
    cd = config_dict(base)
    cd.student.seed = seed
    config = from_config_dict(recipe.RecipeConfig, cd)
    out = os.path.join(workdir, f"seed_{seed}")
    w = recipe.Workdir(out, recipe.validate(config))
    for name in LINKED:
        if not os.path.exists(w.path(name)):
            os.symlink(os.path.join(os.path.abspath(teacher_workdir), name), w.path(name))
    os.makedirs(w.path("eval"), exist_ok=True)
    shutil.copy(os.path.join(teacher_workdir, "eval", "teacher.json"), w.path("eval", "teacher.json"))
    done = w.stages()
    for name in TEACHER_STAGES:
        if name not in done:
            w.finish(name, stages[name]["seconds"], {k: v for k, v in stages[name].items() if k != "seconds"})
    return config, out


def figures(workdir: str, config: recipe.RecipeConfig) -> dict[str, float]:
    """Every student accuracy the main job quotes, in %, from a finished workdir's evaluations."""
    hard = str(config.task.levels[-1])
    out: dict[str, float] = {}
    for name, _ in MODELS:
        path = os.path.join(workdir, "eval", f"{name}.json")
        if name == "teacher" or not os.path.exists(path):
            continue
        with open(path) as f:
            e = json.load(f)
        short = name.removeprefix("student_")
        out[f"{short} thinking"] = 100 * e["accuracy"]["think"]["all"]
        out[f"{short} thinking, level {hard}"] = 100 * e["accuracy"]["think"][hard]
        out[f"{short} non-thinking"] = 100 * e["accuracy"]["no_think"]["all"]
        out[f"{short} ThinkFollow"] = 100 * e["think_follow"]
        for mode, label in (("think", "thinking"), ("no_think", "non-thinking")):
            for k, v in e.get("pass_at", {}).get(mode, {}).items():
                out[f"{short} pass@{k}, {label}"] = 100 * v
        for b, v in e["budget"].items():
            if b != "unlimited":
                out[f"{short} thinking at budget {b}"] = 100 * v["all"]
    for a, b in (("distilled", "direct"), ("distilled", "off_policy"), ("rl", "off_policy")):
        if f"{a} thinking" in out and f"{b} thinking" in out:
            out[f"{a} - {b}, thinking (points)"] = out[f"{a} thinking"] - out[f"{b} thinking"]
    return out


def spread(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """{figure: {mean, std, min, max, values}} over the seeds (std with n - 1; 0 for one seed)."""
    names = list(next(iter(per_seed.values())))
    out = {}
    for name in names:
        v = np.array([fig[name] for fig in per_seed.values()])
        out[name] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                     "min": float(v.min()), "max": float(v.max()), "values": [round(float(x), 2) for x in v]}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher_workdir", help="a main-job workdir with its teacher stages done")
    parser.add_argument("--workdir", help="where the seeds' workdirs go")
    parser.add_argument("--seeds", default=None, help="comma-separated student seeds (default 0,1,2; --smoke: 0,1)")
    args = parse_args(parser, argv)
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.smoke else "0,1,2")).split(",")]
    with tempfile.TemporaryDirectory() as tmp, recording("miniature_seeds", args) as results:
        if args.smoke:
            args.teacher_workdir, args.workdir = os.path.join(tmp, "teacher"), os.path.join(tmp, "seeds")
            recipe.run(smoke_config(), args.teacher_workdir)
        if not (args.teacher_workdir and args.workdir):
            parser.error("--teacher_workdir and --workdir are required (or --smoke)")
        per_seed = {}
        for seed in seeds:
            config, workdir = seed_workdir(args.teacher_workdir, args.workdir, seed)
            stages = recipe.run(config, workdir)
            per_seed[seed] = figures(workdir, config)
            results.setdefault("student_seconds", {})[seed] = sum(
                stages[s]["seconds"] for s in stages if s not in TEACHER_STAGES)
        results["teacher_workdir"] = os.path.abspath(args.teacher_workdir)
        results["seeds"] = seeds
        results["figures"] = spread(per_seed)
        width = max(map(len, results["figures"]))
        print(f"{'figure (%)':<{width}}   mean    std    min    max  per seed {seeds}")
        for name, s in results["figures"].items():
            print(f"{name:<{width}} {s['mean']:6.1f} {s['std']:6.1f} {s['min']:6.1f} {s['max']:6.1f}  {s['values']}")


if __name__ == "__main__":
    main()
