"""Orbax checkpoints of a training run, and initial weights from any checkpoint `load_any` reads.

A run's checkpoint directory (WORKDIR/checkpoints) holds one folder per saved step with these items:
  state         the TrainState (params, optimizer state, step), written by the devices holding it;
  data          the grain iterator position, one JSON file per process;
  data_info     what the run read (`train.data.DataStream.checkpoint_info`: the data files'
                fingerprint, records skipped so far), checked when the run resumes;
  model_config  the architecture as a Hugging Face config.json, so the weights can seed another
                run (`model.init_from`) without its training config;
and, once the step is known to be complete, MANIFEST.json: every file's size and, for files up to
1 MiB (the metadata), its sha256, so a file later lost, truncated or altered is named on restore.

Saves are asynchronous: `save` returns once the arrays are copied off the device and the
iterator position is recorded; files are written in the background and a step only becomes
visible (`latest_step`) once fully committed, so a run killed mid-save resumes from the previous
step (its half-written temporary folder is removed when the next run starts). A save that fails
(a full disk) raises CheckpointWriteError at the next `save`, `wait` or `poll`, after removing its
partial files; older steps are deleted (beyond `keep`) only once a newer one is complete, so a
failed save never costs the last good checkpoint. Restoring takes the target shardings, so a
state saved on one mesh restores onto any other.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Any, Mapping

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from grain.checkpoint import CheckpointRestore, CheckpointSave
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from qwen3_jax.checkpoint import load_any, load_any_config
from qwen3_jax.layout import TRAINER_DATA, TRAINER_DATA_INFO, TRAINER_MODEL_CONFIG, TRAINER_STATE
from qwen3_jax.config import Qwen3Config
from qwen3_jax.hf_config import to_hf_config
from qwen3_jax.hf import CheckpointError
from qwen3_jax.tokenizer import Tokenizer
from train.step import Params, TrainState

MANIFEST = "MANIFEST.json"
_HASHED_BYTES = 1 << 20  # files up to this size (metadata, not arrays) are hashed in the manifest
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CorruptCheckpointError(CheckpointError):
    """A saved step that cannot be read back: a file missing, truncated or altered since it was
    written, or metadata that does not parse. The message names the step and the file."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint saved for another model than the run's config describes (fields named)."""


class CheckpointWriteError(RuntimeError):
    """A step could not be written (e.g. the disk is full); the message names it and the last
    complete step, which is intact."""


class Checkpointer:
    """A run's checkpoint directory: `should_save` marks every `every`-th step, `save` writes any
    step it is given, and only the newest `keep` complete steps stay on disk."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._every, self._keep = every, keep
        self._in_flight: int | None = None  # the step being written in the background
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # Retention is ours (`_settle`): Orbax would delete old steps even when the new
                # one failed to write.
                max_to_keep=None, enable_async_checkpointing=async_save, create=True,
                cleanup_tmp_directories=True,  # the partial step of a killed run
            ),
        )

    def steps(self) -> list[int]:
        """Complete steps on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        return step % self._every == 0

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption: True on every host at the same step once any host got SIGTERM."""
        return self._manager.reached_preemption(step)

    # ---- writing

    def save(self, step: int, state: TrainState, data_iterator: grain.DatasetIterator, cfg: Qwen3Config,
             data_info: Mapping[str, Any] | None = None) -> None:
        """Starts writing `step` (see the module docstring); first finishes the previous save.
        Raises CheckpointWriteError naming the step that could not be written."""
        self._settle()
        items = {
            TRAINER_STATE: ocp.args.StandardSave(state),
            TRAINER_DATA: CheckpointSave(data_iterator),
            TRAINER_MODEL_CONFIG: ocp.args.JsonSave(to_hf_config(cfg)),
        }
        if data_info is not None:
            items[TRAINER_DATA_INFO] = ocp.args.JsonSave(dict(data_info))
        self._in_flight = step
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # whatever the storage raised; named with the step below
            self._write_failed(e)

    def poll(self) -> None:
        """Finishes a background save that is done (raising CheckpointWriteError if it failed);
        never waits. Call it between steps, so a failed save stops the run at once."""
        if self._in_flight is not None and not self._manager.is_saving_in_progress():
            self._settle()

    def wait(self) -> None:
        """Waits for the background save; raises CheckpointWriteError if it failed."""
        self._settle()

    def _settle(self) -> None:
        """Waits for the in-flight save; on success writes its manifest and deletes the steps
        beyond `keep`, on failure removes its partial files and raises CheckpointWriteError."""
        if self._in_flight is None:
            return
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # the background writer's error, whatever the storage raised
            self._write_failed(e)
        step, self._in_flight = self._in_flight, None
        self._manager.reload()
        if step not in self.steps():
            raise CheckpointWriteError(
                f"checkpoint step {step} was not committed to {self.directory}; {self._last_complete()}"
            )
        if jax.process_index() == 0:
            self._write_manifest(step)
        for old in self.steps()[: -self._keep]:
            self._manager.delete(old)

    def _write_failed(self, error: Exception) -> None:
        step, self._in_flight = self._in_flight, None
        if jax.process_index() == 0:  # the partial step: it holds nothing restorable
            for tmp in glob.glob(os.path.join(self.directory, f"{step}{_TMP_SUFFIX}*")):
                shutil.rmtree(tmp, ignore_errors=True)
        self._manager.reload()
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointWriteError(
            f"checkpoint step {step} could not be written to {self.directory}: {cause}; {self._last_complete()}"
        ) from error

    def _last_complete(self) -> str:
        step = self.latest_step()
        if step is None:
            return "no step was saved yet"
        return (f"the last complete checkpoint, step {step}, is intact: fix the cause (free space) and rerun the "
                "same command to resume from it")

    def _write_manifest(self, step: int) -> None:
        """MANIFEST of a complete step, written atomically; a step without one (a full disk, a
        kill just after the commit) is restored unverified."""
        root = os.path.join(self.directory, str(step))
        tmp = os.path.join(root, MANIFEST + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(_file_table(root), f, indent=1, sort_keys=True)
            os.replace(tmp, os.path.join(root, MANIFEST))
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            print(f"warning: could not write {MANIFEST} of checkpoint step {step}: {e}", flush=True)

    # ---- reading

    def verify(self, step: int) -> None:
        """Checks `step`'s files against its MANIFEST; raises CorruptCheckpointError naming the
        first file missing, of another size or with other content."""
        root = os.path.join(self.directory, str(step))
        path = os.path.join(root, MANIFEST)
        if not os.path.exists(path):
            return
        where = f"checkpoint step {step} in {self.directory}"
        try:
            with open(path) as f:
                expected = json.load(f)
        except (OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: its {MANIFEST} cannot be read: {e}") from None
        actual = _file_table(root)
        for name, (size, digest) in sorted(expected.items()):
            if name not in actual:
                raise CorruptCheckpointError(f"{where}: file {name} is missing")
            if actual[name][0] != size:
                raise CorruptCheckpointError(
                    f"{where}: file {name} has {actual[name][0]} bytes, {size} when it was written (truncated or "
                    "overwritten)")
            if actual[name][1] != digest:
                raise CorruptCheckpointError(f"{where}: file {name} has changed since it was written (corrupted)")

    def _read_json(self, step: int, item: str) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # Orbax and json raise many types; each means the item is unreadable
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory}: its {item} item cannot be read: {_summary(e)}") from e

    def model_config(self, step: int) -> dict[str, Any]:
        """The Hugging Face config.json `step` was saved with."""
        return self._read_json(step, TRAINER_MODEL_CONFIG)

    def check_model_config(self, step: int, cfg: Qwen3Config) -> None:
        """Raises ConfigMismatchError naming every field in which the model `step` was saved for
        differs from `cfg` (e.g. another preset or vocab_size)."""
        saved = self.model_config(step)
        wanted = json.loads(json.dumps(to_hf_config(cfg)))  # JSON types, as saved
        fields = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        if fields:
            diff = ", ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {wanted.get(k)!r} in this run" for k in fields)
            raise ConfigMismatchError(
                f"checkpoint step {step} in {self.directory} was saved for another model ({diff}); use the model "
                "config it was trained with, or a new workdir"
            )

    def data_info(self, step: int) -> dict[str, Any] | None:
        """The `data_info` item of `step`; None for a step saved without one."""
        if not os.path.isdir(os.path.join(self.directory, str(step), TRAINER_DATA_INFO)):
            return None
        return self._read_json(step, TRAINER_DATA_INFO)

    def restore(self, step: int, abstract_state: TrainState, data_iterator: grain.DatasetIterator) -> TrainState:
        """The state at `step` laid out as `abstract_state` says; moves `data_iterator` there too.
        Raises CorruptCheckpointError naming the step (and the file, when MANIFEST can tell)."""
        self.verify(step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(**{
                    TRAINER_STATE: ocp.args.StandardRestore(abstract_state),
                    TRAINER_DATA: CheckpointRestore(data_iterator),
                }),
            )
        except Exception as e:  # Orbax, TensorStore and grain raise many types for unreadable files
            raise CorruptCheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored: {_summary(e)}") from e
        return restored[TRAINER_STATE]

    def discarded_dir(self, reason: str) -> str:
        """Where `set_aside(step, reason)` moves steps: DIRECTORY.discarded/REASON."""
        return os.path.join(f"{self.directory}.discarded", reason)

    def set_aside(self, step: int, reason: str) -> str:
        """Moves `step` out of the checkpoint directory into `discarded_dir(reason)` (nothing is
        deleted), so that the run can write that step again; returns where it went."""
        target = os.path.join(self.discarded_dir(reason), str(step))
        n = 1
        while os.path.exists(target):
            target = os.path.join(self.discarded_dir(reason), f"{step}.{n}")
            n += 1
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(os.path.join(self.directory, str(step)), target)
        multihost_utils.sync_global_devices(f"set_aside {step}")  # every process sees the move
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()


def _file_table(root: str) -> dict[str, tuple[int, str | None]]:
    """{path under `root`: (size, sha256 for files up to _HASHED_BYTES else None)}, MANIFEST aside."""
    table = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if rel.startswith(MANIFEST):
                continue
            size = os.path.getsize(path)
            digest = None
            if size <= _HASHED_BYTES:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            table[rel] = (size, digest)
    return table


def _summary(error: Exception) -> str:
    """The first line of an error (TensorStore's run to pages), with its type."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:500] if text else ''}"


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
