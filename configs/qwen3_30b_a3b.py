"""Qwen3-30B-A3B pretraining on a TPU v5p-128 (64 chips, 16 hosts): expert 8 (16 of the 128 experts
per shard) x FSDP 8.

Global batch 512 x 4096 tokens (2.1M) in 2 microbatches of 4 rows per device.
Memory: 30.5B x 16 B = 489 GB of state, 7.6 GB per chip; 3.3B parameters active per token.
Documented, not run here; see configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_30b_a3b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-30b-a3b", topology="v5p:4x4x4",
        mesh={"fsdp": 8, "expert": 8}, batch_size=512, microbatches=2, learning_rate=3e-4,
        serving=("v6e:2x4", {"expert": 2, "tensor": 4})
    )
