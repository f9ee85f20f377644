"""Qwen3-1.7B pretraining on a TPU v5p-16 (8 chips, 2 hosts): FSDP over the 8 chips.

Global batch 256 x 4096 tokens (1.0M) in 4 microbatches of 8 rows per device.
Memory: 1.7B x 16 B = 28 GB of state, 3.4 GB per chip. Documented, not run here; see
configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_1_7b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-1.7b", topology="v5p:2x2x2",
        mesh={"fsdp": 8}, batch_size=256, microbatches=4, learning_rate=4e-4,
        serving=("v5e:2x2", {"tensor": 4})
    )
