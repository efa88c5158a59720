"""
NTP against NITP and the paper's ablations: same data, same seeds, several seeds, one table.

    python -m experiments.run_experiments                                   # ntp and nitp, 3 seeds, train.py defaults
    python -m experiments.run_experiments --variants=ntp,nitp,same_position,no_stop_grad --seeds=3 -- --max_iters=300
    python -m experiments.run_experiments --variants=all --out=experiments/ablation -- config/cpu_tiny.py

Each (variant, seed) is one `python train.py` run into <out>/<variant>_s<seed>_<hash>/, where <hash>
is a short hash of the run's effective settings (the variant's, the seed, --max_iters and every
argument after `--`, config files read): changing any of them starts new runs, and the same ones
reuse the finished runs. A run is finished when its log holds the evaluation at its own max_iters;
an interrupted one resumes from its checkpoint; one that train.py stops for a non-finite loss (exit 3,
as the paper's MSE ablation diverged) is counted as diverged in the table and not repeated. Arguments after `--` go to every run; the variant's
own settings and the seed come after them, so they win. The variants are the rows of the paper's
ablation table; nitp (the paper's defaults) is also its "target at ~20% of depth" and "lambda 1.0" row.

Then the probe (experiments/probe.py) runs on each final checkpoint (cached in the run folder), and
the runner writes <out>/results.md, the final evaluation as mean ± std over seeds with the probe's
retrieval recall@1 and MRR (a proxy for the paper's embedding evaluation, not MTEB) and the downstream
task scores (tasks.py: every run scores the dataset's own task, and the public tasks whose files are
in data/tasks/, at every evaluation; `-- --eval_tasks=...` replaces the list), and, when
matplotlib is installed, <out>/curves.png (val loss, auxiliary loss, effective rank, mean cosine and
the own task's acc against iteration). A progress bar counts training steps over the whole experiment.
"""
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tasks
import configurator
import train
from experiments import probe
from model import CheckpointError, GPTConfig, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each variant is a list of train.py overrides; the names follow the paper's ablation table (spec, "Defaults").
VARIANTS = {
    "ntp": ["--nitp_weight=0"],  # next-token prediction only
    "nitp": [],  # the method with the paper's defaults (target ~20% of depth, lambda 1.0, cosine)
    "same_position": ["--nitp_shift=0"],  # temporal shift t -> t
    "no_stop_grad": ["--nitp_stop_grad=false"],  # gradient flows into the target
    "no_head": ["--nitp_proj=none"],  # compare h_t with the target directly
    "layer0": ["--nitp_layer=0"],  # the embedding output as the target
    # nitp is also the ablation's "target at ~20% of depth" and "lambda 1.0" row
    "layer50": [],  # target at ~50% / ~80% of depth: --nitp_layer is set from n_layer (DEPTHS)
    "layer80": [],
    "lambda0.1": ["--nitp_weight=0.1"],
    "lambda0.3": ["--nitp_weight=0.3"],
    "mse": ["--nitp_loss=mse"],
    "smooth_l1": ["--nitp_loss=smooth_l1"],
    "generic_cosine": ["--nitp_loss=generic_cosine"],  # penalise pairwise cosine, no target (logs generic_cos)
    "late_start": ["--nitp_start_iter=200"],  # NITP switched on later
}
DEPTHS = {"layer50": 0.5, "layer80": 0.8}
PANELS = (("val_loss",), ("val_nitp", "val_generic_cos"), ("erank",), ("mean_cos",), ("task/own/acc",))  # curves.png
TASK_METRICS = ("acc", "acc_norm", "centered", "mean_centered")  # the task scores in the table (tasks.log_record)


def default_tasks(cache=tasks.CACHE):
    """The downstream tasks every run scores: the dataset's own task, and the public ones whose files are present."""
    present = [n for n, (file, *_) in tasks.PUBLIC.items() if os.path.isfile(os.path.join(cache, n, file))]
    return ",".join(["own"] + present)


def run_args(variant, seed, max_iters, extra):
    """train.py's arguments for one run (without --out_dir; max_iters 0 = not set here) and its
    effective (TrainConfig, model overrides). Raises train.UsageError for arguments train.py would refuse.
    --eval_tasks comes first, so that one after `--` wins."""
    argv = [f"--eval_tasks={default_tasks()}", *([f"--max_iters={max_iters}"] if max_iters else []), *extra,
            *VARIANTS[variant], f"--seed={seed}"]
    if variant in DEPTHS:
        n_layer = GPTConfig(**train.parse_args(argv)[1]).n_layer
        argv.append(f"--nitp_layer={min(n_layer - 1, max(1, round(DEPTHS[variant] * n_layer)))}")
    cfg, model_args = train.parse_args(argv)
    return argv, cfg, model_args


def settings_hash(cfg, model_args):
    """8 hex digits of the effective settings: the same run however its arguments are spelled. Only
    the values that differ from train.py's defaults count, so a knob added to train.py later (with
    a default) does not invalidate the finished runs."""
    default = dataclasses.asdict(configurator.TrainConfig())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items()
                if k not in ("out_dir", "init_from") and v != default[k]}
    blob = json.dumps({"train": settings, "model": model_args}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def read_records(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass  # a line cut short by a kill
    return records


def evaluations(out_dir):
    return [r for r in read_records(out_dir) if "val_loss" in r]


def is_finished(out_dir, max_iters):
    """Whether the run in out_dir reached its own max_iters (its final evaluation is logged), or
    diverged: train.py stopped it for a non-finite loss, which a rerun would only repeat."""
    done = any(r["iter"] == max_iters for r in evaluations(out_dir))
    return done and os.path.isfile(os.path.join(out_dir, "ckpt.pt")) or diverged(out_dir)


def diverged(out_dir):
    return os.path.isfile(os.path.join(out_dir, "diverged.json"))


def steps_done(out_dir):
    return max([r["iter"] for r in read_records(out_dir) if "loss" in r], default=0)


def run_one(out_dir, args, bar, done_before):
    """One train.py run in a subprocess (its output to out_dir/stdout.txt), advancing the bar;
    returns its exit code. It runs in this process's folder, so relative paths mean the same to it
    and to the probe."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stdout.txt"), "a") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out_dir}", *args],
                                stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(1.0)
            done = done_before + steps_done(out_dir)
            if done != bar.n:
                bar.update(done - bar.n)
    return proc.returncode


def probe_run(job, n_docs):
    """The probe's results for a finished run, cached in its folder as probe.json; {"error": why}
    when the probe cannot run on its data (llm.c shards, no documents long enough, ...)."""
    path = os.path.join(job["out_dir"], "probe.json")
    key = {"iter": job["cfg"].max_iters, "docs": n_docs}
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached
    try:
        ckpt = load_checkpoint(os.path.join(job["out_dir"], "ckpt.pt"))
        _, meta, val = probe.dataset_of(ckpt, job["out_dir"], "")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        result = probe.probe_model(probe.load_model(ckpt, device), val, meta["eot_token"], device, ctx, n_docs=n_docs)
    except (probe.ProbeError, CheckpointError) as e:
        print(f"notice: no probe for {job['out_dir']}: {e}")
        result = {"error": str(e)}
    result["key"] = key
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def final_metrics(job, probed):
    """The last evaluation of a run, with the probe's recall@1 and MRR when it has them."""
    final = dict(evaluations(job["out_dir"])[-1])
    if probed and "retrieval" in probed:
        final.update(recall_at_1=probed["retrieval"]["recall_at_1"], mrr=probed["retrieval"]["mrr"],
                     probe_docs=probed["retrieval"]["n_docs"])
    return final


def summarise(rows):
    """rows: [(variant, [final metrics of each finished seed], number of diverged seeds)] -> a
    markdown table, mean ± std over the finished seeds (std needs 2+). Auxiliary-loss columns appear
    only where some variant logs them."""
    present = {m for _, finals, _ in rows for f in finals for m in f}
    scored = sorted(m for m in present if m.startswith("task/") and m.rsplit("/", 1)[1] in TASK_METRICS)
    if len({m.split("/")[1] for m in scored}) <= 2:  # one task: its mean centred score is its centred score
        scored = [m for m in scored if m != "task/mean_centered"]
    metrics = [m for m in ("val_loss", "val_nitp", "val_generic_cos", "erank", "mean_cos", *scored, "recall_at_1",
                           "mrr") if m in present or m in ("val_loss", "val_nitp", "erank", "mean_cos")]
    lines = ["| variant | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for v, finals, n_diverged in rows:
        cells = []
        for m in metrics:
            values = [f[m] for f in finals if m in f]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        seeds = f"{len(finals)}" + (f" (+{n_diverged} diverged)" if n_diverged else "")
        lines.append(f"| {v} | {seeds} | " + " | ".join(cells) + " |")
    note = ""
    if "recall_at_1" in metrics:
        sizes = sorted({f["probe_docs"] for _, finals, _ in rows for f in finals if "probe_docs" in f})
        chance = ", ".join(f"N={n}: {probe.chance_scores(n)['recall_at_1']:.4f}, {probe.chance_scores(n)['mrr']:.4f}"
                           for n in sizes)
        note = ("\nrecall_at_1, mrr: the retrieval probe of experiments/probe.py, a proxy for the paper's embedding "
                "evaluation (not MTEB): a held-out document's first half finds its second half among N by cosine of "
                f"mean-pooled final states (chance recall@1 and MRR for {chance}).\n")
    return "\n".join(lines) + "\n" + note


def plot(runs_by_variant, path):
    """runs_by_variant: [(variant, [evaluation records of each seed])]. -> True if written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed, so no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for color, (v, runs) in enumerate(runs_by_variant):  # one colour per variant in every panel
        for ax, keys in zip(axes, PANELS):
            m = next((k for k in keys if k in runs[0][-1]), None)
            if m is None:
                continue
            iters = [r["iter"] for r in runs[0] if m in r]  # tasks may be scored at fewer evaluations
            per_iter = list(zip(*[[r[m] for r in run if m in r] for run in runs]))  # (n_evals, n_seeds)
            ax.plot(iters, [statistics.mean(x) for x in per_iter], label=v, color=f"C{color % 10}",
                    linestyle="--" if m == "val_generic_cos" else "-")
            ax.fill_between(iters, [min(x) for x in per_iter], [max(x) for x in per_iter], alpha=0.2,
                            color=f"C{color % 10}")
    for ax, keys in zip(axes, PANELS):
        ax.set_title(" / ".join(keys))
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean over {len(runs_by_variant[0][1])} seeds; band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv):
    """Run the experiment; returns the exit code (2: bad input, told in one line)."""
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = configurator.ArgumentParser(description=__doc__.strip().splitlines()[0])  # a usage error: one line, exit 2
    p.add_argument("--variants", default="ntp,nitp",
                   help=f"comma-separated, or all; from: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N, the same for every variant")
    p.add_argument("--out", default="out-experiments", help="folder for the runs, the table and the plot")
    p.add_argument("--max_iters", type=int, default=0,
                   help="training steps per run; 0 = train.py's default or the config file's (one after -- wins)")
    p.add_argument("--probe_docs", type=int, default=256, help="documents for the retrieval probe; 0 = no probe")
    try:
        args = p.parse_args(argv)
        variants = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise train.UsageError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)} (or all)")
        if args.seeds < 1 or args.probe_docs == 1 or args.probe_docs < 0:
            raise train.UsageError(f"--seeds={args.seeds} must be >= 1 and --probe_docs={args.probe_docs} 0 or >= 2")
        jobs = []
        for v in variants:
            for s in range(1, args.seeds + 1):
                run_argv, cfg, model_args = run_args(v, s, args.max_iters, extra)
                out_dir = os.path.abspath(os.path.join(args.out, f"{v}_s{s}_{settings_hash(cfg, model_args)}"))
                jobs.append({"variant": v, "seed": s, "argv": run_argv, "cfg": cfg, "out_dir": out_dir})
    except train.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=sum(j["cfg"].max_iters for j in jobs), desc="experiment", unit="step", dynamic_ncols=True)
    done_before = 0
    for job in jobs:
        out_dir, max_iters = job["out_dir"], job["cfg"].max_iters
        if not is_finished(out_dir, max_iters):
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "args.json"), "w") as f:  # for a reader: what this folder holds
                json.dump({"variant": job["variant"], "seed": job["seed"], "argv": job["argv"]}, f, indent=2)
            resume = os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
            if not resume and os.path.exists(os.path.join(out_dir, "log.jsonl")):
                os.remove(os.path.join(out_dir, "log.jsonl"))  # no checkpoint: start over, cleanly
            init = f"--init_from={'resume' if resume else 'scratch'}"
            code = run_one(out_dir, [*job["argv"], init], bar, done_before)
            if code == 3:  # train.py: a non-finite loss (the paper's MSE ablation diverged); the others go on
                with open(os.path.join(out_dir, "diverged.json"), "w") as f:
                    json.dump({"exit": code, "steps_done": steps_done(out_dir)}, f)
                tqdm.write(f"notice: {job['variant']} seed {job['seed']} diverged (non-finite loss); see "
                           f"{out_dir}/stdout.txt")
            elif code != 0:
                bar.close()
                print(f"error: run {out_dir} failed (exit {code}); see {out_dir}/stdout.txt", file=sys.stderr)
                return 1
        done_before += max_iters
        bar.update(done_before - bar.n)
    bar.close()
    rows, curves = [], []
    for v in variants:
        mine = [j for j in jobs if j["variant"] == v and not diverged(j["out_dir"])]
        probed = [probe_run(j, args.probe_docs) if args.probe_docs else None for j in mine]
        n_diverged = sum(j["variant"] == v for j in jobs) - len(mine)
        rows.append((v, [final_metrics(j, pr) for j, pr in zip(mine, probed)], n_diverged))
        if mine:
            curves.append((v, [evaluations(j["out_dir"]) for j in mine]))
    table = summarise(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    if curves and plot(curves, os.path.join(args.out, "curves.png")):
        print(f"wrote {os.path.join(args.out, 'results.md')} and {os.path.join(args.out, 'curves.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
