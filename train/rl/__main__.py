"""`python -m train.rl --config configs/rl_<x>.py --workdir W [--config.<field>=<value>]`."""

from __future__ import annotations

from absl import app

from train.cli import define_command_flags, parse_flags, run_command
from train.rl.trainer import run


def main(argv: list[str]) -> None:
    summary = run_command(run, argv)
    if summary:
        print(f"done: reward {summary['first_reward']:.3f} -> {summary['last_reward']:.3f} | "
              f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f} | "
              f"{summary['tokens_per_s']:,.0f} tok/s | update MFU {100 * summary['mfu']:.1f}%", flush=True)


if __name__ == "__main__":
    define_command_flags("RL config file (configs/rl_*.py).", "Checkpoints, metrics.jsonl and TensorBoard logs go here.")
    app.run(main, flags_parser=parse_flags)
