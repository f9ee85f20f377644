"""Static model configuration: architecture, released presets, Hugging Face config.json interop.

`Qwen3Config` is frozen and hashable so it can be a static argument of jitted functions; anything
that changes per call (temperatures, budgets, learning rates) is passed as arrays elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from qwen3_jax.errors import ConfigError
from qwen3_jax.sharding import ShardingRules

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
MOE_IMPLS = ("auto", "ragged_dot", "blocked")
ATTENTION_IMPLS = ("auto", "einsum", "blockwise", "splash", "cudnn")  # see qwen3_jax.attention


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
    eos_token_id: int | tuple[int, ...] | None = 151645  # config.json may list several
    # Runtime policy: float32 on CPU (XLA:CPU bf16 matmuls are ~40x slower), bfloat16 on TPU/GPU.
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"  # stored parameters
    scan_layers: bool = True  # one compiled layer body per run of identical layers
    remat: str = "none"
    moe_impl: str = "auto"  # grouped matmul: auto = ragged_dot on TPU/GPU, blocked on CPU
    moe_chunk_tokens: int = 0  # tokens per pass of an expert shard's loop (0: all); see qwen3_jax.moe
    # auto = splash on TPU, cuDNN on GPU (bf16, unpacked), blockwise otherwise and over a KV cache.
    attention: str = "auto"
    attention_block_q: int = 512  # query / key tile of blockwise and splash attention
    attention_block_kv: int = 1024
    rules: ShardingRules = ShardingRules()

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def context_length(self) -> int:
        """Positions the model serves: factor x original_max_position_embeddings with YaRN (what vLLM
        and SGLang derive; 131,072 for Qwen3 with Qwen's 4x YaRN), never below max_position_embeddings,
        which Qwen's long-context recipe leaves at 40,960; max_position_embeddings without YaRN."""
        rs = self.rope_scaling
        if rs is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(rs.factor * rs.original_max_position_embeddings))

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
        need(self.rms_norm_eps >= 0, f"rms_norm_eps must be >= 0, got {self.rms_norm_eps}")
        need(self.max_position_embeddings > 0,
             f"max_position_embeddings must be positive, got {self.max_position_embeddings}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, f"param_dtype must be one of {DTYPES}, got {self.param_dtype!r}")
        need(self.moe_impl in MOE_IMPLS, f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")
        need(self.attention in ATTENTION_IMPLS,
             f"attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        need(self.moe_chunk_tokens >= 0, f"moe_chunk_tokens must be >= 0 (0: no chunking), got {self.moe_chunk_tokens}")
        for name in ("attention_block_q", "attention_block_kv"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.remat in REMAT_POLICIES, f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.num_experts > 0:
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, num_experts={self.num_experts}]",
            )
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive for an MoE model")
            need(self.decoder_sparse_step >= 1, f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
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

# What transformers' Qwen3Config / Qwen3MoeConfig (v5) take for a field absent from config.json.
# They are not the released models' values (rope_theta 10,000 where Qwen3 uses 1e6; 32,768
# positions where it uses 40,960), and the two model types differ: the MoE class has no head_dim
# field (its model derives hidden_size // num_attention_heads) and defaults to 4 kv heads.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=False, max_window_layers=28,
    ),
    "qwen3_moe": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=False, decoder_sparse_step=1, router_aux_loss_coef=0.001,
    ),
}
_DEFAULT_ROPE_THETA = 10_000.0  # transformers' RoPE base when config.json names none
_DEFAULT_SLIDING_WINDOW = 4096
_LAYER_TYPES = ("full_attention", "sliding_attention")
_LEGACY_LAYER_TYPES = {"attention": "full_attention"}  # transformers renames these on load


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number (an int beyond float range is not one: float() would overflow)."""
    return (_is_int(v) and abs(v) < 2**1023) or (isinstance(v, float) and math.isfinite(v))


# transformers' configs are strict dataclasses: an int field takes no float or bool, a float field
# no int, a bool field no 0/1. Checking the same here rejects the same config.json files.
_KINDS: dict[str, tuple[str, Any]] = {
    "int": ("an integer", _is_int),
    "int?": ("an integer or null", lambda v: v is None or _is_int(v)),
    "float": ("a float", lambda v: isinstance(v, float)),
    "number": ("a number", lambda v: _is_number(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "ints?": ("a list of integers or null", lambda v: v is None or (isinstance(v, list) and all(map(_is_int, v)))),
    "strs?": ("a list of strings or null", lambda v: v is None or (isinstance(v, list) and all(isinstance(s, str) for s in v))),
    "eos": ("an integer, a list of integers or null",
            lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v)))),
}


def _field(hf: Mapping[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """`hf[name]` checked to be of `kind`, or `default` when the field is absent."""
    if name not in hf:
        return default
    what, ok = _KINDS[kind]
    value = hf[name]
    if not ok(value):
        raise ConfigError(f"config.json field {name!r} must be {what}, got {value!r}")
    return value


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _rope_from_hf(hf: Mapping[str, Any], max_positions: int, layer_types: Sequence[str]) -> tuple[float, YarnScaling | None]:
    """RoPE base and YaRN scaling as transformers v5 resolves them.

    The v4 `rope_scaling` dict wins over the v5 `rope_parameters` one; a top-level `rope_theta`
    fills in a dict without its own; 10,000 when neither names one.
    """
    for name in ("rope_scaling", "rope_parameters"):
        _need(hf.get(name) is None or isinstance(hf[name], dict),
              f"config.json field {name!r} must be an object or null, got {hf.get(name)!r}")
    spec = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    nested = sorted(set(spec) & set(layer_types))
    _need(not nested, f"rope_parameters given per layer type ({nested}): transformers' Qwen3 reads one "
                      "RoPE setting for every layer and cannot build this model")
    theta = spec.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA))
    _need(_is_number(theta) and theta > 0, f"rope_theta must be a positive number, got {theta!r}")

    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type == "default":  # Qwen3's default RoPE ignores partial_rotary_factor
        return float(theta), None
    _need(rope_type == "yarn", f"rope_type {rope_type!r} is not supported (supported: default, yarn)")
    _need("factor" in spec, "yarn RoPE needs rope_scaling.factor (transformers rejects the config without it)")
    # A top-level original_max_position_embeddings takes priority over the dict's (transformers' rule).
    orig = hf.get("original_max_position_embeddings", spec.get("original_max_position_embeddings", max_positions))
    _need(_is_int(orig) and orig > 0, f"yarn original_max_position_embeddings must be a positive integer, got {orig!r}")
    factor = spec["factor"]
    if factor is None:  # transformers then derives it from the two context lengths
        factor = max_positions / orig
    _need(_is_number(factor) and factor >= 1,
          f"yarn factor must be a number >= 1 (transformers warns on anything else), got {factor!r}")
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    _need(partial == 1.0, f"partial_rotary_factor {partial!r} with yarn: transformers' Qwen3 then rotates only part "
                          "of each head and cannot apply it; only 1.0 is supported")
    attention_factor = spec.get("attention_factor")
    mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek-style attention factor
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    for name, value in (("beta_fast", spec.get("beta_fast")), ("beta_slow", spec.get("beta_slow")),
                        ("attention_factor", attention_factor)):
        _need(value is None or _is_number(value), f"yarn {name} must be a number, got {value!r}")

    return float(theta), YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=orig,
        beta_fast=float(spec.get("beta_fast") or 32.0),  # `or`: transformers reads 0 as unset too
        beta_slow=float(spec.get("beta_slow") or 1.0),
        attention_factor=None if attention_factor is None else float(attention_factor),
        truncate=bool(spec.get("truncate", True)),
    )


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _layer_types(hf: Mapping[str, Any], num_layers: int, moe: bool) -> tuple[str, ...]:
    """Each layer's attention kind as transformers builds it; errors for sliding windows.

    Sliding-window attention is not implemented. The dense model slides in layers
    >= max_window_layers (or those `layer_types` marks) once use_sliding_window is true; the MoE
    model slides in every layer then.
    """
    use_window = _field(hf, "use_sliding_window", "bool", False)
    window = _field(hf, "sliding_window", "int?", _DEFAULT_SLIDING_WINDOW)
    window = window if use_window else None  # transformers' rule: the flag switches the window off
    explicit = _field(hf, "layer_types", "strs?")
    if explicit is not None:
        explicit = [_LEGACY_LAYER_TYPES.get(t, t) for t in explicit]
        _need(len(explicit) == num_layers,
              f"layer_types has {len(explicit)} entries but num_hidden_layers is {num_layers}")
        bad = sorted(set(explicit) - set(_LAYER_TYPES))
        _need(not bad, f"layer_types entries {bad} are not Qwen3 attention kinds {_LAYER_TYPES}")
    if moe:
        _need(window is None, f"use_sliding_window=true with sliding_window={window}: transformers' Qwen3-MoE then "
                              "attends within a sliding window in every layer, which qwen3-jax does not implement")
        return ("full_attention",) * num_layers
    max_window_layers = _field(hf, "max_window_layers", "int", _HF_DEFAULTS["qwen3"]["max_window_layers"])
    types = explicit or [
        "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
        for i in range(num_layers)
    ]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding:
        _need(window is not None, f"layer_types marks layers {sliding} sliding_attention but sliding_window is unset "
                                  "(use_sliding_window is false): transformers cannot build this model")
        source = "layer_types" if explicit is not None else "max_window_layers"
        raise ConfigError(
            f"sliding_window={window} applies to layers {sliding} (from use_sliding_window and {source}); "
            "qwen3-jax does not implement sliding-window attention"
        )
    return tuple(types)


def from_hf_config(source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> Qwen3Config:
    """Builds a config from a Hugging Face `config.json` (path, directory or dict).

    A field means what transformers' `Qwen3Config` / `Qwen3MoeConfig` (v5) make of it, defaults
    included: a field absent from the file gets transformers' default for that model type, not the
    released models' value. A config transformers rejects, or one that changes the numerics in a
    way qwen3-jax does not implement (sliding windows, biases, other activations or RoPE types),
    raises `ConfigError` naming the field. Fields with no effect on the model (use_cache,
    initializer_range, attention_dropout, pad_token_id, output_router_logits) are type-checked and
    otherwise ignored; qwen3-jax trains without dropout.

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
    moe = model_type == "qwen3_moe"
    defaults = _HF_DEFAULTS[model_type]

    def field(name: str, kind: str) -> Any:
        return _field(hf, name, kind, defaults.get(name))

    act = field("hidden_act", "str") or "silu"
    _need(act in ("silu", "swish"), f"hidden_act {act!r} is not supported (Qwen3 uses silu)")
    _need(not _field(hf, "attention_bias", "bool", False), "attention_bias=true is not part of Qwen3 and is not supported")
    for name, kind in (("use_cache", "bool"), ("initializer_range", "float"), ("attention_dropout", "number"),
                       ("pad_token_id", "int?"), *((("output_router_logits", "bool"),) if moe else ())):
        _field(hf, name, kind)

    sizes = {name: field(name, "int") for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings",
    )}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        _need(sizes[name] > 0, f"{name} must be positive, got {sizes[name]}")
    heads = sizes["num_attention_heads"]
    kv_heads = _field(hf, "num_key_value_heads", "int" if moe else "int?", defaults["num_key_value_heads"])
    kv_heads = heads if kv_heads is None else kv_heads  # the dense class's rule for an explicit null
    _need(kv_heads > 0 and heads % kv_heads == 0,
          f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}"
          f"{'' if 'num_key_value_heads' in hf else ', the default for an absent field'})")
    if moe and "head_dim" not in hf:
        head_dim = sizes["hidden_size"] // heads
    else:
        head_dim = _field(hf, "head_dim", "int", defaults.get("head_dim"))
    _need(head_dim > 0 and head_dim % 2 == 0, f"head_dim must be positive and even for RoPE, got {head_dim}")
    eps = field("rms_norm_eps", "float")
    _need(eps >= 0, f"rms_norm_eps must be >= 0, got {eps}")
    layer_types = _layer_types(hf, sizes["num_hidden_layers"], moe)
    theta, rope_scaling = _rope_from_hf(hf, sizes["max_position_embeddings"], layer_types)
    eos = _field(hf, "eos_token_id", "eos")

    kw: dict[str, Any] = dict(
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_layers=sizes["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=theta,
        rms_norm_eps=eps,
        tie_word_embeddings=field("tie_word_embeddings", "bool"),
        max_position_embeddings=sizes["max_position_embeddings"],
        rope_scaling=rope_scaling,
        bos_token_id=_field(hf, "bos_token_id", "int?"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    if moe:
        # transformers maps num_experts onto num_local_experts, so the latter wins when both appear.
        experts = _field(hf, "num_local_experts", "int", field("num_experts", "int"))
        step = field("decoder_sparse_step", "int")
        _need(experts >= 0, f"num_experts must be >= 0, got {experts}")
        _need(experts == 0 or step >= 1, f"decoder_sparse_step must be >= 1, got {step}")
        kw.update(
            num_experts=experts,
            num_experts_per_tok=field("num_experts_per_tok", "int"),
            moe_intermediate_size=field("moe_intermediate_size", "int"),
            norm_topk_prob=field("norm_topk_prob", "bool"),
            decoder_sparse_step=step,
            mlp_only_layers=tuple(_field(hf, "mlp_only_layers", "ints?") or ()),
            router_aux_loss_coef=field("router_aux_loss_coef", "float"),
        )
        if experts > 0 and any((i + 1) % step == 0 and i not in kw["mlp_only_layers"] for i in range(kw["num_layers"])):
            _need(0 < kw["num_experts_per_tok"] <= experts,
                  f"num_experts_per_tok ({kw['num_experts_per_tok']}) must be in [1, num_experts={experts}]")
            _need(kw["moe_intermediate_size"] > 0,
                  f"moe_intermediate_size must be positive, got {kw['moe_intermediate_size']}")
        else:  # no MoE layer: the expert fields are unused, as in transformers
            kw.update(num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0)
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
        "rms_norm_eps": float(cfg.rms_norm_eps),
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_layers,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
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
            router_aux_loss_coef=float(cfg.router_aux_loss_coef),
            output_router_logits=False,
        )
    return hf
