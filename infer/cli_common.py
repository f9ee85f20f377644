"""Flags and loading shared by the generate, chat and batch command lines (`define_flags` under `__main__`)."""

from __future__ import annotations

import sys

import jax.numpy as jnp
from absl import flags

from infer.engine import Engine
from infer.rollout import SAMPLING_KEYS
from qwen3_jax.checkpoint import load_any
from qwen3_jax.cli import quiet_orbax_logs
from qwen3_jax.sharding import make_mesh
from qwen3_jax.tokenizer import Tokenizer

FLAGS = flags.FLAGS


def define_checkpoint_flags() -> None:
    """--checkpoint, --step, --dtype and --mesh, which `load` reads (the server defines only these)."""
    flags.DEFINE_string("checkpoint", None, "Hugging Face, qwen3-jax or trainer checkpoint (a workdir, its "
                        "checkpoints/ dir or a step folder).", required=True)
    flags.DEFINE_integer("step", None, "Step of a trainer workdir or checkpoints/ dir to load (default: the latest).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype (float32 on CPU).")
    flags.DEFINE_string("mesh", None, "Device mesh as axis=size pairs over data, fsdp, tensor, expert, e.g. "
                        "'tensor=8' or 'data=2,tensor=4' (-1 once: the remaining devices). Default: one device.")


def define_flags() -> None:
    """Defines the shared flags in absl's global registry; call once, before `app.run`."""
    define_checkpoint_flags()
    flags.DEFINE_bool("no_thinking", False, "Hard switch: render the empty think block (enable_thinking=False).")
    flags.DEFINE_integer("thinking_budget", None, "Thinking tokens allowed per reply, over all its <think> blocks; "
                         "then the stop-thinking text is forced.")
    flags.DEFINE_integer("max_new_tokens", 1024, "Tokens to generate at most.")
    flags.DEFINE_float("temperature", None, "0 = greedy. Default: Qwen's value for the mode.")
    flags.DEFINE_integer("top_k", None, "0 = off. Default: Qwen's value for the mode.")
    flags.DEFINE_float("top_p", None, "In (0, 1]. Default: Qwen's value for the mode.")
    flags.DEFINE_float("min_p", None, "In [0, 1). Default: Qwen's value for the mode.")
    flags.DEFINE_float("presence_penalty", None, "Penalty on already generated tokens (Qwen suggests 0-2).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


def load() -> tuple[Engine, Tokenizer]:
    """The engine and tokenizer of --checkpoint (and --step); exits naming the problem if either
    cannot be loaded."""
    quiet_orbax_logs()
    try:
        mesh = None if FLAGS.mesh is None else make_mesh(parse_mesh(FLAGS.mesh))
    except ValueError as e:
        sys.exit(f"error: --mesh: {e}")
    try:
        tokenizer = Tokenizer.from_checkpoint(FLAGS.checkpoint)  # first: it fails fast, the model load does not
        model = load_any(FLAGS.checkpoint, step=FLAGS.step, dtype=jnp.dtype(FLAGS.dtype), mesh=mesh)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError and ConfigError are ValueErrors
        sys.exit(f"error: {e}")
    return Engine.for_tokenizer(model, tokenizer, mesh=mesh), tokenizer


def parse_mesh(text: str) -> dict[str, int]:
    """{axis: size} from 'axis=size,...'. Raises ValueError naming --mesh for malformed text (the
    axes and sizes themselves are checked by `make_mesh`)."""
    shape = {}
    for part in text.split(","):
        name, eq, size = part.strip().partition("=")
        try:
            if not eq or name in shape:
                raise ValueError
            shape[name] = int(size)
        except ValueError:
            raise ValueError(f"--mesh {text!r} must be distinct axis=size pairs, e.g. 'data=2,tensor=4'") from None
    return shape


def sampling_overrides() -> dict:
    """The sampling flags the user set; unset ones fall back to the mode's defaults."""
    return {k: FLAGS[k].value for k in SAMPLING_KEYS if FLAGS[k].value is not None}
