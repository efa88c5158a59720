"""
Shared test helpers. Being at the repository root, this file also puts the root on sys.path, so
tests in tests/ import model, train, nitp, prepare_data and sample as a user's script would.

    python -m pytest -q            # everything: test_nitp.py and tests/
"""
import json
import os
import subprocess
import sys
from pathlib import Path

# Inductor's pool of compile workers keeps both cores of a small machine busy for a while after
# each compile, slowing every later test; compiling in-process avoids that.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent
# The GPT-2 ranks are never committed: $NITP_GPT2_TIKTOKEN, else the copy next to the repository.
GPT2_FILE = Path(os.environ.get("NITP_GPT2_TIKTOKEN", ROOT.parent / "shared/tokenizers/gpt2.tiktoken"))
needs_gpt2 = pytest.mark.skipif(not GPT2_FILE.is_file(), reason=f"no GPT-2 ranks at {GPT2_FILE}; set "
                                "NITP_GPT2_TIKTOKEN=/path/to/gpt2.tiktoken to run the GPT-2 tests")

# A tiny model and run for train.py: each step takes milliseconds on a CPU.
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--warmup_iters=2", "--log_interval=1", "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu"]


def make_dataset(folder, n_train=20_000, n_val=2_000, vocab=60, train_ids=None, val_ids=None):
    """A dataset folder as prepare_data.py writes it. By default a learnable corpus: a repeated
    random 'sentence' with 5% noise; train_ids / val_ids give the token arrays instead."""
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, vocab, size=97)

    def tokens(n):
        seq = np.resize(pattern, n).astype(np.uint16)
        noise = rng.random(n) < 0.05
        seq[noise] = rng.integers(0, vocab, size=noise.sum())
        return seq
    train = np.asarray(tokens(n_train) if train_ids is None else train_ids, dtype=np.uint16)
    val = np.asarray(tokens(n_val) if val_ids is None else val_ids, dtype=np.uint16)
    os.makedirs(folder, exist_ok=True)
    train.tofile(os.path.join(folder, "train.bin"))
    val.tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"tokenizer": "byte", "vocab_size": vocab, "dtype": "uint16", "train_tokens": len(train),
                   "val_tokens": len(val), "eot_token": vocab - 1}, f)
    return str(folder)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


def read_log(out_dir):
    """(training records, evaluation records) of out_dir/log.jsonl."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def run_script(*args, cwd=ROOT, timeout=300, env=None):
    """Run `python *args` as a user would, under a timeout so that a hang fails instead of stalling."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def torchrun(*args, nproc=2, timeout=300):
    """train.py under torchrun with 2 CPU processes (gloo); asserts success, showing the child's stderr."""
    out = run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                     ROOT / "train.py", *TINY, *args, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out
