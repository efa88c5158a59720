"""
Each test of a property must fail when the code is wrong: this applies one deliberate bug at a
time to a copy of the repository and checks that the test written for it fails (pytest exit 1).

    python tests/mutants.py          # ~1 minute on 2 cores; prints one line per bug

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
]


def main():
    caught = 0
    for name, path, old, new, test in MUTATIONS:
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
    print(f"{caught} of {len(MUTATIONS)} deliberate bugs caught")
    sys.exit(0 if caught == len(MUTATIONS) else 1)


if __name__ == "__main__":
    main()
