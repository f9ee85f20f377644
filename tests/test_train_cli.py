"""`python -m train.train` as a user runs it: SIGKILL and resume, SIGTERM, a full disk, a NaN loss,
and errors printed as one line."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.train_fixtures import REPO, write_word_tokenizer


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


# ------------------------------------------------------------------------------------- CLI
# Subprocesses share the session's persistent compilation cache (conftest.py): they all compile the
# same step (the learning rate schedule, a compile-time constant, is fixed by decay_steps rather
# than train.steps).


@pytest.fixture(scope="module")
def cli_env(no_torch) -> dict[str, str]:
    """Environment of the training subprocesses: this one's, with torch hidden (`no_torch`)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([no_torch, REPO]))


def cli_args(workdir, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "train.train", "--config", os.path.join(REPO, "configs/tiny_pretrain.py"),
        f"--workdir={workdir}", "--config.data.seq_len=32", "--config.data.batch_size=4",
        "--config.train.ce_chunk_len=16", "--config.train.peak_flops=1e10", "--config.optimizer.decay_steps=100",
        *overrides,
    ]


def cli(env: dict[str, str], workdir, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(cli_args(workdir, *overrides), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, returncode: int = 0) -> str:
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == returncode, out
    return out


def losses(workdir) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill and after the resume) keeps the last."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {r["step"]: r["loss"] for r in map(json.loads, open(path).read().splitlines())}


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def latest_checkpoint(workdir) -> int | None:
    """Newest committed step (Orbax writes into a temporary folder and renames it when done)."""
    root = os.path.join(workdir, "checkpoints")
    steps = [int(name) for name in os.listdir(root) if name.isdigit()] if os.path.isdir(root) else []
    return max(steps, default=None)


STEPS_16 = ("--config.train.steps=16", "--config.checkpoint.every=4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env) -> tuple[str, dict[int, float]]:
    """An uninterrupted 16-step run (checkpoints every 4): its workdir and losses."""
    workdir = tmp_path_factory.mktemp("reference")
    finish(cli(cli_env, workdir, *STEPS_16))
    return str(workdir), losses(workdir)


def test_resume_after_sigkill_gives_identical_losses(tmp_path, cli_env, reference):
    ref_dir, ref_losses = reference
    assert sorted(ref_losses) == list(range(1, 17))
    records = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s", "step_time", "mfu"} <= set(records[0])
    assert os.listdir(os.path.join(ref_dir, "tensorboard"))

    killed = cli(cli_env, tmp_path, *STEPS_16)
    wait_until(lambda: latest_checkpoint(tmp_path) and max(losses(tmp_path), default=0) >= 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert max(losses(tmp_path)) < 16
    out = finish(cli(cli_env, tmp_path, *STEPS_16))
    assert "resuming from step" in out
    assert losses(tmp_path) == ref_losses  # exact equality: bit-identical losses


# Loaded by a training subprocess via PYTHONPATH: every Orbax commit (the rename of a finished
# step's temporary folder) waits first, so a test can kill the run while a save is in flight.
SLOW_COMMIT = """
import asyncio
from orbax.checkpoint._src.path import atomicity

_finalize = atomicity.AtomicRenameTemporaryPath.finalize


async def finalize(self):
    await asyncio.sleep(0.3)
    await _finalize(self)


atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


def test_sigkill_during_an_async_save_resumes_from_the_last_complete_step(tmp_path, cli_env, reference):
    slow = tmp_path / "slow_commit"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_COMMIT)
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([str(slow), cli_env["PYTHONPATH"]])}
    workdir = tmp_path / "run"
    in_flight = workdir / "checkpoints" / "8.orbax-checkpoint-tmp"
    killed = cli(env, workdir, *STEPS_16)
    wait_until(lambda: latest_checkpoint(workdir) == 4 and in_flight.is_dir(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert in_flight.is_dir() and latest_checkpoint(workdir) == 4  # killed with step 8 half written

    out = finish(cli(cli_env, workdir, *STEPS_16))
    assert "resuming from step 4" in out
    assert losses(workdir) == reference[1]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "16", "8"]  # the partial step is gone


def _tmpfs_available() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


def _disk_bytes(directory) -> int:
    """Bytes `directory`'s files take on a filesystem of 4 KiB pages."""
    return sum(-(-os.path.getsize(os.path.join(d, n)) // 4096) * 4096
               for d, _, names in os.walk(directory) for n in names)


def test_full_disk_during_a_save_is_named_and_the_run_resumes_once_space_is_back(tmp_path, cli_env, reference):
    """A tmpfs mounted in a user + mount namespace holds one checkpoint of the tiny run and a
    third of another: saving step 8 fails with ENOSPC. Then the same mount is grown (space is
    back) and the same command resumes from step 4."""
    if not _tmpfs_available():
        pytest.skip("needs `unshare --user --mount` (unprivileged user namespaces) to mount a small tmpfs")
    size_kib = (_disk_bytes(os.path.join(reference[0], "checkpoints", "16")) * 4 // 3 + (256 << 10)) >> 10
    disk = tmp_path / "disk"
    disk.mkdir()
    run = shlex.join(cli_args(disk / "run", *STEPS_16))
    script = f"""
        mount -t tmpfs -o size={size_kib}k tmpfs {disk} || exit 99
        {run} > {tmp_path}/full.log 2>&1; echo $? > {tmp_path}/full.rc
        ls {disk}/run/checkpoints > {tmp_path}/after_full.txt
        mount -o remount,size=256m {disk}
        {run} > {tmp_path}/resumed.log 2>&1; echo $? > {tmp_path}/resumed.rc
        cp {disk}/run/metrics.jsonl {tmp_path}/metrics.jsonl
    """
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO, env=cli_env,
                   check=True, timeout=300)
    full = (tmp_path / "full.log").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", full
    # Orbax's writer threads log the failure too (tracebacks, interleaved); the run ends with ours.
    (error,) = [line for line in full.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: checkpoint step 8 could not be written to"), full
    assert "No space left on device" in error and "the last complete checkpoint, step 4, is intact" in error
    assert (tmp_path / "after_full.txt").read_text().split() == ["4"]  # no partial step 8 left behind

    resumed = (tmp_path / "resumed.log").read_text()
    assert (tmp_path / "resumed.rc").read_text().strip() == "0", resumed
    assert "resuming from step 4" in resumed
    assert losses(tmp_path) == reference[1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, cli_env):
    proc = cli(cli_env, tmp_path, "--config.train.steps=100", "--config.checkpoint.every=1000")
    wait_until(lambda: max(losses(tmp_path), default=0) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert "preempted" in out
    step = latest_checkpoint(tmp_path)
    assert 2 <= step < 100 and step == max(losses(tmp_path))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cli_env):
    proc = cli(cli_env, tmp_path, "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=0",
               "--config.checkpoint.every=1")
    out = finish(proc, returncode=1)
    assert "error: non-finite loss" in out and "at step 2; stopping: the last good checkpoint is step 1" in out
    assert "Traceback" not in out
    assert latest_checkpoint(tmp_path) == 1


def test_sigkill_on_a_2x2_mesh_with_moe_and_shuffled_chat_data_resumes_to_identical_losses(
        tmp_path, word_tokenizer, cli_env):
    """The SIGKILL test where more can go wrong than in its single-device run: a data x fsdp mesh
    (sharded state and batch), the MoE model, and SFT records from a shuffled JSONL file read for
    several epochs (each reshuffled), packed whole, with loss masks."""
    rng = np.random.default_rng(0)

    def words():
        return " ".join(f"w{i}" for i in rng.integers(0, 100, rng.integers(1, 6)))

    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": words()},
                                                     {"role": "assistant", "content": words()}]}) + "\n"
                            for _ in range(12)))
    overrides = ("--config.model.preset=tiny-moe", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                 "--config.data.format=jsonl", "--config.data.kind=chat", f"--config.data.paths={path}",
                 "--config.data.shuffle=True", f"--config.tokenizer={word_tokenizer}", *STEPS_16)
    finish(cli(cli_env, tmp_path / "reference", *overrides))
    reference = losses(tmp_path / "reference")
    assert sorted(reference) == list(range(1, 17)) and len(set(reference.values())) == 16

    killed = cli(cli_env, tmp_path / "run", *overrides)
    wait_until(lambda: latest_checkpoint(tmp_path / "run") and max(losses(tmp_path / "run"), default=0) >= 6, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert max(losses(tmp_path / "run")) < 16
    assert "resuming from step" in finish(cli(cli_env, tmp_path / "run", *overrides))
    assert losses(tmp_path / "run") == reference  # bit-identical


def test_a_typo_in_a_config_field_is_one_line_naming_the_closest_field(tmp_path, cli_env):
    for override, message in [
        ("--config.train.stepz=20", "error: unknown config field train.stepz; did you mean train.steps?"),
        ("--config.optimzer.warmup_steps=2", "error: unknown config field optimzer; did you mean optimizer?"),
    ]:
        out = finish(cli(cli_env, tmp_path, override), returncode=1)
        assert out.strip().splitlines()[-1] == message and "Traceback" not in out, out
    assert not os.path.exists(tmp_path / "metrics.jsonl")
