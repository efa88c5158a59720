"""
NTP against NITP (and any of the paper's ablations), same data, same seeds, several seeds.

    python run_experiments.py                                  # ntp and nitp, 3 seeds, train.py defaults
    python run_experiments.py --variants=ntp,nitp,same_position,no_stop_grad --seeds=3 -- --max_iters=300

Each (variant, seed) is one `python train.py` run into experiments/<variant>_s<seed>/ (a finished run
is not repeated, so an interrupted experiment picks up where it stopped). Arguments after `--` go
to every run. Writes experiments/results.md (the final evaluation, mean and spread over seeds) and,
when matplotlib is installed, experiments/curves.png (val loss, NITP loss, effective rank and mean
cosine against iteration). A progress bar counts training steps over the whole experiment.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from tqdm import tqdm

# Each variant is a list of train.py overrides; the names follow the paper's ablation table.
VARIANTS = {
    "ntp": ["--nitp_weight=0"],  # next-token prediction only
    "nitp": [],  # the method with the paper's defaults
    "same_position": ["--nitp_shift=0"],  # temporal shift t -> t
    "no_stop_grad": ["--nitp_stop_grad=false"],  # gradient flows into the target
    "no_head": ["--nitp_proj=none"],  # compare h_t with the target directly
    "layer0": ["--nitp_layer=0"],  # embedding output as the target
    "mse": ["--nitp_loss=mse"],
    "smooth_l1": ["--nitp_loss=smooth_l1"],
    "generic_cosine": ["--nitp_loss=generic_cosine"],  # penalise pairwise cosine, no target
    "late_start": ["--nitp_start_iter=200"],  # NITP switched on later
}
METRICS = ("val_loss", "val_nitp", "erank", "mean_cos")


def read_records(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluations(out_dir):
    return [r for r in read_records(out_dir) if "val_loss" in r]


def is_finished(out_dir, max_iters):
    return any(r["iter"] == max_iters for r in evaluations(out_dir))


def steps_done(out_dir):
    return max([r["iter"] for r in read_records(out_dir) if "loss" in r], default=0)


def run_one(out_dir, args, bar, done_before):
    """One train.py run in a subprocess (its own output to out_dir/stdout.txt), advancing the bar."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
        proc = subprocess.Popen([sys.executable, "train.py", f"--out_dir={out_dir}", *args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
        while proc.poll() is None:
            time.sleep(1.0)
            done = done_before + steps_done(out_dir)
            if done != bar.n:
                bar.update(done - bar.n)
    if proc.returncode != 0:
        sys.exit(f"error: run {out_dir} failed (exit {proc.returncode}); see {out_dir}/stdout.txt")


def summarise(root, variants, seeds):
    """Markdown table of the last evaluation: mean +- std over seeds (std needs 2+ seeds)."""
    lines = ["| variant | seeds | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for v in variants:
        finals = [evaluations(os.path.join(root, f"{v}_s{s}"))[-1] for s in seeds]
        cells = []
        for m in METRICS:
            values = [f[m] for f in finals if m in f]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        lines.append(f"| {v} | {len(finals)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(root, variants, seeds, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed, so no plot (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.4))
    for color, v in enumerate(variants):  # one colour per variant in every panel, even where one is absent
        runs = [evaluations(os.path.join(root, f"{v}_s{s}")) for s in seeds]
        for ax, m in zip(axes, METRICS):
            if m not in runs[0][-1]:
                continue
            iters = [r["iter"] for r in runs[0]]
            per_iter = list(zip(*[[r[m] for r in run] for run in runs]))  # (n_evals, n_seeds)
            mean = [statistics.mean(x) for x in per_iter]
            ax.plot(iters, mean, label=v, color=f"C{color}")
            ax.fill_between(iters, [min(x) for x in per_iter], [max(x) for x in per_iter], alpha=0.2,
                            color=f"C{color}")
    for ax, m in zip(axes, METRICS):
        ax.set_title(m)
        ax.set_xlabel("iteration")
    axes[0].legend()
    fig.suptitle(f"mean over seeds {list(seeds)}; band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv):
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--variants", default="ntp,nitp", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3, help="seeds 1..N, the same for every variant")
    p.add_argument("--out", default="experiments", help="folder for the runs, the table and the plot")
    p.add_argument("--max_iters", type=int, default=600, help="training steps per run (as train.py)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = range(1, args.seeds + 1)
    jobs = [(v, s) for v in variants for s in seeds]
    bar = tqdm(total=len(jobs) * args.max_iters, desc="experiment", unit="step", dynamic_ncols=True)
    for i, (v, s) in enumerate(jobs):
        out_dir = os.path.join(args.out, f"{v}_s{s}")
        if not is_finished(out_dir, args.max_iters):
            if os.path.exists(os.path.join(out_dir, "log.jsonl")):
                os.remove(os.path.join(out_dir, "log.jsonl"))  # an unfinished run starts over, cleanly
            run_one(out_dir, [*VARIANTS[v], f"--seed={s}", f"--max_iters={args.max_iters}", *extra],
                    bar, i * args.max_iters)
        bar.update((i + 1) * args.max_iters - bar.n)
    bar.close()
    table = summarise(args.out, variants, seeds)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    if plot(args.out, variants, seeds, os.path.join(args.out, "curves.png")):
        print(f"wrote {os.path.join(args.out, 'results.md')} and {os.path.join(args.out, 'curves.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
