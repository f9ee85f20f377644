"""qwen3-jax: Qwen3 dense and MoE models in JAX / Flax NNX.

Names load on first use, so importing a submodule (the tokenizer, the sampling kernels' ids) does not
import Orbax. Everything else is importable from its module (`qwen3_jax.hf_config`, `.sharding`, ...).
"""

import importlib

_EXPORTS = {
    "Qwen3Config": "qwen3_jax.config", "preset": "qwen3_jax.config",
    "Qwen3": "qwen3_jax.model", "init_model": "qwen3_jax.model",
    "load_any": "qwen3_jax.checkpoint", "save_model": "qwen3_jax.checkpoint",
    "from_hf": "qwen3_jax.hf", "to_hf": "qwen3_jax.hf",
    "make_mesh": "qwen3_jax.sharding",
    "Tokenizer": "qwen3_jax.tokenizer",
    "ConfigError": "qwen3_jax.errors", "CheckpointError": "qwen3_jax.errors",
}
__all__ = [*_EXPORTS, "chat"]


def __getattr__(name: str):
    if name == "chat":
        return importlib.import_module("qwen3_jax.chat")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qwen3_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
