"""qwen3-jax: Qwen3 dense and MoE models in JAX / Flax NNX."""

from qwen3_jax.config import PRESETS, ConfigError, Qwen3Config, YarnScaling, preset
from qwen3_jax.hf_config import from_hf_config, to_hf_config
from qwen3_jax.checkpoint import load_any, load_model, save_model
from qwen3_jax.hf import CheckpointError, from_hf, to_hf
from qwen3_jax.model import ForwardOutput, Qwen3, abstract_model, count_params, init_model
from qwen3_jax.sharding import MESH_AXES, ShardingRules, auto_mesh, make_mesh

__all__ = [
    "PRESETS", "ConfigError", "Qwen3Config", "YarnScaling", "from_hf_config", "preset", "to_hf_config",
    "load_any", "load_model", "save_model",
    "CheckpointError", "from_hf", "to_hf",
    "ForwardOutput", "Qwen3", "abstract_model", "count_params", "init_model",
    "MESH_AXES", "ShardingRules", "auto_mesh", "make_mesh",
]
