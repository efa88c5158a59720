"""
Tests of train.py and sample.py: the command line, the schedule, batches, evaluation, end-to-end
runs, exact resume, checkpoints, failures and bad input, and DDP with 2 CPU processes (gloo).

    python -m pytest -q tests/test_train.py
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import model as model_py
import configurator
import dataset
import sample
import train
from conftest import ROOT, TINY, make_dataset, read_log, run_script, torchrun
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint


def run_train(*args):
    return train.main([*TINY, *args])


# ------------------------------------------------------------------------------------------------
# pure pieces: command line, schedule, batches, evaluation

def test_cli_parses_types_and_config_files(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text('"""doc"""\nn_layer = 4\nlearning_rate = 1e-3\ncompile = False\n')
    cfg, model_args = train.parse_args([str(preset), "--learning_rate=5e-4", "--nitp_weight=0.8", "--compile=true"])
    assert cfg.learning_rate == 5e-4 and cfg.compile is True  # flags override the file
    assert model_args == {"n_layer": 4, "nitp_weight": 0.8}
    for bad, needle in ((["--no_such_knob=1"], "no_such_knob"), (["--nitp_layr=2"], "did you mean --nitp_layer"),
                        (["--batch_size=x"], "batch_size"), (["--compile=maybe"], "compile")):
        with pytest.raises(train.UsageError, match=needle):
            train.parse_args(bad)


def test_lr_schedule():
    cfg = configurator.TrainConfig(max_iters=100, warmup_iters=10, learning_rate=1.0, min_lr=0.1, decay_frac=0.2)
    lrs = [train.get_lr(it, cfg) for it in range(100)]
    assert lrs[0] > 0  # the first step already learns
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert all(lr == 1.0 for lr in lrs[10:80])  # stable
    assert abs(lrs[-1] - 0.1) < 1e-12 and all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # decays to min_lr
    cos = replace(cfg, lr_schedule="cosine")
    assert abs(train.get_lr(10, cos) - 1.0) < 1e-12 and abs(train.get_lr(100, cos) - 0.1) < 1e-12


def test_batch_offsets_are_stateless_and_distinct_per_micro_batch():
    a = dataset.batch_offsets(10_000, 16, 8, seed=1, step=5, micro=0)
    assert np.array_equal(a, dataset.batch_offsets(10_000, 16, 8, seed=1, step=5, micro=0))
    assert not np.array_equal(a, dataset.batch_offsets(10_000, 16, 8, seed=1, step=5, micro=1))
    assert not np.array_equal(a, dataset.batch_offsets(10_000, 16, 8, seed=1, step=6, micro=0))


def test_targets_are_inputs_shifted_by_one():
    data = np.arange(5000, dtype=np.uint16)  # a known sequence: token i is i
    for seed in range(3):
        offsets = dataset.batch_offsets(len(data), 32, 8, seed=seed, step=0, micro=0)
        x, y = dataset.get_batch(data, offsets, 32, torch.device("cpu"))
        assert x.shape == y.shape == (8, 32)
        assert torch.equal(x[:, 0], torch.from_numpy(offsets))  # each window starts at its offset
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y, x + 1)  # y[:, t] == x[:, t + 1]


def test_evaluation_is_deterministic_and_leaves_training_mode_with_dropout():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5))
    data = np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16)
    windows = dataset.val_offsets(len(data), 16, 4, 3)
    args = (m, data, windows, 16, train.nullcontext(), torch.device("cpu"), "nitp")
    first, second = train.evaluate(*args), train.evaluate(*args)
    assert first == second and set(first) == {"val_loss", "val_nitp"}
    assert m.training  # training continues with dropout on: two forwards of one batch differ
    x = torch.from_numpy(data[:32].astype(np.int64)).view(2, 16)
    assert not torch.equal(m(x, x)[1]["ntp"], m(x, x)[1]["ntp"])


# ------------------------------------------------------------------------------------------------
# end to end (in-process for speed; torchrun for the multi-process ones)

def test_training_run_learns_and_logs(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=30", "--eval_interval=15",
                     "--gradient_accumulation_steps=2") == 0
    steps, evals = read_log(out)
    assert [r["iter"] for r in steps] == list(range(1, 31))  # max_iters counts optimizer steps
    assert set(steps[0]) == {"iter", "loss", "ntp", "nitp", "lr"}
    assert [r["iter"] for r in evals] == [0, 15, 30] and set(evals[0]) == {"iter", "val_loss", "val_nitp", "erank", "mean_cos"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["iter_num"] == 30
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def test_generic_cosine_baseline_logs_under_its_own_name(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--nitp_loss=generic_cosine") == 0
    steps, evals = read_log(out)
    assert "generic_cos" in steps[0] and "nitp" not in steps[0]
    assert "val_generic_cos" in evals[0] and "val_nitp" not in evals[0]
    assert steps[0]["loss"] == pytest.approx(steps[0]["ntp"] + steps[0]["generic_cos"], rel=1e-6)


def test_gradient_accumulation_equals_gradient_of_the_mean_loss(data_dir, tmp_path, monkeypatch):
    """With clipping off, k accumulated micro-steps give the gradient of the mean loss over the same
    k micro-batches (AdamW's scale invariance would hide a wrong scale from loss curves)."""
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **k):
        params = list(params)
        seen.append([p.grad.clone() for p in params])
        return real_clip(params, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    k = 3
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=1", "--grad_clip=0",
                     f"--gradient_accumulation_steps={k}", "--seed=5") == 0
    cfg = configurator.TrainConfig(seed=5)
    mcfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    torch.manual_seed(cfg.seed)
    ref = GPT(mcfg)
    data = dataset.load_split(data_dir, "train", dataset.read_meta(data_dir))
    losses = []
    for micro in range(k):
        x, y = dataset.get_batch(data, dataset.batch_offsets(len(data), 16, 4, 5, 0, micro), 16, torch.device("cpu"))
        losses.append(ref(x, y)[1]["total"])
    torch.stack(losses).mean().backward()
    assert len(seen) == 1
    for got, p in zip(seen[0], ref.parameters()):
        assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-7)


def test_evaluation_reads_only_validation_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)  # train ids in [0, 30), val ids in [30, 60): disjoint
    data = make_dataset(tmp_path / "data", train_ids=rng.integers(0, 30, 5000), val_ids=rng.integers(30, 60, 800))
    calls = []
    real_trunk = GPT.trunk

    def recording_trunk(self, idx):
        calls.append((self.training, int(idx.min()), int(idx.max())))
        return real_trunk(self, idx)
    monkeypatch.setattr(GPT, "trunk", recording_trunk)
    assert run_train(f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--max_iters=4", "--eval_interval=2") == 0
    evals = [c for c in calls if not c[0]]
    trains = [c for c in calls if c[0]]
    assert len(evals) >= 3 * 2 and len(trains) == 4  # 3 evaluations of 2 batches (+ geometry), 4 steps
    assert all(lo >= 30 for _, lo, _ in evals) and all(hi < 30 for _, _, hi in trains)


def test_late_nitp_start_switches_the_weight_at_that_step(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=5", "--nitp_start_iter=3",
                     "--nitp_weight=0.5") == 0
    steps, _ = read_log(out)
    # record `iter` n is the n-th step, 0-based step n-1: steps 0..2 have weight 0, steps 3 and 4 lambda
    for r in steps:
        weight = 0.0 if r["iter"] - 1 < 3 else 0.5
        assert r["nitp"] > 0.01 and r["loss"] == pytest.approx(r["ntp"] + weight * r["nitp"], rel=1e-6), r


def test_exported_inference_weights_load_into_baseline_with_identical_logits(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3") == 0
    sample.main([f"--out_dir={out}", f"--export={tmp_path / 'inference.pt'}"])
    exported = load_checkpoint(str(tmp_path / "inference.pt"))
    assert exported["model_config"]["nitp_weight"] == 0 and not any("nitp_head" in k for k in exported["model"])
    plain = GPT(GPTConfig(**exported["model_config"]))
    plain.load_state_dict(exported["model"], strict=True)
    trained, _ = sample.load_model(os.path.join(out, "ckpt.pt"))
    idx = torch.randint(0, 60, (2, 16))
    assert torch.equal(plain.eval()(idx)[0], trained(idx)[0])


def test_sampling_never_produces_padding_ids(tmp_path):
    """The byte tokenizer has 257 ids and the model 320 (padded to a multiple of 64): an early
    checkpoint must still only ever produce ids the tokenizer can decode."""
    data = make_dataset(tmp_path / "data", vocab=257)
    out = tmp_path / "out"
    assert run_train(f"--data_dir={data}", f"--out_dir={out}", "--max_iters=1") == 0
    trained, _ = sample.load_model(str(out / "ckpt.pt"))
    with torch.no_grad():
        trained.lm_head.weight[257:] = 10.0  # padding logits would win every draw
    ids = trained.generate(torch.zeros(4, 1, dtype=torch.long), 20, temperature=1.0, n_tokens=257)
    assert ids.max() < 257
    os.rename(data, tmp_path / "gone")  # the dataset is not needed to sample: the tokenizer is in the checkpoint
    for seed in range(3):
        result = run_script(ROOT / "sample.py", f"--out_dir={out}", f"--seed={seed}", "--max_new_tokens=40",
                            "--num_samples=1", "--device=cpu", timeout=120)
        assert result.returncode == 0, result.stderr


def test_compiled_training_run_evaluates(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--compile=true") == 0
    steps, evals = read_log(out)
    assert len(steps) == 2 and len(evals) == 2
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


# ------------------------------------------------------------------------------------------------
# resume, checkpoints, failures

def test_resume_is_exact(data_dir, tmp_path):
    common = [f"--data_dir={data_dir}", "--dropout=0.1", "--eval_interval=4", "--lr_decay_iters=8"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_train(*common, f"--out_dir={straight}", "--max_iters=8") == 0
    assert run_train(*common, f"--out_dir={split}", "--max_iters=4") == 0
    assert run_train(*common, f"--out_dir={split}", "--max_iters=8", "--init_from=resume") == 0
    a, b = load_checkpoint(os.path.join(straight, "ckpt.pt")), load_checkpoint(os.path.join(split, "ckpt.pt"))
    for name in a["model"]:  # bit-for-bit: on CPU every op here is deterministic
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert read_log(straight) == read_log(split)


def test_resume_drops_log_records_past_the_checkpoint(data_dir, tmp_path, capsys):
    common = [f"--data_dir={data_dir}", "--eval_interval=3", "--lr_decay_iters=8"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_train(*common, f"--out_dir={straight}", "--max_iters=8") == 0
    assert run_train(*common, f"--out_dir={split}", "--max_iters=6") == 0
    with open(os.path.join(split, "log.jsonl"), "a") as f:  # what a crash after the checkpoint leaves
        f.write(json.dumps({"iter": 7, "loss": 9.0, "ntp": 9.0, "nitp": 0.0, "lr": 0.1}) + "\n")
        f.write(json.dumps({"iter": 7, "val_loss": 9.0}) + "\n" + '{"iter": 8, "lo')
    capsys.readouterr()
    assert run_train(*common, f"--out_dir={split}", "--max_iters=8", "--init_from=resume") == 0
    assert read_log(split) == read_log(straight)  # one run's log: no step twice, no torn line
    # a changed schedule is legitimate (extending a run) but never silent
    assert "max_iters 6 -> 8" in capsys.readouterr().out


def test_fp16_scaler_state_is_checkpointed(data_dir, tmp_path):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0
    ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert ckpt["scaler"] == torch.amp.GradScaler("cpu", enabled=False).state_dict()  # float32: no scaler
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(scaler.state_dict())
    assert restored.get_scale() == 1024.0  # what train.py saves is what it needs to resume fp16 exactly


def test_checkpoint_survives_kill_during_write(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    script = f"""
import os, signal, torch, model
model.save_checkpoint({path!r}, {{"model": {{}}, "model_config": {{}}, "iter_num": 1, "w": torch.ones(3)}})
def dying_save(obj, f):
    f.write(b"partial bytes of a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
model.save_checkpoint({path!r}, {{"iter_num": 2, "w": torch.zeros(3)}})
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)
    assert ckpt["iter_num"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


class RunsCode:
    def __reduce__(self):
        return (open, ("/tmp/nitp_pwned_marker", "w"))


def test_crafted_checkpoint_is_refused_not_executed(tmp_path):
    marker = Path("/tmp/nitp_pwned_marker")
    marker.unlink(missing_ok=True)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_config": {}, "payload": RunsCode()}, path)
    with pytest.raises(model_py.CheckpointError, match="refusing to load") as e:
        load_checkpoint(str(path))
    assert "\n" not in str(e.value) and not marker.exists()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def broken_checkpoint(data_dir, out):
    """A checkpoint whose weights make every loss NaN (logits overflow to inf)."""
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2") == 0
    path = os.path.join(out, "ckpt.pt")
    ckpt = load_checkpoint(path)
    ckpt["model"]["transformer.ln_f.weight"].fill_(1e38)
    save_checkpoint(path, ckpt)
    return path


def test_nonfinite_loss_stops_and_keeps_checkpoint(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    path = broken_checkpoint(data_dir, out)
    before = sha256(path)
    capsys.readouterr()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--init_from=resume") == 3
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step 3 " in err  # numbered as log.jsonl numbers steps
    assert err.startswith("error:") or "\nerror:" in err  # on its own line, not after the progress bar
    assert sha256(path) == before
    # skip mode: both steps skipped, so no checkpoint is written from them
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--init_from=resume",
                     "--on_nonfinite=skip") == 0
    assert "no checkpoint at step 4" in capsys.readouterr().out and sha256(path) == before


def test_skip_mode_stops_after_too_many_skipped_steps_in_a_row(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    path = broken_checkpoint(data_dir, out)
    before = sha256(path)
    capsys.readouterr()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=40", "--eval_interval=5",
                     "--init_from=resume", "--on_nonfinite=skip") == 3
    err = capsys.readouterr().err
    assert f"{train.MAX_SKIPPED_IN_A_ROW + 1} steps in a row skipped" in err
    assert sha256(path) == before  # the evaluation at step 5 and 10 did not save the broken weights


def test_resume_with_other_model_shape_is_refused(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0
    capsys.readouterr()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--init_from=resume", "--n_embd=64") == 2
    err = capsys.readouterr().err
    assert "n_embd" in err and "checkpoint 32" in err


# ------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, no traceback, nothing written

def write_meta(tmp_path, meta_text):
    data = make_dataset(tmp_path / "data")
    Path(data, "meta.json").write_text(meta_text)
    return [f"--data_dir={data}"]


def checkpoint_dir(tmp_path, state):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    if isinstance(state, bytes):
        (out / "ckpt.pt").write_bytes(state)
    else:
        torch.save(state, out / "ckpt.pt")
    return out


def trained_out(tmp_path):
    data = make_dataset(tmp_path / "data")
    assert run_train(f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1") == 0
    return data, tmp_path / "out"


TRAIN_CASES = {  # name: (setup(tmp_path) -> extra args, args, a fragment of the message)
    "cuda without CUDA": (None, ["--device=cuda"], "no CUDA"),
    "unknown device": (None, ["--device=banana"], "device='banana'"),
    "negative seed": (None, ["--seed=-1"], "seed=-1"),
    "nan learning rate": (None, ["--learning_rate=nan"], "learning_rate=nan"),
    "infinite learning rate": (None, ["--learning_rate=inf"], "learning_rate=inf"),
    "zero steps": (None, ["--max_iters=0"], "max_iters=0"),
    "beta out of range": (None, ["--beta1=1.5"], "beta1=1.5"),
    "negative eval_iters": (None, ["--eval_iters=-1"], "eval_iters=-1"),
    "nan NITP weight": (None, ["--nitp_weight=nan"], "nitp_weight=nan"),
    "nan dropout": (None, ["--dropout=nan"], "dropout=nan"),
    "infinite rope_theta": (None, ["--rope_theta=inf"], "rope_theta=inf"),
    "zero norm_eps": (None, ["--norm_eps=0"], "norm_eps=0"),
    "unknown knob": (None, ["--no_such_knob=1"], "no_such_knob"),
    "not a boolean": (None, ["--compile=maybe"], "compile"),
    "target layer too deep": (None, ["--nitp_layer=2"], "nitp_layer"),
    "missing dataset": (lambda t: ["--dataset=missing_dataset"], [], "prepare_data.py"),
    "block larger than data": (None, ["--block_size=30000"], "block_size"),
    "total batch does not divide": (None, ["--total_batch_size=100"], "total_batch_size"),
    "vocab smaller than data": (None, ["--vocab_size=10"], "vocab_size"),
    "meta: unknown dtype": (lambda t: write_meta(t, '{"vocab_size": 60, "dtype": "int7"}'), [], "int7"),
    "meta: no dtype": (lambda t: write_meta(t, '{"vocab_size": 60}'), [], "dtype None"),
    "meta: vocab not a number": (lambda t: write_meta(t, '{"vocab_size": "big", "dtype": "uint16"}'), [], "vocab_size 'big'"),
    "meta: a JSON list": (lambda t: write_meta(t, "[1, 2]"), [], "not a JSON object"),
    "meta: not JSON": (lambda t: write_meta(t, "vocab_size: 60"), [], "meta.json is not readable JSON"),
    "meta: vocab below the ids": (lambda t: write_meta(t, '{"vocab_size": 20, "dtype": "uint16"}'), [],
                                  "holds token id 59"),
    "empty train.bin": (lambda t: [f"--data_dir={make_dataset(t / 'data', n_train=0)}"], [], "train.bin is missing, empty"),
    "checkpoint missing keys": (lambda t: [f"--out_dir={checkpoint_dir(t, {'model': {}})}"], ["--init_from=resume"],
                                "not a nitp checkpoint"),
    "checkpoint runs code": (lambda t: [f"--out_dir={checkpoint_dir(t, {'x': RunsCode()})}"], ["--init_from=resume"],
                             "refusing to load"),
    "damaged checkpoint": (lambda t: [f"--out_dir={checkpoint_dir(t, b'junk')}"], ["--init_from=resume"], "ckpt.pt"),
    "no checkpoint to resume": (None, ["--init_from=resume"], "does not exist"),
    "out_dir is a file": (lambda t: [f"--out_dir={(t / 'f').write_text('x') and t / 'f'}"], [], "cannot use out_dir"),
    "out_dir cannot be created": (lambda t: [f"--out_dir={(t / 'f').write_text('x') and t / 'f' / 'sub'}"], [],
                                  "cannot use out_dir"),
    "config file not UTF-8": (lambda t: [(t / "c.py").write_bytes(b"n_layer = 2 # \xff\xfe\n") and str(t / "c.py")], [],
                              "not UTF-8"),
    "fsdp without torchrun": (None, ["--fsdp=true"], "torchrun"),
    "config file with code": (lambda t: [(t / "c.py").write_text("import os\n") and str(t / "c.py")], [],
                              "only `key = value` lines"),
}


def snapshot(folder):
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")}


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(data_dir, tmp_path, capsys, case):
    setup, args, needle = TRAIN_CASES[case]
    extra = setup(tmp_path) if setup else []
    if not any(a.startswith(("--data_dir", "--dataset")) for a in extra):
        extra.append(f"--data_dir={data_dir}")
    if not any(a.startswith("--out_dir") for a in extra):
        extra.append(f"--out_dir={tmp_path / 'out'}")
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run_train(*extra, *args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


SAMPLE_CASES = {  # name: (args, fragment); run against a trained out_dir
    "no checkpoint": (["--out_dir={tmp}/nowhere"], "no checkpoint at"),
    "export into a missing folder": (["--export={tmp}/missing/inference.pt"], "does not exist"),
    "cuda without CUDA": (["--device=cuda"], "no CUDA"),
    "top_k zero": (["--top_k=0"], "--top_k=0"),
    "negative temperature": (["--temperature=-1"], "--temperature=-1"),
    "nan temperature": (["--temperature=nan"], "--temperature=nan"),
    "no tokens": (["--max_new_tokens=0"], "max_new_tokens"),
    "unknown option": (["--bogus=1"], "unrecognized arguments"),
    "damaged checkpoint": (["--out_dir={tmp}/damaged"], "cannot read checkpoint"),
}


@pytest.mark.parametrize("case", SAMPLE_CASES)
def test_bad_sample_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    _, out = trained_out(tmp_path)
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "ckpt.pt").write_bytes(b"junk")
    args, needle = SAMPLE_CASES[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if not any(a.startswith("--out_dir") for a in args):
        args.append(f"--out_dir={out}")
    before = snapshot(tmp_path)
    result = run_script(ROOT / "sample.py", "--max_new_tokens=5", *args, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "init_from" not in result.stderr
    assert snapshot(tmp_path) == before


def test_cli_errors_are_one_line_without_traceback_as_a_user_sees_them():
    out = run_script(ROOT / "train.py", "--nitp_layer=99", timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "nitp_layer=99" in lines[0]


# ------------------------------------------------------------------------------------------------
# llm.c shards

def test_llmc_shards_train_and_read_across_boundaries(tmp_path, capsys):
    from prepare_data import write_llmc_shard
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 60, size=n) for n in (700, 300, 900)]
    for i, t in enumerate(tokens):
        write_llmc_shard(tmp_path / f"train_{i:03d}.bin", t)
    write_llmc_shard(tmp_path / "val_000.bin", tokens[0][:500])
    shards = dataset.ShardedTokens(str(tmp_path / "train_*.bin"))
    whole = np.concatenate(tokens)
    assert len(shards) == len(whole)
    for start in (0, 650, 699, 990, 1100):  # inside a shard, and across one and two boundaries
        assert np.array_equal(shards[start:start + 420], whole[start:start + 420])
    out = str(tmp_path / "out")
    assert run_train(f"--train_shards={tmp_path}/train_*.bin", f"--val_shards={tmp_path}/val_*.bin",
                     f"--out_dir={out}", "--max_iters=2") == 0
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["model_config"]["vocab_size"] == 50304
    (tmp_path / "bad_000.bin").write_bytes(b"\0" * 2048)
    capsys.readouterr()
    assert run_train(f"--train_shards={tmp_path}/bad_*.bin", f"--val_shards={tmp_path}/val_*.bin",
                     f"--out_dir={out}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad_000.bin" in err[0] and "not an llm.c token shard" in err[0]


# ------------------------------------------------------------------------------------------------
# multi-process (torchrun, gloo on CPU), each under a timeout

@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "out")
    torchrun(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3",
             "--gradient_accumulation_steps=2", "--dropout=0.1")
    return out


def test_ddp_two_ranks_equal_one_process_with_more_accumulation(data_dir, ddp_run, tmp_path):
    single = str(tmp_path / "single")
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={single}", "--max_iters=6", "--eval_interval=3",
                     "--gradient_accumulation_steps=4", "--dropout=0.1") == 0  # the same dropout masks too
    (steps_ddp, evals_ddp), (steps_one, evals_one) = read_log(ddp_run), read_log(single)
    assert len(steps_ddp) == len(steps_one) == 6
    for a, b in zip(steps_ddp + evals_ddp, steps_one + evals_one):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a, b)
    wa = load_checkpoint(os.path.join(ddp_run, "ckpt.pt"))["model"]
    wb = load_checkpoint(os.path.join(single, "ckpt.pt"))["model"]
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_ddp_resume_is_exact(data_dir, ddp_run, tmp_path):
    out = str(tmp_path / "out")
    common = [f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=3", "--gradient_accumulation_steps=2",
              "--lr_decay_iters=6", "--dropout=0.1"]
    torchrun(*common, "--max_iters=3")
    torchrun(*common, "--max_iters=6", "--init_from=resume")
    assert read_log(out) == read_log(ddp_run)
    wa, wb = load_checkpoint(os.path.join(ddp_run, "ckpt.pt")), load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])


def test_ddp_evaluation_with_fewer_batches_than_ranks_does_not_hang(data_dir, tmp_path):
    out = str(tmp_path / "out")
    torchrun(f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_iters=1", "--eval_interval=2", "--max_iters=4",
             timeout=180)
    _, evals = read_log(out)
    assert [r["iter"] for r in evals] == [0, 2, 4]


SYNC_RECORDER = """
import json, os, sys
import torch
sys.path.insert(0, {root!r})
import train
flags = []
class Recording(torch.nn.parallel.DistributedDataParallel):
    def forward(self, *args, **kwargs):
        flags.append(self.require_backward_grad_sync)  # DDP reads it here to decide on the all-reduce
        return super().forward(*args, **kwargs)
torch.nn.parallel.DistributedDataParallel = Recording
code = train.main(sys.argv[1:])
with open(os.path.join({out!r}, "flags%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(flags, f)
sys.exit(code)
"""


def test_ddp_syncs_gradients_on_the_last_micro_step_only(data_dir, tmp_path):
    script = tmp_path / "record_sync.py"
    script.write_text(SYNC_RECORDER.format(root=str(ROOT), out=str(tmp_path)))
    out = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *TINY,
                     f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2",
                     "--gradient_accumulation_steps=3", timeout=180)
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        flags = json.loads((tmp_path / f"flags{rank}.json").read_text())
        assert flags == [False, False, True] * 2


def assert_same_logs(a, b, rel=1e-5):
    for x, y in zip(sum(read_log(a), []), sum(read_log(b), [])):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=rel, abs=1e-6) for k in x), (x, y)
    assert [len(r) for r in read_log(a)] == [len(r) for r in read_log(b)]


def test_fsdp_equals_ddp_resumes_exactly_and_loads_without_fsdp(data_dir, ddp_run, tmp_path):
    """FSDP2 shards the same computation DDP replicates: same losses to float tolerance. Its
    checkpoint holds full tensors, so it resumes under FSDP and in one process alike."""
    common = [f"--data_dir={data_dir}", "--eval_interval=3", "--gradient_accumulation_steps=2", "--lr_decay_iters=6",
              "--fsdp=true", "--dropout=0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(*common, f"--out_dir={straight}", "--max_iters=6")
    assert_same_logs(straight, ddp_run)
    torchrun(*common, f"--out_dir={split}", "--max_iters=3")
    shutil.copytree(split, tmp_path / "single")
    torchrun(*common, f"--out_dir={split}", "--max_iters=6", "--init_from=resume")
    assert_same_logs(split, straight, rel=1e-6)
    # one process with twice the accumulation continues the FSDP checkpoint as DDP would
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'single'}", "--eval_interval=3", "--dropout=0.1",
                     "--gradient_accumulation_steps=4", "--lr_decay_iters=6", "--max_iters=6", "--init_from=resume") == 0
    assert_same_logs(tmp_path / "single", ddp_run)


def test_fsdp_equals_ddp_for_an_moe_model(data_dir, tmp_path):
    moe = [f"--data_dir={data_dir}", "--n_layer=3", "--n_experts=8", "--moe_top_k=2", "--expert_hidden=16",
           "--max_iters=4", "--eval_interval=2", "--gradient_accumulation_steps=2"]
    torchrun(*moe, f"--out_dir={tmp_path / 'ddp'}")
    torchrun(*moe, f"--out_dir={tmp_path / 'fsdp'}", "--fsdp=true")
    assert_same_logs(tmp_path / "fsdp", tmp_path / "ddp")
