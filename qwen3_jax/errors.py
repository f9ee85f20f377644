"""The project's exception types: every user-facing error is one of these (messages name the field or file)."""


class ConfigError(ValueError):
    """An invalid or unsupported configuration: a model, a training job, its data, a request's settings."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not the model its config describes."""


class CorruptCheckpointError(CheckpointError):
    """A saved step whose files no longer match what was written (the message names the step and file)."""


class DataError(ValueError):
    """A data record or file the pipeline cannot use (the message names the file and line or record)."""


class RequestError(ValueError):
    """A generation request with a bad argument (the message names the argument and prompt)."""


class TrainingError(RuntimeError):
    """A run that cannot go on: a non-finite loss, a checkpoint that could not be written."""


def need(cond: bool, msg: str) -> None:
    """Raises ConfigError(msg) unless `cond`."""
    if not cond:
        raise ConfigError(msg)
