"""One process of a multi-process run on CPU, and the launcher that starts them all.

    python tests/helpers/multiprocess_worker.py --out /tmp/mp2 --num_processes 2 --devices 4
    python tests/helpers/multiprocess_worker.py --out /tmp/mp1 --num_processes 1 --devices 8 \
        --restore_from /tmp/mp2/run

Each process sees `--devices` CPU devices; with several processes they join one job through
`jax.distributed.initialize` on localhost (CPU collectives over gloo), as the hosts of a TPU
slice would. Every process then runs the real code paths on one mesh over all devices:

1. `train.train.run` for one step of tiny-dense on JSONL text (a word-level tokenizer, data
   split into 2 shards), saving an Orbax checkpoint;
2. the input pipeline built as `train.train.run` builds it: its first batch on this process
   (the record ids its rows hold) and the global batch `global_batch` assembles from all of them;
3. `train.checkpoint.Checkpointer.restore` of the whole train state (and data position);
4. greedy `infer.engine.generate` on the restored parameters (`qwen3_jax.load_any`).

With `--restore_from RUN` (another job's workdir; that job may still be running, its step 1 is
waited for) it also loads that run's parameters on this run's mesh and on a different one, and
generates from them: a checkpoint written by N processes read by this many. Every process writes
OUT/process_<i>.json (its loss, record ids, tokens, and the wall seconds of each phase); process 0
also writes the arrays, gathered from all processes, as OUT/<name>.npz. Records are
"w<i> w<i+1> ...", so a document's first token names its record: token id i + 1 is record i.

With `--task rollouts` a process instead runs 3 steps of `train.distill.run` (on-policy) and 3 of
`train.rl.run` on tiny models with chat prompts (a sentencepiece tokenizer with Qwen3's control
tokens), rollouts on every host, and process 0 writes both metrics curves to OUT/curves.json.

Without --process_id the command is the launcher: it starts the job's processes (`Job`) and
waits for them (`wait`), which is what tests/test_multiprocess.py does for two jobs side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

STARTED = time.perf_counter()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = {"data": 2, "fsdp": 2, "tensor": 2}  # 8 devices; tiny-dense's heads (6 q, 2 kv) split 2 ways
OTHER_MESH = {"fsdp": 4, "tensor": 2}  # the --restore_from parameters, laid out another way
NUM_RECORDS = 64
PROMPTS = ([5, 6, 7, 8], [30, 31], [70, 71, 72, 73, 74, 75])  # 3 rows: padded to the data degree
MAX_NEW_TOKENS = 8
LEARNING_RATE = 3e-3


def write_inputs(directory: str) -> tuple[str, str]:
    """The JSONL records and the word-level tokenizer.json: ("w0" ... "w99" are ids 1 ... 100)."""
    import tokenizers

    os.makedirs(directory, exist_ok=True)
    data = os.path.join(directory, "text.jsonl")
    with open(data, "w") as f:
        for i in range(NUM_RECORDS):
            words = [f"w{(i + j) % 100}" for j in range(3 + i % 8)]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", *(f"w{i}" for i in range(100))])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = os.path.join(directory, "tokenizer.json")
    tok.save(tokenizer)
    return data, tokenizer


ROLLOUT_VOCAB = 320
ROLLOUT_MODEL = dict(vocab_size=ROLLOUT_VOCAB, hidden_size=48, num_layers=2, intermediate_size=96, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=False)


def write_rollout_inputs(directory: str) -> None:
    """A sentencepiece tokenizer with Qwen3's control tokens, a tiny teacher checkpoint and 16
    prompt records alternating two prompts, so that the records 1 process reads for a step (0, 1,
    ...) and those 2 processes read (each from its half: 0, 1, ... and 8, 9, ...) are the same
    prompts in the same global order."""
    import numpy as np

    import qwen3_jax as q
    from qwen3_jax.tokenizer import Tokenizer
    from train.miniature.spm import train_sentencepiece

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(f"Write the digit {d} {n} times. The answer is {str(d) * n}." for d, n in rng.integers(0, 10, (200, 2))))
    tokenizer = Tokenizer.from_sentencepiece(train_sentencepiece([corpus], os.path.join(directory, "spm"), ROLLOUT_VOCAB))
    teacher = q.init_model(q.preset("tiny-dense", **ROLLOUT_MODEL), seed=1)
    teacher.lm_head[...] = teacher.lm_head[...] * 4.0
    q.save_model(teacher, os.path.join(directory, "teacher"))
    tokenizer.save(os.path.join(directory, "teacher"))
    with open(os.path.join(directory, "prompts.jsonl"), "w") as f:
        for i in range(16):
            digit = (7, 3)[i % 2]
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Write the digit {digit}."}], "digit": digit})
                    + "\n")


def rollout_configs(args: argparse.Namespace, inputs: str):
    """(distillation config, RL config): 3 steps each on MESH, the prompts in file order."""
    from train.distill.config import default_config as distill_default
    from train.rl.config import default_config as rl_default

    out = []
    for c in (distill_default(), rl_default()):
        c.distributed = args.num_processes > 1
        if c.distributed:
            c.coordinator_address = f"localhost:{args.port}"
            c.num_processes, c.process_id = args.num_processes, args.process_id
        c.mesh.update(MESH)
        c.model.preset = "tiny-dense"
        c.model.overrides = dict(ROLLOUT_MODEL)
        c.tokenizer = os.path.join(inputs, "spm.model")
        c.prompts.update(paths=os.path.join(inputs, "prompts.jsonl"), shuffle=False)
        c.rollout.update(max_prompt_len=40, max_new_tokens=8, think_fraction=0.5, thinking_budget=2,
                         temperature=1.0, top_k=0, top_p=1.0)
        c.train.update(steps=3, ce_chunk_len=16, peak_flops=1e10)
        c.optimizer.update(learning_rate=1e-2, warmup_steps=0, decay_steps=100)
        c.checkpoint.every = 100
        out.append(c)
    distill, rl = out
    distill.teacher.init_from = os.path.join(inputs, "teacher")
    distill.prompts.batch_size = 8
    rl.prompts.batch_size = 4
    rl.samples = 2
    rl.reward = "helpers.rl_rewards:answer_chars"
    rl.rl.ppo_minibatches = 2
    rl.distributed = False  # the distillation run, first, joins the job
    return distill, rl


def work_rollouts(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
    sys.path.insert(0, os.path.join(REPO, "tests"))  # the reward function's module
    from train.distill.run import run as distill_run
    from train.rl import run as rl_run

    inputs = os.path.dirname(args.data)
    distill, rl = rollout_configs(args, inputs)
    curves = {}
    for name, run, config in (("distill", distill_run, distill), ("rl", rl_run, rl)):
        workdir = os.path.join(args.out, name)
        run(config, workdir)
        if args.process_id == 0:
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                curves[name] = [json.loads(line) for line in f]
    if args.process_id == 0:
        with open(os.path.join(args.out, "curves.json"), "w") as f:
            json.dump(curves, f)
    with open(os.path.join(args.out, f"process_{args.process_id}.json"), "w") as f:
        json.dump({"process_count": jax.process_count(), "devices": jax.device_count()}, f)


def experiment_config(args: argparse.Namespace):
    """configs/tiny_pretrain.py, shrunk to one step of 8 rows of 32 tokens, as `args` places it."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import tiny_pretrain

    c = tiny_pretrain.get_config()
    c.distributed = args.num_processes > 1
    if c.distributed:
        c.coordinator_address = f"localhost:{args.port}"
        c.num_processes, c.process_id = args.num_processes, args.process_id
    c.mesh.update(MESH)
    c.tokenizer = args.tokenizer
    c.data.update(format="jsonl", kind="text", paths=args.data, seq_len=32, batch_size=8, shards=2,
                  packing_bins=2, shuffle=True)
    c.train.update(steps=1, ce_chunk_len=16, peak_flops=1e10)
    c.optimizer.update(learning_rate=LEARNING_RATE, warmup_steps=0, decay_steps=100)
    c.checkpoint.every = 1
    return c


def work(args: argparse.Namespace) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
    import numpy as np

    from infer.engine import generate
    from qwen3_jax import load_any, make_mesh
    from qwen3_jax.layout import TRAINER_CHECKPOINTS
    from qwen3_jax.sharding import to_host
    from train import data as data_lib
    from train import train as train_lib
    from train.checkpoint import Checkpointer
    from train.config import resolve, tokenizer_from_spec, train_config
    from train.loop import global_batch
    from train.step import abstract_train_state, batch_sharding, param_path

    workdir = os.path.join(args.out, "run")
    config = experiment_config(args)
    primary = args.process_id == 0
    result: dict = {"seconds": {}}
    clock = [STARTED]

    def timed(phase: str) -> None:  # wall seconds since the previous phase ended
        now = time.perf_counter()
        result["seconds"][phase] = round(now - clock[0], 2)
        clock[0] = now

    def save_arrays(name: str, tree) -> None:
        flat = {param_path(p) or "value": x for p, x in jax.tree_util.tree_flatten_with_path(to_host(tree))[0]}
        if primary:
            np.savez(os.path.join(args.out, f"{name}.npz"), **flat)

    def greedy(model, mesh) -> list[list[int]]:
        return generate(model, PROMPTS, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, stop_token_ids=(),
                        forced_ids=[0], mesh=mesh)

    timed("imports")
    train_lib.run(config, workdir)  # joins the job first when config.distributed
    timed("train")
    result.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  local_devices=jax.local_device_count(), devices=jax.device_count())
    if primary:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            metrics = json.loads(f.readline())
        result.update(loss=metrics["loss"], grad_norm=metrics["grad_norm"])

    # The input as the trainer builds it, one step: this process's rows and the global batch.
    job = resolve(train_config(config))
    mesh = make_mesh(job.mesh)
    tokenizer = tokenizer_from_spec(job.tokenizer, job.model)
    stream = data_lib.make_stream(job.data, tokenizer)
    local = next(stream.iterator)
    result["local_record_ids"] = record_ids(local)
    save_arrays("global_batch", global_batch(local, batch_sharding(mesh, job.model.rules)))
    timed("data")

    # The saved step restored whole (params, optimizer moments, step, data position) on the same mesh.
    checkpointer = Checkpointer(os.path.join(workdir, TRAINER_CHECKPOINTS), every=1, keep=1)
    stream = data_lib.make_stream(job.data, tokenizer)
    state = checkpointer.restore(1, abstract_train_state(job.model, job.optimizer, mesh), stream.iterator)
    checkpointer.close()
    save_arrays("state", state)
    result["resumed_record_ids"] = record_ids(next(stream.iterator))  # the rows step 2 would train on

    timed("restore")
    result["generated"] = greedy(load_any(workdir, mesh=mesh), mesh)
    timed("generate")
    if args.restore_from:
        wait_for_checkpoint(args.restore_from)
        timed("wait_for_other_job")
        other = load_any(args.restore_from, mesh=make_mesh(OTHER_MESH))
        save_arrays("restored_other_mesh", params_of(other))
        model = load_any(args.restore_from, mesh=mesh)
        save_arrays("restored", params_of(model))
        result["restored_generated"] = greedy(model, mesh)
        timed("restore_from")
    with open(os.path.join(args.out, f"process_{args.process_id}.json"), "w") as f:
        json.dump(result, f)


def wait_for_checkpoint(workdir: str, timeout: float = 600.0) -> None:
    """Returns once the run in `workdir` (another job, started beside this one) has committed its
    step 1; its MANIFEST is written after the commit."""
    from qwen3_jax.layout import TRAINER_CHECKPOINTS
    from train.checkpoint import MANIFEST

    path = os.path.join(workdir, TRAINER_CHECKPOINTS, "1", MANIFEST)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)


def record_ids(batch) -> list[list[int]]:
    """Per row, the records its documents come from (a document's first token is its record + 1)."""
    starts = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
    return [(row[mask] - 1).tolist() for row, mask in zip(batch["tokens"], starts)]


def params_of(model):
    """The model's parameters as a nested dict (as `nnx.state(model, nnx.Param)` holds them)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# Both jobs compile with LLVM's cheap pipeline: compiling is most of this check's time on a small
# CPU, and every job compiles with the same flags, so their numbers stay comparable.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) for a worker: the repo importable, FAST_COMPILE_FLAGS, and no
    --xla_force_host_platform_device_count (the worker sets its own device count)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, FAST_COMPILE_FLAGS])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), REPO) if p)
    env["JAX_PLATFORMS"] = "cpu"
    return env


class Job:
    """`num_processes` workers of `devices` CPU devices each, started as one job writing to `out`
    (see the module docstring); `wait` collects their process_<i>.json."""

    def __init__(self, out: str, num_processes: int, devices: int, *, restore_from: str | None = None,
                 env: dict[str, str] | None = None, task: str = "train", inputs: str | None = None):
        os.makedirs(out, exist_ok=True)
        if task == "rollouts":  # `inputs`: a write_rollout_inputs directory, shared by the jobs compared
            data, tokenizer = os.path.join(inputs, "prompts.jsonl"), os.path.join(inputs, "spm.model")
        else:
            data, tokenizer = write_inputs(os.path.join(out, "inputs"))
        self.out, self.name = out, f"{num_processes} process(es) x {devices} devices"
        port = free_port()
        self.procs, self.logs = [], []
        for i in range(num_processes):
            log = open(os.path.join(out, f"process_{i}.log"), "w+")
            cmd = [sys.executable, os.path.abspath(__file__), "--out", out, "--num_processes", str(num_processes),
                   "--devices", str(devices), "--process_id", str(i), "--port", str(port), "--data", data,
                   "--tokenizer", tokenizer, "--task", task, *(["--restore_from", restore_from] if restore_from else [])]
            self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=worker_env(env), stdout=log,
                                               stderr=subprocess.STDOUT))
            self.logs.append(log)

    def failure(self) -> str | None:
        """The output of the first process that exited with an error; None while none has."""
        for i, p in enumerate(self.procs):
            if p.poll() not in (None, 0):
                return f"{self.name}: process {i} exited with {p.returncode}:\n{self.tail(i)}"
        return None

    def done(self) -> bool:
        return all(p.poll() is not None for p in self.procs)

    def tail(self, i: int, chars: int = 6000) -> str:
        self.logs[i].flush()
        self.logs[i].seek(0)
        return self.logs[i].read()[-chars:]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()

    def results(self) -> list[dict]:
        results = []
        for i in range(len(self.procs)):
            with open(os.path.join(self.out, f"process_{i}.json")) as f:
                results.append(json.load(f))
        return results


def wait(jobs: list[Job], timeout: float) -> list[list[dict]]:
    """Every job's results, once all have exited. Raises RuntimeError with the output of the first
    process that failed (or of every running process after `timeout` seconds); every process
    still running is then killed."""
    deadline = time.monotonic() + timeout
    try:
        while not all(job.done() for job in jobs):
            for job in jobs:
                if (failure := job.failure()) is not None:
                    raise RuntimeError(failure)
            if time.monotonic() > deadline:
                running = [f"--- {job.name}, process {i} ---\n{job.tail(i)}"
                           for job in jobs for i, p in enumerate(job.procs) if p.poll() is None]
                raise RuntimeError(f"timed out after {timeout:.0f} s:\n" + "\n".join(running))
            time.sleep(0.1)
        for job in jobs:
            if (failure := job.failure()) is not None:
                raise RuntimeError(failure)
        return [job.results() for job in jobs]
    finally:
        for job in jobs:
            job.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="results (and the run's workdir, OUT/run) go here")
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--restore_from", help="another run's workdir, to load and generate from")
    parser.add_argument("--process_id", type=int, help="set by the launcher: run as this worker")
    parser.add_argument("--port", type=int, help="set by the launcher: the coordinator's port")
    parser.add_argument("--data", help="set by the launcher")
    parser.add_argument("--tokenizer", help="set by the launcher")
    parser.add_argument("--task", default="train", choices=("train", "rollouts"))
    args = parser.parse_args()
    if args.process_id is None:
        job = Job(args.out, args.num_processes, args.devices, restore_from=args.restore_from)
        print(json.dumps(wait([job], timeout=600), indent=1))
    else:
        (work_rollouts if args.task == "rollouts" else work)(args)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
