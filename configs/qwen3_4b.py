"""Qwen3-4B pretraining on a TPU v5p-32 (16 chips, 4 hosts): FSDP over the 16 chips.

Global batch 256 x 4096 tokens (1.0M) in 2 microbatches of 8 rows per device.
Memory: 4.0B x 16 B = 64 GB of state, 4 GB per chip. Documented, not run here; see
configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_4b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-4b", topology="v5p:2x2x4",
        mesh={"fsdp": 16}, batch_size=256, microbatches=2, learning_rate=3e-4,
        serving=("v5e:2x4", {"tensor": 8})
    )
