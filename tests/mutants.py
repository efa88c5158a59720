"""
Each test of a property must fail when the code is wrong: this applies one deliberate bug at a
time to a copy of the repository and checks that the test written for it fails (pytest exit 1).

    python tests/mutants.py          # ~20 minutes on 2 shared cores; prints one line per bug
    python tests/mutants.py config   # only the bugs whose name contains "config"

Not collected by pytest (it runs pytest itself); rerun it after changing a guarded line.
"""
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUTATIONS = [  # (what, file, line as it is, line with the bug, the test that must fail)
 ("nitp unweighted", "model.py", 'losses[cfg.aux_name] = aux', 'losses[cfg.aux_name] = aux * (cfg.nitp_weight if nitp_weight is None else nitp_weight)', "test_nitp.py::test_total_is_ntp_plus_weighted_nitp"),
 ("moe_aux mean", "model.py", 'losses["moe_aux"] = torch.stack([aux for aux, _ in routing]).mean()', 'losses["moe_aux"] = torch.stack([aux for aux, _ in routing]).sum()', "tests/test_moe.py::test_moe_aux_is_the_mean_of_the_per_layer_balance_losses"),
 ("accumulation scale", "train.py", 'scaler.scale(losses["total"] / accum).backward()', 'scaler.scale(losses["total"]).backward()', "tests/test_train.py::test_gradient_accumulation_equals_gradient_of_the_mean_loss"),
 ("ddp sync every micro-step", "train.py", 'train_model.require_backward_grad_sync = micro == accum - 1', 'train_model.require_backward_grad_sync = True', "tests/test_train.py::test_ddp_syncs_gradients_on_the_last_micro_step_only"),
 ("batch targets", "dataset.py", 'return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()', 'return xy[:, :-1].contiguous(), xy[:, :-1].contiguous()', "tests/test_train.py::test_targets_are_inputs_shifted_by_one"),
 ("eval on train data", "train.py", 'val = evaluate(model, val_data, val_windows,', 'val = evaluate(model, train_data, val_windows,', "tests/test_train.py::test_evaluation_reads_only_validation_data"),
 ("eval leaves eval mode", "train.py", '''        dist.all_reduce(sums)
    model.train()''', '''        dist.all_reduce(sums)''', "tests/test_train.py::test_evaluation_is_deterministic_and_leaves_training_mode_with_dropout"),
 ("dropout seed local", "train.py", 'np.random.SeedSequence([cfg.seed, it, g])', 'np.random.SeedSequence([cfg.seed, it, micro])', "tests/test_train.py::test_ddp_two_ranks_equal_one_process_with_more_accumulation"),
 ("late start off by one", "train.py", '0.0 if it < cfg.nitp_start_iter else', '0.0 if it <= cfg.nitp_start_iter else', "tests/test_train.py::test_late_nitp_start_switches_the_weight_at_that_step"),
 ('nitp cosine in bf16', 'nitp.py', '1.0 - F.cosine_similarity(pred.float(), target.float(),', '1.0 - F.cosine_similarity(pred, target,', 'test_nitp.py::test_losses_and_geometry_keep_full_precision_for_bf16_inputs'),
 ('nitp mse in bf16', 'nitp.py', 'return (pred.float() - target.float()).pow(2)', 'return (pred - target).pow(2)', 'test_nitp.py::test_losses_and_geometry_keep_full_precision_for_bf16_inputs'),
 ('nitp smooth_l1 in bf16', 'nitp.py', 'F.smooth_l1_loss(pred.float(), target.float(),', 'F.smooth_l1_loss(pred, target,', 'test_nitp.py::test_losses_and_geometry_keep_full_precision_for_bf16_inputs'),
 ('generic cosine in bf16', 'nitp.py', 'u = F.normalize(states.float(), dim=-1, eps=1e-12)', 'u = F.normalize(states, dim=-1, eps=1e-12)', 'test_nitp.py::test_losses_and_geometry_keep_full_precision_for_bf16_inputs'),
 ('erank in fp32', 'nitp.py', 'raw = states.detach().double()', 'raw = states.detach().float()', 'test_nitp.py::test_losses_and_geometry_keep_full_precision_for_bf16_inputs'),
 ('mean_cos in fp32', 'nitp.py', 'h = states.detach().double()', 'h = states.detach().float()', 'test_nitp.py::test_losses_and_geometry_keep_full_precision_for_bf16_inputs'),
 ('router under autocast', 'model.py', 'with torch.autocast(x.device.type, enabled=False):', 'with torch.autocast(x.device.type):', 'tests/test_run_record.py::test_the_router_scores_are_fp32_values_under_bf16_autocast'),
 ('dropout seed without step', 'train.py', 'np.random.SeedSequence([cfg.seed, it, g])', 'np.random.SeedSequence([cfg.seed, g])', 'tests/test_run_record.py::test_every_micro_step_draws_its_own_batch_and_dropout_masks'),
 ('dropout seed without seed', 'train.py', 'np.random.SeedSequence([cfg.seed, it, g])', 'np.random.SeedSequence([it, g])', 'tests/test_run_record.py::test_every_micro_step_draws_its_own_batch_and_dropout_masks'),
 ('batch without step', 'dataset.py', 'np.random.default_rng([seed, step, micro])', 'np.random.default_rng([seed, micro])', 'tests/test_run_record.py::test_every_micro_step_draws_its_own_batch_and_dropout_masks'),
 ('fsdp eval sharded', 'train.py', '*((0, 1) if cfg.fsdp else (rank, world_size))', 'rank, world_size', 'tests/test_run_record.py::test_evaluation_over_ranks_with_uneven_batches_equals_one_process'),
 ('ddp eval drops the remainder', 'train.py', 'for i in range(rank, len(offsets), world_size):', 'for i in range(rank, len(offsets) // world_size * world_size, world_size):', 'tests/test_run_record.py::test_evaluation_over_ranks_with_uneven_batches_equals_one_process'),
 ('skip count never reset', 'train.py', 'skipped = 0 if finite else skipped + 1', 'skipped = skipped + (not finite)', 'tests/test_run_record.py::test_skipped_steps_change_nothing_and_a_good_step_resets_the_count'),
 ('non-finite guard removed', 'train.py', 'if finite or scaler.is_enabled():', 'if True:', 'tests/test_run_record.py::test_skipped_steps_change_nothing_and_a_good_step_resets_the_count'),
 ('llm.c magic unchecked', 'dataset.py', 'header[0] != 20240520 or ', '', 'tests/test_run_record.py::test_an_llmc_shard_with_a_wrong_header_or_size_is_refused'),
 ('llm.c version unchecked', 'dataset.py', 'header[1] != 1 or ', '', 'tests/test_run_record.py::test_an_llmc_shard_with_a_wrong_header_or_size_is_refused'),
 ('llm.c size unchecked', 'dataset.py', ' or size != 1024 + 2 * int(header[2])', '', 'tests/test_run_record.py::test_an_llmc_shard_with_a_wrong_header_or_size_is_refused'),
 ('config expression traceback', 'configurator.py', 'except (AttributeError, ValueError, TypeError, RecursionError):', 'except (AttributeError, TypeError, RecursionError):', 'tests/test_run_record.py::test_a_config_file_line_that_is_not_key_equals_literal_is_one_line'),
 ('config chained assignment', 'configurator.py', 'if len(node.targets) != 1:', 'if False:', 'tests/test_run_record.py::test_a_config_file_line_that_is_not_key_equals_literal_is_one_line'),
 ('fresh run into a run', 'train.py', 'if cfg.init_from == "scratch" and found and not cfg.overwrite:', 'if False:', 'tests/test_run_record.py::test_a_fresh_run_into_an_out_dir_holding_a_run_is_refused_and_overwrite_starts_it_anew'),
 ('overwrite keeps the log', 'train.py', '("ckpt.pt", "ckpt.pt.tmp", "log.jsonl", "log.jsonl.tmp", "config.json")', '("ckpt.pt", "ckpt.pt.tmp", "log.jsonl.tmp", "config.json")', 'tests/test_run_record.py::test_a_fresh_run_into_an_out_dir_holding_a_run_is_refused_and_overwrite_starts_it_anew'),
 ('refusal on rank 0 only', 'train.py', 'if dist.is_initialized() and not progress["agreed"]:', 'if False:', 'tests/test_run_record.py::test_a_refusal_ends_every_rank_with_its_line'),
 ('wandb steps not iters', 'train.py', 'tracker.log(record, step=record["iter"])', 'tracker.log(record)', 'tests/test_run_record.py::test_wandb_mirrors_every_log_record_and_the_config_and_a_resume_continues_its_run'),
 ('wandb id not kept', 'train.py', '"wandb_id": wandb_id,', '"wandb_id": None,', 'tests/test_run_record.py::test_wandb_mirrors_every_log_record_and_the_config_and_a_resume_continues_its_run'),
 ('empty prompt', 'sample.py', 'tok.encode(args.start) or [eot]', 'tok.encode(args.start)', 'tests/test_run_record.py::test_an_empty_prompt_samples_from_the_start_of_a_document'),
 ('val_docs partition', 'prepare_data.py', 'pool if pool.size <= val_docs + 1 else np.partition(pool, val_docs)', 'np.partition(pool, val_docs)', 'tests/test_run_record.py::test_the_val_docs_threshold_puts_exactly_that_many_documents_in_val'),
 ('target layer of 17', 'model.py', 'round((self.n_layer + 1) / 5)', 'round(0.2 * self.n_layer)', 'test_nitp.py::test_config_rejects_bad_values'),
]


def main():
    chosen = [m for m in MUTATIONS if not sys.argv[1:] or any(word in m[0] for word in sys.argv[1:])]
    caught = 0
    for name, path, old, new, test in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            repo = os.path.join(tmp, "repo")
            shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "data", "out*", "__pycache__"))
            with open(os.path.join(repo, path)) as f:
                src = f.read()
            if src.count(old) != 1:
                sys.exit(f"error: the line that '{name}' breaks is no longer in {path}: update MUTATIONS")
            with open(os.path.join(repo, path), "w") as f:
                f.write(src.replace(old, new))
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test],
                               cwd=repo, capture_output=True, text=True, timeout=600)
        caught += r.returncode == 1
        verdict = "caught" if r.returncode == 1 else f"NOT CAUGHT (exit {r.returncode})"
        print(f"{name:28s} {verdict:24s} {r.stdout.strip().splitlines()[-1]}")
    print(f"{caught} of {len(chosen)} deliberate bugs caught")
    sys.exit(0 if caught == len(chosen) else 1)


if __name__ == "__main__":
    main()
