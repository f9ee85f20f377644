"""The loop every trainer shares: init or resume, steps, metrics, checkpoints, SIGTERM, NaN stops.

A workdir that already holds checkpoints resumes from the latest one (state, data position and
all; `model.init_from` then plays no part). Metrics are fetched one step late (step k's after
step k+1 is dispatched), so the host never makes the device wait; step time is the interval
between consecutive fetches (the first step includes compilation).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from qwen3_jax.layout import TRAINER_CHECKPOINTS
from qwen3_jax.errors import CheckpointError, ConfigError, CorruptCheckpointError, TrainingError
from qwen3_jax.sharding import initialize_distributed
from qwen3_jax.tokenizer import Tokenizer
from train import data as data_lib
from train.checkpoint import Checkpointer, load_params, save_tokenizer
from train.config import Job
from train.metrics import MetricsWriter, measure_peak_flops
from train.schema import config_dict
from train.step import TrainState, abstract_train_state, init_train_state


class PreemptionWatch:
    """True once the run should checkpoint and stop.

    One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption service
    (started by jax.distributed.initialize) catches the signal and orbax picks a step at which
    every host stops together; installing our own handler there would shadow it.
    """

    def __init__(self, checkpointer: Checkpointer):
        self._checkpointer = checkpointer
        self._flag = False
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._flag = True

    def __call__(self, step: int) -> bool:
        return self._checkpointer.reached_preemption(step) if self._multi else self._flag

    def close(self) -> None:
        if not self._multi:
            signal.signal(signal.SIGTERM, self._previous)


def start_distributed(config: Any) -> None:
    """Joins the multi-process job when `config.distributed` (before anything touches the devices),
    with the config's coordinator_address / num_processes / process_id (None: discovered)."""
    if config.distributed:
        initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)


def global_batch(host: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows assembled into global [batch, ...] arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host.items()}


StepFn = Callable[[TrainState, Any], tuple[TrainState, dict[str, Any]]]
RatesFn = Callable[[dict[str, float], float, float], dict[str, float]]


def run_loop(
    job: Job, workdir: str, mesh: Mesh, tokenizer: Tokenizer | None, data: data_lib.DataStream, step_fn: StepFn,
    rates: RatesFn,
) -> dict[str, float]:
    """The loop every trainer shares: init or resume, steps, metrics, checkpoints, SIGTERM.

    The workdir ships `tokenizer` (when there is one) at its root, so it serves as a checkpoint.

    `step_fn(state, next(data.iterator))` applies one update and returns the new state and its
    metrics (device arrays, read one step late, or host floats); `rates(scalars, step_time,
    peak_flops)` adds `tokens_per_s` and `mfu`. States are saved (with the data iterator's
    position, `data.checkpoint_info()` and the model config) every `checkpoint.every` steps, at
    the end and on SIGTERM, and only once their step's loss and gradient norm are known to be
    finite. A resumed run is checked first (`resume`); nothing in the workdir is written before.

    Raises:
      TrainingError: a non-finite loss or gradient norm (naming the step and the last good
        checkpoint), or a checkpoint that could not be written.
      ConfigError: the data ran out before `train.steps`.
    """
    cfg, config, steps = job.model, job.config, job.step.steps
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(os.path.join(workdir, TRAINER_CHECKPOINTS), every=config.checkpoint.every,
                                keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    try:
        resumed = resume(checkpointer, job, data, abstract_train_state(cfg, job.optimizer, mesh))
    except BaseException:
        checkpointer.close()
        raise
    if resumed is None:
        init_from = config.model.init_from
        params = None if init_from is None else load_params(init_from, cfg, mesh)
        state = init_train_state(cfg, job.optimizer, mesh, seed=config.seed, params=params)
        start = 0
    else:
        start, state = resumed
        if start >= steps:
            print(f"nothing to do: step {start} of train.steps={steps} is done", flush=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_dict(config).to_json_best_effort(indent=2))
    save_tokenizer(workdir, tokenizer)  # the workdir ships its tokenizer, like any checkpoint

    peak_flops = job.step.peak_flops
    peak = peak_flops * mesh.devices.size if peak_flops else measure_peak_flops(mesh, cfg.dtype)
    writer = MetricsWriter(workdir, steps, job.step.log_every, start)
    preemption = PreemptionWatch(checkpointer)
    skipping = data.bad_records.policy == "skip"
    history: list[dict[str, float]] = []
    last_fetch = time.perf_counter()

    def report(step: int, metrics: dict[str, Any]) -> None:
        nonlocal last_fetch
        scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        # A step that blocks on its own work (a rollout) times itself; an asynchronous one is
        # timed from one metrics fetch to the next.
        step_time = scalars.pop("step_time", now - last_fetch)
        last_fetch = now
        if not (math.isfinite(scalars["loss"]) and math.isfinite(scalars["grad_norm"])):
            checkpointer.wait()
            good = checkpointer.latest_step()
            kept = ("no checkpoint was saved" if good is None
                    else f"the last good checkpoint is step {good} in {checkpointer.directory}")
            raise TrainingError(
                f"non-finite loss {scalars['loss']} (grad_norm {scalars['grad_norm']}) at step {step}; "
                f"stopping: {kept}"
            )
        scalars.update(step_time=step_time, **rates(scalars, step_time, peak))
        if skipping:  # records skipped so far (read ahead of this step by the pipeline's buffers)
            scalars["skipped_records"] = data.bad_records.count
        history.append(scalars)
        writer.write(step, scalars)

    try:
        pending = None
        for step in range(start + 1, steps + 1):
            checkpointer.poll()  # a background save that failed stops the run here
            try:
                host_batch = next(data.iterator)
            except StopIteration:
                raise ConfigError(
                    f"the data ran out before step {step} of train.steps={steps}: raise its num_epochs "
                    "(None repeats forever) or lower train.steps"
                ) from None
            state, metrics = step_fn(state, host_batch)
            if pending is not None:
                report(*pending)  # the previous step: the device is already busy with this one
            pending = (step, metrics)
            preempted = preemption(step)
            if preempted or step == steps or checkpointer.should_save(step):
                report(*pending)  # a state is saved only once its step is known to be finite
                pending = None
                checkpointer.save(step, state, data.iterator, cfg, data.checkpoint_info())
            if preempted:
                print(f"preempted: saved step {step}, exiting", flush=True)
                break
        checkpointer.wait()
    finally:
        preemption.close()
        writer.close()
        checkpointer.close()
    if skipping:
        print(f"data: {data.bad_records.summary()}", flush=True)
    return summarize(history)


def resume(
    checkpointer: Checkpointer, job: Job, data: data_lib.DataStream, abstract_state: TrainState,
) -> tuple[int, TrainState] | None:
    """The (step, state) a run continues from, None for a fresh run; moves `data.iterator` there.

    The step is the latest, or `checkpoint.restore_step` (the steps after it are set aside, once: when
    they were set aside before, this is a rerun that continues from its own later steps). Before
    anything is restored, the step's files are verified, its model config compared with
    `job.model` (CheckpointError naming the fields) and its data files with today's
    (`DataStream.resume`). A corrupt step raises CorruptCheckpointError naming the step and the
    file, or with `checkpoint.on_corrupt='fallback'` is set aside and the next older step tried.
    """
    restore_step, on_corrupt = job.config.checkpoint.restore_step, job.config.checkpoint.on_corrupt
    applied = checkpointer.discarded_dir(f"restore_step_{restore_step}")  # marks the choice as made
    if restore_step is not None and not os.path.isdir(applied):
        steps = checkpointer.steps()
        if restore_step not in steps:
            raise CheckpointError(
                f"checkpoint.restore_step={restore_step} is not a saved step of {checkpointer.directory}; the "
                f"saved steps are {steps}")
        for newer in (s for s in steps if s > restore_step):
            print(f"checkpoint.restore_step={restore_step}: step {newer} set aside to "
                  f"{checkpointer.set_aside(newer, os.path.basename(applied))}", flush=True)
        if jax.process_index() == 0:
            os.makedirs(applied, exist_ok=True)
    while (step := checkpointer.latest_step()) is not None:
        try:
            checkpointer.verify(step)
            checkpointer.check_model_config(step, job.model)
            data.resume(checkpointer.data_info(step), f"checkpoint step {step} in {checkpointer.directory}")
            state = checkpointer.restore(step, abstract_state, data.iterator)
        except CorruptCheckpointError as e:
            if on_corrupt == "error":
                raise CorruptCheckpointError(
                    f"{e}. Set checkpoint.on_corrupt='fallback' to resume from the newest intact step, or "
                    "checkpoint.restore_step to choose one") from e
            print(f"{e}; set aside to {checkpointer.set_aside(step, 'corrupt')}, falling back", flush=True)
            continue
        print(f"resuming from step {step} in {checkpointer.directory}", flush=True)
        return step, state
    if os.path.isdir(checkpointer.discarded_dir("corrupt")):
        raise CorruptCheckpointError(
            f"no intact checkpoint is left in {checkpointer.directory} (the corrupt ones are in "
            f"{checkpointer.discarded_dir('corrupt')}); move one back, or start a new workdir")
    return None


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """First and last loss of this invocation; speed averaged past its first (compiling) step."""
    if not history:
        return {}
    steady = history[1:] or history
    return {
        "first_loss": history[0]["loss"],
        "last_loss": history[-1]["loss"],
        "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in steady])),
        "mfu": float(np.mean([h["mfu"] for h in steady])),
    }
