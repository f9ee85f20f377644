"""Mutation check: deliberate faults, applied one at a time to a copy of the project, must each make
the tests meant to catch them fail.

    python -m benchmarks.mutations [--only NAME ...] [--timeout SECONDS] [--no-baseline]

Each fault is a small exact text replacement in one file plus the pytest arguments of the tests
that should catch it. The text must occur exactly once in the file, otherwise the fault is reported
"stale" (the code moved on: rewrite the fault). The project is copied to a temporary directory; for
each fault its tests run there (`pytest -x -q`, with a timeout) with the fault applied, and the file
is restored afterwards. A fault is "caught" when its tests fail, "survived" when they pass: then add
or strengthen a test until it is caught. First, each distinct test selection runs once without any
fault ("baseline"): a selection that fails on its own would make every fault look caught.

Writes benchmarks/results/mutations.json and prints the table; exits 1 unless every fault is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "mutations.json"


@dataclass(frozen=True)
class Fault:
    name: str
    path: str  # relative to the project root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions


MODEL_PARITY = ("tests/test_model.py", "-k", "logits_and_greedy or rms_norm")
GENERATE_PARITY = ("tests/test_generate.py", "-k", "greedy_matches_transformers")
SAMPLING = ("tests/test_sampling.py",)
BUDGET = ("tests/test_sampling.py", "-k", "budget or think")
TOKENIZER = ("tests/test_tokenizer.py",)
ATTENTION = ("tests/test_attention.py", "-k", "blockwise_equals")
RL_LOSS = ("tests/test_rl.py", "-k", "policy_loss or asymmetric or relative")

FAULTS = (
    # ---- the two faults issue 16 named
    Fault("tokenizer_normalizer_nfkc", "qwen3_jax/tokenizer.py",
          "tok.normalizer = normalizers.NFC()", "tok.normalizer = normalizers.NFKC()", TOKENIZER),
    Fault("first_fit_packing_replaced_by_concat_then_split", "train/data/pipeline.py",
          "        it_ds = grain_exp.FirstFitPackIterDataset(\n"
          "            it_ds, length_struct=lengths, num_packing_bins=data_cfg.packing_bins, shuffle_bins=False\n"
          "        )",
          "        it_ds = grain_exp.ConcatThenSplitIterDataset(it_ds, length_struct=lengths)",
          ("tests/test_data.py", "-k", "packing or first_fit or chunks or never_cut")),
    Fault("iterator_state_slices_restored_as_json_lists", "train/data/pipeline.py",
          'slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}',
          'slices = state["remainder_slices"]',
          ("tests/test_data.py", "-k", "restores_the_exact_stream")),
    # ---- model
    Fault("rmsnorm_eps_outside_the_square_root", "qwen3_jax/layers.py",
          "x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)",
          "x32 * (jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)) + self.eps)", MODEL_PARITY),
    Fault("rmsnorm_scales_by_one_plus_w", "qwen3_jax/layers.py",
          "return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)",
          "return (1 + self.weight[...]).astype(x.dtype) * normed.astype(x.dtype)", MODEL_PARITY),
    Fault("rope_interleaved_instead_of_half_split", "qwen3_jax/layers.py",
          "rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)",
          "rotated = jnp.stack([-x_BxTxNxH[..., 1::2], x_BxTxNxH[..., ::2]], axis=-1).reshape(x_BxTxNxH.shape)",
          MODEL_PARITY),
    Fault("qk_norm_after_rope", "qwen3_jax/layers.py",
          "q = apply_rope(self.q_norm(q), ctx.cos_BxTxH, ctx.sin_BxTxH)",
          "q = self.q_norm(apply_rope(q, ctx.cos_BxTxH, ctx.sin_BxTxH))", MODEL_PARITY),
    Fault("gqa_query_head_n_reads_kv_head_n_mod_k", "qwen3_jax/layers.py",
          "q_BxTxKxGxH = q.reshape(B, T, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)",
          "q_BxTxKxGxH = q.reshape(B, T, cfg.num_heads // cfg.num_kv_heads, cfg.num_kv_heads, cfg.head_dim)"
          ".swapaxes(2, 3)", MODEL_PARITY),
    Fault("causal_mask_excludes_the_diagonal", "qwen3_jax/attention.py",
          "visible = k_lo + jnp.arange(bk)[None, None, :] <= q_slots[:, :, None]",
          "visible = k_lo + jnp.arange(bk)[None, None, :] < q_slots[:, :, None]", MODEL_PARITY),
    Fault("packed_documents_attend_across_segments", "qwen3_jax/attention.py",
          "visible &= q_seg[:, :, None] == k_seg[:, None, :]",
          "visible &= q_seg[:, :, None] == q_seg[:, :, None]",
          ("tests/test_model.py", "-k", "packed_segments")),
    # ---- blockwise (flash) attention
    Fault("online_softmax_without_the_rescale", "qwen3_jax/attention.py",
          "return m_new, l, acc * correction[..., None] + _tile_values(p, v)",
          "return m_new, l, acc + _tile_values(p, v)", ATTENTION),
    Fault("flash_backward_without_the_delta_term", "qwen3_jax/attention.py",
          "ds = p * (dp - delta_i[..., None]) * scale", "ds = p * dp * scale", ATTENTION),
    Fault("flash_skips_the_diagonal_key_tile", "qwen3_jax/attention.py",
          "return jnp.minimum(last_slot_nq // bk + 1, nk)", "return jnp.minimum(last_slot_nq // bk, nk)", ATTENTION),
    Fault("decode_step_does_not_write_the_cache", "qwen3_jax/layers.py",
          "slots_BxT = start_B[:, None] + jnp.arange(T)[None, :]",
          "slots_BxT = start_B[:, None] + jnp.arange(T)[None, :] + (T == 1) * 2**30",
          ("tests/test_model.py", "-k", "kv_cache")),
    Fault("moe_top_k_weights_not_renormalised", "qwen3_jax/moe.py",
          "    if normalize:\n", "    if not normalize:\n",
          ("tests/test_model.py", "-k", "logits_and_greedy and moe")),
    Fault("embedding_foreign_vocab_rows_not_masked", "qwen3_jax/layers.py",
          "x = jax.lax.psum(jnp.where(ours_BxT[..., None], x, 0), vocab_axes)",
          "x = jax.lax.psum(x, vocab_axes)",
          ("tests/test_model.py", "-k", "sharded_equals_unsharded")),
    Fault("moe_routing_weights_from_the_gathered_rows_of_another_shard", "qwen3_jax/moe.py",
          "xs, idxs, ws = (jax.lax.all_gather(a, \"expert\", axis=0, tiled=True) for a in (xs, idxs, ws))",
          "xs, idxs = (jax.lax.all_gather(a, \"expert\", axis=0, tiled=True) for a in (xs, idxs))\n"
          "                    ws = jnp.concatenate([ws, ws], axis=0)",
          ("tests/test_model.py", "-k", "sharded_equals_unsharded and moe")),
    Fault("moe_token_chunks_reassembled_in_reverse", "qwen3_jax/moe.py",
          "return jax.lax.map(one_chunk, (x, idx, w)).reshape(",
          "return jax.lax.map(one_chunk, (x, idx, w))[::-1].reshape(",
          ("tests/test_model.py", "-k", "token_chunks or (sharded_equals_unsharded and moe)")),
    Fault("megablox_foreign_rows_group_first", "qwen3_jax/moe.py",
          "sizes_G = jnp.concatenate([sizes_E, (M + pad - jnp.sum(sizes_E))[None]])",
          "sizes_G = jnp.concatenate([(M + pad - jnp.sum(sizes_E))[None], sizes_E])",
          ("tests/test_model.py", "-k", "megablox")),
    Fault("moe_auto_picks_ragged_dot_on_tpu", "qwen3_jax/moe.py",
          '{"cpu": "blocked", "tpu": "megablox"}', '{"cpu": "blocked", "tpu": "ragged_dot"}',
          ("tests/test_model.py", "-k", "auto_moe_impl")),
    Fault("offload_remat_names_no_layer_input", "qwen3_jax/model.py",
          'h = checkpoint_name(h, "layer_input")', 'h = checkpoint_name(h, "layer_inputs")',
          ("tests/test_model.py", "-k", "offload_remat")),
    Fault("hlo_kernel_config_line_ends_the_computation", "benchmarks/hlo_stats.py",
          'elif line.rstrip() == "}":', 'elif line.startswith("}"):',
          ("tests/test_tpu_aot.py", "-k", "multi_line")),
    Fault("chunked_prefill_keeps_the_last_chunk_for_every_row", "infer/engine.py",
          "return (cache, jnp.where(ends_here_B[:, None, None], h_Bx1xD, last_Bx1xD)), None",
          "return (cache, h_Bx1xD), None",
          ("tests/test_generate.py", "-k", "chunked_prefill")),
    # ---- loss and data
    Fault("cross_entropy_ignores_the_loss_mask", "train/objectives.py",
          "return jnp.sum(m_BxC * (lse_BxC - target_BxC))", "return jnp.sum(lse_BxC - target_BxC)",
          ("tests/test_step.py", "-k", "chunked_cross_entropy")),
    Fault("targets_not_shifted", "train/data/documents.py",
          "targets_n[:-1] = tokens_n[1:]", "targets_n[:-1] = tokens_n[:-1]",
          ("tests/test_data.py", "-k", "packing_rows")),
    Fault("loss_mask_follows_the_input_token_not_the_target", "train/data/documents.py",
          "loss_mask_n[:-1] = trained_n[1:]", "loss_mask_n[:-1] = trained_n[:-1]",
          ("tests/test_data.py", "-k", "sft or chat")),
    Fault("chat_sft_accepted_under_concat_then_split", "train/data/config.py",
          'need(not (self.kind == "chat" and self.packing == "concat_then_split"),',
          'need(True or not (self.kind == "chat" and self.packing == "concat_then_split"),',
          ("tests/test_data.py", "-k", "never_cut or released")),
    # ---- sampling
    Fault("temperature_multiplies", "infer/sampling.py",
          "logits_BxV = logits_BxV / jnp.where(greedy_B, 1.0, params.temperature)[:, None]",
          "logits_BxV = logits_BxV * jnp.where(greedy_B, 1.0, params.temperature)[:, None]", SAMPLING),
    Fault("top_k_keeps_one_more", "infer/sampling.py",
          "k_B = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, n), n)",
          "k_B = jnp.where(params.top_k > 0, jnp.minimum(params.top_k + 1, n), n)", SAMPLING),
    Fault("top_p_keeps_every_tied_token", "infer/sampling.py",
          "tie_id_B = jnp.where((params.top_p < 1) & (cut_p_B == cutoff_B), tie_id_p_B, 0)",
          "tie_id_B = jnp.zeros_like(tie_id_p_B)",
          SAMPLING),
    Fault("min_p_threshold_halved_in_log_space", "infer/sampling.py",
          "cut_m_B = sorted_BxN[:, 0] + jnp.log(params.min_p)",
          "cut_m_B = sorted_BxN[:, 0] + jnp.log(params.min_p) / 2", SAMPLING),
    Fault("presence_penalty_rewards_seen_tokens", "infer/sampling.py",
          "logits_BxV = logits_BxV - jnp.where(seen_BxV", "logits_BxV = logits_BxV + jnp.where(seen_BxV", SAMPLING),
    Fault("qwen_thinking_temperature_changed", "infer/sampling.py",
          '{"temperature": 0.6, "top_p": 0.95', '{"temperature": 0.7, "top_p": 0.95',
          ("tests/test_rollout.py", "tests/test_generate.py", "-k", "sampling_defaults or complete_renders")),
    Fault("soft_switch_ignored", "infer/rollout.py",
          "thinking = enable_thinking and last_soft_switch(messages) != chat.NO_THINK_FLAG", "thinking = enable_thinking",
          ("tests/test_rollout.py", "tests/test_generate.py", "-k", "mode_of or complete_renders or stream_text_yields")),
    # ---- thinking budget
    Fault("budget_counts_forced_tokens", "infer/sampling.py",
          "count_B = state.count + (state.in_think & ~forcing_B).astype(jnp.int32)",
          "count_B = state.count + state.in_think.astype(jnp.int32)", BUDGET),
    Fault("budget_spent_one_token_late", "infer/sampling.py",
          "return (budget_B >= 0) & (count_B >= budget_B)", "return (budget_B >= 0) & (count_B > budget_B)", BUDGET),
    Fault("think_open_read_from_the_whole_prompt", "infer/sampling.py",
          "turn = ids[turns[-1] + 1:] if turns.size else ids", "turn = ids", BUDGET),
    Fault("spent_budget_thinks_again_after_the_forced_close", "infer/sampling.py",
          "closed_B = state.done & ~state.in_think", "closed_B = state.done & ~state.in_think & (state.forcing_pos >= 0)",
          BUDGET),
    Fault("spent_budget_mask_leaves_end_think", "infer/sampling.py",
          "tags_BxV = (ids_V == state.think_id[:, None]) | (ids_V == state.end_think_id[:, None])",
          "tags_BxV = ids_V == state.think_id[:, None]", BUDGET),
    Fault("decode_samples_before_the_budget_mask", "infer/engine.py",
          "logits_BxV = budget_mask(s.budget, s.logits_BxV)", "logits_BxV = s.logits_BxV",
          ("tests/test_generate.py", "-k", "budget_counts_the_whole_reply")),
    # ---- tokenizer and chat template
    Fault("tokenizer_regex_groups_digits", "qwen3_jax/tokenizer.py",
          r'\p{L}+|\p{N}|"""', r'\p{L}+|\p{N}+|"""', TOKENIZER),
    Fault("tokenizer_contractions_case_sensitive", "qwen3_jax/tokenizer.py",
          "(?i:'s|'t|'re", "(?:'s|'t|'re", TOKENIZER),
    Fault("think_tag_marked_special", "qwen3_jax/tokenizer.py",
          '(151667, "<think>", False),', '(151667, "<think>", True),', TOKENIZER),
    Fault("earlier_turns_keep_their_thinking", "qwen3_jax/chat.py",
          "if after_query and (is_last or reasoning):", "if is_last or reasoning:",
          ("tests/test_chat.py", "-k", "official")),
    # ---- checkpoints
    Fault("hf_q_norm_read_from_k_norm", "qwen3_jax/hf.py",
          '("attn", "q_norm", "weight"): ("self_attn.q_norm.weight", None),',
          '("attn", "q_norm", "weight"): ("self_attn.k_norm.weight", None),', MODEL_PARITY),
    Fault("hf_export_kernels_not_transposed", "qwen3_jax/hf.py",
          "return ours.reshape(math.prod(ours.shape[: self.n_in]), -1).T",
          "return ours.reshape(-1, math.prod(ours.shape[: self.n_in]))",
          ("tests/test_model.py", "-k", "export_round_trip")),
    Fault("checkpoint_manifest_hash_not_checked", "train/checkpoint.py",
          "if actual[name][1] != digest:", "if False:",
          ("tests/test_resume.py", "-k", "corrupt_step")),
    # ---- issue 26: CPU decode over a small cache runs einsum
    Fault("cpu_decode_crossover_at_one_tile", "qwen3_jax/attention.py",
          "and kv_slots <= 2 * cfg.attention_block_kv):", "and kv_slots <= cfg.attention_block_kv):",
          ("tests/test_attention.py", "-k", "auto_picks")),
    # ---- issue 22: sampled-token distillation signals and the rollout's sampling
    Fault("sampled_signal_rule_checks_temperature_only", "train/rollout.py",
          "    return [f\"{k}={v}\" for k, v in sampling.items() if v != exact.get(k, v)]",
          "    return [f\"{k}={v}\" for k, v in sampling.items() if k == \"temperature\" and v != exact[k]]",
          ("tests/test_distill.py", "-k", "unbiased or filtered_rollouts")),
    # ---- issue 23: reasoning RL
    Fault("engine_logprob_before_temperature", "infer/engine.py",
          "    return at_B - jax.nn.logsumexp(scaled_BxV, axis=-1)",
          "    return at_B - jax.nn.logsumexp(logits_BxV.astype(jnp.float32), axis=-1)",
          ("tests/test_generate.py", "-k", "logprob")),
    Fault("rl_surrogate_sign_flipped", "train/rl/loss.py",
          "    loss = -jnp.minimum(unclipped, clipped_ratio * advantages_BxT)",
          "    loss = jnp.minimum(unclipped, clipped_ratio * advantages_BxT)", RL_LOSS),
    Fault("rl_clip_bounds_swapped", "train/rl/loss.py",
          "    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)",
          "    clipped_ratio = jnp.clip(ratio, 1.0 - clip_high, 1.0 + clip_low)", RL_LOSS),
    Fault("rl_k3_sign", "train/rl/loss.py",
          "jnp.exp(log_ratio) - log_ratio - 1.0", "jnp.exp(log_ratio) + log_ratio - 1.0", RL_LOSS),
    Fault("rl_seq_mean_counts_empty_rows", "train/rl/loss.py",
          "        rows = jnp.maximum(jnp.sum(per_row_B > 0), 1)", "        rows = B", RL_LOSS),
    Fault("rl_group_std_population", "train/rl/loss.py",
          "g.std(axis=1, ddof=1, keepdims=True)", "g.std(axis=1, ddof=0, keepdims=True)",
          ("tests/test_rl.py", "-k", "group_advantages")),
    Fault("rl_weights_normalised_per_microbatch", "train/step.py",
          "        terms = objective(params, mb, frozen)",
          "        terms = objective(params, mb if prepare is None else prepare(mb), frozen)",
          ("tests/test_rl.py", "-k", "microbatched")),
    Fault("rl_old_logp_one_position_late", "train/rollout.py",
          "            batch[\"old_logp\"][b, P - 1 : P + C - 1] =", "            batch[\"old_logp\"][b, P : P + C] =",
          ("tests/test_rl.py", "-k", "engine_logprobs")),
    Fault("rl_weights_count_unsampled_tokens", "train/rl/loss.py",
          "    if aggregation == \"token_mean\":\n        return mask_BxT\n",
          "    if aggregation == \"token_mean\":\n        return (mask_BxT >= 0).astype(jnp.float32)\n",
          ("tests/test_rl.py", "-k", "forced_tokens")),
    Fault("rollout_engine_kept_from_the_first_step", "train/rollout.py",
          "        return Engine.for_tokenizer(model_at(self.graphdef, params, self.dtype), self.tokenizer, mesh=self.mesh)",
          "        self._e = getattr(self, '_e', None) or Engine.for_tokenizer(model_at(self.graphdef, params, self.dtype), "
          "self.tokenizer, mesh=self.mesh)\n        return self._e", ("tests/test_rl.py", "-k", "toy_task")),
    Fault("sampler_unfiltered_rows_keep_only_the_top", "infer/sampling.py",
          "jnp.where(unfiltered_B, jnp.min(logits_BxV, axis=-1), full_cutoff_B)",
          "jnp.where(unfiltered_B, jnp.max(logits_BxV, axis=-1), full_cutoff_B)", SAMPLING),
    Fault("rollout_modes_of_the_local_rows", "train/rollout.py",
          "        first = jax.process_index() * n_local\n", "        first = 0 * n_local\n",
          ("tests/test_multiprocess.py", "-k", "rollouts")),
    # ---- issue 23: the main job's comparison
    Fault("pass_at_k_biased_estimator", "train/miniature/evaluate.py",
          "1.0 - math.comb(n - ci, k) / math.comb(n, k)", "1.0 - (1.0 - ci / n) ** k",
          ("tests/test_recipe.py", "-k", "pass_at_k")),
    Fault("teacher_scoring_charged_as_training", "train/miniature/compute.py",
          '"teacher_flops": 0.0 if scorer is None else forward_flops(scorer, seq_len) * update_tokens,',
          '"teacher_flops": 0.0 if scorer is None else flops_per_token(scorer, seq_len) * update_tokens,',
          ("tests/test_recipe.py", "-k", "charged")),
    Fault("stop_thinking_record_without_the_stop_text", "train/miniature/task.py",
          'STOP_THINKING_TEXT.removesuffix(f"\\n{END_THINK_TEXT}\\n\\n")', '""',
          ("tests/test_task.py", "-k", "cut")),
    # ---- issue 24: serving with continuous batching
    Fault("continuous_admit_keeps_the_old_row_keys", "infer/continuous.py",
          "keys_B=_scatter_rows(rows.keys_B, keys_b, idx_b),", "keys_B=rows.keys_B,",
          ("tests/test_serve.py", "-k", "seeded_sampled")),
    Fault("continuous_read_back_one_token_late", "infer/continuous.py",
          "at_BxW = jnp.minimum(start_B[:, None] + jnp.arange(width), N - 1)",
          "at_BxW = jnp.minimum(start_B[:, None] + jnp.arange(width) + 1, N - 1)",
          ("tests/test_serve.py", "-k", "concurrent_greedy")),
    Fault("continuous_release_leaves_rows_running", "infer/continuous.py",
          "return state._replace(done_B=state.done_B | release_B), rows._replace(sampling=greedy)",
          "return state, rows._replace(sampling=greedy)",
          ("tests/test_serve.py", "-k", "cancel_frees_rows or disconnects")),
    Fault("continuous_admission_not_padded_to_the_data_parallel_degree", "infer/continuous.py",
          "return -(-min(1 << (n - 1).bit_length(), slots) // multiple) * multiple",
          "return min(1 << (n - 1).bit_length(), slots)",
          ("tests/test_serve.py", "-k", "on_a_mesh")),
    Fault("continuous_decode_layout_not_pinned", "infer/continuous.py",
          "donate_argnums=(2,),\n                                 out_shardings=layout[0])",
          "donate_argnums=(2,))",
          ("tests/test_serve.py", "-k", "on_a_mesh")),
    Fault("stream_chat_drops_the_row_that_waits_for_a_bigger_cache", "infer/rollout.py",
          "                    held = row\n", "",
          ("tests/test_rollout.py", "-k", "stream_chat")),
    Fault("batch_writes_rows_as_they_finish", "infer/batch.py",
          "            while written in replies:", "            for written in sorted(replies):",
          ("tests/test_batch.py", "-k", "does_not_depend_on_its_batch or out_of_order")),
    Fault("stream_chat_budget_on_no_think_rows", "infer/rollout.py",
          "budget = thinking_budget if Mode(mode) is Mode.THINK else None", "budget = thinking_budget",
          ("tests/test_batch.py", "-k", "round_trip")),
    Fault("tool_call_arguments_not_checked", "infer/openai_api.py",
          "        if not isinstance(parsed, Mapping):", "        if parsed is None and False:",
          ("tests/test_serve.py", "-k", "bad_input")),
    Fault("reply_parser_keeps_leading_newlines", "infer/openai_api.py",
          "            text = text.lstrip(\"\\n\")", "            text = text",
          ("tests/test_serve.py", "-k", "reply_parser")),
    Fault("reasoning_tokens_count_answer_tokens", "infer/openai_api.py",
          "            self.reasoning_tokens += self.in_think", "            self.reasoning_tokens += 1",
          ("tests/test_serve.py", "-k", "two_budgets")),
    Fault("usage_counts_tokens_past_the_stop_string", "infer/serve.py",
          "        c.tokens += used\n", "        c.tokens += len(ids)\n",
          ("tests/test_serve.py", "-k", "two_budgets")),
)


def _copy_project(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".hypothesis", "results", "*.egg-info")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _run_tests(project: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, the first failure line or the output tail)."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # -n 0: in this process, not pytest-xdist's workers (there -x ends a failing run with exit code 2).
    cmd = [sys.executable, "-m", "pytest", "-n", "0", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    detail = failures[0] if failures else out.strip().splitlines()[-1] if out.strip() else ""
    # pytest exit codes: 0 all passed, 1 some test failed, anything else is not a test verdict
    # (5: no test selected, 2: collection error or interrupt).
    return {0: "passed", 1: "failed"}.get(proc.returncode, "error"), seconds, detail


def _apply(project: Path, fault: Fault) -> str | None:
    """Applies `fault` in the copy and returns the original text, or None if the fault is stale."""
    path = project / fault.path
    text = path.read_text()
    if text.count(fault.old) != 1:
        return None
    path.write_text(text.replace(fault.old, fault.new))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="names of the faults to try (default: all)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per test run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fault-free runs")
    args = parser.parse_args(argv)
    faults = [f for f in FAULTS if not args.only or f.name in args.only]
    if args.only and len(faults) != len(set(args.only)):
        parser.error(f"unknown faults: {sorted(set(args.only) - {f.name for f in faults})}")

    results, baseline = [], {}
    with tempfile.TemporaryDirectory(prefix="qwen3-mutations-") as tmp:
        project = Path(tmp)
        _copy_project(project)
        if not args.no_baseline:
            for tests in dict.fromkeys(f.tests for f in faults):
                status, seconds, detail = _run_tests(project, tests, args.timeout)
                baseline[tests] = status
                print(f"baseline {' '.join(tests)}: {status} ({seconds:.0f} s) {detail if status != 'passed' else ''}",
                      flush=True)
        for fault in faults:
            original = _apply(project, fault)
            if original is None:
                status, seconds, detail = "stale", 0.0, "the text to replace does not occur exactly once"
            elif baseline.get(fault.tests, "passed") != "passed":
                (project / fault.path).write_text(original)
                status, seconds, detail = "untested", 0.0, "its tests fail without the fault"
            else:
                try:
                    verdict, seconds, detail = _run_tests(project, fault.tests, args.timeout)
                finally:
                    (project / fault.path).write_text(original)
                status = {"failed": "caught", "passed": "survived"}.get(verdict, verdict)
            results.append({"fault": fault.name, "file": fault.path, "tests": " ".join(fault.tests),
                            "status": status, "seconds": round(seconds, 1), "detail": detail})
            print(f"{fault.name}: {status} ({seconds:.0f} s) {detail}", flush=True)

    # A run of some faults (--only) updates their rows and keeps the others'.
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(RESULTS.read_text())["faults"] if RESULTS.exists() else []
    order = [f.name for f in FAULTS]
    rows = {r["fault"]: r for r in kept if r["fault"] in order} | {r["fault"]: r for r in results}
    RESULTS.write_text(json.dumps({"faults": sorted(rows.values(), key=lambda r: order.index(r["fault"]))}, indent=1) + "\n")
    print("\n| fault | file | tests | caught |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['fault']} | {r['file']} | {r['tests']} | {'yes' if r['status'] == 'caught' else r['status']} |")
    missed = [r["fault"] for r in results if r["status"] != "caught"]
    print(f"\n{len(results) - len(missed)}/{len(results)} caught" + (f"; not caught: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
