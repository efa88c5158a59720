"""
NTP then NITP on one GPU in about ten minutes, offline: corpus, two runs, curves, verdict.

    python -m experiments.gpu_nitp --tiktoken_file=gpt2.tiktoken          # one H100/H200, ~9 minutes
    python -m experiments.gpu_nitp --tiktoken_file=gpt2.tiktoken --max_iters=1000 --n_layer=6
    python -m experiments.gpu_nitp --smoke                                # CPU, tiny, byte tokens, < 1 minute

1. Corpus: the .py files of this Python (the standard library and site-packages, which run to
   hundreds of megabytes on a machine with torch), in a fixed pseudo-random order, capped at
   --corpus_mb; files over 1 MB (generated tables) are left out. Tokenised with GPT-2 BPE from the
   --tiktoken_file (tokenizer.py's get_tokenizer, no network) by one process per CPU, into
   <out>/data/<name>/ in prepare_data.py's format (eot before every file; every 100th file of that
   order is a validation document, ~1%). Reused when it exists with the same recipe.
2. Training: `python train.py` twice, NTP (--nitp_weight=0) and then NITP (the paper's defaults), with
   the same seed, hence the same initial trunk and the same batches, bf16 and torch.compile on CUDA.
3. At every evaluation (train.py logs val loss, erank and mean_cos of the final states) the checkpoint
   is probed from here (experiments/probe.py: per-layer geometry, NITP cosine, and the retrieval probe,
   a proxy for the paper's embedding evaluation, not MTEB); step 0 is the same initial model, rebuilt.
   <out>/gpu_nitp.json and <out>/gpu_nitp.png (val loss, erank, mean cos, recall@1: NTP vs NITP) are
   rewritten after every evaluation, so a run stopped early still leaves its figures; the per-layer
   erank and mean cosine of every probed step are in the JSON too. train.py also scores the downstream
   tasks at every evaluation (tasks.py: the corpus's own task, and the public tasks whose files are in
   data/tasks/), so the table shows accuracy next to the loss: the paper's question.
4. The end: a summary table (printed, and in <out>/gpu_nitp.md), and whether NTP reached the paper's
   regime in the budget (spec, "What NITP is claimed to change": effective rank of the last states
   falling, pairwise cosine rising), judged over the second half of the run.

Sizing, without a GPU to measure it on: an H100/H200 SXM peaks at ~989 TFLOP/s dense bf16 (~790
measured on an 8192^3 matmul); we assume a compiled model of this size sustains 25% of the peak on
train.py's count of 6 x parameters per token, 2.5e14 FLOP/s. The default model (8 layers, d=512, 8
heads, context 1024, 64 sequences = 65,536 tokens per step, GPT-2 vocabulary: 80M parameters, 26M of
them the embedding table; 3.3e8 FLOPs per token with the NITP head) then takes ~86 ms a step, and
max_iters is sized to TRAIN_SECONDS = 150 s of training per run: 1,700 steps, 111M tokens, leaving
each run ~90 s for start-up, two compilations (train.py evaluates through the compiled model too) and
evaluation. Timeline: ~20 s for the corpus, ~4 minutes per run, ~9 minutes in all. Given
--n_layer/--n_embd/--n_head/--batch_size/--block_size, the steps are re-sized to the same budget;
--max_iters overrides that. The measured ms/step is printed early in the NTP run.
"""
import hashlib
import json
import math
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import sysconfig
import time
from contextlib import nullcontext

import numpy as np
import torch

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_data
from dataset import DatasetError, load_split, read_meta
from experiments import probe
from experiments.run_experiments import default_tasks, read_records
from model import GPT, GPTConfig, flops_per_token, load_checkpoint
from tokenizer import TokenizerError, get_tokenizer
from configurator import ArgumentParser, UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSUMED_FLOPS = 2.5e14  # sustained FLOP/s on one H100/H200 (25% of the bf16 peak), see the docstring
TRAIN_SECONDS = 150  # training time per run that max_iters is sized to
MAX_FILE_BYTES = 1 << 20  # larger .py files are mostly generated tables
GPU = dict(n_layer=8, n_embd=512, n_head=8, block_size=1024, batch_size=64, corpus_mb=400, probe_docs=256,
           probe_tokens=8192)
SMOKE = dict(n_layer=2, n_embd=32, n_head=2, block_size=64, batch_size=8, corpus_mb=1, probe_docs=16,
             probe_tokens=512, max_iters=6)


# ----------------------------------------------------------------------------------------------
# the corpus: this Python's own source files, tokenised in parallel

def python_sources(max_bytes):
    """(roots, [(path, size)]): the .py files under the stdlib and site-packages, in a fixed order
    (by a hash of the path below its root, so that a cap samples every package), up to max_bytes."""
    paths = sysconfig.get_paths()
    roots = sorted({os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib") if os.path.isdir(paths[k])})
    found, seen = {}, set()
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            # site-packages lies inside the stdlib folder too: walk it once, as its own root
            subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "__pycache__"
                             and os.path.realpath(os.path.join(folder, d)) not in roots]
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except OSError:  # a dangling link
                    continue
                if stat.S_ISREG(st.st_mode) and 0 < st.st_size <= MAX_FILE_BYTES and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))  # a file linked under two names is read once
                    found[hashlib.sha1(os.path.relpath(path, root).encode()).hexdigest()] = (path, st.st_size)
    chosen, total = [], 0
    for key in sorted(found):
        if total >= max_bytes:
            break
        chosen.append(found[key])
        total += found[key][1]
    return roots, chosen


_tokenizer = None


def _init_worker(name, tiktoken_file):
    global _tokenizer
    _tokenizer = get_tokenizer(name, tiktoken_file)


def _encode_files(paths):
    """One worker task: the files' ids, each led by the end-of-text id -> (uint32 ids, input bytes)."""
    parts, size = [], 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        size += len(data)
        parts += [np.array([_tokenizer.eot_token], dtype=np.uint32),
                  _tokenizer.encode_array(data.decode("utf-8", errors="replace")).astype(np.uint32)]
    return np.concatenate(parts), size


def build_corpus(out_root, tokenizer, tiktoken_file, max_bytes, num_proc, val_every=100):
    """A dataset folder of this Python's sources in prepare_data.py's format -> (its path, meta)."""
    tok = get_tokenizer(tokenizer, tiktoken_file)  # raises TokenizerError for a bad file
    name = f"pysources_{tokenizer}"
    final = os.path.join(out_root, name)
    roots, files = python_sources(max_bytes)
    sha = None if tiktoken_file is None else hashlib.sha256(open(tiktoken_file, "rb").read()).hexdigest()
    recipe = {"source": "python sources (gpu_nitp.py)", "roots": roots, "files": len(files), "max_bytes": max_bytes,
              "tokenizer": tokenizer, "tiktoken_file_sha256": sha, "val_every": val_every}
    if os.path.isfile(os.path.join(final, "meta.json")):
        with open(os.path.join(final, "meta.json")) as f:
            meta = json.load(f)
        if meta.get("recipe") == recipe:
            return final, meta
    if len(files) < 2 * val_every:
        raise UsageError(f"only {len(files)} .py files found under {roots} (within --corpus_mb): too few to "
                         f"train on; raise --corpus_mb")
    # Every val_every-th file of the (pseudo-random) order is a validation document.
    split = {"val": [path for path, _ in files[::val_every]],
             "train": [path for i, (path, _) in enumerate(files) if i % val_every]}
    partial = final + ".partial"
    os.makedirs(partial, exist_ok=True)
    dtype = prepare_data.token_dtype(tok.vocab_size)
    counts, start, input_bytes, top = {}, time.time(), 0, 0
    # spawn, not fork: a worker forked from a process that has run torch or tiktoken's threads can inherit a
    # held lock and wait forever (seen once in the test suite)
    with multiprocessing.get_context("spawn").Pool(num_proc, initializer=_init_worker,
                                                   initargs=(tokenizer, tiktoken_file)) as pool:
        for s, paths in split.items():
            tasks = [paths[i:i + 32] for i in range(0, len(paths), 32)]  # ~0.5 MB of source per task
            with open(os.path.join(partial, f"{s}.bin"), "wb") as f:
                counts[s] = 0
                for ids, size in pool.imap(_encode_files, tasks):  # in order: the files stay in sequence
                    f.write(ids.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
                    counts[s] += len(ids)
                    input_bytes += size
                    top = max(top, int(ids.max()))
    meta = {"name": name, "tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token,
            "dtype": dtype, "max_token_id": top, "eot_placement": "before_each_document",
            "train_tokens": counts["train"], "val_tokens": counts["val"], "train_documents": len(split["train"]),
            "val_documents": len(split["val"]), "input_bytes": input_bytes,
            "seconds": round(time.time() - start, 1), "recipe": recipe}
    with open(os.path.join(partial, "meta.json"), "w") as f:  # last: marks the folder complete
        json.dump(meta, f, indent=2)
    if os.path.isdir(final):
        for leftover in os.listdir(final):
            os.remove(os.path.join(final, leftover))
        os.rmdir(final)
    os.replace(partial, final)
    return final, meta


# ----------------------------------------------------------------------------------------------
# sizing, verdict, outputs

def plan(args):
    """The model, batch and step count: args, or the GPU defaults sized to the budget."""
    base = SMOKE if args.smoke else GPU
    p = {k: getattr(args, k) if getattr(args, k, None) else v for k, v in base.items()}
    mcfg = GPTConfig(n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], block_size=p["block_size"],
                     vocab_size=50304)
    tokens_per_step = p["batch_size"] * p["block_size"]
    step_flops = flops_per_token(mcfg)["total"] * tokens_per_step  # NITP's, the larger of the two
    sized = max(100, int(TRAIN_SECONDS * ASSUMED_FLOPS / step_flops) // 100 * 100)
    p["max_iters"] = args.max_iters or p.get("max_iters") or sized
    p["eval_interval"] = max(1, p["max_iters"] // 10) if not args.smoke else 3
    p["tokens_per_step"], p["assumed_ms_per_step"] = tokens_per_step, 1000 * step_flops / ASSUMED_FLOPS
    return p


def train_args(p, data_dir, seed, smoke):
    args = [f"--data_dir={data_dir}", f"--seed={seed}", f"--max_iters={p['max_iters']}",
            f"--eval_interval={p['eval_interval']}", f"--n_layer={p['n_layer']}", f"--n_embd={p['n_embd']}",
            f"--n_head={p['n_head']}", f"--block_size={p['block_size']}", f"--batch_size={p['batch_size']}",
            f"--warmup_iters={max(2, p['max_iters'] // 20)}"]
    if smoke:
        return args + ["--device=cpu", "--eval_iters=2", "--log_interval=1", "--learning_rate=3e-3", "--min_lr=3e-4"]
    return args + ["--compile=true", "--eval_iters=10", "--log_interval=10", "--learning_rate=1e-3", "--min_lr=1e-4"]


def regime(evals):
    """Did the final states' geometry move the way the paper says NTP's does (erank falling, mean
    cosine rising)? Judged over the second half of the run: from the first evaluation at or past
    half the last step to the last one; "reached" needs erank down >= 2% and mean_cos up >= 0.01."""
    evals = [e for e in evals if "erank" in e]
    if len(evals) < 3:
        return None
    last = evals[-1]
    mid = next(e for e in evals if e["iter"] >= last["iter"] / 2)
    erank_change = last["erank"] / mid["erank"] - 1
    cos_change = last["mean_cos"] - mid["mean_cos"]
    return {"from_iter": mid["iter"], "to_iter": last["iter"], "erank": [mid["erank"], last["erank"]],
            "mean_cos": [mid["mean_cos"], last["mean_cos"]], "erank_change": erank_change, "cos_change": cos_change,
            "reached": erank_change <= -0.02 and cos_change >= 0.01}


def write_json(path, log):
    with open(path + ".tmp", "w") as f:
        json.dump(log, f, indent=2)
    os.replace(path + ".tmp", path)


PANELS = (("val_loss", "val loss"), ("erank", "effective rank, final states"),
          ("mean_cos", "mean pairwise cosine, final states"), ("recall_at_1", "retrieval recall@1 (proxy)"))


def plot(log, path):
    """The four curves, NTP vs NITP, from what the log holds so far. -> True if written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    for color, (name, run) in enumerate(log["runs"].items()):
        for ax, (key, title) in zip(axes, PANELS):
            points = sorted((int(i), e[key]) for i, e in run["evals"].items() if e.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=name, color=f"C{color}")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    chance = [r["evals"][i].get("chance_recall_at_1") for r in log["runs"].values() for i in r["evals"]]
    if any(chance):
        axes[3].axhline(next(c for c in chance if c), color="gray", linestyle=":", label="chance")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary(log):
    lines = ["| run | steps | tokens | wall s | ms/step | val_loss | val_nitp | erank | mean_cos | nitp_cos | recall@1 "
             "| MRR | own acc | tasks centred |", "|---|" + "---|" * 13]
    for name, run in log["runs"].items():
        if not run["evals"]:
            continue
        last = run["evals"][max(run["evals"], key=int)]
        probed = [run["evals"][i] for i in sorted(run["evals"], key=int) if "recall_at_1" in run["evals"][i]]
        pr = probed[-1] if probed else {}
        cells = [last.get("val_loss"), last.get("val_nitp"), last.get("erank"), last.get("mean_cos"),
                 pr.get("nitp_cos"), pr.get("recall_at_1"), pr.get("mrr"), last.get("task/own/acc"),
                 last.get("task/mean_centered")]
        lines.append(f"| {name} | {last['iter']} | {last['iter'] * log['plan']['tokens_per_step']:,} | "
                     f"{run.get('wall_s', 0):.0f} | {probe.fmt(run.get('ms_per_step'), '.0f')} | "
                     + " | ".join(probe.fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_text(log):
    ntp, nitp = (log["runs"].get(k, {}).get("regime") for k in ("ntp", "nitp"))
    if not ntp:
        return "NTP: too few evaluations to judge the paper's regime."
    word = "REACHED" if ntp["reached"] else "NOT reached"
    text = (f"NTP, steps {ntp['from_iter']} -> {ntp['to_iter']}: erank {ntp['erank'][0]:.2f} -> {ntp['erank'][1]:.2f} "
            f"({100 * ntp['erank_change']:+.1f}%), mean_cos {ntp['mean_cos'][0]:.4f} -> {ntp['mean_cos'][1]:.4f} "
            f"({ntp['cos_change']:+.4f}): the paper's regime (erank falling >= 2%, cosine rising >= 0.01) {word} "
            f"in this budget.")
    if nitp:
        text += (f"\nNITP over the same steps: erank {nitp['erank'][0]:.2f} -> {nitp['erank'][1]:.2f}, mean_cos "
                 f"{nitp['mean_cos'][0]:.4f} -> {nitp['mean_cos'][1]:.4f}.")
    return text


# ----------------------------------------------------------------------------------------------
# one training run, watched: every evaluation logged, every checkpoint probed

def probe_into(entry, model, val, eot, device, ctx, p):
    r = probe.probe_model(model, val, eot, device, ctx, n_docs=p["probe_docs"], n_tokens=p["probe_tokens"])
    entry.update(recall_at_1=r["retrieval"]["recall_at_1"], mrr=r["retrieval"]["mrr"],
                 chance_recall_at_1=r["retrieval"]["chance"]["recall_at_1"], probe_docs=r["retrieval"]["n_docs"],
                 nitp_cos=r["nitp_cos"], erank_by_layer=[layer["erank"] for layer in r["layers"]],
                 mean_cos_by_layer=[layer["mean_cos"] for layer in r["layers"]])


def watch_run(name, argv, out, log, p, data, device, say):
    """Run train.py into out/<name>, probing each new checkpoint as it appears; returns when it ends."""
    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    for stale in ("log.jsonl", "ckpt.pt", "config.json"):  # a fresh run: train.py appends to an old log
        if os.path.exists(os.path.join(run_dir, stale)):
            os.remove(os.path.join(run_dir, stale))
    run = log["runs"][name] = {"argv": argv, "evals": {}}
    val, eot = data
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    json_path, png_path = os.path.join(out, "gpu_nitp.json"), os.path.join(out, "gpu_nitp.png")
    start, ckpt_mtime, steps_seen = time.time(), None, {}
    with open(os.path.join(run_dir, "stdout.txt"), "w") as stdout:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={run_dir}", *argv],
                                stdout=stdout, stderr=subprocess.STDOUT)
        try:
            while True:
                ended = proc.poll() is not None
                changed = False
                for r in read_records(run_dir):
                    if "val_loss" in r and str(r["iter"]) not in run["evals"]:
                        run["evals"][str(r["iter"])] = {**r, "t": round(time.time() - start, 1)}
                        changed = True
                        say(f"{name} step {r['iter']}: " + " ".join(f"{k} {v:.4f}" for k, v in r.items()
                                                                    if k != "iter"))
                    elif "loss" in r and r["iter"] not in steps_seen:
                        steps_seen[r["iter"]] = time.time()
                if "0" in run["evals"] and "probed" not in run["evals"]["0"]:
                    # step 0 has no checkpoint: rebuild the initial weights as train.py makes them (seed, then GPT)
                    with open(os.path.join(run_dir, "config.json")) as f:  # written before step 0
                        saved = json.load(f)
                    run["evals"]["0"]["probed"] = "model" in saved and "train" in saved
                    if run["evals"]["0"]["probed"]:
                        torch.manual_seed(saved["train"]["seed"])
                        model = GPT(GPTConfig(**saved["model"])).to(device).eval()
                        probe_into(run["evals"]["0"], model, val, eot, device, ctx, p)
                    changed = True
                ckpt_path = os.path.join(run_dir, "ckpt.pt")
                if os.path.exists(ckpt_path) and os.path.getmtime(ckpt_path) != ckpt_mtime:
                    ckpt_mtime = os.path.getmtime(ckpt_path)
                    ckpt = load_checkpoint(ckpt_path)
                    entry = run["evals"].setdefault(str(ckpt["iter_num"]),
                                                    {"iter": ckpt["iter_num"], **(ckpt.get("val") or {})})
                    probe_into(entry, probe.load_model(ckpt, device), val, eot, device, ctx, p)
                    say(f"{name} step {ckpt['iter_num']}: recall@1 {entry['recall_at_1']:.3f} mrr {entry['mrr']:.3f} "
                        f"(chance {entry['chance_recall_at_1']:.3f}, {entry['probe_docs']} docs)")
                    changed = True
                timed = sorted(steps_seen.items())[1:]  # the first logged steps include compilation
                if len(timed) >= 3 and timed[-1][1] - timed[0][1] > 5 and "ms_per_step" not in run:
                    (i0, t0), (i1, t1) = timed[0], timed[-1]
                    run["ms_per_step"] = 1000 * (t1 - t0) / (i1 - i0)
                    left = (p["max_iters"] - i1) * run["ms_per_step"] / 1000
                    say(f"{name}: {run['ms_per_step']:.0f} ms/step measured ({p['assumed_ms_per_step']:.0f} assumed): "
                        f"this run's training ends in ~{left:.0f} s; --max_iters=N resizes both runs")
                if changed:
                    run["wall_s"] = time.time() - start
                    write_json(json_path, log)
                    plot(log, png_path)
                if ended:
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:  # interrupted here: do not leave the GPU busy
                proc.terminate()
                proc.wait()
    run["wall_s"] = time.time() - start
    run["regime"] = regime([run["evals"][i] for i in sorted(run["evals"], key=int)])
    write_json(json_path, log)
    plot(log, png_path)
    if proc.returncode != 0:
        with open(os.path.join(run_dir, "stdout.txt")) as f:
            tail = f.read()[-1500:]
        raise RuntimeError(f"train.py for {name} failed (exit {proc.returncode}); the end of "
                           f"{run_dir}/stdout.txt:\n{tail}")


def stop(signum, frame):
    """SIGTERM (a timeout) unwinds like Ctrl-C, so the training child is stopped too."""
    raise KeyboardInterrupt


def main(argv):
    p_ = ArgumentParser(description=__doc__.strip().splitlines()[0])  # a usage error: one line, exit 2
    p_.add_argument("--tiktoken_file", default=None, help="GPT-2 ranks (gpt2.tiktoken); required unless --smoke")
    p_.add_argument("--out", default="out-gpu_nitp", help="folder for the data, the runs, the JSON and the PNG")
    p_.add_argument("--smoke", action="store_true", help="CPU, tiny corpus and model, a few steps")
    p_.add_argument("--seed", type=int, default=1337)
    p_.add_argument("--num_proc", type=int, default=prepare_data.default_num_proc(), help="tokenising processes")
    for k in ("n_layer", "n_embd", "n_head", "block_size", "batch_size", "max_iters", "corpus_mb"):
        p_.add_argument(f"--{k}", type=int, default=0, help=f"default {GPU.get(k, 'sized to the budget')} "
                        f"(smoke {SMOKE.get(k, '-')})")
    say = lambda text: print(text, flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    args = None
    try:
        args = p_.parse_args(argv)
        if not args.smoke and not args.tiktoken_file:
            raise UsageError("pass --tiktoken_file=PATH to GPT-2's gpt2.tiktoken (see README), or --smoke")
        tokenizer = "gpt2" if args.tiktoken_file else "byte"  # byte: the smoke path only
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        if not args.smoke and device.type != "cuda":
            say("notice: no CUDA GPU here; this runs, slowly, on the CPU (use --smoke for the quick path)")
        p = plan(args)
        os.makedirs(args.out, exist_ok=True)
        t0 = time.time()  # the corpus first: its worker processes are forked before CUDA starts here
        data_dir, meta = build_corpus(os.path.join(args.out, "data"), tokenizer, args.tiktoken_file,
                                      p["corpus_mb"] * 10 ** 6, args.num_proc, val_every=5 if args.smoke else 100)
        log = {"plan": p, "assumption": f"{ASSUMED_FLOPS:.2e} FLOP/s sustained, {TRAIN_SECONDS} s of training per run",
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "corpus": None, "runs": {}}
        log["corpus"] = {k: meta[k] for k in ("name", "tokenizer", "train_tokens", "val_tokens", "train_documents",
                                              "val_documents", "input_bytes")}
        log["corpus"]["seconds"] = round(time.time() - t0, 1)
        say(f"corpus {data_dir}: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val {tokenizer} tokens from "
            f"{meta['input_bytes'] / 1e6:.0f} MB of .py files, ready in {log['corpus']['seconds']} s")
        mcfg = GPTConfig(n_layer=p["n_layer"], n_embd=p["n_embd"], n_head=p["n_head"], block_size=p["block_size"],
                         vocab_size=64 * math.ceil(meta["vocab_size"] / 64))
        tokens = p["max_iters"] * p["tokens_per_step"]
        say(f"model {p['n_layer']} x {p['n_embd']} ({sum(x.numel() for x in GPT(mcfg).parameters()) / 1e6:.1f}M "
            f"parameters with the head), {p['max_iters']} steps x {p['tokens_per_step']:,} tokens = {tokens:,} "
            f"tokens per run ({tokens / meta['train_tokens']:.2f} epochs); sized for ~{p['assumed_ms_per_step']:.0f} "
            f"ms/step at {ASSUMED_FLOPS:.1e} FLOP/s")
        val_meta = read_meta(data_dir)
        data = (load_split(data_dir, "val", val_meta), val_meta["eot_token"])
        common = train_args(p, data_dir, args.seed, args.smoke) + [f"--eval_tasks={default_tasks()}"] + (
            [f"--tiktoken_file={os.path.abspath(args.tiktoken_file)}"] if args.tiktoken_file else [])
        for name, extra in (("ntp", ["--nitp_weight=0"]), ("nitp", [])):
            watch_run(name, common + extra, args.out, log, p, data, device, say)
    except (UsageError, DatasetError, prepare_data.PrepareError, TokenizerError, probe.ProbeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; what was measured so far is in {args.out if args else '?'}/gpu_nitp.json and .png",
              file=sys.stderr)
        return 130
    table = summary(log)
    print("\n" + table + "\n" + verdict_text(log))
    log["verdict"] = verdict_text(log)
    write_json(os.path.join(args.out, "gpu_nitp.json"), log)
    with open(os.path.join(args.out, "gpu_nitp.md"), "w") as f:
        f.write(table + "\n" + log["verdict"] + "\n")
    print(f"wrote {args.out}/gpu_nitp.json, gpu_nitp.md" + (", gpu_nitp.png" if plot(log, os.path.join(
        args.out, "gpu_nitp.png")) else " (no PNG: pip install matplotlib)"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
