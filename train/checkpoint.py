"""Orbax checkpoints of a training run, and initial weights from a Hugging Face or Orbax directory.

A run's checkpoint directory holds one folder per saved step with three items:
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

from qwen3_jax.checkpoint import is_hf_checkpoint, is_orbax_checkpoint, load_any, load_config
from qwen3_jax.config import Qwen3Config, from_hf_config, to_hf_config
from qwen3_jax.hf import CheckpointError
from train.step import Params, TrainState, abstract_params, params_shardings

STATE, DATA, MODEL_CONFIG = "state", "data", "model_config"


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
                STATE: ocp.args.StandardSave(state),
                DATA: CheckpointSave(data_iterator),
                MODEL_CONFIG: ocp.args.JsonSave(to_hf_config(cfg)),
            }),
            force=True,
        )

    def restore(self, step: int, abstract_state: TrainState, data_iterator: grain.DatasetIterator) -> TrainState:
        """The state at `step` laid out as `abstract_state` says; moves `data_iterator` there too."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(abstract_state),
                DATA: CheckpointRestore(data_iterator),
            }),
        )
        return restored[STATE]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


# ------------------------------------------------------------------------------- init_from
# `model.init_from` accepts a Hugging Face checkpoint, a qwen3-jax model checkpoint
# (qwen3_jax.checkpoint, e.g. written by `python -m qwen3_jax.convert`), or a checkpoint of this
# trainer: a step folder, a checkpoint directory (its latest step) or a run's workdir.


def trainer_step_dir(path: str) -> str | None:
    """The trainer step folder `path` designates, or None if it designates none."""
    if os.path.isdir(os.path.join(path, STATE)):
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
    return os.path.join(root, str(max(steps))) if steps else None


def _trainer_step_dir_or_raise(path: str) -> str:
    step_dir = trainer_step_dir(path)
    if step_dir is None:
        raise CheckpointError(
            f"{path} is neither a Hugging Face checkpoint (config.json + *.safetensors), a qwen3-jax "
            "checkpoint (qwen3_jax.json + params/) nor a checkpoint of this trainer"
        )
    return step_dir


def init_from_config(path: str, **overrides) -> Qwen3Config:
    """The architecture stored with the weights at `path`, plus (runtime) `overrides`."""
    if is_orbax_checkpoint(path):
        return load_config(path, **overrides)
    if is_hf_checkpoint(path):
        return from_hf_config(path, **overrides)
    model_config_dir = os.path.join(_trainer_step_dir_or_raise(path), MODEL_CONFIG)
    return from_hf_config(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(model_config_dir), **overrides)


def load_params(path: str, cfg: Qwen3Config, mesh: Mesh) -> Params:
    """Float32 parameters for `cfg` from `path`, each restored directly into its sharding."""
    if is_orbax_checkpoint(path) or is_hf_checkpoint(path):
        return nnx.to_pure_dict(nnx.state(load_any(path, mesh=mesh, dtype=jnp.float32), nnx.Param))
    target = {"params": jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s),
        abstract_params(cfg), params_shardings(cfg, mesh),
    )}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(_trainer_step_dir_or_raise(path), STATE),
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
            partial_restore=True,  # the params only, not the optimizer state
        ),
    )
    return restored["params"]
