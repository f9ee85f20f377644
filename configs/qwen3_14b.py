"""Qwen3-14B pretraining on a TPU v5p-128 (64 chips, 16 hosts): FSDP over the 64 chips.

Global batch 512 x 4096 tokens (2.1M) in 2 microbatches of 4 rows per device.
Memory: 14.8B x 16 B = 236 GB of state, 3.7 GB per chip. Documented, not run here; see
configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_14b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-14b", topology="v5p:4x4x4",
        mesh={"fsdp": 64}, batch_size=512, microbatches=2, learning_rate=2e-4,
        serving=("v6e:2x4", {"tensor": 8})
    )
