"""Supervised fine-tuning of a converted checkpoint on chat data.

    python -m train.train --config configs/sft.py --workdir /tmp/qwen3-sft \
        --config.model.init_from=/models/Qwen3-0.6B --config.data.paths='/data/chat/*.jsonl'

`model.init_from` is a Hugging Face checkpoint directory (config.json + *.safetensors, e.g. as
downloaded from the Hub), a qwen3-jax checkpoint (`python -m qwen3_jax.convert`), or a workdir of
an earlier run of this trainer. Its tokenizer is used unless `tokenizer` is set.

Data: JSONL records {"messages": [{"role": ..., "content": ...}, ...], "tools": [...]} rendered
with the Qwen3 chat template (thinking blocks as the template writes them); the loss covers the
final assistant turn only, normalised by the number of those tokens in the global batch.
Defaults fit Qwen3-0.6B / 1.7B on one 8-chip host (FSDP over every device); on CPU add
--config.model.dtype=float32 (XLA:CPU bfloat16 matmuls are slow).
"""

from train.config import default_config


def get_config():
    c = default_config()
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.format = "jsonl"
    c.data.kind = "chat"
    c.data.seq_len = 4096
    c.data.batch_size = 32
    c.data.packing = "first_fit"  # whole conversations per row
    c.data.num_epochs = None  # the schedule is in steps; the data repeats
    c.mesh.fsdp = -1  # all devices
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 50
    c.optimizer.weight_decay = 0.0
    c.train.steps = 2000
    c.train.ce_chunk_len = 512
    c.checkpoint.every = 250
    return c
