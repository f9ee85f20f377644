"""Static model configuration: the architecture, its runtime policy, and the released presets.

`Qwen3Config` is frozen and hashable so it can be a static argument of jitted functions; anything
that changes per call (temperatures, budgets, learning rates) is passed as arrays elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from qwen3_jax.errors import ConfigError, need
from qwen3_jax.sharding import ShardingRules

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "offload", "dots", "dots_with_no_batch_dims")
MOE_IMPLS = ("auto", "ragged_dot", "blocked", "megablox")
ATTENTION_IMPLS = ("auto", "einsum", "blockwise", "splash", "cudnn")  # the kernels of qwen3_jax.attention


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
    # Runtime policy: float32 on CPU (XLA:CPU's bf16 matmuls are slow), bfloat16 on TPU/GPU.
    dtype: str = "float32"  # activations and matmul inputs
    param_dtype: str = "float32"  # stored parameters
    scan_layers: bool = True  # one compiled layer body per run of identical layers
    remat: str = "none"
    moe_impl: str = "auto"  # grouped matmul: auto = megablox on TPU, ragged_dot on GPU, blocked on CPU
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
