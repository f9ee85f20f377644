"""Orbax checkpoints of a training run, and initial weights from any checkpoint `load_any` reads.

A run's checkpoint directory (WORKDIR/checkpoints) holds one folder per saved step with three items:
  state         the TrainState (params, optimizer state, step), written by the devices holding it;
  data          the grain iterator position, one JSON file per process;
  model_config  the architecture as a Hugging Face config.json, so the weights can seed another
                run (`model.init_from`) without its training config.
Saves are asynchronous: `save` returns once the arrays are copied off the device and the
iterator position is recorded; files are written in the background and a step only becomes
visible (`latest_step`) once fully committed, so a run killed mid-save resumes from the previous
step. Restoring takes the target shardings, so a state saved on one mesh restores onto any other.
"""

from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from grain.checkpoint import CheckpointRestore, CheckpointSave
from jax.sharding import Mesh

from qwen3_jax.checkpoint import TRAINER_DATA, TRAINER_MODEL_CONFIG, TRAINER_STATE, load_any, load_any_config
from qwen3_jax.config import Qwen3Config, to_hf_config
from qwen3_jax.tokenizer import Tokenizer
from train.step import Params, TrainState


class Checkpointer:
    """A run's checkpoint directory: `should_save` marks every `every`-th step, `save` writes any
    step it is given, and only the newest `keep` steps stay on disk."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._every = every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self._every == 0

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption: True on every host at the same step once any host got SIGTERM."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: TrainState, data_iterator: grain.DatasetIterator, cfg: Qwen3Config) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(**{
                TRAINER_STATE: ocp.args.StandardSave(state),
                TRAINER_DATA: CheckpointSave(data_iterator),
                TRAINER_MODEL_CONFIG: ocp.args.JsonSave(to_hf_config(cfg)),
            }),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState, data_iterator: grain.DatasetIterator) -> TrainState:
        """The state at `step` laid out as `abstract_state` says; moves `data_iterator` there too."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                TRAINER_STATE: ocp.args.StandardRestore(abstract_state),
                TRAINER_DATA: CheckpointRestore(data_iterator),
            }),
        )
        return restored[TRAINER_STATE]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ------------------------------------------------------------------------------- init_from
# `model.init_from` accepts whatever `qwen3_jax.checkpoint.load_any` reads: a Hugging Face
# checkpoint, a qwen3-jax model checkpoint (e.g. written by `python -m qwen3_jax.convert`), or a
# checkpoint of this trainer (a run's workdir or its checkpoints/ directory: the latest step; or a
# step folder). The reading of this trainer's layout lives there, below the inference code.


def init_from_config(path: str, **overrides) -> Qwen3Config:
    """The architecture stored with the weights at `path`, plus (runtime) `overrides`."""
    return load_any_config(path, **overrides)


def load_params(path: str, cfg: Qwen3Config, mesh: Mesh) -> Params:
    """Float32 parameters from `path`, each restored directly into its sharding under `cfg`'s rules."""
    return nnx.to_pure_dict(nnx.state(load_any(path, mesh=mesh, dtype=jnp.float32, rules=cfg.rules), nnx.Param))


def save_tokenizer(workdir: str, tokenizer: Tokenizer | None) -> None:
    """Writes the run's tokenizer (if it has one) at the root of `workdir`, so the workdir ships it
    like any checkpoint: `Tokenizer.from_checkpoint`, the inference CLIs, `qwen3_jax.convert` and
    a later run's `model.init_from` find it from the workdir, its checkpoints/ dir or a step folder."""
    if tokenizer is not None and jax.process_index() == 0:
        tokenizer.save(workdir)
