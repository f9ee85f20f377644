"""Qwen3-32B pretraining on a TPU v5p-256 (128 chips, 32 hosts): FSDP 32 x tensor 4 (heads, MLP width
and vocab split 4 ways, so each chip's attention and MLP activations shrink too).

Global batch 1024 x 4096 tokens (4.2M) in 8 microbatches of 4 rows per device.
Memory: 32.8B x 16 B = 524 GB of state, 4.1 GB per chip. Documented, not run here; see
configs/_released.py for the shared recipe.

    python -m train.train --config configs/qwen3_32b.py --workdir DIR --config.data.paths='DATA/*.arrayrecord'
"""

from configs._released import pretrain_config


def get_config():
    return pretrain_config(
        "qwen3-32b", topology="v5p:4x4x8",
        mesh={"fsdp": 32, "tensor": 4}, batch_size=1024, microbatches=8, learning_rate=1.5e-4,
        serving=("v6e:2x4", {"tensor": 8})
    )
