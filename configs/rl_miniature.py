"""GRPO on CPU: the main job's on-policy-distilled student, on the miniature task's verifier.

    python -m train.miniature --config configs/miniature.py --workdir runs/miniature   # the student
    python -m train.rl --config configs/rl_miniature.py --workdir runs/rl

The policy starts from the main job's distilled student (runs/miniature/student_distilled; its
off-policy phase, runs/miniature/student_distilled/off_policy, is the report's common starting
point for RL and on-policy distillation); 8 prompts x 8 samples per step in thinking mode (the report's
reasoning RL: with /no_think prompts the verifier, which reads the answer only, rewards thinking in
non-thinking mode), rewarded 1 for a right 'The answer is N.' (train.rl.rewards:miniature_answer). A few minutes on 2
cores. Another workdir: --config.model.init_from=DIR --config.prompts.paths=... --config.tokenizer=...
"""

from train.rl.config import default_config

RUN = "runs/miniature"


def get_config():
    c = default_config()
    c.model.init_from = f"{RUN}/student_distilled"
    c.tokenizer = f"{RUN}/tokenizer/spm.model"
    c.prompts.paths = f"{RUN}/data/prompts.jsonl"
    c.prompts.batch_size = 8
    c.samples = 8
    c.reward = "train.rl.rewards:miniature_answer"
    c.rollout.max_prompt_len = 64
    c.rollout.max_new_tokens = 128
    c.rollout.think_fraction = 1.0
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.end_learning_rate_ratio = 1.0
    c.train.steps = 40
    c.train.ce_chunk_len = 64
    c.train.log_every = 10
    c.checkpoint.every = 20
    return c
