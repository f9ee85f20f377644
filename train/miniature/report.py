"""The miniature recipe's report: WORKDIR/report.md (tables) and WORKDIR/plots/*.png (matplotlib).

Reads what the recipe's stages wrote (WORKDIR/eval/*.json, stages.json, recipe.json) and states,
with the measured values, whether each figure the miniature is meant to show was reached.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no backend, no global figure state

from qwen3_jax.model import count_params
from qwen3_jax.tokenizer import Tokenizer
from train.metrics import flops_per_token
from train.miniature import compute, task

MODELS = (("teacher", "Teacher"), ("student_off_policy", "Student, off-policy distilled"),
          ("student_rl", "Student, off-policy + RL"), ("student_distilled", "Student, off-policy + on-policy distilled"),
          ("student_direct", "Student, trained directly"))


def _load(w, name: str) -> dict[str, Any] | None:
    path = w.path("eval", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _se(a: float, b: float, n: int) -> float:
    """Binomial standard error of the difference of two accuracies over n problems each: the noise
    a comparison is read with (the figures themselves repeat exactly on a rerun on one machine)."""
    return math.sqrt((a * (1 - a) + b * (1 - b)) / n)


def _change(label: str, after: float, before: float, n: int) -> str:
    """'<label> moved thinking accuracy from X% to Y% (+Z points, within / beyond 2 standard errors, W)'."""
    diff, two_se = after - before, 2 * _se(after, before, n)
    where = "beyond" if abs(diff) > two_se else "within"
    return (f"{label} moved thinking accuracy from {_pct(before)}% to {_pct(after)}% ({100 * diff:+.1f} points, "
            f"{where} 2 standard errors of {_pct(two_se)})")


def analysis(r, evals: dict[str, dict[str, Any]], spent: dict[str, dict[str, float]]) -> list[str]:
    """The report's analysis: one sentence per finding, each computed from the tables' figures."""
    t = evals["teacher"]
    acc, levels = t["accuracy"], [str(d) for d in r.levels]
    easy, hard = levels[0], levels[-1]
    n = sum(t["problems"].values())
    per_level = t["problems"][easy]
    out = [
        f"The teacher's thinking accuracy goes from {_pct(acc['think'][easy])}% at level {easy} to "
        f"{_pct(acc['think'][hard])}% at level {hard}, its non-thinking accuracy from {_pct(acc['no_think'][easy])}% "
        f"to {_pct(acc['no_think'][hard])}%: thinking leads by {100 * (acc['think'][easy] - acc['no_think'][easy]):.1f} "
        f"points on the easiest level and {100 * (acc['think'][hard] - acc['no_think'][hard]):.1f} on the hardest "
        f"({per_level} problems per level: a level's figure has a standard error of up to "
        f"{100 * math.sqrt(0.25 / per_level):.0f} points, an all-levels one up to {100 * math.sqrt(0.25 / n):.1f}).",
    ]
    budget = t["budget"]
    points = [b for b in budget if b != "unlimited"]
    unl = budget["unlimited"]["all"]
    reached = next((b for b in points if budget[b]["all"] >= unl - 1e-9), None)
    answered = t.get("budget_answered", {})
    if points:
        reach = (f"the unlimited figure is reached at a budget of {reached} tokens" if reached is not None
                 else "no measured budget reaches the unlimited figure")
        said = f"; {_pct(min(answered.values()))}% or more of the budgeted replies state an answer" if answered else ""
        curve = ", ".join(f"{_pct(budget[b]['all'])}% at {b}" for b in points)
        out.append(f"With a thinking budget the teacher's accuracy is {curve} "
                   f"and {_pct(unl)}% unlimited ({reach}{said}); at budget {points[0]} it scores "
                   f"{_pct(budget[points[0]]['all'])}% against {_pct(acc['no_think']['all'])}% in non-thinking mode.")
    d, s = evals["student_distilled"]["accuracy"], evals["student_direct"]["accuracy"]
    out.append(_change("Distillation (off-policy then on-policy) against direct training at equal update steps",
                       d["think"]["all"], s["think"]["all"], n).replace("moved thinking accuracy from",
                                                                        "compares thinking accuracy") + ".")
    off = evals.get("student_off_policy")
    if off is not None:
        before = off["accuracy"]["think"]["all"]
        teacher_gap = acc["think"]["all"] - before
        out.append(f"The off-policy student scores {_pct(before)}% in thinking mode, "
                   f"{abs(100 * teacher_gap):.1f} points {'below' if teacher_gap > 0 else 'above'} its teacher "
                   f"({_pct(acc['think']['all'])}%).")
        for name, label in (("student_distilled", "On-policy distillation"), ("student_rl", "RL (GRPO on the verifier)")):
            if name in evals:
                e = evals[name]
                sentence = _change(label, e["accuracy"]["think"]["all"], before, n)
                sentence += (f" and non-thinking accuracy from {_pct(off['accuracy']['no_think']['all'])}% to "
                             f"{_pct(e['accuracy']['no_think']['all'])}% (ThinkFollow {_pct(off['think_follow'])}% -> "
                             f"{_pct(e['think_follow'])}%; /no_think replies that think "
                             f"{_pct(off['thought']['no_think'])}% -> {_pct(e['thought']['no_think'])}%)")
                if "pass_at" in e and "pass_at" in off:
                    k = max(e["pass_at"]["think"], key=int)
                    sentence += (f"; thinking pass@1 {_pct(off['pass_at']['think']['1'])}% -> "
                                 f"{_pct(e['pass_at']['think']['1'])}%, pass@{k} {_pct(off['pass_at']['think'][k])}% -> "
                                 f"{_pct(e['pass_at']['think'][k])}%")
                phase = spent.get(name)
                if phase:
                    total = phase["rollout_flops"] + phase["teacher_flops"] + phase["update_flops"]
                    sentence += f", for {total / 1e9:.3g} GFLOPs and {phase['seconds']:.0f} s"
                out.append(sentence + ".")
    return out


def stage_compute(r, w) -> dict[str, dict[str, float]]:
    """{student eval name: {steps, rollout_flops, teacher_flops, update_flops, seconds}} of each
    student stage that ran (`train.miniature.compute`)."""
    cfg, stages = r.config, w.stages()
    rows, seq = cfg.student.batch_size, cfg.teacher.seq_len
    tokenizer = Tokenizer.from_checkpoint(w.path("teacher"))
    out: dict[str, dict[str, float]] = {}
    if "distilled" in stages:
        off = compute.off_policy(r.student, r.teacher, w.path("student_distilled", "off_policy"), rows=rows,
                                 seq_len=seq, tokenizer=tokenizer)
        prompt = compute.prompt_tokens(tokenizer, w.path("data", "prompts.jsonl"))
        on = compute.on_policy(r.student, r.teacher, w.path("student_distilled"), rows=rows, seq_len=seq,
                               prompt_tokens=prompt)
        # The stage runs both phases: the off-policy phase is the stage's time less the on-policy loop's.
        out["student_off_policy"] = {**off, "seconds": stages["distilled"]["seconds"] - on["loop_seconds"]}
        out["student_distilled"] = {**on, "seconds": on["loop_seconds"]}
        if "rl" in stages:
            out["student_rl"] = {**compute.on_policy(r.student, None, w.path("student_rl"), rows=rows, seq_len=seq,
                                                     prompt_tokens=prompt), "seconds": stages["rl"]["seconds"]}
    if "direct" in stages:
        steps = cfg.student.off_policy_steps + cfg.student.on_policy_steps
        out["student_direct"] = {"steps": steps, "rollout_flops": 0.0, "teacher_flops": 0.0,
                                 "update_flops": flops_per_token(r.student, seq) * rows * seq * steps,
                                 "seconds": stages["direct"]["seconds"]}
    return out


def findings(r, evals: dict[str, dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(claim, reached, measured values) for each figure the miniature is meant to show."""
    t = evals["teacher"]
    easy, hard = str(r.levels[0]), str(r.levels[-1])
    acc = t["accuracy"]
    gap_hard = acc["think"][hard] - acc["no_think"][hard]
    gap_easy = acc["think"][easy] - acc["no_think"][easy]
    budget = t["budget"]
    b0, unl = budget[str(min(r.budgets))]["all"] if r.budgets else acc["no_think"]["all"], budget["unlimited"]["all"]
    out = [
        (f"teacher: thinking beats non-thinking by a wide margin (>= 30 points) on the hardest level ({hard})",
         gap_hard >= 0.30, f"{_pct(acc['think'][hard])}% vs {_pct(acc['no_think'][hard])}%"),
        (f"teacher: thinking and non-thinking are close (within 15 points) on the easiest level ({easy})",
         abs(gap_easy) <= 0.15, f"{_pct(acc['think'][easy])}% vs {_pct(acc['no_think'][easy])}%"),
        ("teacher: flag obedience (ThinkFollow) >= 95%", t["think_follow"] >= 0.95, f"{_pct(t['think_follow'])}%"),
        ("teacher: accuracy rises from budget 0 to unlimited", unl > b0,
         f"{_pct(b0)}% at budget {min(r.budgets)}, {_pct(unl)}% unlimited"),
    ]
    d, s = evals["student_distilled"]["accuracy"], evals["student_direct"]["accuracy"]
    n = sum(evals["student_direct"]["problems"].values())
    # Binomial standard error of a difference of two accuracies over n problems each: the noise
    # the comparison is read with (the figures themselves repeat exactly on a rerun).
    se = math.sqrt((d["think"]["all"] * (1 - d["think"]["all"]) + s["think"]["all"] * (1 - s["think"]["all"])) / n)
    out.append(("the distilled student beats the directly trained one at equal update steps (thinking mode)",
                d["think"]["all"] > s["think"]["all"],
                f"{_pct(d['think']['all'])}% vs {_pct(s['think']['all'])}%, difference "
                f"{_pct(d['think']['all'] - s['think']['all'])} points, 2 standard errors {_pct(2 * se)} points "
                f"(no-thinking {_pct(d['no_think']['all'])}% vs {_pct(s['no_think']['all'])}%)"))
    return out


def write(r, w) -> dict[str, Any]:
    """Writes report.md and the plots; returns the findings as {claim: reached}."""
    evals = {name: e for name, _ in MODELS if (e := _load(w, name)) is not None}
    with open(w.path("eval", "curves.json")) as f:
        curves = json.load(f)
    stages = w.stages()
    os.makedirs(w.path("plots"), exist_ok=True)
    plots = [_plot_budget(r, w, evals), _plot_difficulty(r, w, evals), _plot_curves(r, w, curves)]
    if "expert_load" in evals["teacher"]:
        plots.append(_plot_expert_load(w, evals["teacher"]["expert_load"]))
    cfg = r.config
    found = findings(r, evals)
    lines = [
        "# Qwen3's recipe in miniature", "",
        f"Task: a Fibonacci-like sequence mod 10 (`train/miniature/task.py`); difficulty = steps asked for "
        f"({', '.join(map(str, r.levels))}); test problems per level "
        + ("(questions never trained on; their starting pairs are trained at other step counts): "
           if cfg.task.split_by == "question" else "(starting pairs never trained on at any step count): ")
        + f"{', '.join(str(v) for v in evals['teacher']['problems'].values())}. Greedy decoding."
        + (f" {_pct(cfg.task.stop_thinking)}% of the single-turn thinking records are cut by the stop-thinking text "
           "and then answered." if cfg.task.stop_thinking else ""),
        f"Teacher: {_describe(r.teacher)}. Student: {_describe(r.student)}.",
        f"Students: {cfg.student.off_policy_steps} + {cfg.student.on_policy_steps} update steps "
        f"(off-policy + on-policy distillation, or off-policy + RL: GRPO on the verifier, {cfg.rl.samples} samples per "
        f"prompt) against {cfg.student.off_policy_steps + cfg.student.on_policy_steps} "
        f"steps on the ground-truth data, {cfg.student.batch_size} rows x {cfg.teacher.seq_len} tokens per step for all.",
        "", "## What the miniature shows", "",
        "| claim | reached | measured |", "|---|---|---|",
        *[f"| {claim} | {'yes' if ok else '**no**'} | {values} |" for claim, ok, values in found],
        "", "## Accuracy by mode and difficulty (%)", "",
        "| model | mode | " + " | ".join(f"level {d}" for d in r.levels) + " | all |",
        "|---|---|" + "---|" * (len(r.levels) + 1),
    ]
    for name, label in MODELS:
        if name in evals:
            for mode in ("think", "no_think"):
                a = evals[name]["accuracy"][mode]
                lines.append(f"| {label} | {mode} | " + " | ".join(_pct(a[str(d)]) for d in r.levels)
                             + f" | {_pct(a['all'])} |")
    budgets = list(evals["teacher"]["budget"])
    lines += ["", "## Accuracy against the thinking budget (%, all levels)", "",
              "Budget in thinking tokens; then Qwen's stop-thinking text is forced and the model answers.", "",
              "| model | " + " | ".join(budgets) + " | no thinking |", "|---|" + "---|" * (len(budgets) + 1)]
    for name, label in MODELS:
        if name in evals:
            e = evals[name]
            lines.append(f"| {label} | " + " | ".join(_pct(e["budget"][b]["all"]) for b in budgets)
                         + f" | {_pct(e['accuracy']['no_think']['all'])} |")
    lines += ["", "## Students side by side (the shape of the report's Table 21)", "",
              f"Accuracy greedy; pass@k from {cfg.eval.samples} samples per test problem with Qwen's sampling settings per mode "
              "(thinking: temperature 0.6, top-p 0.95, top-k 20). Compute is what the stage itself spent "
              f"(`train/miniature/compute.py`: model FLOPs; {cfg.student.batch_size} rows x {cfg.teacher.seq_len} "
              "tokens per update step); wall time of the stage on this machine.", "",
              f"| method | update steps | thinking (%) | non-thinking (%) | pass@1 / pass@{cfg.eval.samples}, thinking (%) | "
              f"pass@1 / pass@{cfg.eval.samples}, non-thinking (%) | ThinkFollow (%) | /no_think replies that think (%) | "
              "rollout GFLOPs | teacher scoring GFLOPs | update GFLOPs | wall (s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    spent = stage_compute(r, w)
    for name, label in (("student_off_policy", "Off-policy distillation"), ("student_rl", "+ RL (GRPO)"),
                        ("student_distilled", "+ On-policy distillation"), ("student_direct", "Direct training (for reference)")):
        if name in evals and name in spent:
            e, c = evals[name], spent[name]
            p = e.get("pass_at", {})
            pk = [" / ".join(_pct(v) for v in p[m].values()) if m in p else "" for m in ("think", "no_think")]
            lines.append(f"| {label} | {c['steps']} | {_pct(e['accuracy']['think']['all'])} | "
                         f"{_pct(e['accuracy']['no_think']['all'])} | {pk[0]} | {pk[1]} | {_pct(e['think_follow'])} | "
                         f"{_pct(e['thought']['no_think'])} | {c['rollout_flops'] / 1e9:.3g} | "
                         f"{c['teacher_flops'] / 1e9:.3g} | {c['update_flops'] / 1e9:.3g} | {c['seconds']:.0f} |")
    lines += ["", "## What the tables say", "", *[f"- {sentence}" for sentence in analysis(r, evals, spent)]]
    lines += ["", "## Wall time of each stage", "", "| stage | seconds |", "|---|---|",
              *[f"| {name} | {rec['seconds']:.0f} |" for name, rec in stages.items()],
              f"| total (stages finished before the report) | {sum(rec['seconds'] for rec in stages.values()):.0f} |",
              "", "## Plots", "", *[f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots],
              "", "## Try the models", "",
              f"    python -m infer.chat --checkpoint {w.path('student_distilled')}",
              f"    python -m infer.generate --checkpoint {w.path('teacher')} --prompt \"{_example(r)}\"",
              "",
              *([f"Add `--thinking_budget 8` to see the budget cut the trace short: the stop-thinking text is forced "
                 f"and the model answers (the budget table's 8-token column: the teacher scores "
                 f"{_pct(evals['teacher']['budget']['8']['all'])}% at that budget).", ""]
                if "8" in evals["teacher"]["budget"] else []),
              f"Hugging Face exports (`to_hf`, with the tokenizer): `{w.path('export')}/{{teacher,student_distilled,"
              "student_direct}`.", ""]
    with open(w.path("report.md"), "w") as f:
        f.write("\n".join(lines))
    return {claim: ok for claim, ok, _ in found}


def _describe(cfg) -> str:
    total, active = count_params(cfg)
    kind = f"MoE {cfg.num_experts} experts top-{cfg.num_experts_per_tok}" if cfg.is_moe else "dense"
    return (f"{kind}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, {total / 1e6:.2f}M parameters"
            + (f" ({active / 1e6:.2f}M active)" if cfg.is_moe else ""))


def _example(r) -> str:
    return task.problems("test", r.levels[-1], 1, r.config.seed, r.config.task.split_by)[0].question.replace("\n", " ") + " /think"


def _plot_budget(r, w, evals) -> str:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    budgets = list(evals["teacher"]["budget"])
    xs = list(range(len(budgets)))
    for (name, label), color in zip(MODELS, ("C0", "C2", "C1", "C3")):
        if name in evals:
            e = evals[name]
            ax.plot(xs, [100 * e["budget"][b]["all"] for b in budgets], "o-", color=color, label=label)
            ax.axhline(100 * e["accuracy"]["no_think"]["all"], color=color, ls="--", lw=1, label=f"{label}, non-thinking")
    ax.set_xticks(xs, budgets)
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel("accuracy, all levels (%)")
    ax.set_title("Accuracy against the thinking budget (dashed: non-thinking)")
    ax.legend(fontsize=7)
    return _save(fig, w, "budget.png")


def _plot_difficulty(r, w, evals) -> str:
    names = [(n, label) for n, label in MODELS if n in evals]
    fig = Figure(figsize=(4 * len(names), 3.6))
    axes = fig.subplots(1, len(names), sharey=True)
    for ax, (name, label) in zip(axes, names):
        for mode, style in (("think", "o-"), ("no_think", "s--")):
            ax.plot(r.levels, [100 * evals[name]["accuracy"][mode][str(d)] for d in r.levels], style, label=mode)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("difficulty (steps)")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=8)
    return _save(fig, w, "difficulty.png")


def _plot_curves(r, w, curves) -> str:
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, color in (("distilled", "C1"), ("direct", "C3")):
        pts = curves[name]
        for mode, style in (("think", "o-"), ("no_think", "s--")):
            ax.plot([p["step"] for p in pts], [100 * p[mode] for p in pts], style, color=color, label=f"{name}, {mode}")
    ax.axvline(r.config.student.off_policy_steps, color="grey", lw=1, ls=":")
    ax.annotate("on-policy from here", (r.config.student.off_policy_steps, 1), xycoords=("data", "axes fraction"),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xlabel("update steps")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Student learning curves: distilled against direct")
    ax.legend(fontsize=8)
    return _save(fig, w, "curves.png")


def _plot_expert_load(w, load) -> str:
    fig = Figure(figsize=(6, 0.6 * len(load) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Teacher: share of top-k routing per expert (uniform = 1 / experts)")
    fig.colorbar(im, ax=ax)
    return _save(fig, w, "expert_load.png")


def _save(fig, w, name: str) -> str:
    path = w.path("plots", name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
