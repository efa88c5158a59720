"""
train.py's knobs: TrainConfig (every training field, commented and validated; the model's are GPTConfig in model.py),
the command line that sets them (`--key=value` flags and config files of `key = value` lines, read, never executed),
and the check that a configuration can run on the device it got.

    cfg, model_args = parse_args(["config/cpu_tiny.py", "--nitp_weight=0"])   # (TrainConfig, GPTConfig overrides)
"""
import argparse
import ast
import dataclasses
import difflib
import inspect
import io
import os
import tokenize
from dataclasses import dataclass

import torch
from torch.utils.benchmark import Timer

from model import GPTConfig, check_fields

DESCRIPTION = "Train a GPT with next-token + next-implicit-token prediction (NITP), on one device or many."


class UsageError(Exception):
    """What the user asked for cannot work: one line, exit code 2."""


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # log.jsonl, ckpt.pt and config.json go here
    dataset: str = "stdlib"  # data/<dataset>/ made by prepare_data.py (stdlib = the embedded default corpus)
    data_dir: str = ""  # explicit dataset folder; overrides `dataset` when set
    train_shards: str = ""  # glob of llm.c / modded-nanogpt .bin shards (GPT-2 ids) to train on instead of a dataset
    val_shards: str = ""  # glob of such shards for validation (both or neither)
    init_from: str = "scratch"  # "scratch", "resume" (from out_dir/ckpt.pt) or "hf:PATH" (a Hugging Face model folder)
    overwrite: bool = False  # scratch into an out_dir holding a run: delete its log, checkpoint and config first
    wandb_project: str = ""  # also log every log.jsonl record and the config to this wandb project; "" = off
    wandb_run_name: str = ""  # the wandb run's display name; "" = wandb picks one
    # batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps * world_size
    batch_size: int = 16  # sequences per micro-step per process
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step per process
    total_batch_size: int = 0  # tokens per optimizer step over all processes; 0 = as above, else derives the accumulation
    max_iters: int = 600  # optimizer steps (not micro-steps)
    # AdamW (spec: betas (0.9, 0.95), weight decay 0.1, clip 1.0)
    learning_rate: float = 2e-3  # peak lr (paper: 4.2e-4 to 8.7e-4 at scale; tiny models take more)
    min_lr: float = 2e-4  # lr at the end of the decay
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9  # in [0, 1)
    beta2: float = 0.95  # in [0, 1)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # schedule: warmup-stable-decay as in the paper, or cosine
    lr_schedule: str = "wsd"  # "wsd" (paper) or "cosine"
    warmup_iters: int = 50  # linear warmup steps (paper: 2000)
    decay_frac: float = 0.2  # wsd: fraction of lr_decay_iters spent decaying to min_lr (paper: last 20%)
    lr_decay_iters: int = 0  # step at which the schedule ends; 0 = max_iters
    # evaluation and logging
    eval_interval: int = 100  # evaluate and checkpoint every this many steps (and at the end)
    eval_iters: int = 20  # validation batches, the same fixed ones at every evaluation
    log_interval: int = 10  # print and log a training record every this many steps
    eval_tasks: str = ""  # downstream tasks (tasks.py), comma-separated: "own,hellaswag,my.jsonl,piqa:5"; "" = none
    task_eval_interval: int = 0  # score them every this many steps (and at the end); 0 = at every evaluation
    task_items: int = 200  # items per task (the first ones; the own task draws this many); 0 = all
    tiktoken_file: str = ""  # local gpt2.tiktoken ranks, for text tasks on a gpt2 dataset offline
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16", "float16"
    compile: bool = False  # torch.compile the model (worth it on GPU; ~20 s of compile on CPU)
    fsdp: bool = False  # FSDP2 under torchrun: shard weights, gradients and AdamW state (for models DDP cannot fit)
    seed: int = 1337  # weights, data order and dropout; >= 0
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" (exit 3) or "skip" the step
    peak_flops: float = 0.0  # per-GPU peak FLOP/s for MFU; 0 = look the GPU up in PEAK_BF16_FLOPS (bf16/fp16 runs only)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~1/3 more block compute
    nitp_start_iter: int = 0  # NITP weight 0 before this step (paper: 0; a late start of 1k-3k steps is worse)

    def __post_init__(self):  # every number finite and in range, every choice one of its values
        at_least = dict(batch_size=1, gradient_accumulation_steps=1, max_iters=1, eval_interval=1, eval_iters=1,
                        log_interval=1, total_batch_size=0, warmup_iters=0, lr_decay_iters=0, seed=0, nitp_start_iter=0,
                        min_lr=0, weight_decay=0, grad_clip=0, peak_flops=0, task_eval_interval=0,
                        task_items=0)
        choices = dict(init_from=("scratch", "resume", self.init_from if self.init_from[:3] == "hf:" else "hf:PATH"),
                       lr_schedule=("wsd", "cosine"), on_nonfinite=("stop", "skip"),
                       dtype=("auto", "float32", "bfloat16", "float16"))
        check_fields(self, at_least, choices)
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device[:5] == "cuda:" and self.device[5:].isdigit()):
            raise ValueError(f"device={self.device!r} must be auto, cpu, cuda, cuda:N or mps")
        if self.learning_rate <= 0 or self.min_lr > self.learning_rate:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0 and >= min_lr={self.min_lr}")
        if self.overwrite and self.init_from == "resume":
            raise ValueError("overwrite=True deletes the run in out_dir, init_from=resume continues it: pass one")
        if self.wandb_run_name and not self.wandb_project:
            raise ValueError(f"wandb_run_name={self.wandb_run_name!r} names a run in a wandb project: set wandb_project")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and 0 <= self.decay_frac <= 1):
            raise ValueError(f"beta1={self.beta1} and beta2={self.beta2} must be in [0, 1), "
                             f"decay_frac={self.decay_frac} in [0, 1]")


# --- command line: python train.py [config/file.py ...] [--key=value ...]
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 (in main), instead of a usage block
        raise UsageError(message)


def converter(name, typ):
    """--name's text -> typ, with an error that says what was expected."""
    truth = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

    def convert(text):
        try:
            return truth[text.lower()] if typ is bool else typ(text)
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(f"--{name}={text}: expected {'true/false' if typ is bool else typ.__name__}")
    return convert


def read_config_file(path):
    """A config file's `key = literal` lines as flags ["--key=value", ...]; nothing in it is executed (nanoGPT execs)."""
    try:
        with open(path, encoding="utf-8") as f:
            body = ast.parse(f.read(), filename=path).body
    except (OSError, SyntaxError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or a NUL byte
        why = "it is not UTF-8 text, save it as UTF-8" if isinstance(e, UnicodeDecodeError) else e
        raise UsageError(f"cannot read config file {path}: {why}") from None
    flags = []
    for node in body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        try:  # TypeError: an unhashable literal ({[1]: 2}); a chained `a = b = 1` would set only `a`
            if len(node.targets) != 1:
                raise ValueError
            flags.append(f"--{node.targets[0].id}={ast.literal_eval(node.value)}")
        except (AttributeError, ValueError, TypeError, RecursionError):  # not `name = literal`
            raise UsageError(f"{path}:{node.lineno}: only `key = value` lines are allowed in a config file") from None
    return flags


def field_comments(cls):
    """{field: the comment on its line} of a config dataclass: --help shows the text written there once."""
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    return {node.target.id: comments.get(node.end_lineno, "") for node in ast.parse(source).body[0].body
            if isinstance(node, ast.AnnAssign)}


def parse_args(argv):
    """-> (TrainConfig, dict of GPTConfig overrides): the config files in order, then the flags, which win."""
    fields = dataclasses.fields(TrainConfig) + dataclasses.fields(GPTConfig)
    parser = ArgumentParser(description=DESCRIPTION, allow_abbrev=False,
                            usage="python train.py [config/file.py ...] [--key=value ...]")
    parser.add_argument("config_files", nargs="*", help="config files of `key = value` lines (see config/)")
    for cls, title in ((TrainConfig, "training"), (GPTConfig, "model")):
        group = parser.add_argument_group(f"{title} ({cls.__name__} in {cls.__module__}.py)")
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):  # argparse formats help with %, so a literal % is doubled
            group.add_argument(f"--{f.name}", type=converter(f.name, type(f.default)), default=argparse.SUPPRESS,
                               metavar=type(f.default).__name__.upper(),
                               help=f"{comments[f.name]} (default {f.default!r})".replace("%", "%%"))

    def parse(args, source):  # -> {knob: value}; an unknown knob or a bad value is reported with where it came from
        try:
            known, unknown = parser.parse_known_args(args)
        except UsageError as e:
            raise UsageError(f"{source}{e}") from None
        if unknown:
            close = difflib.get_close_matches(unknown[0].lstrip("-").partition("=")[0], [f.name for f in fields], n=1)
            raise UsageError(f"{source}unknown knob or argument '{unknown[0]}'" + (
                f" (did you mean --{close[0]}?)" if close else " (see --help)"))
        return {k: v for k, v in vars(known).items() if k != "config_files"}
    values = {}
    for path in parser.parse_known_args(argv)[0].config_files:
        values.update(parse(read_config_file(path), f"{path}: "))
    values.update(parse(argv, ""))  # flags override files
    try:
        cfg = TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__})
        model_args = {k: v for k, v in values.items() if k not in TrainConfig.__dataclass_fields__}
        GPTConfig(**model_args)  # check the model knobs now, before any data is read
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg, model_args


# --- can this configuration run here?
def matmul_flops(device, dtype):
    """FLOP/s of a square matmul in the training dtype, on all threads: a rough ceiling on what training reaches.
    Timer synchronizes an accelerator around what it times."""
    n = 4096 if device.type == "cuda" else 512
    timer = Timer("a @ a", globals={"a": torch.randn(n, n, device=device, dtype=dtype)},
                  num_threads=torch.get_num_threads())
    return 2 * n ** 3 / timer.timeit(3).median


def duration(seconds):
    for size, unit in ((86400, "days"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def check_fits(n_params, flops_per_step, cfg, device, dtype, world_size, say):
    """Refuse a model whose weights, gradients and AdamW state (16 bytes a parameter) exceed this device's memory; say
    when even the device's matmul speed makes a step take minutes or the run days (a 0.5B model on a CPU)."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:  # the processes of one node share its memory
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need = 16 * n_params / (world_size if cfg.fsdp else 1)
    if need > memory:
        raise UsageError(f"{n_params / 1e9:.2f}B parameters need at least {need / 2**30:.1f} GiB per process for "
                         f"weights, gradients and AdamW state, more than this {device.type}'s {memory / 2**30:.1f} "
                         "GiB: use a smaller model, --fsdp=true over more GPUs, or a bigger machine")
    speed = matmul_flops(device, dtype)
    step = flops_per_step / world_size / speed
    if step > 60 or step * cfg.max_iters > 86400:
        say(f"notice: at least {duration(step)} per step here ({speed / 1e12:.2f} TFLOP/s per {device.type} on a "
            f"matmul), {duration(step * cfg.max_iters)} for max_iters={cfg.max_iters}: this config wants faster or "
            "more devices, or a smaller config such as config/cpu_tiny.py; Ctrl-C stops it")
