"""
Tests that a run's record is its own (an out_dir is never mixed, its lock cannot race or stick, the optional wandb
mirror holds what log.jsonl holds), and tests written against one-line bugs that the rest of the suite let through
(each is listed in tests/mutants.py with the mutation it catches).

    python -m pytest -q tests/test_run_record.py
"""
import fcntl
import glob
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dataset
import model as model_py
import prepare_data
import sample
import train
from conftest import ROOT, TINY, make_dataset, read_log, run_script, torchrun
from model import GPT, GPTConfig, load_checkpoint


def run_train(*args):
    return train.main([*TINY, *args])


def digest(folder):
    """{file name: sha256} of a folder: what a refused run must leave as it was."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------------
# an out_dir holds one run

def test_a_fresh_run_into_an_out_dir_holding_a_run_is_refused_and_overwrite_starts_it_anew(data_dir, tmp_path,
                                                                                            capsys):
    """The issue's reproduction: a run, a fresh run with another seed into the same out_dir, then a resume. The fresh
    run is refused untouched; with --overwrite=true the folder ends holding exactly what a new folder would."""
    out, clean = tmp_path / "out", tmp_path / "clean"
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2") == 0
    before = digest(out)
    capsys.readouterr()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3", "--seed=7") == 2
    line = one_error_line(capsys)
    assert "already holds a run" in line and all(f in line for f in ("--init_from=resume", "--overwrite=true"))
    assert digest(out) == before  # nothing of it touched (the lock file's line names the last holder)
    for stale in ("ckpt.pt.tmp", "log.jsonl.tmp"):  # what a killed write leaves behind
        (out / stale).write_text("left by a kill")
    for folder, extra in ((out, ["--overwrite=true"]), (clean, [])):
        assert run_train(f"--data_dir={data_dir}", f"--out_dir={folder}", "--max_iters=3", "--seed=7", *extra) == 0
        assert run_train(f"--data_dir={data_dir}", f"--out_dir={folder}", "--max_iters=4", "--seed=7",
                         "--init_from=resume") == 0
    assert read_log(out) == read_log(clean)  # the first run left no record (same losses: same weights and data)
    assert [r["iter"] for r in sum(read_log(out), [])] == [1, 2, 3, 4, 0, 3, 4]
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "log.jsonl", "train.lock"]
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 7


def test_overwrite_with_resume_and_a_run_name_without_project_are_refused(data_dir, tmp_path, capsys):
    for flags, fragment in ((["--overwrite=true", "--init_from=resume"], "overwrite"),
                            (["--wandb_run_name=a"], "wandb_project")):
        assert run_train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *flags) == 2
        assert fragment in one_error_line(capsys)
        assert not (tmp_path / "out").exists()


HOLDER = """
import fcntl, os, socket, sys, time
f = open(sys.argv[1], "a+")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
f.truncate(0); f.write(f"process {os.getpid()} on {socket.gethostname()}\\n"); f.flush()
print("held", flush=True)
time.sleep(120)
"""


def test_a_held_lock_refuses_a_second_run_and_is_released_when_its_holder_dies(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "train.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 2
        line = one_error_line(capsys)
        assert "in use by another training run" in line and f"process {holder.pid} on" in line
        assert sorted(os.listdir(out)) == ["train.lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up code runs: the OS alone releases the lock
        holder.wait()
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0


@pytest.mark.parametrize("left", ["", "garbage", "{host} {pid}\n"])
def test_a_lock_file_nobody_holds_never_blocks(data_dir, tmp_path, left):
    """An empty file (a kill between create and write), a foreign one, or one naming a live process that does not
    hold the lock (this very test process): none of them is a lock."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.lock").write_text(left.format(host=os.uname().nodename, pid=os.getpid()))
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0


def test_the_lock_is_free_after_a_run_and_after_a_failed_one(data_dir, tmp_path):
    """An in-process run that stopped with an error (here a refused fresh run) must not keep the lock: the next
    in-process run would find it held, as flock locks belong to an open file, not to a process."""
    out = tmp_path / "out"
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 2
    with open(out / "train.lock") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a run still held it


def test_two_runs_started_together_into_one_out_dir_one_wins(data_dir, tmp_path):
    """Whatever the interleaving, exactly one of two simultaneous fresh runs trains; the other is refused (in use, or
    the folder already holds a run) and the record is the winner's alone."""
    out = tmp_path / "out"
    args = [ROOT / "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2).strip().splitlines()
    assert len(loser) == 1 and ("in use by another" in loser[0] or "already holds a run" in loser[0])
    steps, evals = read_log(out)
    assert [r["iter"] for r in steps] == [1, 2, 3] and [r["iter"] for r in evals] == [0, 3]


def test_a_refusal_ends_every_rank_with_its_line(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=1") == 0
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "train.py", *TINY,
                        f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.match(r"error: rank 0 on .*: .*/out already holds a run", errors[0]), result.stderr
    assert 'train.py", line' not in result.stderr  # both ranks ended with that line, neither with a traceback


# ------------------------------------------------------------------------------------------------
# optional wandb, with the real package in offline mode

def wandb_records(run_dir):
    """(run id, config, {step: {key: value}}) from an offline run's .wandb file: a leveldb-style log of 32 KiB blocks
    (a 7-byte file header; records of crc32, length, type 1 full / 2 first / 3 middle / 4 last) holding protobuf
    Records. wandb ships no reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]).read_bytes()
    pos, piece, records = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        piece, pos = piece + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(piece))
            piece = b""
    run_id, config, rows = None, {}, {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    return run_id, config, rows


def test_wandb_mirrors_every_log_record_and_the_config_and_a_resume_continues_its_run(data_dir, tmp_path):
    pytest.importorskip("wandb")
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "cache")}
    common = [ROOT / "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--eval_interval=2",
              "--wandb_project=nitp-test", "--wandb_run_name=tiny"]
    for extra in (["--max_iters=2"], ["--max_iters=4", "--init_from=resume"]):
        result = run_script(*common, *extra, env=env, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    (first_id, _, first), (second_id, config, second) = wandb_records(runs[0]), wandb_records(runs[1])
    assert first_id == second_id == load_checkpoint(str(out / "ckpt.pt"))["wandb_id"]
    saved = json.loads((out / "config.json").read_text())  # the resumed run's config, as wandb's
    assert config["train"] == saved["train"] and config["model"] == saved["model"]
    rows = {**first, **second}
    records = sum(read_log(out), [])
    assert sorted(rows) == sorted({r["iter"] for r in records}) == [0, 1, 2, 3, 4]
    for record in records:  # every key of every record, at its step
        assert {k: rows[record["iter"]][k] for k in record} == record


def test_wandb_missing_is_one_line_with_the_install_hint(data_dir, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None\n")  # import wandb fails
    result = run_script(ROOT / "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
                        "--wandb_project=x", env={"PYTHONPATH": str(hide)}, timeout=120)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1 and "pip install wandb" in err[0], result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# sample.py's empty prompt, prepare_data.py's --val_docs

def test_an_empty_prompt_samples_from_the_start_of_a_document(tmp_path):
    data = make_dataset(tmp_path / "data", vocab=257)  # byte ids and eot 256, as prepare_data.py writes them
    out = tmp_path / "out"
    assert run_train(f"--data_dir={data}", f"--out_dir={out}", "--max_iters=1") == 0
    result = run_script(ROOT / "sample.py", f"--out_dir={out}", "--start=", "--temperature=0", "--max_new_tokens=12",
                        "--num_samples=1", "--device=cpu", env={"PYTHONIOENCODING": "utf-8"}, timeout=120)
    assert result.returncode == 0, result.stderr
    trained, _ = sample.load_model(str(out / "ckpt.pt"))
    greedy = trained.generate(torch.tensor([[256]]), 12, temperature=0, n_tokens=257)[0, 1:]  # after end-of-text
    tok = prepare_data.get_tokenizer("byte")
    assert result.stdout == tok.decode(greedy.tolist()) + "\n" + "-" * 60 + "\n"


@pytest.mark.parametrize("n_docs,val_docs", [(5, 4), (2**20 + 3, 2**20 - 1), (2**20 + 3, 2**20), (2**20 + 3, 2**20 + 1),
                                             (2**20 + 3, 2**20 + 2), (3 * 2**20, 2**20 + 7)])
def test_the_val_docs_threshold_puts_exactly_that_many_documents_in_val(n_docs, val_docs):
    """Around the 2**20-document block and at n_docs - 1, where np.partition's kth fell out of bounds."""
    threshold = prepare_data.docs_threshold(11, n_docs, val_docs)
    assert int((prepare_data.split_hashes(11, np.arange(n_docs)) < np.uint64(threshold)).sum()) == val_docs



# ------------------------------------------------------------------------------------------------
# one-line bugs the rest of the suite let through, and the rest of each one's kind

BAD_CONFIG_LINES = ["n_layer = 2 * 3", "n_layer = 2 if True else 3", "n_layer = int('2')", "n_layer += 1",
                    "n_layer: int = 2", "a, b = 1, 2", "n_layer = n_head = 2", "n_layer = {[1]: 2}",
                    "n_layer = {{1: 2}}", "n_layer = " + "-" * 5000 + "1", "n_layer = " + "(" * 300 + "1" + ")" * 300,
                    "import os", "n_layer[0] = 1", "if True: n_layer = 2"]


@pytest.mark.parametrize("line", BAD_CONFIG_LINES, ids=range(len(BAD_CONFIG_LINES)))
def test_a_config_file_line_that_is_not_key_equals_literal_is_one_line(tmp_path, capsys, line):
    (tmp_path / "bad.py").write_text(line + "\n")
    assert train.main([str(tmp_path / "bad.py"), f"--out_dir={tmp_path / 'out'}"]) == 2
    assert "bad.py" in one_error_line(capsys) and not (tmp_path / "out").exists()


def test_every_micro_step_draws_its_own_batch_and_dropout_masks(data_dir, tmp_path, monkeypatch):
    """Not a comparison of two runs (both would share a bug): within one run, no two micro-steps may reuse a
    dropout seed or a batch, and another --seed changes every one of them."""
    seeds, windows = [], []
    real_seed, real_batch = torch.manual_seed, train.get_batch
    monkeypatch.setattr(torch, "manual_seed", lambda s: seeds.append(int(s)) or real_seed(s))
    monkeypatch.setattr(train, "get_batch", lambda data, offsets, *a: windows.append((len(data), tuple(offsets)))
                        or real_batch(data, offsets, *a))
    per_run = []
    for seed in (1, 2):
        seeds.clear(), windows.clear()
        assert run_train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / str(seed)}", "--max_iters=3",
                         "--gradient_accumulation_steps=2", "--dropout=0.1", f"--seed={seed}") == 0
        assert seeds[0] == seed  # the initial weights; then one reseed per micro-step
        train_windows = [w for n, w in windows if n == 20_000]  # conftest's train split
        assert len(seeds[1:]) == len(set(seeds[1:])) == 6 and len(train_windows) == len(set(train_windows)) == 6
        per_run.append((set(seeds[1:]), set(train_windows)))
    assert not per_run[0][0] & per_run[1][0] and not per_run[0][1] & per_run[1][1]


def test_evaluation_over_ranks_with_uneven_batches_equals_one_process(data_dir, tmp_path):
    """3 validation batches over 2 ranks: DDP splits them 2 + 1 and must still average all 3; FSDP runs every batch on
    every rank (each forward is a collective: uneven counts hang)."""
    common = [f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=1", "--eval_iters=3"]
    assert run_train(*common, f"--out_dir={tmp_path / 'one'}", "--gradient_accumulation_steps=2") == 0  # = 2 ranks
    _, reference = read_log(tmp_path / "one")
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp=true"])):
        torchrun(*common, f"--out_dir={tmp_path / name}", *extra, timeout=150)
        _, evals = read_log(tmp_path / name)
        assert len(evals) == len(reference) == 3
        for got, want in zip(evals, reference):
            assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-4) for k in got), name


def test_skipped_steps_change_nothing_and_a_good_step_resets_the_count(data_dir, tmp_path, monkeypatch):
    """12 non-finite steps, never two in a row (the limit is 10 in a row): the run completes, and across each skipped
    step the weights and AdamW's state stay bit for bit what they were."""
    bad, snapshots, optimizers = set(range(1, 24, 2)), [], []
    real_clip, real_configure = torch.nn.utils.clip_grad_norm_, GPT.configure_optimizers
    monkeypatch.setattr(GPT, "configure_optimizers", lambda self, *a: optimizers.append(real_configure(self, *a))
                        or optimizers[-1])

    def poisoning_clip(params, max_norm, *a, **k):  # called once per step, before the optimizer
        params = list(params)
        state = [t.clone() for p in params for t in [p.detach(), *optimizers[0].state.get(p, {}).values()]]
        if len(snapshots) in bad:
            for p in params:
                p.grad.fill_(float("nan"))
        snapshots.append(state)
        return real_clip(params, max_norm, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", poisoning_clip)
    assert run_train(f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", "--max_iters=25",
                     "--on_nonfinite=skip") == 0
    assert len(snapshots) == 25
    for step in range(24):  # the state before step+1 vs before step
        same = len(snapshots[step]) == len(snapshots[step + 1]) and all(
            torch.equal(a, b) for a, b in zip(snapshots[step], snapshots[step + 1]))
        assert same == (step in bad), step
    steps, _ = read_log(tmp_path / "out")
    assert all(np.isfinite(r["loss"]) for r in steps if r["iter"] - 1 not in bad)


def write_shard(path, tokens, magic=20240520, version=1, count=None, tail=b""):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + tail)
    return path


@pytest.mark.parametrize("bad", [dict(magic=20240521), dict(version=2), dict(count=101), dict(count=99),
                                 dict(tail=b"\0"), dict(count=-1)])
def test_an_llmc_shard_with_a_wrong_header_or_size_is_refused(tmp_path, bad):
    tokens = np.arange(100)
    good = dataset.read_llmc_shard(str(write_shard(tmp_path / "good.bin", tokens)))
    assert np.array_equal(good, tokens)
    path = write_shard(tmp_path / "bad.bin", tokens, **bad)
    with pytest.raises(dataset.DatasetError, match="bad.bin.*not an llm.c token shard"):
        dataset.read_llmc_shard(str(path))


def test_an_llmc_shard_shorter_than_its_header_is_refused(tmp_path):
    (tmp_path / "short.bin").write_bytes(np.array([20240520, 1, 0], dtype="<i4").tobytes())
    with pytest.raises(dataset.DatasetError, match="short.bin"):
        dataset.read_llmc_shard(str(tmp_path / "short.bin"))


def test_the_router_scores_are_fp32_values_under_bf16_autocast():
    """Not only fp32 tensors: the values of an fp32 product, which bf16 logits (2-3 digits) would not give."""
    cfg = GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=64, n_experts=8, moe_top_k=2)
    layer = model_py.MoE(cfg)
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _, _ = layer.route(x)
    want = (x.double() @ layer.router.weight.detach().double().T).softmax(dim=-1)
    torch.testing.assert_close(scores.double(), want, rtol=1e-5, atol=1e-7)


def test_every_deliberate_bug_of_mutants_py_still_applies_and_names_an_existing_test():
    """tests/mutants.py runs for ~20 minutes, so it is not in the suite; this keeps its list true: each bug's line is
    in its file exactly once (so the bug can be applied) and the test that must catch it exists."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mutants", ROOT / "tests" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutants)
    for name, path, old, new, test in mutants.MUTATIONS:
        assert (ROOT / path).read_text().count(old) == 1, f"{name}: its line is not once in {path}"
        assert old != new, name
        file, _, function = test.partition("::")
        assert f"def {function.split('[')[0]}(" in (ROOT / file).read_text(), f"{name}: no test {test}"
