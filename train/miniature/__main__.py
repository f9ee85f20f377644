"""`python -m train.miniature --config configs/miniature.py --workdir W [--config.<field>=<value>]`."""

from __future__ import annotations

import os
import time

from absl import app, flags

from train import train as train_lib
from train.distill.run import USER_ERRORS
from train.miniature.recipe import run


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    stages = train_lib.run_command(run, argv, USER_ERRORS)
    total = sum(s["seconds"] for s in stages.values())
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min (all stages: {total / 60:.1f} min): "
          f"{os.path.join(os.path.abspath(flags.FLAGS.workdir), 'report.md')}")


if __name__ == "__main__":
    train_lib.define_command_flags("Recipe config file (configs/miniature.py).", "Where every stage writes; rerunning resumes.")
    app.run(main)
