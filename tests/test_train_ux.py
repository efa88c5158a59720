"""
train.py as a user meets it: --help, the first line and a config too big for the device, Ctrl-C and SIGTERM,
resume messages, and under torchrun a check that one rank fails. Each runs the command and checks the exit code,
the one line, and what is on disk.

    python -m pytest -q tests/test_train_ux.py
"""
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import torch

import train
from conftest import ROOT, TINY, make_dataset, run_script
from configurator import TrainConfig
from model import GPT, GPTConfig, load_checkpoint


def start(*args, cwd=ROOT, torchrun=False):
    """train.py (or torchrun with 2 CPU processes) in its own session, so that a signal can go to the whole group as
    a terminal's Ctrl-C does."""
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    return subprocess.Popen([sys.executable, *launch, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def evaluations(out):
    try:
        with open(out / "log.jsonl") as f:
            return [r["iter"] for r in map(json.loads, f) if "val_loss" in r]
    except (OSError, ValueError):
        return []


def said(stderr, start=("error", "stopped")):
    """The lines of ours on stderr (the progress bar writes there too)."""
    return [line for line in stderr.splitlines() if line.startswith(start)]


def test_help_shows_each_knobs_comment_type_and_default():
    out = run_script(ROOT / "train.py", "--help")
    assert out.returncode == 0 and out.stderr == ""
    def flat(text):  # argparse wraps lines, also after a hyphen
        return re.sub(r"-\s+", "-", " ".join(text.split()))
    text = flat(out.stdout)
    for cls, file in ((TrainConfig, "configurator.py"), (GPTConfig, "model.py")):
        source = (ROOT / file).read_text().splitlines()
        for f in dataclasses.fields(cls):  # the comment, read here with a plain regex on the field's line
            comment = next(m[1] for line in source if (m := re.match(rf"\s+{f.name}: \w+ = .*?  # (.*)$", line)))
            kind = type(f.default).__name__.upper()
            assert flat(f"--{f.name} {kind} {comment} (default {f.default!r})") in text, f.name


def test_ctrl_c_and_sigterm_say_where_they_stopped_and_the_resume_command_continues(data_dir, tmp_path):
    out = tmp_path / "out"
    run = start(ROOT / "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=100000",
                "--eval_interval=20")
    wait_for(lambda: (out / "ckpt.pt").exists())
    os.killpg(run.pid, signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    line, = said(stderr)
    step, saved, command = re.fullmatch(rf"stopped by SIGINT at step (\d+); {out}/ckpt.pt holds step (\d+); "
                                        r"resume with: (python .*)", line).groups()
    assert int(saved) == load_checkpoint(str(out / "ckpt.pt"))["iter_num"] <= int(step)
    assert int(saved) in evaluations(out)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "log.jsonl", "train.lock"]  # nothing half-written
    assert_lock_free(out)

    resumed = start(*shlex.split(command)[1:])  # as printed, with this interpreter
    lines = []
    wait_for(lambda: lines.append(resumed.stdout.readline()) or lines[-1].startswith("resuming"))
    assert lines[-1] == f"resuming {out}/ckpt.pt at step {saved} of 100000\n"
    resumed.send_signal(signal.SIGTERM)
    stdout, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert re.fullmatch(r"stopped by SIGTERM (during setup|at step \d+); .*ckpt.pt holds step \d+; resume with: .*",
                        said(stderr)[0]) and len(said(stderr)) == 1
    assert_lock_free(out)


def assert_lock_free(out):
    """The lock file stays (unlinking a locked file would let two runs in), but nobody may hold it."""
    if (out / "train.lock").exists():
        with open(out / "train.lock") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if the stopped run kept it


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_of_a_finished_run_says_so_and_changes_nothing(data_dir, tmp_path, capsys):
    args = [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=4", "--eval_interval=2"]
    assert train.main(args) == 0
    before = {p.name: sha256(p) for p in tmp_path.iterdir()}
    capsys.readouterr()
    assert train.main([*args, "--init_from=resume"]) == 0  # done is not an error: a requeued job exits cleanly
    stdout, stderr = capsys.readouterr()
    assert stdout.splitlines()[-1] == f"{tmp_path}/ckpt.pt is already at max_iters=4: raise --max_iters to train on"
    assert stderr == "" and {p.name: sha256(p) for p in tmp_path.iterdir()} == before


def test_a_config_too_big_for_a_cpu_says_so_first_and_ctrl_c_in_setup_leaves_nothing(tmp_path):
    data = make_dataset(tmp_path / "data", n_val=5000)  # val must hold a 4096-token window
    out = tmp_path / "out"
    run = start(ROOT / "train.py", ROOT / "config/dense_0.5b.py", f"--data_dir={data}", f"--out_dir={out}",
                "--device=cpu")
    first, notice = run.stdout.readline(), run.stdout.readline()  # before the 1.5 GB of weights are initialised
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=120)
    with torch.device("meta"):  # the dataset's 60 ids padded to 64
        params = GPT(GPTConfig(**train.parse_args([str(ROOT / "config/dense_0.5b.py")])[1], vocab_size=64))
    assert first.startswith(f"{params.num_params() / 1e6:.2f}M parameters") and "on 1 x cpu" in first
    assert re.match(r"notice: at least [\d.]+ (s|min|h|days) per step here .* for max_iters=20000: this config "
                    "wants", notice)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert re.fullmatch(r"stopped by SIGINT (during setup|at step 0); nothing saved yet; start again with the same "
                        "command", said(stderr)[0]) and len(said(stderr)) == 1
    assert "ckpt.pt" not in (os.listdir(out) if out.exists() else [])
    assert_lock_free(out)


def test_a_model_beyond_the_machines_memory_is_refused_with_one_line(data_dir, tmp_path):
    big = ["--n_layer=64", "--n_embd=8192", "--n_head=64"]
    out = run_script(ROOT / "train.py", *TINY, *big, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    with torch.device("meta"):
        params = GPT(GPTConfig(**train.parse_args([*TINY, *big])[1], vocab_size=64)).num_params()
    assert out.returncode == 2 and out.stderr.startswith(
        f"error: {params / 1e9:.2f}B parameters need at least {16 * params / 2**30:.1f} GiB per process")
    assert len(out.stderr.splitlines()) == 1 and "--fsdp=true" in out.stderr and not (tmp_path / "out").exists()


# --- torchrun with 2 CPU processes; each rank runs in its own folder, as if on its own node
NODE_WRAPPER = """import os, runpy, sys
os.chdir(os.path.join(sys.argv.pop(1), "node" + os.environ["RANK"]))  # this rank's "node": its own files
sys.path.insert(0, {root!r})
sys.argv[0] = os.path.join({root!r}, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def two_nodes(tmp_path, data_dir, *args):
    """torchrun of train.py where rank r sees tmp_path/node<r> as its working directory (node0 has the data)."""
    wrapper = tmp_path / "as_two_nodes.py"
    wrapper.write_text(NODE_WRAPPER.format(root=str(ROOT)))
    for node in ("node0", "node1"):
        (tmp_path / node).mkdir(exist_ok=True)
    if not (tmp_path / "node0/data").exists():
        os.symlink(data_dir, tmp_path / "node0/data")
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", wrapper, tmp_path, *TINY,
                      "--data_dir=data", "--out_dir=out", *args)


def test_a_check_one_rank_fails_ends_every_rank_with_its_line(data_dir, tmp_path):
    missing = two_nodes(tmp_path, data_dir)  # node1 has no data
    os.symlink(data_dir, tmp_path / "node1/data")
    assert train.main([*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'node0/out'}", "--max_iters=2"]) == 0
    resumed = two_nodes(tmp_path, data_dir, "--init_from=resume", "--max_iters=4")  # node1 has no checkpoint
    for run, why in ((missing, "no dataset in data"), (resumed, "init_from=resume but out/ckpt.pt does not exist")):
        line, = said(run.stderr)  # once: both ranks run on this one "node"
        assert line.startswith(f"error: rank 1 on {socket.gethostname()}: {why}"), run.stderr[-3000:]
        assert len(re.findall(r"exitcode\s*: 2 ", run.stderr)) == 2  # torchrun's report: both ranks ended with 2
        assert 'train.py", line' not in run.stderr and "Connection closed" not in run.stderr
    assert not (tmp_path / "node1/out/ckpt.pt").exists()


def test_ctrl_c_under_torchrun_stops_every_rank_with_one_line(data_dir, tmp_path):
    out = tmp_path / "out"
    run = start(ROOT / "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=100000",
                "--eval_interval=20", torchrun=True)
    wait_for(lambda: (out / "ckpt.pt").exists())
    os.killpg(run.pid, signal.SIGINT)  # torchrun and both ranks, as a terminal's Ctrl-C
    stdout, stderr = run.communicate(timeout=120)
    line, = said(stderr)
    saved = re.fullmatch(r"stopped by SIGINT at step \d+; .*/ckpt.pt holds step (\d+); resume with: torchrun "
                         r"--standalone --nproc_per_node=2 train.py .* --init_from=resume", line)[1]
    assert int(saved) == load_checkpoint(str(out / "ckpt.pt"))["iter_num"]
    assert 'train.py", line' not in stderr and "Connection closed" not in stderr  # torchrun reports only itself
    assert "broadcast_buffers" not in stderr  # torch 2.13's FutureWarning, once per process, is not triggered
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "log.jsonl", "train.lock"]
    assert_lock_free(out)
