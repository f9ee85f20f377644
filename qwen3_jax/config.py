"""Static model configuration: architecture, released presets, Hugging Face config.json interop.

`Qwen3Config` is frozen and hashable so it can be a static argument of jitted functions; anything
that changes per call (temperatures, budgets, learning rates) is passed as arrays elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from qwen3_jax.sharding import ShardingRules

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
MOE_IMPLS = ("auto", "ragged_dot", "blocked")


class ConfigError(ValueError):
    """An inconsistent or unsupported model configuration."""


@dataclasses.dataclass(frozen=True)
class YarnScaling:
    """Static YaRN RoPE scaling, with the defaults transformers uses for `rope_type: yarn`."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: 0.1 * ln(factor) + 1
    truncate: bool = True

    @property
    def mscale(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture of one Qwen3 model plus the runtime policy it is run with."""

    # Architecture (mirrors the Hugging Face config.json fields).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    rope_scaling: YarnScaling | None = None
    # Mixture of experts (num_experts == 0 means dense).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    # Runtime policy: float32 on CPU (XLA:CPU bf16 matmuls are ~40x slower), bfloat16 on TPU/GPU.
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"  # stored parameters
    scan_layers: bool = True  # one compiled layer body per run of identical layers
    remat: str = "none"
    moe_impl: str = "auto"  # grouped matmul: auto = ragged_dot on TPU/GPU, blocked on CPU
    rules: ShardingRules = ShardingRules()

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, i: int) -> bool:
        """transformers' rule: MoE iff not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
        return (
            self.num_experts > 0
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    @property
    def layer_runs(self) -> tuple[tuple[bool, int], ...]:
        """Maximal runs of consecutive layers of the same kind: ((is_moe, length), ...).

        Each run is stacked and scanned; released models are a single run.
        """
        runs: list[list] = []
        for i in range(self.num_layers):
            kind = self.is_moe_layer(i)
            if runs and runs[-1][0] == kind:
                runs[-1][1] += 1
            else:
                runs.append([kind, 1])
        return tuple((k, n) for k, n in runs)

    def replace(self, **kwargs: Any) -> "Qwen3Config":
        return dataclasses.replace(self, **kwargs)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
        )
        need(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
        need(self.moe_impl in MOE_IMPLS, f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        need(self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.num_experts > 0:
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive for an MoE model")
            need(self.decoder_sparse_step >= 1, f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
            need(not bad, f"mlp_only_layers {bad} are outside [0, {self.num_layers})")
        # Some layer is dense (is_moe_layer false) unless every layer is MoE, which needs step 1; no
        # loop over the layers, so an absurd num_layers (a config.json's) cannot stall validation.
        has_dense = (self.num_experts == 0 or self.decoder_sparse_step > 1
                     or any(0 <= i < self.num_layers for i in self.mlp_only_layers))
        if has_dense:
            need(self.intermediate_size > 0, "intermediate_size must be positive: the model has dense MLP layers")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(rs.factor >= 1.0, f"rope_scaling.factor must be >= 1, got {rs.factor}")
            need(rs.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be positive")


def _dense(layers, hidden, inter, heads, kv, tied) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, tie_word_embeddings=tied,
    )


def _moe(layers, hidden, inter, moe_inter, heads, kv) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
        num_heads=heads, num_kv_heads=kv, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=moe_inter,
    )


# The released models (Qwen3 technical report, Tables 1-2, and the official config.json files).
PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": _dense(28, 1024, 3072, 16, 8, True),
    "qwen3-1.7b": _dense(28, 2048, 6144, 16, 8, True),
    "qwen3-4b": _dense(36, 2560, 9728, 32, 8, True),
    "qwen3-8b": _dense(36, 4096, 12288, 32, 8, False),
    "qwen3-14b": _dense(40, 5120, 17408, 40, 8, False),
    "qwen3-32b": _dense(64, 5120, 25600, 64, 8, False),
    "qwen3-30b-a3b": _moe(48, 2048, 6144, 768, 32, 4),
    "qwen3-235b-a22b": _moe(94, 4096, 12288, 1536, 64, 4),
    # Tiny shapes for tests and CPU demos: odd sizes, real head grouping, same code path.
    "tiny-dense": Qwen3Config(
        vocab_size=512, hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6,
        num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
    ),
    "tiny-moe": Qwen3Config(
        vocab_size=512, hidden_size=96, intermediate_size=160, num_layers=3, num_heads=6,
        num_kv_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
    ),
}


def preset(name: str, **overrides: Any) -> Qwen3Config:
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[key].replace(**overrides) if overrides else PRESETS[key]


# ----------------------------------------------------------------------------- Hugging Face

_MODEL_TYPES = ("qwen3", "qwen3_moe")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number (an int beyond float range is not one: float() would overflow)."""
    return (_is_int(v) and abs(v) < 2**1023) or (isinstance(v, float) and math.isfinite(v))


# config.json fields `from_hf_config` reads: (kind, test). Checked before any is used, so a wrong
# type is named rather than failing as an arithmetic error somewhere below.
_HF_KINDS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", _is_int),
    "positive": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "int?": ("an integer or null", lambda v: v is None or _is_int(v)),
    "number": ("a finite number", _is_number),
    "number?": ("a finite number or null", lambda v: v is None or _is_number(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "ints?": ("a list of integers or null", lambda v: v is None or (isinstance(v, list) and all(map(_is_int, v)))),
    "eos": ("an integer, a non-empty list of integers or null",
            lambda v: v is None or _is_int(v) or (isinstance(v, list) and v and all(map(_is_int, v)))),
    "object?": ("an object or null", lambda v: v is None or isinstance(v, dict)),
}
_HF_FIELDS = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"), "positive"),
    **dict.fromkeys(("intermediate_size", "num_key_value_heads", "max_position_embeddings", "num_experts",
                     "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"), "int"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "router_aux_loss_coef"), "number"),
    **dict.fromkeys(("tie_word_embeddings", "norm_topk_prob", "attention_bias", "use_sliding_window"), "bool"),
    "hidden_act": "str", "head_dim": "int?", "bos_token_id": "int?", "eos_token_id": "eos", "mlp_only_layers": "ints?",
    "rope_scaling": "object?", "rope_parameters": "object?",
}
_ROPE_FIELDS = {
    "rope_type": "str", "type": "str", "factor": "number?", "original_max_position_embeddings": "positive",
    "beta_fast": "number?", "beta_slow": "number?", "attention_factor": "number?", "truncate": "bool",
    "rope_theta": "number",
}
_REQUIRED = {"qwen3": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"),
             "qwen3_moe": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "num_experts_per_tok", "moe_intermediate_size")}


def _check_hf_types(hf: Mapping[str, Any]) -> None:
    """ConfigError naming the first config.json field that is missing or of the wrong type."""
    missing = [name for name in _REQUIRED[hf["model_type"]] if name not in hf]
    if missing:
        raise ConfigError(f"config.json has no {', '.join(missing)} (required for model_type {hf['model_type']!r})")
    checks = [(name, hf[name], kind) for name, kind in _HF_FIELDS.items() if name in hf]
    for section in ("rope_scaling", "rope_parameters"):
        if isinstance(hf.get(section), dict):
            checks += [(f"{section}.{k}", hf[section][k], kind) for k, kind in _ROPE_FIELDS.items() if k in hf[section]]
    for name, value, kind in checks:
        what, ok = _HF_KINDS[kind]
        if not ok(value):
            raise ConfigError(f"config.json field {name!r} must be {what}, got {value!r:.100}")


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, YarnScaling | None]:
    # transformers v4 writes rope_theta + rope_scaling; v5 writes rope_parameters.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 1_000_000.0))
    spec = scaling or params
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(f"unsupported rope_scaling type {rope_type!r} (supported: default, yarn)")
    unknown = set(spec) - {
        "rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
        "attention_factor", "truncate", "rope_theta",
    }
    if unknown:
        raise ConfigError(f"unsupported yarn rope_scaling keys {sorted(unknown)}")
    orig = spec.get("original_max_position_embeddings")
    factor = spec.get("factor")
    if orig is None:
        raise ConfigError("yarn rope_scaling needs original_max_position_embeddings")
    if factor is None:  # transformers derives it from the context ratio only when absent
        factor = hf.get("max_position_embeddings", 40960) / orig
    return float(theta), YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(spec.get("beta_fast") or 32.0),
        beta_slow=float(spec.get("beta_slow") or 1.0),
        attention_factor=spec.get("attention_factor"),
        truncate=bool(spec.get("truncate", True)),
    )


def from_hf_config(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> Qwen3Config:
    """Builds a config from a Hugging Face `config.json` (path, directory or dict).

    `overrides` set runtime fields such as dtype, scan_layers or remat. Raises FileNotFoundError
    for a missing file and ConfigError naming the file or field for a file that is not a JSON
    object, a field of the wrong type, a missing required field or an unsupported setting.
    """
    if isinstance(source, Mapping):
        hf = dict(source)
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path) as f:
                hf = json.load(f)
        except ValueError as e:  # not JSON, or not UTF-8
            raise ConfigError(f"{path} is not JSON: {e}") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not an object")
    model_type = hf.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r} (supported: {', '.join(_MODEL_TYPES)})")
    _check_hf_types(hf)
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=true is not part of Qwen3 and is not supported")
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported (no released Qwen3 model uses it)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (Qwen3 uses silu)")
    theta, rope_scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    kw: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf.get("intermediate_size", 0),
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=theta,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        rope_scaling=rope_scaling,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id") if not isinstance(hf.get("eos_token_id"), list) else hf["eos_token_id"][0],
    )
    if model_type == "qwen3_moe":
        kw.update(
            num_experts=hf.get("num_experts", hf.get("num_local_experts", 0)),
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=hf.get("norm_topk_prob", False),
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
    kw.update(overrides)
    return Qwen3Config(**kw)


def to_hf_config(cfg: Qwen3Config) -> dict[str, Any]:
    """The `config.json` transformers needs to load the exported checkpoint."""
    hf: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if cfg.is_moe else "qwen3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
            "truncate": rs.truncate,
            **({"attention_factor": rs.attention_factor} if rs.attention_factor is not None else {}),
        }
    if cfg.is_moe:
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
        )
    return hf
