"""`python -m train.distill --config configs/distill_<x>.py --workdir W [--config.<field>=<value>]`."""

from __future__ import annotations

from absl import app

from train import train as train_lib
from train.distill.run import USER_ERRORS, run


def main(argv: list[str]) -> None:
    summary = train_lib.run_command(run, argv, USER_ERRORS)
    if summary:
        print(f"done: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} | "
              f"{summary['tokens_per_s']:,.0f} tok/s | update MFU {100 * summary['mfu']:.1f}%", flush=True)


if __name__ == "__main__":
    train_lib.define_command_flags("Distillation config file (configs/distill_*.py).",
                                   "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
    app.run(main)
