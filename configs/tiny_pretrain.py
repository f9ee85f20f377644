"""Tiny pretraining run on CPU: a tiny-dense Qwen3 learns synthetic arithmetic sequences.

    python -m train.train --config configs/tiny_pretrain.py --workdir /tmp/qwen3_tiny

About 1.5 minutes on 2 CPU cores (~10 s of it compiling); the loss falls from 6.26 (ln 512) to
~0.5 in 200 steps of 16 x 128 tokens. Every code path of a real run is exercised: sharded train
state (on a 1-device mesh), packed data with segment ids, chunked cross-entropy, async checkpoints,
metrics, the MFU benchmark. Re-running the command resumes from the last checkpoint.
"""

from train.config import default_config


def get_config():
    c = default_config()
    c.model.preset = "tiny-dense"  # 3 layers, hidden 96, 6 query / 2 kv heads, vocab 512
    c.data.format = "synthetic"  # arithmetic progressions modulo the vocab: no files needed
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.num_threads = 1
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.weight_decay = 0.01
    c.train.steps = 200
    c.train.ce_chunk_len = 64  # two chunks per row: the chunked path runs even here
    c.train.log_every = 25
    c.checkpoint.every = 100
    return c
