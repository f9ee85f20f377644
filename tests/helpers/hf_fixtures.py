"""Tiny random Hugging Face checkpoints written by transformers (the numerics reference).

Every weight is randomised, norm weights included, so a swapped q/k norm, a `1 + w` RMSNorm or
a wrong RoPE convention changes the logits.
"""

from __future__ import annotations

import torch
import transformers

DENSE = dict(
    vocab_size=300, hidden_size=80, intermediate_size=136, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=24, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=512,
)
MOE = dict(DENSE, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=40, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[])


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def make_hf_model(kind: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    if kind.startswith("moe"):
        cfg = transformers.Qwen3MoeConfig(**{**MOE, **overrides})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**{**DENSE, "tie_word_embeddings": kind == "dense_tied", **overrides})
        model = transformers.Qwen3ForCausalLM(cfg)
    randomize_(model, seed)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval().float()


def save_hf_model(model, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return str(path)
