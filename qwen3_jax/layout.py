"""On-disk layout of the trainer's checkpoints: WORKDIR/checkpoints/<step>/{state,data,data_info,model_config}.

`train/checkpoint.py` writes it; the library reads a step's params (`qwen3_jax.checkpoint.load_any`)
and the tokenizer saved beside them (`checkpoint_dirs`), so neither needs the trainer.
"""

from __future__ import annotations

import os

TRAINER_CHECKPOINTS = "checkpoints"
TRAINER_STATE, TRAINER_DATA, TRAINER_MODEL_CONFIG = "state", "data", "model_config"
TRAINER_DATA_INFO = "data_info"


def trainer_steps(root: str | os.PathLike) -> list[int]:
    """The saved steps (ascending) in a trainer `checkpoints/` directory: committed step folders
    holding the train state (Orbax renames a step's folder into place once it is fully written)."""
    import orbax.checkpoint as ocp  # here, not at the top: the tokenizer imports this module

    steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
    return sorted(s for s in steps if os.path.isdir(os.path.join(root, str(s), TRAINER_STATE)))


def checkpoint_dirs(path: str | os.PathLike) -> list[str]:
    """Where files that ship with the checkpoint at `path` (its tokenizer) are looked for, innermost
    first: `path`, then, for a trainer step folder or `checkpoints/` directory, the directories
    above it up to the run's workdir (the trainer writes its tokenizer at the workdir's root)."""
    path = os.path.abspath(path)
    dirs = [path]
    if os.path.isdir(os.path.join(path, TRAINER_STATE)):
        path = os.path.dirname(path)
        dirs.append(path)
    if os.path.basename(path) == TRAINER_CHECKPOINTS:
        dirs.append(os.path.dirname(path))
    return dirs
