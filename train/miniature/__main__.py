"""`python -m train.miniature --config configs/miniature.py --workdir W [--config.<field>=<value>]`."""

from __future__ import annotations

import os
import time

from absl import app, flags

from train.cli import define_command_flags, parse_flags, run_command
from train.miniature.recipe import run


def main(argv: list[str]) -> None:
    start = time.perf_counter()
    stages = run_command(run, argv)
    total = sum(s["seconds"] for s in stages.values())
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min (all stages: {total / 60:.1f} min): "
          f"{os.path.join(os.path.abspath(flags.FLAGS.workdir), 'report.md')}")


if __name__ == "__main__":
    define_command_flags("Recipe config file (configs/miniature.py).", "Where every stage writes; rerunning resumes.")
    app.run(main, flags_parser=parse_flags)
