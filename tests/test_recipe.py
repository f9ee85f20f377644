"""The miniature recipe: the whole pipeline at smoke size, resume, exports, and its config errors."""

from __future__ import annotations

import json
import math
import os

import jax
import pytest

import qwen3_jax as q
from qwen3_jax.model import count_params
from qwen3_jax.tokenizer import Tokenizer
from train.miniature import recipe
from qwen3_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
    """configs/miniature.py at seconds per stage: every stage and code path, nothing learnt."""
    c = recipe.default_config()
    c.task.update(levels=(1, 2), sft_records=200, prompts=8, test_per_level=4,
                  validation_per_level=2, follow_conversations=8, budgets=(0, 4))
    c.tokenizer.update(vocab_size=320, corpus_records=200)
    # A MoE teacher here (the default is dense): the expert-load path runs too.
    c.teacher.preset = "tiny-moe"
    c.teacher.overrides.update(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                               intermediate_size=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    c.teacher.update(steps=3, batch_size=4, seq_len=320, warmup_steps=1)
    c.student.overrides.update(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                               intermediate_size=32)
    c.student.update(off_policy_steps=2, on_policy_steps=2, batch_size=4, warmup_steps=1)
    c.rl.samples = 2
    c.eval.update(batch_size=8, max_new_tokens=32, curve_points=2, samples=2)
    c.distill.keep_unfinished = True  # an untrained teacher rarely stops
    c.train.update(ce_chunk_len=32, peak_flops=1e10)
    return c


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("miniature")
    return workdir, recipe.run(smoke_config(), str(workdir))


def test_every_stage_runs_and_the_report_has_its_tables_and_plots(smoke_run):
    workdir, stages = smoke_run
    assert list(stages) == list(recipe.STAGES) and all(s["seconds"] >= 0 for s in stages.values())
    report = (workdir / "report.md").read_text()
    for heading in ("What the miniature shows", "Accuracy by mode and difficulty", "thinking budget",
                    "Table 21", "Wall time of each stage", "python -m infer.chat --checkpoint"):
        assert heading in report, heading
    for plot in ("budget.png", "difficulty.png", "curves.png", "expert_load.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000, plot
    teacher = json.loads((workdir / "eval" / "teacher.json").read_text())
    assert set(teacher["budget"]) == {"0", "4", "unlimited"} and 0 <= teacher["think_follow"] <= 1
    load = teacher["expert_load"]  # per MoE layer, shares that sum to 1
    assert len(load) == 2 and all(math.isclose(sum(row), 1.0, rel_tol=1e-5) for row in load)
    # Table 21's rows, each with its compute, and the analysis written from the figures.
    for row in ("| Off-policy distillation | 2 |", "| + RL (GRPO) | 2 |", "| + On-policy distillation | 2 |"):
        assert row in report, row
    rl_row = next(line for line in report.splitlines() if line.startswith("| + RL (GRPO)"))
    assert float(rl_row.split("|")[10]) == 0 and float(rl_row.split("|")[9]) > 0  # rollouts, no teacher
    assert "- RL (GRPO on the verifier) moved thinking accuracy from" in report
    rl = json.loads((workdir / "eval" / "student_rl.json").read_text())
    assert set(rl["pass_at"]["think"]) == {"1", "2"} and len(rl["per_problem"]["think"]) == 8
    assert json.loads((workdir / "student_rl" / "config.json").read_text())
    curves = json.loads((workdir / "eval" / "curves.json").read_text())
    assert [p["step"] for p in curves["distilled"]] == [p["step"] for p in curves["direct"]] == [2, 4]


def test_exports_load_and_the_workdirs_serve_as_checkpoints(smoke_run, monkeypatch):
    workdir, _ = smoke_run
    tokenizer = Tokenizer.from_checkpoint(str(workdir / "export" / "teacher"))
    for name in ("teacher", "student_distilled", "student_direct"):
        export = workdir / "export" / name
        assert (export / "config.json").exists() and (export / "tokenizer.model").exists()
        config = json.loads((export / "config.json").read_text())  # Qwen's bos / eos at the task vocabulary's ids
        assert (config["bos_token_id"], config["eos_token_id"]) == (
            tokenizer.token_to_id("<|endoftext|>"), tokenizer.token_to_id("<|im_end|>"))
        model = q.load_any(str(export))
        assert model.cfg.vocab_size == 320
    monkeypatch.chdir(workdir)  # a relative workdir path, as a user types it
    assert q.load_any("student_distilled").cfg.num_layers == 1


def test_a_rerun_resumes_at_the_first_unfinished_stage(smoke_run, capsys):
    workdir, stages = smoke_run
    again = recipe.run(smoke_config(), str(workdir))
    assert again == stages  # nothing ran again
    assert capsys.readouterr().out.count("done already") == len(recipe.STAGES)
    # A stage that did not finish runs again, the ones before it do not.
    records = json.loads((workdir / "stages.json").read_text())
    del records["report"]
    (workdir / "stages.json").write_text(json.dumps(records))
    recipe.run(smoke_config(), str(workdir))
    assert f"[{len(recipe.STAGES)}/{len(recipe.STAGES)}] report ..." in capsys.readouterr().out


def test_a_workdir_holding_another_recipes_run_is_refused(smoke_run):
    workdir, _ = smoke_run
    other = smoke_config()
    other.teacher.steps = 5
    with pytest.raises(ConfigError, match=r"holds another recipe's run \(fields that differ: teacher.steps\)"):
        recipe.run(other, str(workdir))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.student.overrides.update(hidden_size=256, num_layers=6, intermediate_size=1024),
     r"student \([\d,]+ parameters\) is not smaller than the teacher"),
    (lambda c: (c.tokenizer.update(kind="qwen3"), c.teacher.update(preset="qwen3-0.6b")),
     r"teacher's vocab_size \(151936\) and the student's \(512\) differ"),
    (lambda c: c.task.update(budgets=(0, -4, 8)), r"task.budgets must be >= 0"),
    (lambda c: c.task.update(levels=(3, 1)), r"task.levels must be increasing"),
    (lambda c: c.task.update(split_by="pair"), r"task.split_by must be one of \('question', 'start'\)"),
    (lambda c: c.task.update(stop_thinking=1.5), r"task.stop_thinking must be in \[0, 1\]"),
    (lambda c: c.eval.update(samples=0), r"eval.samples must be >= 1"),
    (lambda c: c.rl.update(samples=3), r"student.batch_size=4 must be a multiple of rl.samples=3"),
    (lambda c: c.rl.update(think_fraction=1.5), r"rl.think_fraction must be in \[0, 1\] or unset"),
    (lambda c: c.teacher.update(preset="qwen3-7b"), r"teacher: unknown preset"),
    (lambda c: c.mesh.update(tensor=3), r"splits 3 ways"),
    (lambda c: c.distill.update(signal="k1", rollout_temperature=0.7), r"distill.signal='k1' .* rollout.temperature=0.7"),
    (lambda c: c.distill.update(signal="k3"), r"signal='k3' with estimator_use='reward' has no divergence's gradient"),
])
def test_bad_configs_are_named_before_anything_runs(change, message, tmp_path):
    c = smoke_config()
    change(c)
    with pytest.raises(ConfigError, match=message):
        recipe.run(c, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_the_config_scales_to_real_presets_on_an_8_device_mesh(monkeypatch):
    """A qwen3-8b teacher and a qwen3-1.7b student with the real tokenizer validate on 8 devices."""
    c = recipe.default_config()
    c.teacher.preset, c.student.preset = "qwen3-8b", "qwen3-1.7b"  # what the command-line overrides set
    c.tokenizer.kind = "qwen3"
    c.dtype = "bfloat16"
    c.mesh.update(fsdp=4, tensor=2)
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    r = recipe.validate(c)
    assert (r.teacher.vocab_size, r.student.vocab_size) == (151936, 151936)
    assert count_params(r.teacher)[0] > 4 * count_params(r.student)[0]


def test_the_rl_stage_matches_on_policy_distillation_unless_told(smoke_run):
    workdir, _ = smoke_run
    c = smoke_config()
    r = recipe.validate(c)
    w = recipe.Workdir(str(workdir), r)
    rl, distill = recipe.rl_config(r, w), recipe.distill_config(r, w)
    assert rl.train.steps == distill.train.steps and rl.optimizer == distill.optimizer
    assert rl.prompts.batch_size * rl.samples == distill.prompts.batch_size  # rows per update step
    assert rl.rollout.think_fraction == 1.0  # the report's reasoning RL: thinking mode
    assert rl.rollout.max_new_tokens == distill.rollout.max_new_tokens
    assert rl.model.init_from == str(workdir / "student_distilled" / "off_policy")
    c.rl.think_fraction = None
    assert recipe.rl_config(recipe.validate(c), w).rollout.think_fraction == distill.rollout.think_fraction


def test_shipped_miniature_config_validates():
    import importlib.util

    spec = importlib.util.spec_from_file_location("miniature", os.path.join(REPO, "configs", "miniature.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = recipe.validate(module.get_config())
    assert count_params(r.teacher)[0] > 2 * count_params(r.student)[0]


def test_pass_at_k_is_the_chance_that_k_of_n_replies_hold_a_correct_one():
    """Against the definition: the share of k-subsets of each problem's n replies with a correct one."""
    import itertools

    import numpy as np

    from train.miniature.evaluate import pass_at_k

    correct = np.array([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]], bool)
    for k in (1, 2, 3, 5):
        want = np.mean([np.mean([any(row[list(s)]) for s in itertools.combinations(range(5), k)]) for row in correct])
        assert math.isclose(pass_at_k(correct, k), want, rel_tol=1e-12), k
    assert math.isclose(pass_at_k(correct, 1), correct.mean())


def test_each_student_stage_is_charged_its_own_compute(smoke_run):
    from qwen3_jax.tokenizer import Tokenizer as Tok
    from train.metrics import flops_per_token
    from train.miniature import report

    workdir, _ = smoke_run
    r = recipe.validate(smoke_config())
    spent = report.stage_compute(r, recipe.Workdir(str(workdir), r))
    rows, seq, steps = 4, 320, 2
    update = flops_per_token(r.student, seq) * rows * seq * steps
    # On-policy distillation: the teacher's forward over every update row; RL: no model scores.
    assert math.isclose(spent["student_distilled"]["teacher_flops"], flops_per_token(r.teacher, seq) / 3 * rows * seq * steps)
    assert spent["student_rl"]["teacher_flops"] == 0 and spent["student_off_policy"]["teacher_flops"] == 0
    for name in ("student_distilled", "student_rl", "student_off_policy"):
        assert math.isclose(spent[name]["update_flops"], update), name
    assert math.isclose(spent["student_direct"]["update_flops"], 2 * update)  # off- + on-policy steps
    metrics = [json.loads(line) for line in (workdir / "student_rl" / "metrics.jsonl").read_text().splitlines()]
    generated = sum(m["completion_len"] for m in metrics) * rows
    tokenizer = Tok.from_checkpoint(str(workdir / "teacher"))
    prompt = report.compute.prompt_tokens(tokenizer, str(workdir / "data" / "prompts.jsonl"))
    assert math.isclose(spent["student_rl"]["rollout_flops"],
                        flops_per_token(r.student, seq) / 3 * (generated + prompt * rows * steps))
