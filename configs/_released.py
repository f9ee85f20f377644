"""Shared recipe of the per-size pretraining configs (configs/qwen3_*.py); not an experiment itself.

Starting points, not tuned recipes: the Qwen3 report publishes neither learning rates nor batch
sizes. Every size trains 4096-token rows (the report's first two stages) of tokenised text in
ArrayRecord files, bfloat16 compute over float32 master weights, full rematerialisation, and a
per-device microbatch of at most 8 rows so activations stay well inside a v5p chip's 95 GB.
Memory for the state is 16 bytes per parameter (float32 params, grads, two Adam moments) spread
over the fsdp (and expert) axes.

Each config names the TPU slice it is written for (`topology`, e.g. "v5p:4x4x4"; its chips are the
mesh's devices) and, under `serving`, the slice and mesh its bfloat16 weights are served on with
`infer.engine` (v5e or v6e). `benchmarks.tpu_aot` compiles the train step and the engine's prefill
and decode for exactly these slices.

    python -m train.train --config configs/qwen3_8b.py --workdir /mnt/ckpt/qwen3-8b \
        --config.data.paths='/mnt/data/*.arrayrecord'
"""

from train.config import default_config

V5P_PEAK_BF16 = 459e12  # FLOP/s per v5p chip


def pretrain_config(preset: str, *, topology: str, mesh: dict[str, int], batch_size: int, microbatches: int,
                    learning_rate: float, serving: tuple[str, dict[str, int]], multi_host: bool = True):
    """`topology` and `serving` = (topology, mesh) name TPU slices as jax.experimental.topologies
    spells them ("v5p:4x4x4", "v6e:2x4")."""
    c = default_config()
    c.topology = topology
    c.serving.topology, c.serving.mesh = serving[0], dict(serving[1])
    c.distributed = multi_host  # jax.distributed.initialize(): one process per TPU host
    c.model.preset = preset
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.tokenizer = "qwen3"
    c.data.format = "arrayrecord"
    c.data.kind = "text"
    c.data.seq_len = 4096
    c.data.batch_size = batch_size
    c.data.packing = "concat_then_split"  # pretraining: no padding
    c.mesh.update(mesh)
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 2000
    c.optimizer.weight_decay = 0.1
    c.train.steps = 100_000
    c.train.microbatches = microbatches
    c.train.ce_chunk_len = 256  # [rows, 256, 151936] float32 logits per chunk
    c.train.z_loss_coef = 1e-4
    c.train.peak_flops = V5P_PEAK_BF16
    c.checkpoint.every = 1000
    return c
