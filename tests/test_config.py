"""config.json parsing against transformers itself, field by field, for both model types.

Each case is a config dict. transformers is the oracle: its config class parses the dict and its
model class is built from the result and run on five tokens. Then:

- transformers rejects the dict, or its model fails or gives non-finite logits: `from_hf_config`
  must raise `ConfigError` naming the field;
- the case is in `UNSUPPORTED` (transformers runs it, qwen3-jax does not implement it): the same;
- otherwise every value the model depends on must be what transformers' model uses, read from
  the built model where the model holds it (head_dim, norm eps, RoPE frequencies, which layers are
  MoE, top-k, ...).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
import transformers

import qwen3_jax as q
from qwen3_jax.config import YarnScaling
from qwen3_jax.hf_config import from_hf_config, to_hf_config
from qwen3_jax.layers import rope_inv_freq

transformers.logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

CLASSES = {
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
}
# Small and valid, with every field away from transformers' default, so removing one changes it.
BASE = {
    "qwen3": dict(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, max_position_embeddings=128, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_theta=5e5, bos_token_id=1, eos_token_id=2,
    ),
}
BASE["qwen3_moe"] = dict(
    BASE["qwen3"], num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=3,
    moe_intermediate_size=16, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[0],
    router_aux_loss_coef=0.01,
)
DEL = object()  # marks a field to remove from the base

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
# A non-default valid value for every field either config class declares, plus the legacy keys
# they still read (rope_theta, rope_scaling, partial_rotary_factor, num_local_experts, head_dim).
PRESENT = {
    "both": dict(
        vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=77, rms_norm_eps=3e-6, tie_word_embeddings=False,
        rope_theta=1e6, bos_token_id=None, eos_token_id=[2, 3], head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 2e4}, rope_scaling=YARN,
        hidden_act="swish", attention_bias=False, use_sliding_window=False, sliding_window=7,
        use_cache=False, initializer_range=0.05, attention_dropout=0.1, pad_token_id=3,
        partial_rotary_factor=1.0,
    ),
    "qwen3": dict(max_window_layers=1, layer_types=["full_attention", "attention"]),
    "qwen3_moe": dict(
        num_experts=6, num_local_experts=5, num_experts_per_tok=1, moe_intermediate_size=8,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], router_aux_loss_coef=0.5,
        output_router_logits=True,
    ),
}
# Values of the wrong JSON type for each kind of field (transformers' configs are strict dataclasses).
WRONG_TYPE = {
    "vocab_size": 64.0, "hidden_size": "32", "intermediate_size": True, "num_hidden_layers": None,
    "num_attention_heads": 4.0, "num_key_value_heads": "2", "head_dim": None, "max_position_embeddings": 1e3,
    "rms_norm_eps": 1, "tie_word_embeddings": 1, "rope_theta": "1e6", "eos_token_id": [1.5],
    "bos_token_id": "1", "attention_bias": "no", "use_sliding_window": None, "sliding_window": 4.0,
    "norm_topk_prob": 1, "router_aux_loss_coef": 1, "mlp_only_layers": [0.5], "num_experts": 4.0,
    "num_experts_per_tok": "2", "moe_intermediate_size": None, "decoder_sparse_step": 1.0,
    "use_cache": "yes", "rope_scaling": "yarn", "layer_types": "full_attention",
}
# Configs transformers runs but qwen3-jax does not implement, with the field the error must name.
UNSUPPORTED = {
    "qwen3/hidden_act=gelu": "hidden_act",
    "qwen3/attention_bias": "attention_bias",
    "qwen3/sliding layer": "sliding_window",
    "qwen3/explicit sliding layer_types": "layer_types",
    "qwen3_moe/sliding window": "sliding_window",
    "qwen3/rope linear": "rope_type",
    "qwen3/rope dynamic": "rope_type",
    "qwen3/yarn factor < 1": "factor",
    # Degenerate sizes: transformers builds a model that ignores its input or its MLP.
    "qwen3/num_hidden_layers=0": "num_hidden_layers",
    "qwen3/intermediate_size=0": "intermediate_size",
    "qwen3_moe/num_experts_per_tok=0": "num_experts_per_tok",
    "qwen3/rope_theta negative": "rope_theta",
}
# Public reports of this kind, each covered by a case: head_dim derived as hidden / heads
# (marin-community/marin#2098), an explicit `"head_dim": null` (HabanaAI/vllm-fork#1294), the MoE
# norm_topk_prob default lost (huggingface/transformers#41151), rope_theta silently defaulted once
# transformers v5 moved it into rope_parameters (deepspeedai/DeepSpeed#8345, sgl-project/sglang#14745),
# eos_token_id given as a list (Blaizzy/mlx-vlm#309).
EXTRA = [  # (id, model type, changes, field the error names if it is an error)
    ("qwen3/hidden_act=gelu", "qwen3", {"hidden_act": "gelu"}, None),
    ("qwen3/hidden_act=bogus", "qwen3", {"hidden_act": "bogus"}, "hidden_act"),
    ("qwen3/attention_bias", "qwen3", {"attention_bias": True}, None),
    ("qwen3/sliding layer", "qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, None),
    ("qwen3/sliding but every layer full", "qwen3", {"use_sliding_window": True, "sliding_window": 4}, None),
    ("qwen3/explicit sliding layer_types", "qwen3",
     {"layer_types": ["full_attention", "sliding_attention"], "use_sliding_window": True, "sliding_window": 4}, None),
    ("qwen3/sliding layer_types without window", "qwen3", {"layer_types": ["sliding_attention"] * 2}, "sliding_window"),
    ("qwen3/layer_types length", "qwen3", {"layer_types": ["full_attention"]}, "layer_types"),
    ("qwen3/layer_types entry", "qwen3", {"layer_types": ["full_attention", "bogus"]}, "layer_types"),
    ("qwen3_moe/sliding window", "qwen3_moe", {"use_sliding_window": True, "sliding_window": 4}, None),
    ("qwen3_moe/sliding window, flag off", "qwen3_moe", {"use_sliding_window": False, "sliding_window": 4}, None),
    ("qwen3/v5 rope_parameters", "qwen3", {"rope_theta": DEL, "rope_parameters": {"rope_type": "default", "rope_theta": 3e5}}, None),
    ("qwen3/rope_parameters without theta", "qwen3", {"rope_parameters": {"rope_type": "default"}}, None),
    ("qwen3/rope_scaling null", "qwen3", {"rope_scaling": None}, None),
    ("qwen3/rope_scaling wins", "qwen3", {"rope_scaling": YARN, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}, None),
    ("qwen3/yarn legacy type key", "qwen3", {"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}}, None),
    ("qwen3/yarn without original", "qwen3", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, None),
    ("qwen3/yarn top-level original", "qwen3", {"rope_scaling": YARN, "original_max_position_embeddings": 16}, None),
    ("qwen3/yarn factor null", "qwen3", {"rope_scaling": dict(YARN, factor=None)}, None),
    ("qwen3/yarn without factor", "qwen3", {"rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 32}}, "factor"),
    ("qwen3/yarn all keys", "qwen3", {"rope_parameters": dict(YARN, beta_fast=16.0, beta_slow=2, attention_factor=1.25, truncate=False, rope_theta=1e4)}, None),
    ("qwen3/yarn zero betas", "qwen3", {"rope_scaling": dict(YARN, beta_fast=0, beta_slow=0)}, None),
    ("qwen3/yarn mscale", "qwen3", {"rope_scaling": dict(YARN, mscale=0.7, mscale_all_dim=1.3)}, None),
    ("qwen3/yarn unknown key", "qwen3", {"rope_scaling": dict(YARN, foo=1)}, None),
    ("qwen3_moe/yarn", "qwen3_moe", {"head_dim": DEL, "rope_scaling": YARN}, None),
    ("qwen3/yarn partial rotary", "qwen3", {"rope_scaling": YARN, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen3/default rope partial rotary", "qwen3", {"partial_rotary_factor": 0.5}, None),
    ("qwen3/yarn factor < 1", "qwen3", {"rope_scaling": dict(YARN, factor=0.5)}, None),
    ("qwen3/yarn original 0", "qwen3", {"rope_scaling": dict(YARN, original_max_position_embeddings=0)}, "original_max_position_embeddings"),
    ("qwen3/rope linear", "qwen3", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, None),
    ("qwen3/rope dynamic", "qwen3", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, None),
    ("qwen3/rope bogus", "qwen3", {"rope_parameters": {"rope_type": "bogus"}}, "rope_type"),
    ("qwen3/rope per layer type", "qwen3", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5.0}}}, "rope_parameters"),
    ("qwen3/rope_theta negative", "qwen3", {"rope_theta": -1.0}, "rope_theta"),
    ("qwen3/rope_theta int", "qwen3", {"rope_theta": 100000}, None),
    ("qwen3/head_dim odd", "qwen3", {"head_dim": 7}, "head_dim"),
    ("qwen3/head_dim tiny odd", "qwen3", {"head_dim": 3}, "head_dim"),
    ("qwen3_moe/head_dim null", "qwen3_moe", {"head_dim": None}, "head_dim"),
    ("qwen3/kv heads null", "qwen3", {"num_key_value_heads": None}, None),
    ("qwen3/kv heads 0", "qwen3", {"num_key_value_heads": 0}, "num_key_value_heads"),
    ("qwen3/heads not a multiple", "qwen3", {"num_attention_heads": 3}, "num_attention_heads"),
    ("qwen3/vocab 0", "qwen3", {"vocab_size": 0}, "vocab_size"),
    ("qwen3/rms_norm_eps 0", "qwen3", {"rms_norm_eps": 0.0}, None),
    ("qwen3/rms_norm_eps negative", "qwen3", {"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ("qwen3/num_hidden_layers=0", "qwen3", {"num_hidden_layers": 0}, None),
    ("qwen3/intermediate_size=0", "qwen3", {"intermediate_size": 0}, None),
    ("qwen3/bos -1", "qwen3", {"bos_token_id": -1}, None),
    ("qwen3/eos null", "qwen3", {"eos_token_id": None}, None),
    ("qwen3/MoE keys in a dense config", "qwen3", {"num_experts": 4, "num_experts_per_tok": 2}, None),
    ("qwen3_moe/no experts", "qwen3_moe", {"num_experts": 0}, None),
    ("qwen3_moe/experts_per_tok > experts", "qwen3_moe", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("qwen3_moe/num_experts_per_tok=0", "qwen3_moe", {"num_experts_per_tok": 0}, None),
    ("qwen3_moe/moe_intermediate_size 0", "qwen3_moe", {"moe_intermediate_size": 0}, "moe_intermediate_size"),
    ("qwen3_moe/decoder_sparse_step 0", "qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("qwen3_moe/mlp_only_layers out of range", "qwen3_moe", {"mlp_only_layers": [7, -1]}, None),
    ("qwen3_moe/mlp_only_layers null", "qwen3_moe", {"mlp_only_layers": None}, None),
    ("qwen3_moe/num_local_experts only", "qwen3_moe", {"num_experts": DEL, "num_local_experts": 3}, None),
    ("qwen3_moe/kv heads null", "qwen3_moe", {"num_key_value_heads": None}, "num_key_value_heads"),
    ("qwen3_moe/max_window_layers is not read", "qwen3_moe", {"max_window_layers": "anything"}, None),
]


def _cases():
    out = []
    for mt, base in BASE.items():
        out += [(f"{mt}/absent {k}", mt, {k: DEL}, k) for k in base]
        present = {**PRESENT["both"], **PRESENT[mt]}
        out += [(f"{mt}/present {k}", mt, {k: v}, k) for k, v in present.items()]
        out += [(f"{mt}/wrong type {k}", mt, {k: v}, k) for k, v in WRONG_TYPE.items() if k in present or k in base]
    return out + EXTRA


CASES = _cases()


def _apply(mt: str, changes: dict) -> dict:
    d = {**BASE[mt], **changes}
    return {"model_type": mt, **{k: v for k, v in d.items() if v is not DEL}}


def _hf_view(mt: str, d: dict) -> dict | None:
    """What transformers' model uses, or None when transformers cannot build or run it."""
    config_cls, model_cls = CLASSES[mt]
    try:
        hf = config_cls.from_dict({k: v for k, v in d.items() if k != "model_type"})
        torch.manual_seed(0)
        model = model_cls(hf).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    except Exception:  # noqa: BLE001 - any failure is "transformers rejects it"
        return None
    if not torch.isfinite(logits).all():
        return None
    inner = model.model
    mlps = [layer.mlp for layer in inner.layers]
    moe = [m for m in mlps if hasattr(m, "gate") and hasattr(m, "experts")]
    dense = [m for m in mlps if not (hasattr(m, "gate") and hasattr(m, "experts"))]
    eos = hf.eos_token_id
    view = dict(
        vocab_size=inner.embed_tokens.num_embeddings, hidden_size=inner.embed_tokens.embedding_dim,
        num_layers=len(inner.layers), num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
        head_dim=inner.layers[0].self_attn.head_dim if len(inner.layers) else None, rms_norm_eps=inner.norm.variance_epsilon,
        tie_word_embeddings=model.lm_head.weight is inner.embed_tokens.weight,
        max_position_embeddings=hf.max_position_embeddings,
        inv_freq=inner.rotary_emb.inv_freq.numpy(), attention_scaling=float(inner.rotary_emb.attention_scaling),
        moe_layers=tuple(m in moe for m in mlps), bos_token_id=hf.bos_token_id,
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        sliding=any(getattr(layer.self_attn, "sliding_window", None) for layer in inner.layers),
    )
    if dense:
        view["intermediate_size"] = dense[0].gate_proj.out_features
    if moe:
        view.update(
            num_experts=moe[0].gate.num_experts, num_experts_per_tok=moe[0].gate.top_k,
            moe_intermediate_size=moe[0].experts.intermediate_dim, norm_topk_prob=moe[0].gate.norm_topk_prob,
            router_aux_loss_coef=model.router_aux_loss_coef,
        )
    return view


def _our_view(cfg: q.Qwen3Config, like: dict) -> dict:
    inv_freq, scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    view = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        inv_freq=inv_freq, attention_scaling=float(scale),
        moe_layers=tuple(cfg.is_moe_layer(i) for i in range(cfg.num_layers)), bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, sliding=False, intermediate_size=cfg.intermediate_size,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
    )
    if like.get("head_dim", 0) is None:  # a model without layers has no head_dim to compare
        view["head_dim"] = None
    return {k: view[k] for k in like}


@pytest.mark.parametrize("case_id, mt, changes, field", CASES, ids=[c[0] for c in CASES])
def test_config_reads_like_transformers(case_id, mt, changes, field):
    d = _apply(mt, changes)
    ref = _hf_view(mt, d)
    if case_id in UNSUPPORTED:
        assert ref is not None, f"{case_id} is listed as unsupported but transformers rejects it too"
        field = UNSUPPORTED[case_id]
    if ref is None or case_id in UNSUPPORTED:
        with pytest.raises(q.ConfigError, match=field):
            from_hf_config(d)
        return
    ours = _our_view(from_hf_config(d), ref)
    np.testing.assert_allclose(ours.pop("inv_freq"), ref.pop("inv_freq"), rtol=3e-7, atol=0)
    assert ours.pop("attention_scaling") == pytest.approx(ref.pop("attention_scaling"), rel=1e-12)
    assert ours == ref


def _declared_fields(config_cls) -> set[str]:
    base = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}
    return {f.name for f in dataclasses.fields(config_cls)} - base


@pytest.mark.parametrize("mt", sorted(CLASSES))
def test_every_field_transformers_declares_is_covered(mt):
    """A field transformers adds to its config class must get a case here."""
    covered = set(BASE[mt]) | set(PRESENT["both"]) | set(PRESENT[mt])
    assert _declared_fields(CLASSES[mt][0]) - covered == set()


def test_issue_head_dim_default_loads_the_checkpoint_transformers_loads():
    """Issue 13, case 1: a qwen3 config.json without head_dim means 128, not hidden / heads."""
    cfg = from_hf_config({"model_type": "qwen3", "hidden_size": 64, "num_attention_heads": 4,
                            "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 32})
    assert cfg.head_dim == 128 and cfg.rope_theta == 10000.0 and cfg.max_position_embeddings == 32768


def test_round_trip_through_to_hf_config_and_transformers():
    cfg = q.preset("tiny-moe", eos_token_id=(5, 6), rope_scaling=YarnScaling(4.0, 64, attention_factor=1.3),
                   mlp_only_layers=(1,), decoder_sparse_step=1)
    hf = to_hf_config(cfg)
    assert from_hf_config(hf) == cfg
    reloaded = transformers.Qwen3MoeConfig.from_dict({k: v for k, v in hf.items() if k != "model_type"})
    assert reloaded.eos_token_id == [5, 6] and reloaded.head_dim == cfg.head_dim


def test_context_length_is_what_serving_engines_derive():
    """YaRN: factor x original (vLLM's max_model_len; vllm-project/vllm-ascend#760), never below
    max_position_embeddings; a YaRN factor left null derives back to max_position_embeddings."""
    def context(rope_scaling, max_positions):
        return from_hf_config({"model_type": "qwen3", "rope_scaling": rope_scaling,
                                 "max_position_embeddings": max_positions}).context_length

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context(yarn, 40960) == 131072  # Qwen's own instructions
    assert context(yarn, 131072) == 131072  # the config edited to match (ggml-org/llama.cpp#10698)
    assert context(dict(yarn, factor=2.0), 131072) == 131072
    assert context(dict(yarn, factor=None), 40960) == 40960
    assert context(None, 40960) == 40960
