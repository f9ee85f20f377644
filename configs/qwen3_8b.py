"""Qwen3-8B pretraining on a TPU v5p-64 (32 chips, 8 hosts): FSDP over the 32 chips.

Global batch 512 x 4096 tokens (2.1M) in 4 microbatches of 4 rows per device.
Memory: 8.2B x 16 B = 131 GB of state, 4.1 GB per chip. Documented, not run here; see
configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_8b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-8b", topology="v5p:2x4x4",
        mesh={"fsdp": 32}, batch_size=512, microbatches=4, learning_rate=3e-4,
        serving=("v5e:2x4", {"tensor": 8})
    )
