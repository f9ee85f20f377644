"""Training metrics: model FLOPs per token, the mesh's peak FLOP/s, and where per-step scalars go.

MFU = `flops_per_token` x tokens/s over the mesh's peak: `train.peak_flops` x devices, or, when
unset, `measure_peak_flops`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import tensorboardX
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qwen3_jax.config import Qwen3Config
from qwen3_jax.model import count_params


def flops_per_token(cfg: Qwen3Config, seq_len: int) -> float:
    """Training FLOPs per token: 6 x parameters used in matmuls + 12 x L x heads x head_dim x T.

    The embedding lookup is not a matmul (a tied embedding still counts once, as the unembedding);
    MoE counts the active experts only. Attention counts the full T x T score matrix (PaLM).
    """
    _, active = count_params(cfg)
    matmul_params = active - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def measure_peak_flops(mesh: Mesh, dtype: str) -> float:
    """FLOP/s of the whole mesh on square matmuls, one per device at the same time (best of 3)."""
    n = 1024 if jax.default_backend() == "cpu" else 8192
    devices = mesh.devices.size
    sharding = NamedSharding(mesh, P(mesh.axis_names))
    x = jax.jit(lambda: jnp.ones((devices, n, n), dtype), out_shardings=sharding)()
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a), out_shardings=sharding)
    matmul(x).block_until_ready()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 * devices / best


class MetricsWriter:
    """Per-step scalars to metrics.jsonl and TensorBoard, plus a progress bar or periodic lines."""

    def __init__(self, workdir: str, steps: int, log_every: int, start_step: int):
        self._primary = jax.process_index() == 0
        self._log_every, self._steps = max(1, log_every), steps
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a") if self._primary else None
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard")) if self._primary else None
        self._bar = tqdm.tqdm(total=steps, initial=start_step, dynamic_ncols=True,
                              disable=not (self._primary and sys.stderr.isatty()))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self._primary:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()  # readable by whoever watches the run, even after a kill -9
        for name, value in scalars.items():
            self._tb.add_scalar(f"train/{name}", value, step)
        line = format_metrics(scalars)
        if not self._bar.disable:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(line, refresh=False)
        elif step % self._log_every == 0 or step == self._steps:
            print(f"step {step}/{self._steps} | {line}", flush=True)

    def close(self) -> None:
        if self._primary:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()


# (metric, format) in display order; a line shows the metrics its step reported.
_DISPLAY = (
    ("loss", "loss {:.4f}"), ("divergence", "divergence {:.4f}"), ("z_loss", "z_loss {:.4f}"),
    ("aux_loss", "aux_loss {:.4f}"), ("student_entropy", "H_student {:.3f}"), ("teacher_entropy", "H_teacher {:.3f}"),
    ("completion_len", "len {:.1f}"), ("closed_thinking", "closed {:.2f}"), ("grad_norm", "grad_norm {:.3f}"),
    ("learning_rate", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"), ("step_time", "{:.3f} s/step"),
    ("mfu", "MFU {:.1%}"),
)


def format_metrics(s: dict[str, float]) -> str:
    return " | ".join(fmt.format(s[k]) for k, fmt in _DISPLAY if k in s)
