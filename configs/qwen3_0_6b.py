"""Qwen3-0.6B pretraining on a TPU v5p-8 (4 chips, 1 host): FSDP over the 4 chips.

Global batch 128 x 4096 tokens (0.5M) in 4 microbatches of 8 rows per device.
Memory: 0.6B x 16 B = 9.5 GB of state, 2.4 GB per chip. Documented, not run here; see
configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_0_6b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-0.6b", topology="v5p:2x2x1",
        mesh={"fsdp": 4}, batch_size=128, microbatches=4, learning_rate=6e-4,
        serving=("v5e:2x2", {"tensor": 4}), multi_host=False
    )
