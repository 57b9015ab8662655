"""Mutation check: critical one-line bugs in the science paths must make a test fail.

Each mutation replaces one exact line fragment of one source file in a temporary copy of
the repository (tracked and untracked, not ignored, files) and runs the tests named for
it there, with this interpreter. A mutation is KILLED when pytest reports a failing test
(exit code 1); it SURVIVES when its tests pass. Anything else (the fragment is no longer
in the source, a collection error, a timeout) is an ERROR. The script prints a table and
exits 1 if any mutation survived or errored. A mutation of code that runs only on some
CPUs (the AMX path: `needs`) is not run where this CPU lacks it, and the table says so; a
mutation whose tests all skip here is an ERROR, never a kill.

    python tools/mutation_check.py              # every mutation
    python tools/mutation_check.py --list       # names, files and tests
    python tools/mutation_check.py -k judge -k kl_penalty   # a subset (substring of names)
    python tools/mutation_check.py --slow       # also those whose test is the smoke flow
    python tools/mutation_check.py --baseline   # first: the named tests pass unmutated
    python tools/mutation_check.py --check      # only: every fragment is still in the source

Run it from the repository root with the project's environment (.venv/bin/python); it
sets the 8 fake CPU devices itself. About 20 minutes on 2 CPU cores; see README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple  # pytest node ids
    slow: bool = False  # its test runs the whole smoke flow: only with --slow
    needs: str = ""  # a host feature its tests need ("amx"); not run (and said) where absent


MUTATIONS = [
    Mutation("attention_blocks_see_the_future", "blocked causal attention (>= 256 tokens) "
             "masks each query block as if it started at position 0, so its rows read later "
             "keys", "warm_jax/model.py",
             "outs.append(_attention_block(q[:, rows], k[:, :end], v[:, :end], m, i * c))",
             "outs.append(_attention_block(q[:, rows], k[:, :end], v[:, :end], m, 0))",
             ("tests/test_packing.py::test_blocked_causal_attention_is_full_causal_attention",)),
    Mutation("kernel_sees_the_next_key", "the fused CPU attention kernel lets each query "
             "read the key after it", "warm_jax/csrc/causal_attention.cc",
             "_mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(int32_t(p)))",
             "_mm512_cmple_epi32_mask(jv, _mm512_set1_epi32(int32_t(p + 1)))",
             ("tests/test_cpu_attention.py::test_kernel_is_grouped_attention_with_gradients",)),
    Mutation("kernel_pairs_see_each_other", "in the kernel, the rejected continuation of a "
             "packed pair reads the chosen one (and vice versa)",
             "warm_jax/csrc/causal_attention.cc",
             "_mm512_cmpeq_epi32_mask(sj, _mm512_set1_epi32(seg[p]))",
             "_mm512_cmpgt_epi32_mask(sj, _mm512_set1_epi32(1))",
             ("tests/test_cpu_attention.py::test_kernel_takes_packed_segments",)),
    Mutation("kernel_gradient_forgets_the_scale", "the kernel's backward drops the 1/sqrt(d) "
             "of the logits from dS (dQ and dK 8x too large)", "warm_jax/csrc/causal_attention.cc",
             "_mm512_storeu_ps(dsi + j, _mm512_mul_ps(x, sc));",
             "_mm512_storeu_ps(dsi + j, x);",
             ("tests/test_cpu_attention.py::test_kernel_is_grouped_attention_with_gradients",)),
    Mutation("narrow_gemm_tile_drops_a_vector", "the shared f32 gemm's column tiles narrower "
             "than 64 (head dims 16-48 in the attention kernel) hold one 16-lane vector too "
             "few", "warm_jax/csrc/f32_gemm.h", "switch ((nc + 15) / 16) {",
             "switch (nc / 32 + 1) {",
             ("tests/test_cpu_attention.py::test_kernel_is_grouped_attention_with_gradients",)),
    Mutation("bf16_matmul_reads_the_first_rows", "the bf16 matmul kernel reads every task's "
             "rows of A from the first task's (row offset dropped)", "warm_jax/csrc/bf16_matmul.cc",
             "arows = reinterpret_cast<const uint32_t*>(ae) + i0 * k2, asi = k2, ask = 1;",
             "arows = reinterpret_cast<const uint32_t*>(ae), asi = k2, ask = 1;",
             ("tests/test_cpu_matmul.py::test_matmul_is_the_f32_product_rounded",)),
    Mutation("amx_transposed_a_tail_rows_dropped", "the AMX path's 16 x 16 transpose of a "
             "packed transposed A writes only its first half of 32 rows", "warm_jax/csrc/bf16_matmul.cc",
             "for (int64_t h = 0; h < 2; ++h) {",
             "for (int64_t h = 0; h < 1; ++h) {",
             ("tests/test_cpu_matmul.py::test_matmul_is_the_f32_product_rounded",), needs="amx"),
    Mutation("bf16_matmul_transposed_b_first_panel", "packing a transposed B, every 64-column "
             "panel reads the first panel's rows", "warm_jax/csrc/bf16_matmul.cc",
             "const uint32_t* row = w + (j0 + j) * k2;",
             "const uint32_t* row = w + j * k2;",
             ("tests/test_cpu_matmul.py::test_dense_gradients_are_the_dots",)),
    Mutation("swiglu_gate_gradient_without_sigmoid_slope", "the low-precision SwiGLU's "
             "backward drops the sigmoid's own slope from the gate's gradient", "warm_jax/model.py",
             "dgate = ct_act * s + (g * ct_act) * (s * (1.0 - s))",
             "dgate = ct_act * s",
             ("tests/test_swiglu.py::test_values_and_gradients_are_the_float32_ones_rounded_once",)),
    Mutation("own_rows_block_offset_dropped", "with RMTrainConfig.member_rows = 'own' "
             "every member draws from the first block (the blocks' offsets dropped)",
             "warm_jax/ensemble.py",
             "spans = blocks or [(0, n)] * len(specs)",
             "spans = [(0, hi - lo) for lo, hi in blocks] if blocks else [(0, n)] * len(specs)",
             ("tests/test_rm_ensemble.py::test_own_rows_give_each_member_a_disjoint_block_it_"
              "keeps_when_trained_alone",)),
    Mutation("own_rows_not_passed_to_the_batches", "the ensemble stage records "
             "member_rows = 'own' but draws every member's batches from all rows",
             "warm_jax/stages/rm_ensemble.py",
             'step, blocks=data["blocks"])),', "step)),",
             ("tests/test_rm_ensemble.py::test_own_rows_stage_trains_each_member_on_its_block",)),
    Mutation("rope_table_off_by_one", "the rotary sin/cos table is read one position late",
             "warm_jax/model.py",
             "jnp.take(table, positions, axis=0,",
             "jnp.take(table, positions + 1, axis=0,",
             ("tests/test_rope.py::test_table_equals_per_token_bit_for_bit",)),
    Mutation("f32_matmul_restarts_each_k_block", "the f32 matmul kernel starts every "
             "contraction block from zero (the earlier blocks' sums dropped)",
             "warm_jax/csrc/f32_matmul.cc",
             "const bool add = k0 > 0;",
             "const bool add = false;",
             ("tests/test_cpu_matmul_f32.py::test_f32_matmul_is_the_product",)),
    Mutation("f32_matmul_transposed_a_first_rows", "packing a transposed A, every task reads "
             "the first task's rows", "warm_jax/csrc/f32_matmul.cc",
             "ae + (k0 + k) * p.m + i0, sizeof(float) * mc);",
             "ae + (k0 + k) * p.m, sizeof(float) * mc);",
             ("tests/test_cpu_matmul_f32.py::test_f32_matmul_is_the_product",
              "tests/test_cpu_matmul_f32.py::test_f32_model_training_step_matches_xla")),
    Mutation("world4_references_perfect", "world 4's references name every fact (world 2's)",
             "warm_jax/data/world.py",
             'WORLD_4 = WorldVersion(4, ID_POLICIES, OOD_POLICIES, reference=REFERENCE_4, streams=2)',
             'WORLD_4 = WorldVersion(4, ID_POLICIES, OOD_POLICIES, reference=REFERENCE, streams=2)',
             ("tests/test_data_world.py::test_world_4_is_world_2_with_imperfect_references",)),
    Mutation("world4_own_streams", "world 4 draws from its own random streams (its comparisons "
             "are no longer world 2's)", "warm_jax/data/world.py",
             'return random.Random(f"{self.world.stream_version}/{self.seed}/{name}")',
             'return random.Random(f"{self.world.generator_version}/{self.seed}/{name}")',
             ("tests/test_data_world.py::test_world_4_is_world_2_with_imperfect_references",)),
    Mutation("bon_claim_sides_swapped", "the BoN claim compares the single RM against WARM "
             "(sides swapped)", "warm_jax/stages/bon.py",
             '"holds": curves[a][-1]["control"] >= last["control"],',
             '"holds": last["control"] >= curves[a][-1]["control"],',
             ("tests/test_bon.py::test_bon_claims_read_the_curves_and_the_duel",)),
    Mutation("kl_penalty_removed", "RL trains without the KL penalty (alpha -> 0.0)",
             "warm_jax/rl_steps.py",
             'rewards = shaped_rewards(score, kl_t, tmask, 0.0 if in_loss else alpha)',
             'rewards = shaped_rewards(score, kl_t, tmask, 0.0)',
             ("tests/test_rl.py::test_kl_coefficient_keeps_the_policy_near_the_reference",)),
    Mutation("kl_controller_sign", "the adaptive KL coefficient moves away from its target",
             "warm_jax/rl_steps.py",
             'err = jnp.clip(kl / target - 1.0, -0.2, 0.2)',
             'err = jnp.clip(1.0 - kl / target, -0.2, 0.2)',
             ("tests/test_rl.py::test_the_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_a_fifth",)),
    Mutation("kl_floor_ignored", "the adaptive KL coefficient falls through its floor",
             "warm_jax/rl_steps.py",
             'new = new if floor is None else jnp.maximum(new, floor)',
             'new = new',
             ("tests/test_rl.py::test_the_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_a_fifth",)),
    Mutation("kl_cap_ignored", "the adaptive KL coefficient rises through its cap",
             "warm_jax/rl_steps.py",
             'return new if cap is None else jnp.minimum(new, cap)',
             'return new',
             ("tests/test_rl.py::test_the_adaptive_kl_coefficient_moves_towards_the_target_by_at_most_a_fifth",)),
    Mutation("trust_region_one_rescale", "the trust region rescales once and does not measure again",
             "warm_jax/rl_steps.py",
             'return (c[1] > TRUST_SLACK * max_kl) & (c[2] < TRUST_ITERS)',
             'return (c[1] > TRUST_SLACK * max_kl) & (c[2] < 1)',
             ("tests/test_rl.py::test_the_trust_region_scales_a_step_down_to_about_its_kl_limit",)),
    Mutation("kl_loss_term_dropped", "kl_penalty 'loss' leaves the exact KL out of the policy loss",
             "warm_jax/rl_steps.py",
             'loss = loss + kl_alpha * _masked_mean(kl_tok, tmask)',
             'loss = loss',
             ("tests/test_rl.py::test_the_kl_penalty_in_the_loss_pulls_towards_the_reference_whatever_the_samples",)),
    Mutation("kl_loss_mode_keeps_the_reward_penalty", "kl_penalty 'loss' also keeps the penalty in the returns",
             "warm_jax/rl_steps.py",
             'rewards = shaped_rewards(score, kl_t, tmask, 0.0 if in_loss else alpha)',
             'rewards = shaped_rewards(score, kl_t, tmask, alpha)',
             ("tests/test_rl.py::test_the_kl_penalty_in_the_loss_pulls_towards_the_reference_whatever_the_samples",)),
    Mutation("unfinished_scored_as_sampled", "score_unfinished 'with_eos' scores the completion as sampled",
             "warm_jax/rl_steps.py",
             '    if unfinished == "as_sampled":',
             '    if True:',
             ("tests/test_rl.py::test_an_unfinished_completion_is_scored_with_an_eos_appended_when_asked",)),
    Mutation("unfinished_rollout_ignores_the_setting", "the rollout scores every completion as sampled",
             "warm_jax/rl_steps.py",
             'score = reward_apply(rm_params, *rm_sequences(prompt_tokens, prompt_mask, out,\n                                                  unfinished, seq))',
             'score = reward_apply(rm_params, *rm_sequences(prompt_tokens, prompt_mask, out,\n                                                  "as_sampled", seq))',
             ("tests/test_rl.py::test_an_unfinished_completion_is_scored_with_an_eos_appended_when_asked",)),
    Mutation("lcb_penalty_rewards_disagreement", "the lcb reward adds k x the members' spread",
             "warm_jax/reward.py",
             "return jnp.mean(z, axis=0) - penalty * jnp.std(z, axis=0)",
             "return jnp.mean(z, axis=0) + penalty * jnp.std(z, axis=0)",
             ("tests/test_average.py::test_ens_is_mean_of_member_rewards_and_resolve_specs",)),
    Mutation("lcb_members_unscaled", "the lcb reward centres the members but leaves their scales",
             "warm_jax/reward.py",
             "        / jnp.asarray(std, jnp.float32)[:, None]",
             "        / 1.0",
             ("tests/test_average.py::test_ens_is_mean_of_member_rewards_and_resolve_specs",)),
    Mutation("lcb_norm_on_other_samples", "the members are standardised on half the pool's samples",
             "warm_jax/stages/rl.py",
             'norm = reward_lib.member_norm_of(pool["score"], f" ({path})")',
             'norm = reward_lib.member_norm_of(pool["score"][:, :8], f" ({path})")',
             ("tests/test_rl.py::test_an_lcb_reward_standardises_its_members_on_the_pool_samples_and_keeps_them",)),
    Mutation("lcb_resume_recomputes_the_norm", "a resumed lcb run computes the members' figures again",
             "warm_jax/stages/rl.py",
             "    if os.path.exists(path):\n        with open(path) as f:\n            rec = json.load(f)",
             "    if False:\n        with open(path) as f:\n            rec = json.load(f)",
             ("tests/test_rl.py::test_an_lcb_reward_standardises_its_members_on_the_pool_samples_and_keeps_them",)),
    Mutation("warm_start_rule_ignores_gain", "the warm start's train-on rule trains on whatever the gain",
             "warm_jax/stages/rm_init.py",
             'if new - acc < min_gain:',
             'if False:',
             ("tests/test_packing.py::test_warm_start_train_on_rule",)),
    Mutation("warm_start_rule_restarts_data", "each warm-start cycle restarts the data order at step 0",
             "warm_jax/stages/rm_init.py",
             'params = cycle(params, done, length)',
             'params = cycle(params, 0, length)',
             ("tests/test_packing.py::test_warm_start_train_on_rule",)),
    Mutation("trust_region_ignored", "the trust region measures the step but applies it whole",
             "warm_jax/rl_steps.py",
             'return scaled(scale), {"step_kl": kl_full, "step_scale"',
             'return updates, {"step_kl": kl_full, "step_scale"',
             ("tests/test_rl.py::test_the_trust_region_scales_a_step_down_to_about_its_kl_limit",)),
    Mutation("rl_advantage_sign", "RL advantage with the wrong sign (baseline - returns)",
             "warm_jax/rl_steps.py",
             'adv = jax.lax.stop_gradient(returns - baseline) * tmask',
             'adv = jax.lax.stop_gradient(baseline - returns) * tmask',
             ("tests/test_rl.py::test_learning_raises_a_synthetic_token_reward",)),
    Mutation("rl_reward_not_standardised", "RL trains on the raw RM reward, not (r - mean) / std",
             "warm_jax/rl_steps.py",
             'score = standardise(ro["score"], state["reward_norm"])',
             'score = ro["score"]',
             ("tests/test_rl.py::test_a_group_baseline_step_trains_the_policy_and_leaves_the_"
              "value_model",)),
    Mutation("rl_group_baseline_includes_itself", "the group baseline averages the completion "
             "itself too (biased)", "warm_jax/rl_steps.py",
             'loo = (jnp.sum(g, axis=1, keepdims=True) - g) / (k - 1)',
             'loo = jnp.mean(g, axis=1, keepdims=True) + 0.0 * g',
             ("tests/test_rl.py::test_group_baseline_is_the_mean_of_the_other_completions_of_"
              "the_prompt",)),
    Mutation("rl_momentum_dropped", "the RL optimiser loses its momentum (sign-sized steps)",
             "warm_jax/rl_steps.py",
             'base = dataclasses.replace(base, momentum=self.momentum)',
             'base = dataclasses.replace(base, momentum=None)',
             ("tests/test_rl.py::test_the_momentum_optimiser_does_not_start_with_sign_sized_"
              "steps",)),
    Mutation("judge_sides_swapped", "the judge scores B's win rate as A's",
             "warm_jax/stages/judge.py",
             'win_rate(scored[a]["scores"], scored[b]["scores"], tie_tol,',
             'win_rate(scored[b]["scores"], scored[a]["scores"], tie_tol,',
             ("tests/test_judge.py::test_judge_prefers_the_better_policy_and_keeps_sides",)),
    Mutation("rm_eval_valid_stress_swapped", "rm_eval reads the stress set (valid2) as "
             "'valid' and vice versa", "warm_jax/stages/rm_eval.py",
             'arrays = prov.preference(split)',
             'arrays = prov.preference({"valid": "stress", "stress": "valid"}[split])',
             ("tests/test_rm_eval.py::test_rm_eval_on_hand_made_splits_of_known_accuracy",)),
    Mutation("rm_eval_ood_reads_stress", "rm_eval's 'ood' split reads valid2 instead of D_ood",
             "warm_jax/stages/rm_eval.py",
             'arrays = prov.preference_file(ood_path)',
             'arrays = prov.preference("stress")',
             ("tests/test_rm_eval.py::test_rm_eval_on_hand_made_splits_of_known_accuracy",)),
    Mutation("labeler_sign_swapped", "the world's labeler (training data and D_ood) prefers "
             "the summary the oracle scores lower", "warm_jax/data/world.py",
             'diff = (oracle.score(post, a) - oracle.score(post, b)) / temperature',
             'diff = (oracle.score(post, b) - oracle.score(post, a)) / temperature',
             ("tests/test_ood.py::test_labels_follow_the_oracle",)),
    Mutation("dood_pairs_of_one_text", "D_ood pairs a summary with itself",
             "warm_jax/stages/ood.py",
             'pairs = list(itertools.combinations(list(seen.items()), 2))',
             'pairs = list(itertools.combinations_with_replacement(list(seen.items()), 2))',
             ("tests/test_ood.py::test_pairs_are_within_a_post_distinct_and_deduplicated",)),
    Mutation("rm_eval_clean_mask_inverted", "rm_eval's train_clean takes the flipped rows",
             "warm_jax/stages/rm_eval.py",
             'cap(train, np.flatnonzero(~flipped), max_train_pairs)',
             'cap(train, np.flatnonzero(flipped), max_train_pairs)',
             ("tests/test_rm_eval.py::test_rm_eval_stage_outputs_and_values",)),
    Mutation("rm_eval_ens_max", "rm_eval's ENS takes the max of member rewards, not the mean",
             "warm_jax/stages/rm_eval.py",
             'e_c, e_r = rc[s][top].mean(0), rr[s][top].mean(0)',
             'e_c, e_r = rc[s][top].max(0), rr[s][top].max(0)',
             ("tests/test_rm_eval.py::test_rm_eval_stage_outputs_and_values",)),
    Mutation("rm_eval_worst_members", "rm_eval's WARM/ENS of M take the worst M members",
             "warm_jax/stages/rm_eval.py",
             'top = sorted(order[:m_count])',
             'top = sorted(order[-m_count:])',
             ("tests/test_rm_eval.py::test_rm_eval_stage_outputs_and_values",)),
    Mutation("rm_eval_train_rows_unchecked", "rm_eval scores train rows other than the "
             "ensemble's without a word", "warm_jax/stages/rm_eval.py",
             'elif list(rows) != [0, n]:',
             'elif list(rows) == [-1]:',
             ("tests/test_rm_eval.py::"
              "test_rm_eval_reads_the_data_stage_baselines_and_checks_its_train_rows",)),
    Mutation("members_ranked_on_the_reported_split", "members are ranked on the ID split that "
             "is reported, not on the selection rows", "warm_jax/reward.py",
             'return SELECT_SPLIT',
             'return "valid"',
             ("tests/test_cards.py::"
              "test_members_are_ranked_on_the_selection_rows_when_every_card_has_them",)),
    Mutation("aggregate_merges_settings", "the aggregate keys claims without their setting "
             "(clean and corrupted merged, each seed counted twice)", "warm_jax/claims.py",
             'setting = claim.get("setting") or setting_of(stage, summary)',
             'setting = "all"',
             ("tests/test_report.py::"
              "test_aggregate_keys_claims_by_setting_and_split_once_per_seed",)),
    Mutation("bradley_terry_sign_dropped", "Bradley-Terry loss without its minus sign",
             "warm_jax/losses.py",
             'loss = -jax.nn.log_sigmoid(margin).mean()',
             'loss = jax.nn.log_sigmoid(margin).mean()',
             ("tests/test_substrate.py::test_bradley_terry_loss_values_and_direction",)),
    Mutation("merge_without_head", "the WARM merge keeps member 0's reward head",
             "warm_jax/average.py",
             'merged = acc_ops.finish(acc)',
             'merged = dict(acc_ops.finish(acc), '
             'reward_head=_load(members[0], abstract)["reward_head"])',
             ("tests/test_average.py::test_weighted_merge_matches_numpy_reference_and_card",)),
    Mutation("average_params_without_head", "in-memory averaging keeps tree 0's reward head",
             "warm_jax/average.py",
             '    return ops.finish(acc)\n',
             '    return dict(ops.finish(acc), reward_head=trees[0]["reward_head"])\n',
             ("tests/test_average.py::test_average_params_matches_numpy_reference",)),
    Mutation("weights_ignored", "merge_checkpoints uses uniform weights whatever --weights says",
             "warm_jax/average.py",
             'w = normalize_weights(weights, n) if method != "greedy" else None',
             'w = normalize_weights(None, n) if method != "greedy" else None',
             ("tests/test_average.py::test_weighted_merge_matches_numpy_reference_and_card",
              "tests/test_average.py::test_cli_success_and_bad_input")),
    Mutation("ens_max", "ENS returns the max of the member rewards, not the mean",
             "warm_jax/reward.py",
             'jnp.mean(members(p, t, m), axis=0)',
             'jnp.max(members(p, t, m), axis=0)',
             ("tests/test_average.py::test_ens_is_mean_of_member_rewards_and_resolve_specs",)),
    Mutation("bon_kl_off_by_one", "KL(BoN) = log(n+1) - n/(n+1)",
             "warm_jax/stages/bon.py",
             'out = np.log(n) - (n - 1.0) / n',
             'out = np.log(n + 1.0) - n / (n + 1.0)',
             ("tests/test_bon.py::test_bon_kl_formula",)),
    Mutation("bon_weights_off_by_one", "best-of-n subset weights C(i, n-1) instead of C(i-1, n-1)",
             "warm_jax/stages/bon.py",
             'math.exp(logc(j - 1, n - 1) - logc(k, n)) if j >= n else 0.0',
             'math.exp(logc(j, n - 1) - logc(k, n)) if j >= n else 0.0',
             ("tests/test_bon.py::test_bon_expectation_equals_enumeration_of_subsets",)),
    Mutation("flipped_mask_inverted", "corrupt_labels flips the rows its mask does NOT mark",
             "warm_jax/data/formats.py",
             'out = [dataclasses.replace(c, choice=1 - c.choice) if m else c',
             'out = [dataclasses.replace(c, choice=1 - c.choice) if not m else c',
             ("tests/test_data_formats.py::test_corrupt_labels_exact_and_reproducible",)),
    Mutation("corrupted_rows_not_flipped", "corrupt_labels marks rows but does not flip them",
             "warm_jax/data/formats.py",
             'dataclasses.replace(c, choice=1 - c.choice)',
             'dataclasses.replace(c, choice=c.choice)',
             ("tests/test_data_formats.py::test_corrupt_labels_exact_and_reproducible",)),
    Mutation("resume_drops_rng", "a resumed run restarts from another RNG key",
             "warm_jax/checkpoint.py",
             'return state, step, f"resumed from {manager.directory} step {step}"',
             'return {**state, "rng": jnp.zeros_like(state["rng"])}, step, '
             'f"resumed from {manager.directory} step {step}"',
             ("tests/test_rl.py::test_stage_resume_continues_exactly",)),
    Mutation("member_head_from_zeros", "ensemble members start from a zero head, not the probe",
             "warm_jax/ensemble.py",
             'out["reward_head"] = head["reward_head"]',
             'out["reward_head"] = jax.tree.map(np.zeros_like, head["reward_head"])',
             ("tests/test_rm_ensemble.py::test_flow_exports_and_cards",)),
    Mutation("ensemble_nonfinite_not_counted", "the stacked step forgets members' skipped steps",
             "warm_jax/ensemble.py",
             'new["member_nonfinite"] = state["member_nonfinite"] + nf',
             'new["member_nonfinite"] = state["member_nonfinite"]',
             ("tests/test_rm_ensemble.py::test_stacked_step_skips_a_members_nonfinite_update",)),
    Mutation("guard_ignores_nonfinite_update", "the guard checks loss/grads, not the update",
             "warm_jax/train_lib.py",
             'finite = jnp.logical_and(finite, all_finite(new[pkey]))\n'
             '        finite = jnp.logical_and(finite, all_finite(new[okey]))',
             'pass',
             ("tests/test_rm_ensemble.py::test_stacked_step_skips_a_members_nonfinite_update",
              "tests/test_rl.py::test_one_guard_refuses_a_non_finite_rl_update")),
    Mutation("report_judge_reads_ci", "report prints the CI's low end as the win rate",
             "warm_jax/stages/report.py",
             'rows = [[pair, r.get("win_rate"),',
             'rows = [[pair, r.get("ci_low"),',
             ("tests/test_report.py::test_report_stage_renders_measured_numbers",)),
    Mutation("ties_count_as_wins", "the tie-adjusted rate counts a tie as a win",
             "warm_jax/stats.py",
             'rate = float(np.mean(w + 0.5 * t)) if n else float("nan")',
             'rate = float(np.mean(w + t)) if n else float("nan")',
             ("tests/test_judge.py::test_win_rate_counts_ties_rates_and_intervals",)),
    Mutation("decisive_rate_counts_ties", "the decisive rate divides by wins + ties + losses",
             "warm_jax/stats.py",
             'decisive = float(_decisive(np.float64(wins), np.float64(losses)))',
             'decisive = float(_decisive(np.float64(wins), np.float64(losses + ties)))',
             ("tests/test_judge.py::test_win_rate_counts_ties_rates_and_intervals",)),
    Mutation("seeds_not_resampled", "the aggregate's bootstrap resamples prompts, not seeds",
             "warm_jax/stats.py",
             'pick = rng.integers(0, s, (n_boot, s))',
             'pick = np.tile(np.arange(s), (n_boot, 1))',
             ("tests/test_report.py::test_aggregate_judge_over_two_seeds",)),
    Mutation("matched_kl_runs_swapped", "matched KL reads run B's curve as A's",
             "warm_jax/stats.py",
             'va, vb = control_at_kl(ka, ca, grid), control_at_kl(kb, cb, grid)',
             'va, vb = control_at_kl(kb, cb, grid), control_at_kl(ka, ca, grid)',
             ("tests/test_judge.py::test_matched_kl_interpolates_and_says_when_ranges_do_not_overlap",)),
    Mutation("bon_pair_sides_swapped", "BoN pairwise outcomes count B's wins as A's",
             "warm_jax/stages/bon.py",
             'masks = [pair & (d > 0), pair & (d == 0), pair & (d < 0)]',
             'masks = [pair & (d < 0), pair & (d == 0), pair & (d > 0)]',
             ("tests/test_bon.py::test_pair_outcomes_equal_enumeration_of_subsets",)),
    Mutation("bon_ens_max", "BoN's ENS selector takes the max of the member scores",
             "warm_jax/stages/bon.py",
             'scores[sorted(order[:sel["M"]])].mean(0)',
             'scores[sorted(order[:sel["M"]])].max(0)',
             ("tests/test_bon.py::test_bon_stage_selectors_of_an_ensemble",)),
    Mutation("bon_best_is_worst", "BoN's single-RM selector is the worst member",
             "warm_jax/stages/bon.py",
             'return scores[order[0]] if sel["kind"] == "best" else',
             'return scores[order[-1]] if sel["kind"] == "best" else',
             ("tests/test_bon.py::test_bon_stage_selectors_of_an_ensemble",)),
    Mutation("scores_unsorted_back", "score_sequences returns the scores in sorted order",
             "warm_jax/reward.py",
             'return out[np.asarray(inverse).reshape(-1)]',
             'return out[np.sort(np.asarray(inverse).reshape(-1))]',
             ("tests/test_bon.py::test_bon_stage_writes_curves_and_skips_when_done",)),
    Mutation("shared_prefill_tiled", "the shared prefill's cache goes to the wrong rows",
             "warm_jax/sampling.py",
             'rep = jnp.repeat(x, num_samples, axis=0)',
             'rep = jnp.tile(x, (num_samples,) + (1,) * (x.ndim - 1))',
             ("tests/test_sampling.py::test_num_samples_repeats_prompts_and_pads_to_the_mesh",)),
    Mutation("judge_summary_loses_win_rate", "the judge's summary stores no win_rate (what "
             "report reads): stage and report disagree", "warm_jax/stages/judge.py",
             'SUMMARY_FIELDS = ("win_rate", "ci_low", "ci_high", "decisive_rate", "decisive_low",',
             'SUMMARY_FIELDS = ("ci_low", "ci_high", "decisive_rate", "decisive_low",',
             ("tests/test_report.py::test_report_of_the_smoke_flow_reads_what_the_stages_wrote",),
             slow=True),
    Mutation("stored_paths_resolved_against_cwd", "a path a summary or card stores is looked "
             "for relative to the working directory only, not in the run directory (a moved "
             "run directory, or one run from elsewhere, loses its SFT snapshots)",
             "warm_jax/artifacts.py",
             "return [os.path.join(run_dir, stored), stored]", "return [stored]",
             ("tests/test_sft.py::test_stored_paths_are_relative_to_the_run_and_resolve_against_it",
              "tests/test_sft.py::test_a_moved_run_directory_runs_its_remaining_stages")),
    Mutation("stored_paths_as_given", "summaries and cards store the paths of the run's own "
             "artifacts as given (relative to the working directory), not relative to the run "
             "directory", "warm_jax/artifacts.py",
             "return os.path.relpath(full, root)", "return path",
             ("tests/test_sft.py::test_a_moved_run_directory_runs_its_remaining_stages",)),
]


def copy_repo(dst: str) -> None:
    """Tracked and untracked-but-not-ignored files (no .venv, no build outputs)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True).stdout.split(b"\0")
    for f in files:
        if not f:
            continue
        rel = f.decode()
        src = os.path.join(REPO, rel)
        if not os.path.isfile(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


def fragment_count(root: str, m: Mutation) -> tuple[str, int]:
    """(the file's text, how often the mutation's fragment occurs in it)."""
    with open(os.path.join(root, m.path)) as f:
        text = f.read()
    return text, text.count(m.old)


def stale_fragments(root: str = REPO) -> list:
    """Every mutation whose fragment does not occur exactly once (code moved on)."""
    return [(m.name, m.path, n) for m in MUTATIONS for n in [fragment_count(root, m)[1]]
            if n != 1]


def apply(root: str, m: Mutation) -> None:
    path = os.path.join(root, m.path)
    text, n = fragment_count(root, m)
    if n != 1:
        raise LookupError(f"{m.path}: the fragment occurs {n} times (expected once): {m.old!r}")
    with open(path, "w") as f:
        f.write(text.replace(m.old, m.new))


def run_tests(root: str, tests, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=8").strip())
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return p.returncode, p.stderr[-1500:] + p.stdout[-3000:]  # pytest's summary line last


NOT_RUN = "not run here"


def missing_feature(needs: str) -> str:
    """Why this host cannot run tests that need `needs` ("" where it can)."""
    if not needs:
        return ""
    if needs != "amx":  # a typo must not quietly skip a mutation
        raise ValueError(f"Mutation.needs: unknown host feature {needs!r} (known: 'amx')")
    code = "from warm_jax import cpu_matmul; print(cpu_matmul.amx_available())"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO))
    return "" if p.stdout.strip().endswith("True") else "no AMX on this CPU"


def verdict(rc: int, out: str) -> str:
    """pytest's exit code and output -> killed / SURVIVED / ERROR (all tests skipped: ERROR)."""
    if rc == 1:
        return "killed"
    if rc == 0:
        tail = out.strip().splitlines()[-1] if out.strip() else ""
        return "SURVIVED" if re.search(r"\b\d+ passed\b", tail) else "ERROR (its tests all skipped)"
    return f"ERROR (rc {rc})"


def run_one(m: Mutation, timeout: float, keep: bool) -> tuple:
    """(m, status, seconds) for one mutation, in a temporary copy; prints its line."""
    t0, why = time.time(), missing_feature(m.needs)
    if why:
        print(f"{m.name:32s} {NOT_RUN}: {why}", flush=True)
        return m, f"{NOT_RUN} ({why})", 0.0
    root = tempfile.mkdtemp(prefix=f"mutation_{m.name}_")
    try:
        copy_repo(root)
        check_imports_from(root)
        apply(root, m)
        rc, out = run_tests(root, m.tests, timeout)
    except Exception as e:  # noqa: BLE001 - reported as an error row
        rc, out = -2, f"{type(e).__name__}: {e}"
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    status = verdict(rc, out)
    print(f"{m.name:32s} {status:14s} {time.time() - t0:6.0f}s", flush=True)
    if status != "killed":
        print("    " + out.strip().replace("\n", "\n    ")[-1500:], flush=True)
    else:  # what failed: pytest's short summary line
        first = next((l for l in out.splitlines() if l.startswith("FAILED ")), "")
        print("    " + first[:200], flush=True)
    return m, status, time.time() - t0


def check_imports_from(root: str) -> None:
    """The copy's warm_jax must be the one imported (not the installed checkout)."""
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", "import warm_jax; print(warm_jax.__file__)"],
                         cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    if not os.path.realpath(out.strip()).startswith(os.path.realpath(root)):
        raise RuntimeError(f"the copy imports warm_jax from {out.strip()}, not from {root}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", action="append", default=[], help="run mutations whose name "
                    "contains this (repeatable)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true", help="only check that every mutation's "
                    "fragment occurs exactly once in the source (a second)")
    ap.add_argument("--slow", action="store_true", help="also the mutations whose test runs "
                    "the whole smoke flow (a few minutes each)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copies")
    ap.add_argument("--baseline", action="store_true", help="first run every named test on "
                    "an unmutated copy (they must pass, so that a kill means the mutation)")
    args = ap.parse_args(argv)
    todo = [m for m in MUTATIONS if (args.slow or not m.slow)
            and (not args.k or any(k in m.name for k in args.k))]
    if args.check:
        stale = stale_fragments()
        for name, path, n in stale:
            print(f"{name}: its fragment occurs {n} times in {path} (expected once)")
        print(f"{len(MUTATIONS) - len(stale)}/{len(MUTATIONS)} fragments found once")
        return 1 if stale else 0
    if args.list:
        for m in todo:
            print(f"{m.name:32s} {m.path:28s} {' '.join(m.tests)}\n    {m.what}")
        return 0
    rows, t_all = [], time.time()
    if args.baseline:
        tests = list(dict.fromkeys(t for m in todo for t in m.tests))
        root = tempfile.mkdtemp(prefix="mutation_baseline_")
        try:
            copy_repo(root)
            rc, out = run_tests(root, tests, args.timeout * 2)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"baseline: {len(tests)} tests, rc {rc}, {time.time() - t_all:.0f}s", flush=True)
        if rc != 0:
            print(out)
            return 2
    for m in todo:
        rows.append(run_one(m, args.timeout, args.keep))
    print(f"\n| mutation | file | what | test(s) | result | seconds |\n|---|---|---|---|---|---|")
    for m, status, sec in rows:
        tests = ", ".join(t.split("::")[-1] for t in m.tests)
        print(f"| {m.name} | {m.path} | {m.what} | {tests} | {status} | {sec:.0f} |")
    absent = [m.name for m, status, _ in rows if status.startswith(NOT_RUN)]
    bad = [m.name for m, status, _ in rows if status != "killed" and m.name not in absent]
    ran = len(rows) - len(absent)
    print(f"\n{ran - len(bad)}/{ran} mutations killed in {time.time() - t_all:.0f}s"
          + (f"; not killed: {', '.join(bad)}" if bad else "")
          + (f"; not run on this CPU: {', '.join(absent)}" if absent else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
