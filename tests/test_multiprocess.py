"""A pod is many processes: 2 processes x 4 CPU devices (jax.distributed on localhost, gloo
collectives) train, checkpoint, restore and generate as 1 process x 8 devices does, and read
disjoint halves of the data into the same global batch (see tests/helpers/multiprocess_worker.py).

The two jobs run side by side; the 1-process job also loads the 2-process job's checkpoint, once
on the same mesh and once on another."""

from __future__ import annotations

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
