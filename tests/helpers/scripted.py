"""A real-vocabulary model scripted to greedy-decode a given successor for each token."""

import jax.numpy as jnp
import numpy as np

import qwen3_jax as q


def scripted_model(next_token: dict[int, int], default_next: int) -> q.Qwen3:
    """A real-vocabulary model whose greedy next token is `next_token[last token]` (else
    `default_next`): the layers add nothing (zero output projections), each scripted token embeds
    as its own one-hot direction and the unembedding maps that direction to its successor."""
    cfg = q.preset("tiny-dense", vocab_size=151936, hidden_size=32, intermediate_size=8, num_layers=1,
                   tie_word_embeddings=False)
    model = q.init_model(cfg)
    run = model.runs[0]
    run.attn.o_proj[...] = jnp.zeros_like(run.attn.o_proj[...])
    run.mlp.down_proj[...] = jnp.zeros_like(run.mlp.down_proj[...])
    embed = np.zeros((cfg.vocab_size, cfg.hidden_size), np.float32)
    embed[:, 0] = 1.0
    head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
    head[0, default_next] = 1.0
    for k, (tok, nxt) in enumerate(next_token.items(), start=1):
        embed[tok] = np.eye(cfg.hidden_size, dtype=np.float32)[k]
        head[k, nxt] = 1.0
    model.embed[...], model.lm_head[...] = jnp.asarray(embed), jnp.asarray(head)
    return model
