"""On-policy distillation of Qwen3-0.6B from Qwen3-32B (Qwen3 report §4.5, phase 2) on a TPU v5p-8.

The student starts from an off-policy run: set `off_policy.steps` > 0 to run that phase first in
the same command (the teacher answers the prompts, the student is fine-tuned on the answers, in
WORKDIR/off_policy), or point `model.init_from` at an earlier SFT run, as here:

    python -m train.distill --config configs/distill_qwen3_0_6b.py --workdir /mnt/ckpt/qwen3-0.6b-onpolicy \
        --config.model.init_from=/mnt/ckpt/qwen3-0.6b-offpolicy --config.teacher.init_from=/mnt/models/Qwen3-32B \
        --config.prompts.paths='/mnt/data/prompts/*.jsonl'

One v5p-8 host (4 chips, 95 GB each), FSDP over the 4 chips. Memory: the bfloat16 teacher is
65.5 GB (16.4 GB per chip, no optimizer state); the student's float32 state is 0.6B x 16 B = 9.5 GB
(2.4 GB per chip). Rollouts of 64 prompts, half in thinking mode with a 2,048-token thinking
budget, 3,072 new tokens at most; the update runs over 4,096-token rows in 8 microbatches.
Documented, not run here: no TPU in this environment (tests validate it on faked devices).
"""

from configs._released import V5P_PEAK_BF16
from train.distill.config import default_config


def get_config():
    c = default_config()
    c.model.init_from = "/mnt/ckpt/qwen3-0.6b-offpolicy"  # HF, qwen3-jax or a workdir
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.teacher.init_from = "/mnt/models/Qwen3-32B"
    c.teacher.dtype = "bfloat16"
    c.prompts.paths = "/mnt/data/prompts/*.jsonl"
    c.prompts.batch_size = 64
    c.rollout.max_prompt_len = 1024
    c.rollout.max_new_tokens = 3072
    c.rollout.think_fraction = 0.5
    c.rollout.thinking_budget = 2048
    c.mesh.fsdp = 4
    c.optimizer.learning_rate = 5e-6
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.0
    c.train.steps = 1000
    c.train.microbatches = 8
    c.train.ce_chunk_len = 256
    c.train.peak_flops = V5P_PEAK_BF16
    c.checkpoint.every = 50
    return c
