"""Pretraining and SFT of Qwen3 models on a device mesh: `python -m train.train`.

    python -m train.train --config configs/tiny_pretrain.py --workdir /tmp/tiny \
        [--config.train.steps=500 --config.mesh.fsdp=4 ...]

The config's fields are `train.config.TrainConfig`'s. Re-running the same command resumes from the
workdir's latest checkpoint; SIGTERM saves one and exits with 0 (see `train.loop`). The workdir
receives `checkpoints/`, `metrics.jsonl`, `tensorboard/`, `config.json` and the tokenizer, so it
serves as a checkpoint (`qwen3_jax.load_any`, the infer CLIs, `model.init_from`).
"""

from __future__ import annotations

import ml_collections
from absl import app

from qwen3_jax.sharding import make_mesh
from train import data as data_lib
from train.cli import define_command_flags, parse_flags, run_command
from train.config import TrainConfig, resolve, tokenizer_from_spec, train_config
from train.loop import global_batch, run_loop, start_distributed
from train.metrics import flops_per_token
from train.step import batch_sharding, make_train_step


def run(config: TrainConfig | ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (or resumes) the job `config` describes in `workdir`; returns a summary of this
    invocation (`train.loop.summarize`). Raises ConfigError before any device work."""
    train_cfg = config if isinstance(config, TrainConfig) else train_config(config)
    start_distributed(train_cfg)
    job = resolve(train_cfg)
    cfg = job.model
    mesh = make_mesh(job.mesh)
    tokenizer = None if job.tokenizer is None else tokenizer_from_spec(job.tokenizer, cfg)
    data = data_lib.make_stream(job.data, tokenizer)
    train_step = make_train_step(cfg, job.step, job.optimizer, mesh)
    sharding = batch_sharding(mesh, cfg.rules)
    tokens_per_step = job.data.batch_size * job.data.seq_len
    model_flops_per_step = flops_per_token(cfg, job.data.seq_len) * tokens_per_step

    def rates(scalars: dict[str, float], step_time: float, peak: float) -> dict[str, float]:
        return {"tokens_per_s": tokens_per_step / step_time, "mfu": model_flops_per_step / step_time / peak}

    return run_loop(job, workdir, mesh, tokenizer, data,
                    lambda state, host: train_step(state, global_batch(host, sharding)), rates)


def main(argv: list[str]) -> None:
    summary = run_command(run, argv)
    if summary:
        print(
            f"done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} | "
            f"{summary['tokens_per_s']:,.0f} tok/s | MFU {100 * summary['mfu']:.1f}%",
            flush=True,
        )


if __name__ == "__main__":
    define_command_flags("Experiment config file (configs/*.py).", "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
    app.run(main, flags_parser=parse_flags)
