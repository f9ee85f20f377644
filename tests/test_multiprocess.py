"""A pod is many processes: 2 processes x 4 CPU devices (jax.distributed on localhost, gloo
collectives) train, checkpoint, restore and generate as 1 process x 8 devices does, and read
disjoint halves of the data into the same global batch (see tests/helpers/multiprocess_worker.py).

The two jobs run side by side; the 1-process job also loads the 2-process job's checkpoint, once
on the same mesh and once on another."""

from __future__ import annotations

import json
import os

import numpy as np

from helpers import multiprocess_worker as worker

HALF = worker.NUM_RECORDS // 2  # data.shards=2: shard 0 holds records 0..31, shard 1 32..63


def test_two_processes_match_one_process(tmp_path, no_torch):
    env = dict(os.environ, PYTHONPATH=no_torch)
    two = worker.Job(str(tmp_path / "2x4"), 2, 4, env=env)
    one = worker.Job(str(tmp_path / "1x8"), 1, 8, restore_from=str(tmp_path / "2x4" / "run"), env=env)
    (p0, p1), (ref,) = worker.wait([two, one], timeout=300)
    assert [(r["process_index"], r["process_count"], r["local_devices"], r["devices"]) for r in (p0, p1, ref)] == [
        (0, 2, 4, 8), (1, 2, 4, 8), (0, 1, 8, 8)]

    # Each process's iterator reads its own half of the records; together they make the global
    # batch of one process, row for row, and so do they after the restore (the step-2 batch).
    for key in ("local_record_ids", "resumed_record_ids"):
        ids0, ids1 = (sorted(i for row in r[key] for i in row) for r in (p0, p1))
        assert ids0 and ids1 and max(ids0) < HALF <= min(ids1), (key, ids0, ids1)
        assert ref[key] == p0[key] + p1[key], key
    seen = {i for r in (p0, p1) for key in ("local_record_ids", "resumed_record_ids") for row in r[key] for i in row}
    assert len(seen) == sum(len(row) for r in (p0, p1) for k in ("local_record_ids", "resumed_record_ids")
                            for row in r[k])  # no record twice in two steps
    batch2, batch1 = (np.load(tmp_path / job / "global_batch.npz") for job in ("2x4", "1x8"))
    for name in batch1.files:
        np.testing.assert_array_equal(batch2[name], batch1[name], err_msg=name)

    # One train step. The loss is the same to the bit here; the updated state differs by float32
    # rounding: gloo's cross-process all-reduce adds the 8 devices' partial gradients in another
    # order than the in-process one, so the gradient (Adam's mu and nu) may move by a few ulps of
    # its largest value. AdamW's first step moves a weight by lr * g / (|g| + eps): where g is a
    # cancellation within those ulps of Adam's eps, its step takes a visibly different size, so
    # weights get a tolerance of 1/500 of the learning rate on top.
    np.testing.assert_allclose([p0["loss"], p0["grad_norm"]], [ref["loss"], ref["grad_norm"]], rtol=1e-6)
    state2, state1 = (np.load(tmp_path / job / "state.npz") for job in ("2x4", "1x8"))
    assert state2.files == state1.files and ".step" in state2.files
    for name in state2.files:
        scale = float(np.abs(state1[name]).max())
        step_noise = 2e-3 * worker.LEARNING_RATE if name.startswith(".params") else 0.0
        np.testing.assert_allclose(state2[name], state1[name], rtol=0, atol=1e-6 * scale + step_noise, err_msg=name)

    # The checkpoint the 2 processes wrote, read by 1 on two meshes: the same bits they restored.
    for restored in ("restored", "restored_other_mesh"):
        params = np.load(tmp_path / "1x8" / f"{restored}.npz")
        assert params.files and len(params.files) == sum(n.startswith(".params/") for n in state2.files)
        for name in params.files:
            np.testing.assert_array_equal(params[name], state2[f".params/{name}"], err_msg=f"{restored}: {name}")

    # Greedy decoding: every process returns the whole batch, the tokens of one process.
    assert p0["generated"] == p1["generated"] == ref["restored_generated"] == ref["generated"]
    assert all(len(row) == worker.MAX_NEW_TOKENS for row in p0["generated"])


def test_rollouts_on_every_host_give_the_one_process_curves(tmp_path, no_torch):
    """On-policy distillation and RL with rollouts on every host: each of 2 processes renders its
    share of the prompts, one engine on the global mesh samples the whole batch, each keeps its
    rows. 3 steps of each loop give 1 process x 8 devices' metrics curves. Rollouts sample the
    same tokens (rewards, lengths equal); losses agree to float32 rounding: gloo adds the
    processes' partial gradients in another order (see the test above), so from step 2 the
    parameters, and with them the losses, may differ by a few ulps."""
    inputs = str(tmp_path / "inputs")
    worker.write_rollout_inputs(inputs)
    env = dict(os.environ, PYTHONPATH=no_torch)
    two = worker.Job(str(tmp_path / "2x4"), 2, 4, env=env, task="rollouts", inputs=inputs)
    one = worker.Job(str(tmp_path / "1x8"), 1, 8, env=env, task="rollouts", inputs=inputs)
    (p0, p1), (ref,) = worker.wait([two, one], timeout=400)
    assert (p0["process_count"], ref["process_count"], p0["devices"], ref["devices"]) == (2, 1, 8, 8)
    curves2, curves1 = (json.load(open(tmp_path / job / "curves.json")) for job in ("2x4", "1x8"))
    exact = {"distill": ("completion_len", "forced_tokens", "think_rows", "loss_tokens"),
             "rl": ("reward_mean", "reward_std", "groups_all_equal", "completion_len", "loss_tokens")}
    close = {"distill": ("loss", "divergence", "student_entropy", "grad_norm"),
             "rl": ("loss", "entropy", "clip_frac", "grad_norm", "behaviour_logp_diff")}
    for loop in ("distill", "rl"):
        assert [m["step"] for m in curves2[loop]] == [m["step"] for m in curves1[loop]] == [1, 2, 3]
        for a, b in zip(curves2[loop], curves1[loop]):
            for k in exact[loop]:
                assert a[k] == b[k], (loop, a["step"], k)
            for k in close[loop]:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=f"{loop} step {a['step']} {k}")
    assert all(m["grad_norm"] > 0 and m["groups_all_equal"] < 1 for m in curves1["rl"])  # every step learns
