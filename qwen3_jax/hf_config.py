"""Hugging Face `config.json` <-> `Qwen3Config`, with transformers' (v5) defaults, types and rejections."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from qwen3_jax.config import Qwen3Config, YarnScaling
from qwen3_jax.errors import ConfigError, need

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


def _rope_from_hf(hf: Mapping[str, Any], max_positions: int, layer_types: Sequence[str]) -> tuple[float, YarnScaling | None]:
    """RoPE base and YaRN scaling as transformers v5 resolves them.

    The v4 `rope_scaling` dict wins over the v5 `rope_parameters` one; a top-level `rope_theta`
    fills in a dict without its own; 10,000 when neither names one.
    """
    for name in ("rope_scaling", "rope_parameters"):
        need(hf.get(name) is None or isinstance(hf[name], dict),
              f"config.json field {name!r} must be an object or null, got {hf.get(name)!r}")
    spec = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    nested = sorted(set(spec) & set(layer_types))
    need(not nested, f"rope_parameters given per layer type ({nested}): transformers' Qwen3 reads one "
                      "RoPE setting for every layer and cannot build this model")
    theta = spec.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA))
    need(_is_number(theta) and theta > 0, f"rope_theta must be a positive number, got {theta!r}")

    rope_type = spec.get("rope_type", spec.get("type", "default"))
    if rope_type == "default":  # Qwen3's default RoPE ignores partial_rotary_factor
        return float(theta), None
    need(rope_type == "yarn", f"rope_type {rope_type!r} is not supported (supported: default, yarn)")
    need("factor" in spec, "yarn RoPE needs rope_scaling.factor (transformers rejects the config without it)")
    # A top-level original_max_position_embeddings takes priority over the dict's (transformers' rule).
    orig = hf.get("original_max_position_embeddings", spec.get("original_max_position_embeddings", max_positions))
    need(_is_int(orig) and orig > 0, f"yarn original_max_position_embeddings must be a positive integer, got {orig!r}")
    factor = spec["factor"]
    if factor is None:  # transformers then derives it from the two context lengths
        factor = max_positions / orig
    need(_is_number(factor) and factor >= 1,
          f"yarn factor must be a number >= 1 (transformers warns on anything else), got {factor!r}")
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    need(partial == 1.0, f"partial_rotary_factor {partial!r} with yarn: transformers' Qwen3 then rotates only part "
                          "of each head and cannot apply it; only 1.0 is supported")
    attention_factor = spec.get("attention_factor")
    mscale, mscale_all_dim = spec.get("mscale"), spec.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek-style attention factor
        attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    for name, value in (("beta_fast", spec.get("beta_fast")), ("beta_slow", spec.get("beta_slow")),
                        ("attention_factor", attention_factor)):
        need(value is None or _is_number(value), f"yarn {name} must be a number, got {value!r}")

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
        need(len(explicit) == num_layers,
              f"layer_types has {len(explicit)} entries but num_hidden_layers is {num_layers}")
        bad = sorted(set(explicit) - set(_LAYER_TYPES))
        need(not bad, f"layer_types entries {bad} are not Qwen3 attention kinds {_LAYER_TYPES}")
    if moe:
        need(window is None, f"use_sliding_window=true with sliding_window={window}: transformers' Qwen3-MoE then "
                              "attends within a sliding window in every layer, which qwen3-jax does not implement")
        return ("full_attention",) * num_layers
    max_window_layers = _field(hf, "max_window_layers", "int", _HF_DEFAULTS["qwen3"]["max_window_layers"])
    types = explicit or [
        "sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
        for i in range(num_layers)
    ]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding:
        need(window is not None, f"layer_types marks layers {sliding} sliding_attention but sliding_window is unset "
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
    need(act in ("silu", "swish"), f"hidden_act {act!r} is not supported (Qwen3 uses silu)")
    need(not _field(hf, "attention_bias", "bool", False), "attention_bias=true is not part of Qwen3 and is not supported")
    for name, kind in (("use_cache", "bool"), ("initializer_range", "float"), ("attention_dropout", "number"),
                       ("pad_token_id", "int?"), *((("output_router_logits", "bool"),) if moe else ())):
        _field(hf, name, kind)

    sizes = {name: field(name, "int") for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings",
    )}
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
        need(sizes[name] > 0, f"{name} must be positive, got {sizes[name]}")
    heads = sizes["num_attention_heads"]
    kv_heads = _field(hf, "num_key_value_heads", "int" if moe else "int?", defaults["num_key_value_heads"])
    kv_heads = heads if kv_heads is None else kv_heads  # the dense class's rule for an explicit null
    need(kv_heads > 0 and heads % kv_heads == 0,
          f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}"
          f"{'' if 'num_key_value_heads' in hf else ', the default for an absent field'})")
    if moe and "head_dim" not in hf:
        head_dim = sizes["hidden_size"] // heads
    else:
        head_dim = _field(hf, "head_dim", "int", defaults.get("head_dim"))
    need(head_dim > 0 and head_dim % 2 == 0, f"head_dim must be positive and even for RoPE, got {head_dim}")
    eps = field("rms_norm_eps", "float")
    need(eps >= 0, f"rms_norm_eps must be >= 0, got {eps}")
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
        need(experts >= 0, f"num_experts must be >= 0, got {experts}")
        need(experts == 0 or step >= 1, f"decoder_sparse_step must be >= 1, got {step}")
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
            need(0 < kw["num_experts_per_tok"] <= experts,
                  f"num_experts_per_tok ({kw['num_experts_per_tok']}) must be in [1, num_experts={experts}]")
            need(kw["moe_intermediate_size"] > 0,
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
