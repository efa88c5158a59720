"""
Train a GPT with next-token + next-implicit-token prediction (NITP), on one device or many.

    python prepare_data.py                        # the embedded default corpus -> data/stdlib
    python train.py                               # NITP with the paper's defaults
    python train.py --nitp_weight=0               # the plain next-token baseline
    python train.py config/some_preset.py --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py config/some_preset.py

Knobs are the fields of TrainConfig below and of model.GPTConfig; `--key=value` sets one, a config
file (`key = value` lines, see config/) sets several; unknown keys and wrong types are rejected.
Writes out_dir/log.jsonl (one JSON record per line), out_dir/ckpt.pt (atomically replaced) and
out_dir/config.json. `--init_from=resume` continues exactly where ckpt.pt stopped.
"""
import ast
import dataclasses
import difflib
import glob
import json
import math
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from model import GPT, GPTConfig, expert_balance_stats, flops_per_token
from nitp import effective_rank, mean_pairwise_cosine
import prepare_data


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # log.jsonl, ckpt.pt and config.json go here
    dataset: str = "stdlib"  # data/<dataset>/ made by prepare_data.py (stdlib = the embedded default corpus)
    data_dir: str = ""  # explicit dataset folder; overrides `dataset` when set
    train_shards: str = ""  # glob of llm.c / modded-nanogpt .bin shards (GPT-2 ids) to train on instead of a dataset
    val_shards: str = ""  # glob of such shards for validation (both or neither)
    init_from: str = "scratch"  # "scratch" or "resume" (from out_dir/ckpt.pt)
    # batch: tokens per optimizer step = batch_size * block_size * gradient_accumulation_steps * world_size
    batch_size: int = 16  # sequences per micro-step per process
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step per process
    total_batch_size: int = 0  # tokens per optimizer step over all processes; 0 = as above, else derives gradient_accumulation_steps
    max_iters: int = 600  # optimizer steps (not micro-steps)
    # AdamW (spec: betas (0.9, 0.95), weight decay 0.1, clip 1.0)
    learning_rate: float = 2e-3  # peak lr (paper: 4.2e-4 to 8.7e-4 at scale; tiny models take more)
    min_lr: float = 2e-4  # lr at the end of the decay
    weight_decay: float = 0.1  # on matrices only
    beta1: float = 0.9
    beta2: float = 0.95
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
    # system
    device: str = "auto"  # "auto" (cuda, then mps, then cpu), or a torch device string
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16", "float16"
    compile: bool = False  # torch.compile the model (worth it on GPU; ~20 s of compile on CPU)
    seed: int = 1337
    on_nonfinite: str = "stop"  # a non-finite loss or gradient: "stop" (exit 3) or "skip" the step
    peak_flops: float = 0.0  # per-GPU peak FLOP/s for MFU; 0 = look the GPU up in PEAK_BF16_FLOPS
    nitp_start_iter: int = 0  # the NITP term gets weight 0 before this step (paper: 0; a late start of 1k-3k steps is worse)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                     "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        choices = {"init_from": ("scratch", "resume"), "lr_schedule": ("wsd", "cosine"),
                   "dtype": ("auto", "float32", "bfloat16", "float16"), "on_nonfinite": ("stop", "skip")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"decay_frac={self.decay_frac} must be in [0, 1]")
        if self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr={self.min_lr} must not exceed learning_rate={self.learning_rate}")


LLMC_VOCAB = 50257  # GPT-2's vocabulary, what llm.c's shards hold


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# command line: python train.py [config/file.py] [--key=value ...]

def knob_types():
    """Every knob name -> its Python type, from both dataclasses (they share no field names)."""
    fields = list(dataclasses.fields(TrainConfig)) + list(dataclasses.fields(GPTConfig))
    return {f.name: type(f.default) for f in fields}


def parse_value(key, text, typ):
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"--{key}={text}: expected a boolean (true/false)")
    try:
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
    except ValueError:
        raise UsageError(f"--{key}={text}: expected {typ.__name__}") from None
    return text


def check_key(key, types):
    if key not in types:
        close = difflib.get_close_matches(key, types, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else " (see TrainConfig in train.py and GPTConfig in model.py)"
        raise UsageError(f"unknown knob '{key}'{hint}")


def read_config_file(path, types):
    """A config file holds `key = literal` lines (no code is executed, unlike nanoGPT's exec)."""
    try:
        tree = ast.parse(open(path).read(), filename=path)
    except (OSError, SyntaxError) as e:
        raise UsageError(f"cannot read config file {path}: {e}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UsageError(f"{path}:{node.lineno}: only `key = value` lines are allowed in a config file")
        key = node.targets[0].id
        check_key(key, types)
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise UsageError(f"{path}:{node.lineno}: the value of {key} must be a literal") from None
        values[key] = parse_value(key, str(value), types[key]) if not isinstance(value, types[key]) else value
    return values


def parse_args(argv):
    """-> (TrainConfig, dict of GPTConfig overrides). Later arguments override earlier ones."""
    types = knob_types()
    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            values.update(read_config_file(arg, types))
            continue
        key, eq, text = arg[2:].partition("=")
        check_key(key, types)
        if not eq:
            raise UsageError(f"--{key}: give a value, as --{key}=VALUE")
        values[key] = parse_value(key, text, types[key])
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    train_args = {k: v for k, v in values.items() if k in train_names}
    model_args = {k: v for k, v in values.items() if k not in train_names}
    try:
        cfg = TrainConfig(**train_args)
        GPTConfig(**model_args)  # validate the model knobs now, before any data is read
    except ValueError as e:
        raise UsageError(str(e)) from None
    return cfg, model_args


# ----------------------------------------------------------------------------------------------
# data: flat token files, sampled statelessly so that resuming and re-sharding are exact

def load_split(data_dir, split):
    """The token ids of one split as a read-only memmap, and the dataset's meta.json."""
    try:
        return prepare_data.load_split(data_dir, split), prepare_data.read_meta(data_dir)
    except (OSError, ValueError) as e:  # no dataset, or files that do not match their meta.json
        raise UsageError(str(e)) from None


class ShardedTokens:
    """llm.c / modded-nanogpt shards (256 x int32 header, magic 20240520, then uint16 tokens) seen
    as one sequence, memory-mapped; a window that crosses a shard boundary is stitched together."""

    def __init__(self, pattern):
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise UsageError(f"no llm.c shard matches {pattern!r}: give a glob such as 'fineweb10B/fineweb_train_*.bin'")
        try:
            self.shards = [prepare_data.read_llmc_shard(p) for p in paths]
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, window):
        first = int(np.searchsorted(self.starts, window.start, side="right")) - 1
        pieces, pos = [], window.start
        while pos < window.stop:
            shard = self.shards[first]
            take = shard[pos - self.starts[first]:window.stop - self.starts[first]]
            pieces.append(take)
            pos += len(take)
            first += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def load_data(cfg):
    """(train tokens, val tokens, meta, where): a prepared dataset folder, or llm.c shards by glob."""
    if cfg.train_shards or cfg.val_shards:
        if not (cfg.train_shards and cfg.val_shards):
            raise UsageError("give both --train_shards and --val_shards (globs of llm.c .bin shards)")
        meta = {"vocab_size": LLMC_VOCAB, "tokenizer": "gpt2"}  # llm.c's shards hold GPT-2 ids
        return ShardedTokens(cfg.train_shards), ShardedTokens(cfg.val_shards), meta, cfg.train_shards
    data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    train_data, meta = load_split(data_dir, "train")
    val_data, _ = load_split(data_dir, "val")
    return train_data, val_data, meta, data_dir


def batch_offsets(n_tokens, block_size, batch_size, seed, step, micro):
    """Start offsets of one micro-batch: a pure function of (seed, step, global micro-batch index).
    No sampler state to save, the same tokens whatever the number of processes, and rank r's
    micro-step m reads global micro-batch r * accumulation + m, so ranks read different data."""
    rng = np.random.default_rng([seed, step, micro])
    return rng.integers(0, n_tokens - block_size - 1, size=batch_size)


def get_batch(data, offsets, block_size, device):
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in offsets]).astype(np.int64))  # (B, T)
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in offsets]).astype(np.int64))  # (B, T)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def val_offsets(n_tokens, block_size, batch_size, eval_iters):
    """Evenly spaced windows over the validation split, fixed for the whole run (and across runs)."""
    count = batch_size * eval_iters
    return np.linspace(0, n_tokens - block_size - 1, num=count).astype(np.int64).reshape(eval_iters, batch_size)


# ----------------------------------------------------------------------------------------------
# learning rate

def get_lr(it, cfg):
    """lr for optimizer step `it` (0-based). Warmup starts at lr/(warmup+1), not 0, so the first
    step already learns. wsd: warmup, constant, then linear decay to min_lr over the last
    decay_frac of the schedule (paper). cosine: warmup, then cosine to min_lr."""
    total = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= total:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = total - int(cfg.decay_frac * total)
        if it < decay_start:
            return cfg.learning_rate
        frac = (it - decay_start + 1) / (total - decay_start)
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = (it - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


# ----------------------------------------------------------------------------------------------
# checkpoints: written to a temporary file, then atomically renamed

def save_checkpoint(path, state):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a kill before this line leaves the previous checkpoint intact


def load_checkpoint(path):
    if not os.path.exists(path):
        raise UsageError(f"init_from=resume but {path} does not exist: train with --init_from=scratch first")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise UsageError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); "
                         f"it is damaged or not a nitp checkpoint; restore it or start with --init_from=scratch") from None


def check_resume_config(ckpt_config, model_config, path):
    differing = [k for k, v in dataclasses.asdict(model_config).items() if k != "dropout" and ckpt_config.get(k) != v]
    if differing:
        detail = ", ".join(f"{k}: checkpoint {ckpt_config.get(k)!r} vs requested {getattr(model_config, k)!r}"
                           for k in differing)
        raise UsageError(f"the model in {path} differs from the requested config ({detail}); "
                         f"pass the checkpoint's settings or use a new out_dir")


# ----------------------------------------------------------------------------------------------
# devices, processes and precision

def setup_distributed():
    """-> (rank, local_rank, world_size). torchrun sets RANK; a plain `python` run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend)
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def pick_device(requested, local_rank, world_size):
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() and world_size == 1:
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda" and world_size > 1:
        requested = f"cuda:{local_rank}"
    device = torch.device(requested)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def pick_dtype(requested, device, say):
    """The autocast dtype; one the device cannot do falls back to float32 with a notice."""
    if requested == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    dtype = getattr(torch, requested)
    if dtype == torch.float32:
        return dtype
    if device.type != "cuda":
        say(f"notice: dtype={requested} is not used on {device.type}; training in float32")
        return torch.float32
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        say("notice: this GPU has no bfloat16; training in float32 (or pass --dtype=float16)")
        return torch.float32
    return dtype


# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment, for MFU on CUDA.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                   "A10G": 70e12, "A10": 125e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


def peak_flops(cfg, device):
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU, unlisted GPU)."""
    if cfg.peak_flops > 0:
        return cfg.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def git_hash():
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------
# evaluation

GEOMETRY_TOKENS = 8192  # at most this many last states (from the first validation batch) for erank and mean_cos


@torch.no_grad()
def evaluate(r):
    """Mean validation losses over the fixed batches (each process takes every world_size-th one),
    plus the geometry of the last hidden states (spec, Appendix D) on rank 0."""
    r.model.eval()
    sums = torch.zeros(3, device=r.device)  # ntp, nitp, batches
    for i in range(r.rank, len(r.val_offsets), r.world_size):
        x, y = get_batch(r.val_data, r.val_offsets[i], r.mcfg.block_size, r.device)
        with r.ctx:
            _, losses = r.model(x, y)
        sums += torch.stack([losses["ntp"].float(), losses.get("nitp", losses["ntp"] * 0).float(),
                             torch.ones((), device=r.device)])
    if r.world_size > 1:
        torch.distributed.all_reduce(sums)
    record = {"val_loss": (sums[0] / sums[2]).item()}
    if r.mcfg.nitp:
        record["val_nitp"] = (sums[1] / sums[2]).item()
    if r.master:
        record.update(geometry(r))
    r.model.train()
    return record


def geometry(r):
    """erank and mean_cos of the final states h_t on the first validation batch. One extra forward
    of the uncompiled model, at evaluation only: training keeps no hidden states around."""
    x, _ = get_batch(r.val_data, r.val_offsets[0], r.mcfg.block_size, r.device)
    with r.ctx:
        _, h, _ = r.raw_model.trunk(x)
    states = h.reshape(-1, h.size(-1)).float()  # (B*T, C)
    stride = max(1, states.size(0) // GEOMETRY_TOKENS)
    states = states[::stride][:GEOMETRY_TOKENS]
    return {"erank": effective_rank(states), "mean_cos": mean_pairwise_cosine(states)}


def mean_over_ranks(values, world_size):
    """Average a 1-D tensor of logged numbers over processes, so the log shows the global batch."""
    if world_size > 1:
        torch.distributed.all_reduce(values)
        values /= world_size
    return values


# ----------------------------------------------------------------------------------------------
# the run

class Logger:
    """Appends JSON records to out_dir/log.jsonl (rank 0 only), flushed at once so a crash keeps them."""

    def __init__(self, out_dir, active):
        self.path = os.path.join(out_dir, "log.jsonl")
        self.active = active

    def record(self, **fields):
        if self.active:
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")


def build_model_config(model_args, meta):
    """GPTConfig from the knobs; vocab_size comes from the dataset, padded to a multiple of 64."""
    data_vocab = int(meta["vocab_size"])
    if "vocab_size" in model_args and model_args["vocab_size"] < data_vocab:
        raise UsageError(f"vocab_size={model_args['vocab_size']} is smaller than the dataset's vocabulary "
                         f"({data_vocab}, from meta.json): drop --vocab_size or set it >= {data_vocab}")
    model_args = {"vocab_size": 64 * math.ceil(data_vocab / 64), **model_args}
    try:
        return GPTConfig(**model_args)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


def derive_accumulation(cfg, block_size, world_size):
    if cfg.total_batch_size == 0:
        return cfg.gradient_accumulation_steps
    per_step = cfg.batch_size * block_size * world_size
    if cfg.total_batch_size % per_step:
        raise UsageError(f"total_batch_size={cfg.total_batch_size} tokens does not divide into micro-batches of "
                         f"batch_size*block_size*world_size = {cfg.batch_size}*{block_size}*{world_size} = {per_step}; "
                         f"make it a multiple of {per_step}")
    return cfg.total_batch_size // per_step


def check_data_fits(train_data, val_data, block_size, data_dir):
    for name, data in (("train", train_data), ("val", val_data)):
        if len(data) < block_size + 2:
            raise UsageError(f"block_size={block_size} is larger than the {name} split of {data_dir} "
                             f"({len(data)} tokens): use a smaller --block_size or prepare more data")


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_rng_states(device, world_size):
    """Every rank's random state (rank 0 saves them all, so dropout continues exactly on resume)."""
    state = rng_state(device)
    if world_size == 1:
        return [state]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return states


def run(argv):
    cfg, model_args = parse_args(argv)
    rank, local_rank, world_size = setup_distributed()
    master = rank == 0
    say = tqdm.write if master else (lambda *a, **k: None)  # tqdm.write keeps the progress bar intact
    device = pick_device(cfg.device, local_rank, world_size)
    ptdtype = pick_dtype(cfg.dtype, device, say)
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)

    train_data, val_data, meta, data_dir = load_data(cfg)
    mcfg = build_model_config(model_args, meta)
    check_data_fits(train_data, val_data, mcfg.block_size, data_dir)
    accum = derive_accumulation(cfg, mcfg.block_size, world_size)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if cfg.init_from == "resume" else None
    if ckpt is not None:
        check_resume_config(ckpt["model_config"], mcfg, ckpt_path)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = GPT(mcfg).to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank
    start_iter = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter = ckpt["iter_num"]
        if ckpt["world_size"] == world_size:
            set_rng_state(ckpt["rng_states"][rank], device)
        else:
            say(f"notice: resuming with {world_size} processes instead of {ckpt['world_size']}: per-process random "
                f"state is re-seeded; the data order is unchanged only if the global batch is unchanged")
        del ckpt
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)

    tokens_per_iter = cfg.batch_size * mcfg.block_size * accum * world_size
    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg), "world_size": world_size,
                       "gradient_accumulation_steps": accum, "device": str(device), "dtype": str(ptdtype),
                       "torch": torch.__version__, "git": git_hash(), "argv": argv}, f, indent=2)
    flops = flops_per_token(mcfg)
    say(f"training FLOPs per token (6 x params touched): {flops['total']:.3e}, of which NITP "
        f"{flops['nitp']:.3e} = {100 * flops['nitp_share']:.2f}% of NTP")
    say(f"{raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(include_head=False) / 1e6:.2f}M "
        f"at inference), {tokens_per_iter:,} tokens per step on {world_size} x {device} in {ptdtype}; "
        f"nitp_layer={mcfg.nitp_layer} nitp_weight={mcfg.nitp_weight} nitp_loss={mcfg.nitp_loss}")
    run_state = SimpleNamespace(
        cfg=cfg, mcfg=mcfg, model=model, raw_model=raw_model, optimizer=optimizer, scaler=scaler, ctx=ctx,
        device=device, rank=rank, world_size=world_size, accum=accum, train_data=train_data, val_data=val_data,
        val_offsets=val_offsets(len(val_data), mcfg.block_size, cfg.batch_size, cfg.eval_iters),
        logger=Logger(cfg.out_dir, master), ckpt_path=ckpt_path, say=say, master=master,
        tokens_per_iter=tokens_per_iter, logged=logged_losses(mcfg), flops_per_token=flops["total"], peak=peak_flops(cfg, device))
    train_loop(run_state, start_iter)


def train_step(r, it):
    """One optimizer step: accumulation micro-steps, clipping, the non-finite guard, the update.
    Returns the losses named in r.logged averaged over micro-steps (a tensor), the gradient norm,
    whether the step was finite, and the MoE expert token counts (None for a dense model)."""
    cfg = r.cfg
    sums = counts = None
    for micro in range(r.accum):
        if r.world_size > 1:  # all-reduce gradients only on the last micro-step, decided before forward
            r.model.require_backward_grad_sync = micro == r.accum - 1
        offsets = batch_offsets(len(r.train_data), r.mcfg.block_size, cfg.batch_size, cfg.seed, it,
                                r.rank * r.accum + micro)
        x, y = get_batch(r.train_data, offsets, r.mcfg.block_size, r.device)
        with r.ctx:
            _, losses = r.model(x, y, **nitp_weight_now(r, it))
        # Every micro-batch holds the same number of tokens, so dividing each mean by the number of
        # micro-steps makes the accumulated gradient exactly that of the mean over the whole batch.
        r.scaler.scale(losses["total"] / r.accum).backward()
        parts = torch.stack([losses[k].detach().float() for k in r.logged])
        sums = parts if sums is None else sums + parts
        if "expert_counts" in losses:  # (n_moe_layers, E) tokens per expert, summed over micro-steps
            counts = losses["expert_counts"] if counts is None else counts + losses["expert_counts"]
    r.scaler.unscale_(r.optimizer)
    norm = torch.nn.utils.clip_grad_norm_(r.raw_model.parameters(), cfg.grad_clip or float("inf"))
    # One host sync per step: a non-finite update must never reach the weights (or a checkpoint).
    finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(sums).all())
    if finite or r.scaler.is_enabled():  # float16's scaler skips a bad step by itself and lowers its scale
        r.scaler.step(r.optimizer)
        r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    return sums / r.accum, norm, finite, counts


def logged_losses(mcfg):
    """The entries of the loss dict that are logged, in this order."""
    return ["total", "ntp"] + (["nitp"] if mcfg.nitp else []) + (["moe_aux"] if mcfg.n_experts else [])


def nitp_weight_now(r, it):
    """A late NITP start (paper ablation) as a weight tensor: 0 before nitp_start_iter, lambda after.
    A tensor, not a float, so that the compiled graph is not rebuilt when it switches."""
    if not r.mcfg.nitp or r.cfg.nitp_start_iter == 0:
        return {}
    weight = 0.0 if it < r.cfg.nitp_start_iter else r.mcfg.nitp_weight
    return {"nitp_weight": torch.tensor(weight, device=r.device)}


def save(r, it, val):
    states = all_rng_states(r.device, r.world_size)  # every rank takes part in the gather
    if r.master:
        save_checkpoint(r.ckpt_path, {
            "model": r.raw_model.state_dict(), "optimizer": r.optimizer.state_dict(),
            "model_config": dataclasses.asdict(r.mcfg), "train_config": dataclasses.asdict(r.cfg),
            "iter_num": it, "val": val, "rng_states": states, "world_size": r.world_size})


def evaluate_and_save(r, it):
    val = evaluate(r)
    r.logger.record(iter=it, **val)
    r.say(f"iter {it}: " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
    if it > 0:
        save(r, it, val)
    return val


def log_step(r, it, means, lr, norm, elapsed, steps, counts):
    means = mean_over_ranks(means, r.world_size).tolist()
    record = {"iter": it, "loss": means[0], **dict(zip(r.logged[1:], means[1:])), "lr": lr}
    if counts is not None:  # load balance of this step's global batch: counts summed over ranks
        if r.world_size > 1:
            torch.distributed.all_reduce(counts)
        stats = expert_balance_stats(counts)
        record.update(moe_imbalance=stats["imbalance"], moe_idle=stats["idle"])
    r.logger.record(**record)
    ms = 1000 * elapsed / steps
    tok_s = r.tokens_per_iter * steps / elapsed
    parts = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in record.items() if k not in ("iter", "loss", "lr"))
    mfu = f" mfu {100 * r.flops_per_token * tok_s / (r.peak * r.world_size):.1f}%" if r.peak else ""
    r.say(f"iter {it}: loss {means[0]:.4f} ({parts}) lr {lr:.2e} norm {norm:.2f} "
          f"{ms:.0f} ms/iter {tok_s:,.0f} tok/s{mfu}")


def train_loop(r, start_iter):
    cfg = r.cfg
    if start_iter == 0:
        evaluate_and_save(r, 0)
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=not r.master, dynamic_ncols=True,
                mininterval=1.0)
    t0, steps = time.time(), 0
    for it in range(start_iter, cfg.max_iters):
        lr = get_lr(it, cfg)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        means, norm, finite, counts = train_step(r, it)
        if not finite:
            handle_nonfinite(r, it, means, norm)
        bar.update(1)
        steps += 1
        done = it + 1
        if done % cfg.log_interval == 0 or done == cfg.max_iters:
            log_step(r, done, means, lr, norm.item(), time.time() - t0, steps, counts)
            t0, steps = time.time(), 0
        if done % cfg.eval_interval == 0 or done == cfg.max_iters:
            evaluate_and_save(r, done)
            t0, steps = time.time(), 0  # keep evaluation out of the step timing
    bar.close()


class NonFiniteLoss(Exception):
    """The loss or gradient became inf/NaN and on_nonfinite=stop: exit 3, checkpoint untouched."""


def handle_nonfinite(r, it, means, norm):
    if r.cfg.on_nonfinite == "skip":
        r.say(f"warning: non-finite loss or gradient at step {it} (loss {means[0].item()}, norm {norm.item()}); "
              f"step skipped")
        return
    raise NonFiniteLoss(f"non-finite loss or gradient at step {it} (loss {means[0].item()}, grad norm "
                        f"{norm.item()}); stopped without saving, so {r.ckpt_path} still holds the last good "
                        f"state. Lower --learning_rate, or pass --on_nonfinite=skip to skip such steps")


def main(argv):
    code = 0
    try:
        run(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        code = 3
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
