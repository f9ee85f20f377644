"""Reasoning RL of Qwen3-8B (Qwen3 report §4.2, stage 2: GRPO on verifiable queries) on a TPU v5p-64.

    python -m train.rl --config configs/rl_qwen3_8b.py --workdir /mnt/ckpt/qwen3-8b-rl \
        --config.model.init_from=/mnt/ckpt/qwen3-8b-cold-start --config.prompts.paths='/mnt/data/math/*.jsonl' \
        --config.reward=my_verifiers:math_answer --config.distributed=True

32 chips (v5p:4x4x2, 8 hosts: every host renders its share of the prompts, one engine on the global
mesh decodes the whole batch), FSDP 32 ways. Memory per chip: the float32 state is 8.2B x 16 B =
131 GB / 32 = 4.1 GB; no reference model (rl.kl_beta = 0, DAPO / Dr. GRPO). Each step samples 16
completions for each of 64 prompts (the report's stage 2 batch is not given; DAPO uses 512 x 16),
all in thinking mode (reasoning RL), 16,384 new tokens at most with a 14,336-token thinking budget;
the update runs over 17,408-token rows (1,024-token prompts) in 16 microbatches, two PPO minibatches
per rollout batch. Documented, not run here: no TPU in this environment (tests validate it on faked devices).
"""

from configs._released import V5P_PEAK_BF16
from train.rl.config import default_config


def get_config():
    c = default_config()
    c.model.init_from = "/mnt/ckpt/qwen3-8b-cold-start"  # HF, qwen3-jax or a workdir
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.topology = "v5p:4x4x2"
    c.prompts.paths = "/mnt/data/math/*.jsonl"
    c.prompts.batch_size = 64
    c.samples = 16
    c.reward = "train.rl.rewards:miniature_answer"  # replace with the task's verifier
    c.rollout.max_prompt_len = 1024
    c.rollout.max_new_tokens = 16384
    c.rollout.think_fraction = 1.0
    c.rollout.thinking_budget = 14336
    c.rl.ppo_minibatches = 2
    c.mesh.fsdp = 32
    c.optimizer.learning_rate = 1e-6
    c.optimizer.warmup_steps = 10
    c.optimizer.weight_decay = 0.1
    c.train.steps = 500
    c.train.microbatches = 16
    c.train.ce_chunk_len = 1024
    c.train.peak_flops = V5P_PEAK_BF16
    c.checkpoint.every = 20
    return c
