"""What every `--config` / `--workdir` command shares: its flags, running it, and one-line user errors.

`define_command_flags` is called under `__main__` only (config files import the modules that
define their schema), and the command runs as `app.run(main, flags_parser=parse_flags)`.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from qwen3_jax.cli import quiet_orbax_logs
from qwen3_jax.errors import CheckpointError, ConfigError, DataError, TrainingError

USER_ERRORS = (ConfigError, TrainingError, CheckpointError, DataError, FileNotFoundError)


def define_command_flags(config_help: str, workdir_help: str) -> None:
    """`--config` (a config file, overridable field by field) and `--workdir`, both required."""
    config_flags.DEFINE_config_file("config", None, config_help)
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a `--config.<field>` that names no field reported in one line
    (config_flags raises it from inside the parser, as a KeyError wrapped in an AttributeError)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(f"error: {_unknown_field(argv, e)}")


def _unknown_field(argv: list[str], error: BaseException) -> str:
    cause = error.args[0] if error.args and isinstance(error.args[0], BaseException) else error
    text = str(cause.args[0]) if cause.args else str(cause)
    key = re.match(r"'([^']*)'", text)
    close = re.search(r'Did you mean "([^"]+)"', text)
    if key is None:
        return text.replace("\n", " ")
    paths = [a.split("=", 1)[0].removeprefix("--config.").split(".") for a in argv if a.startswith("--config.")]
    parts = next((p for p in paths if key.group(1) in p), [key.group(1)])
    parts = parts[:parts.index(key.group(1)) + 1]
    hint = f"; did you mean {'.'.join(parts[:-1] + [close.group(1)])}?" if close else ""
    return f"unknown config field {'.'.join(parts)}{hint}"


def run_command(run_fn: Callable[[ml_collections.ConfigDict, str], Any], argv: list[str],
                errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
    """`run_fn(config, workdir)` with Orbax's per-save INFO logs silenced (`quiet_orbax_logs`),
    and a user error printed as one line."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_orbax_logs()
    try:
        return run_fn(flags.FLAGS.config, flags.FLAGS.workdir)
    except errors as e:
        sys.exit(f"error: {e}")
