"""
Score a trained checkpoint on downstream tasks (tasks.py) and write the scores as JSON.

    python -m experiments.evaluate --out_dir=out --tasks=own,hellaswag,my.jsonl --out=scores.json
    python experiments/evaluate.py --out_dir=out --tasks=arc_easy:5 --out=arc.json --tiktoken_file=PATH/gpt2.tiktoken

Writes {task: {"acc", "acc_norm", "centered", "chance", "n", "loglik"}} (loglik: the mean summed log-probability of
the right continuation) and prints one line per task and the mean centred accuracy. The own task is built from the
validation split of the dataset in the checkpoint's train_config (or --data_dir); text tasks need the dataset's
tokenizer. A bad input is one line on stderr and exit code 2, and then nothing is written.
"""
import argparse
import json
import os
import sys
from contextlib import nullcontext

if __package__ in (None, ""):  # run as a file: the repository root holds the modules
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import CheckpointError  # noqa: E402
from tasks import TaskError, load_tasks, log_record, score_tasks  # noqa: E402


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, instead of a usage block
        raise TaskError(message)


def parse_args(argv):
    p = ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.add_argument("--out_dir", required=True, help="the run folder holding ckpt.pt")
    p.add_argument("--tasks", required=True, help="comma-separated: own, a public task name, a .jsonl file; NAME:K "
                                                  "for K-shot")
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--tiktoken_file", default=None, help="local gpt2.tiktoken ranks for GPT-2 BPE offline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--items", type=int, default=0, help="items per task (the own task draws this many, 1000 if 0); "
                                                        "0 = all")
    p.add_argument("--seed", type=int, default=1337, help="the few-shot draw and the own task's items")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per forward call")
    p.add_argument("--data_dir", default="", help="dataset for the own task; default: the checkpoint's")
    args = p.parse_args(argv)
    if args.items < 0 or args.seed < 0 or args.batch_size < 1:
        raise TaskError("--items and --seed must be >= 0 and --batch_size >= 1")
    if args.device.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise TaskError(f"--device={args.device} but this machine has no CUDA GPU: use --device=cpu")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise TaskError(f"cannot write --out={args.out}: the folder {folder} does not exist; create it")
    return args


def evaluate(args):
    """The scores of the checkpoint in args.out_dir on args.tasks."""
    from experiments.probe import ProbeError, dataset_of
    from tokenizer import TokenizerError, get_tokenizer
    from sample import load_model
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    model, ckpt = load_model(ckpt_path, args.device)
    meta, val = dict(ckpt.get("data") or {}), None
    if any(t.strip().partition(":")[0] == "own" for t in args.tasks.split(",")):
        try:
            _, meta, val = dataset_of(ckpt, ckpt_path, args.data_dir)
        except ProbeError as e:
            raise TaskError(f"the own task: {e}") from None
    tokenizer = None
    if meta.get("tokenizer"):
        try:
            tokenizer = get_tokenizer(meta["tokenizer"], tiktoken_file=args.tiktoken_file)
        except TokenizerError as e:  # the own task needs no tokenizer; text tasks do
            if any(t.strip().partition(":")[0] != "own" for t in args.tasks.split(",")):
                raise TaskError(str(e) if args.tiktoken_file else f"the {meta['tokenizer']} tokenizer cannot be "
                                "built here (offline?): pass --tiktoken_file=PATH/gpt2.tiktoken") from None
    tasks = load_tasks(args.tasks, val, meta, model.config.block_size, args.items, args.seed, tokenizer)
    device = torch.device(args.device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    return score_tasks(model, tasks, meta["eot_token"], ctx, device, batch_size=args.batch_size,
                       n_tokens=meta.get("vocab_size"))


def main(argv):
    try:
        args = parse_args(argv)
        scores = evaluate(args)
    except (TaskError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with open(args.out + ".tmp", "w") as f:
        json.dump(scores, f, indent=2)
    os.replace(args.out + ".tmp", args.out)
    for name, s in scores.items():
        print(f"{name}: acc {s['acc']:.4f} acc_norm {s['acc_norm']:.4f} centered {s['centered']:.4f} (chance "
              f"{s['chance']:.3f}) n {s['n']}")
    print(f"mean centered {log_record(scores)['task/mean_centered']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
