"""Strong-to-weak distillation on CPU, from the main job's teacher into a fresh miniature student.

    python -m train.miniature --config configs/miniature.py --workdir runs/miniature   # the teacher
    python -m train.distill --config configs/distill_miniature.py --workdir runs/distill

Off-policy (the teacher answers the main job's prompts in both modes, greedy; SFT on them), then
on-policy (full reverse KL on the student's own samples at temperature 1, no truncation), with the
miniature's settings at fewer steps: a few minutes on 2 cores. Another teacher workdir:
--config.teacher.init_from=DIR --config.prompts.paths=DIR/../data/prompts.jsonl --config.tokenizer=...
"""

from train.distill.config import default_config
from train.miniature.recipe import SHAPES

RUN = "runs/miniature"


def get_config():
    c = default_config()
    c.model.preset = "tiny-dense"
    c.model.overrides = dict(SHAPES["mini-student"], vocab_size=512)
    c.tokenizer = f"{RUN}/tokenizer/spm.model"
    c.teacher.init_from = f"{RUN}/teacher"
    c.prompts.paths = f"{RUN}/data/prompts.jsonl"
    c.prompts.batch_size = 8
    c.rollout.max_prompt_len = 64
    c.rollout.max_new_tokens = 128
    c.rollout.temperature, c.rollout.top_k, c.rollout.top_p = 1.0, 0, 1.0
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.01
    c.optimizer.end_learning_rate_ratio = 1.0
    c.off_policy.steps = 200
    c.off_policy.temperature = 0.0
    c.off_policy.max_new_tokens = 128
    c.off_policy.seq_len = 192
    c.off_policy.learning_rate = 3e-3
    c.off_policy.warmup_steps = 30
    c.train.steps = 40
    c.train.ce_chunk_len = 64
    c.train.log_every = 10
    c.checkpoint.every = 40
    return c
