"""
Train a GPT with next-token + next-implicit-token prediction (NITP), on one device or many.

    python train.py                                         # NITP, the paper's defaults, on data/stdlib
    python train.py config/cpu_tiny.py --nitp_weight=0      # a preset, then a flag: here the NTP baseline
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py

Knobs are the fields of TrainConfig (configurator.py) and GPTConfig (model.py): `--key=value` sets one, a config
file of `key = value` lines (config/) several; flags win. Writes out_dir/log.jsonl (a JSON record per line), ckpt.pt
(replaced atomically) and config.json (a fresh run refuses a folder holding a run unless --overwrite=true);
`--init_from=resume` continues ckpt.pt with the same data, dropout masks and loss scale. `--wandb_project=NAME` mirrors the log to wandb.
Reading order: the command line, the schedule, evaluation, then run(): the setup, then the loop in the order it runs.
"""
import dataclasses
import fcntl
import gc
import inspect
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext


def stopped_while_starting(signum, frame):  # until main() installs its handler: a signal during the imports
    print(f"stopped by {signal.Signals(signum).name} while starting, before anything was written", file=sys.stderr)
    os._exit(128 + signum)  # at once: unwinding the import machinery would print its traceback


if __name__ == "__main__":  # importing torch takes seconds, long enough for a Ctrl-C
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stopped_while_starting)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm  # noqa: E402

from configurator import UsageError, check_fits, parse_args  # noqa: E402
from dataset import DatasetError, batch_offsets, get_batch, load_data, val_offsets  # noqa: E402
from hf import HFError, hf_gpt_config, load_hf_weights  # noqa: E402
from model import (GPT, CheckpointError, GPTConfig, expert_balance_stats, flops_per_token,  # noqa: E402
                   load_checkpoint, peak_flops_for, save_checkpoint)
from nitp import effective_rank, mean_pairwise_cosine  # noqa: E402
from tasks import TaskError, load_tasks, log_record, score_tasks  # noqa: E402


class RankError(UsageError):
    """Another rank's setup check failed; every rank ends with its line (exit 2)."""


class NonFiniteLoss(Exception):
    """The loss or gradient became inf/NaN and the run cannot go on: exit 3, checkpoint untouched."""


MAX_SKIPPED_IN_A_ROW = 10  # on_nonfinite=skip: more skipped steps than this in a row means broken weights


# --- schedule, evaluation, the log
def get_lr(it, cfg):
    """lr for optimizer step `it` (0-based). Warmup starts at lr/(warmup+1), not 0, so the first step already learns.
    wsd: then constant, then linear decay to min_lr over the last decay_frac (paper). cosine: then cosine to min_lr."""
    total = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= total:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        decay_start = total - int(cfg.decay_frac * total)
        frac = max(0, it - decay_start + 1) / max(1, total - decay_start)
        return cfg.learning_rate + frac * (cfg.min_lr - cfg.learning_rate)
    frac = (it - cfg.warmup_iters) / max(1, total - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, data, offsets, block_size, ctx, device, aux_name=None, rank=0, world_size=1):
    """Mean validation losses over the fixed windows `offsets` (eval_iters, B), in eval mode (no dropout); rank r takes
    batches r, r + W, ... Every rank calls all_reduce exactly once, and `model` must not be the DDP wrapper (whose
    forward is a collective), so a rank with no batch never leaves the others waiting."""
    model.eval()
    sums = torch.zeros(3, device=device)  # ntp, aux, batches
    for i in range(rank, len(offsets), world_size):
        x, y = get_batch(data, offsets[i], block_size, device)
        with ctx:
            _, losses = model(x, y)
        sums += torch.stack([losses["ntp"].float(), losses.get(aux_name, sums[0] * 0).float(), sums[0] * 0 + 1])
    if world_size > 1:
        dist.all_reduce(sums)
    model.train()
    means = (sums[:2] / sums[2]).tolist()
    return {"val_loss": means[0], **({f"val_{aux_name}": means[1]} if aux_name else {})}


@torch.no_grad()
def geometry(raw_model, x, ctx, max_tokens=8192):
    """erank and mean_cos (spec, Appendix D) of the final states h_t of the batch x, at most max_tokens of them."""
    seen = []  # through a hook in a forward call, not trunk(): FSDP gathers sharded weights in forward only
    hook = raw_model.transformer.ln_f.register_forward_hook(lambda module, args, out: seen.append(out))
    raw_model.eval()
    with ctx:
        raw_model(x)
    raw_model.train()
    hook.remove()
    states = seen[0].reshape(-1, seen[0].size(-1)).float()  # (B, T, C) -> (B*T, C)
    states = states[::max(1, states.size(0) // max_tokens)][:max_tokens]
    return {"erank": effective_rank(states), "mean_cos": mean_pairwise_cosine(states)}


def agree_on_setup(error):
    """Gather every rank's setup error (None: its checks passed) and raise the first on all ranks, so that a check
    one rank fails (a checkpoint or data missing on one node) ends every rank with that line, none left waiting."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error and (socket.gethostname(), str(error)))
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, (host, text) = failed[0]
        raise RankError(f"rank {rank} on {host}: {text}")


def resume_command(argv):
    """The command line that resumes this run: the same arguments, --init_from=resume."""
    args = [a for a in argv if not a.startswith("--init_from=")] + ["--init_from=resume"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launch = (["python"] if "RANK" not in os.environ else ["torchrun", "--standalone", f"--nproc_per_node={local}"]
              if local == int(os.environ["WORLD_SIZE"]) else ["torchrun", "(your --nnodes and --rdzv_endpoint flags)"])
    return " ".join(launch + [shlex.quote(a) for a in [os.path.relpath(__file__), *args]])


@contextmanager
def signals_deferred():
    """A Ctrl-C or SIGTERM that arrives inside this block is handled when it ends."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def sharded_model(mcfg, full_state, param_dtype, compile, checkpointing, device):
    """GPT(mcfg) under FSDP2 with rank 0's `full_state` (ignored on other ranks), built on the meta device and sent
    shard by shard: no rank holds the whole model on its device, and no rank but 0 on the host. param_dtype: the
    dtype blocks compute in (None = fp32); gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    with torch.device("meta"):
        model = GPT(mcfg)
    # Forward inputs keep their dtype: the default casts the fp32 RoPE tables (and nitp_weight) to param_dtype,
    # rotating with bf16 angles where DDP under autocast uses fp32. The residual stream is cast by the weights anyway.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.transformer.h:  # one all-gather per block in forward and one reduce-scatter in backward
        block.checkpoint = checkpointing  # before fully_shard, so the recomputation runs inside its hooks
        if compile:
            block.compile()  # per block: FSDP's hooks stay outside the compiled graphs
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: embeddings, ln_f, lm_head, nitp_head
    model.to_empty(device=device)
    model.init_rope(device)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def append_jsonl(path, record):
    with open(path, "a") as f:  # opened per record, so a crash loses nothing already logged
        f.write(json.dumps(record) + "\n")


# --- the run
def run(argv, cleanup, progress):
    """Train. `cleanup` (an ExitStack that main unwinds) takes what must be released however the run ends;
    `progress` (main's) tells main the step an interrupt stopped at, the step ckpt.pt holds, whether ranks agreed."""
    # --- setup: processes first (so that the ranks can agree on any error below), knobs, device and precision
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))  # set by torchrun
    world_size, master = int(os.environ.get("WORLD_SIZE", 1)), rank == 0
    if "RANK" in os.environ:  # torchrun; a plain `python` run is rank 0 of 1. Gloo carries CPU tensors and objects
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    cfg, model_args = parse_args(argv)
    say = tqdm.write if master else (lambda *a, **k: None)  # tqdm.write keeps the progress bar intact
    if cfg.fsdp and "RANK" not in os.environ:
        raise UsageError("--fsdp=true shards over torchrun's processes: run `torchrun --nproc_per_node=N train.py ...`")
    if cfg.wandb_project:  # on every rank, so that all of them stop here when it is missing
        try:
            import wandb  # only when asked for
        except ImportError:
            raise UsageError("--wandb_project needs the wandb package: pip install wandb (or drop --wandb_project)") \
                from None
    mps, cuda = torch.backends.mps.is_available(), torch.cuda.is_available()
    name = ("cuda" if cuda else "mps" if mps and world_size == 1 else "cpu") if cfg.device == "auto" else cfg.device
    if not cuda and name.startswith("cuda") or not mps and name == "mps":
        what = "MPS device" if name == "mps" else "CUDA GPU"
        raise UsageError(f"--device={name} but torch {torch.__version__} sees no {what} here: use --device=cpu")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    cuda = device.type == "cuda"
    if cuda:
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device={name} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for what runs in float32
    bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
    dtype = ("bfloat16" if bf16 else "float32") if cfg.dtype == "auto" else cfg.dtype
    if dtype != "float32" and not cuda or dtype == "bfloat16" and not bf16:
        say(f"notice: dtype={dtype} is not supported on this {device.type} device; training in float32")
        dtype = "float32"
    ptdtype = getattr(torch, dtype)
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(device.type, dtype=ptdtype)

    # --- data, the model's shape, the batch
    train_data, val_data, meta, where = load_data(cfg.data_dir or os.path.join("data", cfg.dataset), cfg.train_shards,
                                                  cfg.val_shards)
    vocab = meta["vocab_size"]
    # A Hugging Face model (hf.py) fixes the architecture knobs; a resume of such a run reads them from config.json.
    hf_source = cfg.init_from[3:] if cfg.init_from[:3] == "hf:" else None
    previous = os.path.join(cfg.out_dir, "config.json")
    if cfg.init_from == "resume" and os.path.isfile(previous):
        with open(previous) as f:
            try:
                recorded = json.load(f)
            except ValueError:  # cut short by a crash: the checkpoint's model check below still applies
                recorded = {}
        if recorded.get("hf_source"):
            hf_source, model_args = recorded["hf_source"], {**recorded["model"], **model_args}
    try:
        mcfg = hf_gpt_config(hf_source, model_args) if hf_source and cfg.init_from != "resume" else GPTConfig(
            **{"vocab_size": 64 * math.ceil(vocab / 64), **model_args})  # padded to a multiple of 64
    except HFError as e:
        raise UsageError(str(e)) from None
    if mcfg.vocab_size < vocab:
        raise UsageError(f"vocab_size={mcfg.vocab_size} is below the dataset's {vocab} ids (meta.json): " + (
            f"drop --vocab_size or set it >= {vocab}" if not hf_source else
            f"tokenise the data with the model's tokenizer (prepare_data.py --tokenizer=hf:{hf_source})"))
    if min(len(train_data), len(val_data)) < mcfg.block_size + 2:
        raise UsageError(f"block_size={mcfg.block_size} does not fit the data in {where} ({len(train_data)} "
                         f"train / {len(val_data)} val tokens): use a smaller --block_size or prepare more data")
    accum, per_micro = cfg.gradient_accumulation_steps, cfg.batch_size * mcfg.block_size * world_size
    if cfg.total_batch_size % per_micro:
        raise UsageError(f"total_batch_size={cfg.total_batch_size} is not a multiple of batch_size * block_size "
                         f"* world_size = {per_micro} tokens: make it one")
    accum = cfg.total_batch_size // per_micro or accum
    tokens_per_iter, flops = per_micro * accum, flops_per_token(mcfg)
    with torch.device("meta"):  # the parameter counts in milliseconds: the first line comes before any slow work
        shape = GPT(mcfg)
    say(f"{shape.num_params() / 1e6:.2f}M parameters ({shape.num_params(include_head=False) / 1e6:.2f}M at "
        f"inference), {tokens_per_iter:,} tokens per step on {world_size} x {device} in {ptdtype}; training FLOPs per "
        f"token (6 x params touched) {flops['total']:.3e}, of which NITP {flops['nitp']:.3e} = "
        f"{100 * flops['nitp_share']:.2f}% of NTP; nitp_layer={mcfg.nitp_layer} nitp_weight={mcfg.nitp_weight} "
        f"nitp_loss={mcfg.nitp_loss}")
    check_fits(shape.num_params(), flops["total"] * tokens_per_iter, cfg, device, ptdtype, world_size, say)
    tasks = []  # downstream tasks, tokenised once; a text task needs the dataset's tokenizer
    if cfg.eval_tasks:
        from tokenizer import TokenizerError, get_tokenizer
        ranks = cfg.tiktoken_file if meta.get("tokenizer") == "gpt2" and cfg.tiktoken_file else None
        try:
            tokenizer = get_tokenizer(meta.get("tokenizer", ""), tiktoken_file=ranks)
        except TokenizerError as e:
            if ranks:
                raise UsageError(str(e)) from None
            tokenizer = None  # the own task still works; a text task says it needs the tokenizer
        tasks = load_tasks(cfg.eval_tasks, val_data, meta, mcfg.block_size, cfg.task_items, cfg.seed, tokenizer)

    # --- the checkpoint to resume: refuse one of another model shape; name any schedule knob that changed
    ckpt_path, log_path, ckpt = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl"), None
    if cfg.init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise UsageError(f"init_from=resume but {ckpt_path} does not exist: train with --init_from=scratch first")
        ckpt = load_checkpoint(ckpt_path, required=("model", "model_config", "optimizer", "iter_num"))
        progress["saved"] = ckpt["iter_num"]  # what an interrupt from here on can tell the user to resume from
        try:  # through GPTConfig: a checkpoint older than a knob gets its default (head_dim, qkv_bias, rope_factor)
            saved, old = dataclasses.asdict(GPTConfig(**ckpt["model_config"])), ckpt.get("train_config", {})
        except (TypeError, ValueError) as e:
            raise UsageError(f"the model config in {ckpt_path} does not fit this version ({e}): use a new out_dir")
        differing = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs requested {v!r}"
                              for k, v in dataclasses.asdict(mcfg).items() if k != "dropout" and saved.get(k) != v)
        if differing:
            raise UsageError(f"the model in {ckpt_path} differs ({differing}): pass its settings or use a new out_dir")
        changed = [f"{k} {old[k]} -> {getattr(cfg, k)}" for k in ("max_iters", "lr_decay_iters", "warmup_iters",
                   "learning_rate", "min_lr", "lr_schedule", "decay_frac") if k in old and old[k] != getattr(cfg, k)]
        if changed:
            say(f"notice: the schedule differs from the checkpoint's ({', '.join(changed)}); the learning rate "
                f"follows the new one from step {ckpt['iter_num']} on")

    # --- one run per out_dir, and its record its own. The lock is the OS's (flock on an open file, dropped when the
    # process dies, so no file left behind can block); host and PID are written only for the message. The global
    # rank 0 alone decides; a refusal reaches every rank through agree_on_setup below.
    lock_path, tracker = os.path.join(cfg.out_dir, "train.lock"), None
    wandb_id = ckpt.get("wandb_id") if ckpt else None  # a resumed run continues its wandb run
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            lock = cleanup.enter_context(open(lock_path, "a+"))  # closed (so released) however the run ends
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)  # the file is never truncated before it is held: the holder's line stays readable
                holder = lock.read().strip() or "just starting"
                raise UsageError(f"{cfg.out_dir} is in use by another training run ({holder}); wait for it or pick "
                                 f"another --out_dir") from None
            lock.truncate(0)
            lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
            found = [n for n in ("ckpt.pt", "log.jsonl") if os.path.exists(os.path.join(cfg.out_dir, n))]
            if cfg.init_from == "scratch" and found and not cfg.overwrite:
                raise UsageError(f"{cfg.out_dir} already holds a run ({', '.join(found)}): continue it with "
                                 f"--init_from=resume, pick another --out_dir, or pass --overwrite=true to delete it")
            if cfg.init_from == "scratch":  # nothing of an old run (or of its interrupted writes) survives
                for stale in ("ckpt.pt", "ckpt.pt.tmp", "log.jsonl", "log.jsonl.tmp", "config.json"):
                    if os.path.exists(os.path.join(cfg.out_dir, stale)):
                        os.remove(os.path.join(cfg.out_dir, stale))
        except OSError as e:
            raise UsageError(f"cannot use out_dir {cfg.out_dir}: {e.strerror or e}; pick a writable --out_dir") from None
        if cfg.wandb_project:
            try:
                config = {"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg),
                          "world_size": world_size, "gradient_accumulation_steps": accum}
                tracker = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or None, id=wandb_id,
                                     resume="allow", config=config)
                wandb_id = tracker.id
            except Exception as e:  # no login, no network, a bad project name: wandb raises many kinds
                raise UsageError(f"wandb could not start a run ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [''])[0]}): run `wandb login`, set WANDB_MODE=offline, "
                                 "or drop --wandb_project") from None
            cleanup.callback(tracker.finish)

    def log(record):  # every record goes to log.jsonl and, when asked for, to wandb at step `iter`
        append_jsonl(log_path, record)
        if tracker is not None:
            tracker.log(record, step=record["iter"])

    # --- every rank passed its checks (or all stop with the failing rank's line); only then a model, and collectives
    progress["agreed"] = True  # this rank takes part in the agreement now: main must not call it again
    if world_size > 1:
        agree_on_setup(None)
    if ckpt is not None and ckpt["iter_num"] >= cfg.max_iters:  # done: exit 0, so a requeued job does not fail
        say(f"{ckpt_path} is already at max_iters={cfg.max_iters}: raise --max_iters to train on")
        return
    if ckpt is not None:
        say(f"resuming {ckpt_path} at step {ckpt['iter_num']} of {cfg.max_iters}")

    # --- model, sharding, optimizer, and the state to resume
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, and under FSDP as without it

    def fresh():  # the seed's weights; with --init_from=hf the folder's, the NITP head initialised as in a fresh run
        new = GPT(mcfg)
        if hf_source:
            load_hf_weights(new, hf_source)
        return new
    if cfg.fsdp:  # only rank 0 holds the full weights, on the host: made as above or read from the checkpoint
        full = (ckpt["model"] if ckpt is not None else fresh().state_dict()) if master else {}
        model = sharded_model(mcfg, full, None if dtype == "float32" else ptdtype, cfg.compile,
                              cfg.activation_checkpointing, device)
        del full
    else:
        model = (GPT(mcfg) if ckpt is not None else fresh()).to(device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        for block in model.transformer.h:
            block.checkpoint = cfg.activation_checkpointing  # before compile, which traces it
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    start_iter = 0 if ckpt is None else ckpt["iter_num"]
    if ckpt is not None:  # the file holds full, name-keyed state: it loads with or without FSDP
        set_optimizer_state_dict(model, optimizer, ckpt["optimizer"] if master or not cfg.fsdp else {},
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=cfg.fsdp))
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if master and os.path.exists(log_path):  # drop the records a crash left past the checkpoint's step
            keep = []
            with open(log_path) as f:
                for line in f:
                    try:
                        keep += [line] if json.loads(line)["iter"] <= start_iter else []
                    except (ValueError, KeyError, TypeError):
                        pass  # a line cut short by the crash
            with open(log_path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(log_path + ".tmp", log_path)
        del ckpt
    raw_model = model  # saved and evaluated for geometry: no _orig_mod. or module. prefixes
    # Compile first, then wrap in DDP; the RoPE tables are buffers every rank computes itself: nothing to broadcast
    # in forward (torch >= 2.13 names that forward_sync_buffers and warns about broadcast_buffers).
    model = torch.compile(model) if cfg.compile and not cfg.fsdp else model
    DDP = torch.nn.parallel.DistributedDataParallel
    no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else "broadcast_buffers": False}
    train_model = model if world_size == 1 or cfg.fsdp else DDP(model, device_ids=[local_rank] if cuda else None,
                                                                 **no_buffer_sync)

    logged = ["total", "ntp"] + ([mcfg.aux_name] if mcfg.nitp else []) + (["moe_aux"] if mcfg.n_experts else [])
    val_windows = val_offsets(len(val_data), mcfg.block_size, cfg.batch_size, cfg.eval_iters)
    peak = cfg.peak_flops or (cuda and peak_flops_for(torch.cuda.get_device_name(device), dtype))
    if master:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": dataclasses.asdict(mcfg), "world_size": world_size,
                       "gradient_accumulation_steps": accum, "device": str(device), "dtype": str(ptdtype),
                       "torch": torch.__version__, "git": git, "argv": argv, "hf_source": hf_source}, f, indent=2)

    # --- the training loop: `it` counts optimizer steps taken; evaluation and checkpoint come first
    skipped, t0, timed_steps = 0, time.time(), 0  # skipped: non-finite steps in a row
    with tqdm(total=cfg.max_iters, initial=start_iter, disable=not master, dynamic_ncols=True, mininterval=1.0) as bar:
        for it in range(start_iter, cfg.max_iters + 1):
            progress["step"] = it
            if it == 0 or (it > start_iter and (it % cfg.eval_interval == 0 or it == cfg.max_iters)):
                # Under FSDP every forward is a collective: each rank evaluates every batch (and the geometry).
                val = evaluate(model, val_data, val_windows, mcfg.block_size, ctx, device,
                               mcfg.aux_name if mcfg.nitp else None, *((0, 1) if cfg.fsdp else (rank, world_size)))
                if master or cfg.fsdp:
                    val.update(geometry(raw_model, get_batch(val_data, val_windows[0], mcfg.block_size, device)[0], ctx))
                if tasks and (not cfg.task_eval_interval or it % cfg.task_eval_interval == 0 or it == cfg.max_iters):
                    t = time.time()  # through raw_model: no recompilation for the tasks' shapes
                    scores = score_tasks(raw_model, tasks, meta["eot_token"], ctx, device, rank, world_size, cfg.fsdp,
                                         n_tokens=vocab)
                    val.update(log_record(scores), task_seconds=time.time() - t)
                if master:
                    log({"iter": it, **val})
                    say(f"iter {it}: " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
                if it > 0 and skipped:
                    say(f"notice: no checkpoint at step {it}: the last {skipped} steps were skipped as non-finite")
                elif it > 0:  # full tensors keyed by parameter name (gathered from the shards under FSDP: a
                    # collective on every rank), saved by rank 0
                    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                    state = {"model": get_model_state_dict(raw_model, options=options),
                             "optimizer": get_optimizer_state_dict(raw_model, optimizer, options=options)}
                    with signals_deferred():  # a stop waits for the file to be whole, then says it holds this step
                        if master:
                            save_checkpoint(ckpt_path, {
                                **state, "scaler": scaler.state_dict(), "model_config": dataclasses.asdict(mcfg),
                                "train_config": dataclasses.asdict(cfg), "iter_num": it, "val": val,
                                "wandb_id": wandb_id, "data": {k: meta.get(k) for k in ("tokenizer", "vocab_size",
                                                                                         "eot_token")}})
                        progress["saved"] = it
                t0, timed_steps = time.time(), 0  # keep evaluation out of the step timing
            if it == cfg.max_iters:
                break

            lr = get_lr(it, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # A late NITP start (paper ablation): the weight as a tensor, 0 before nitp_start_iter and lambda after,
            # so that the compiled graph is not rebuilt when it switches.
            weight = {}
            if mcfg.nitp and cfg.nitp_start_iter:
                weight["nitp_weight"] = torch.tensor(0.0 if it < cfg.nitp_start_iter else mcfg.nitp_weight, device=device)
            sums, counts = torch.zeros(len(logged), device=device), 0  # loss parts; MoE tokens per expert (L, E)
            for micro in range(accum):
                # FSDP reduce-scatters every micro-step: skipping it would keep an unsharded gradient per rank
                # (pytorch#126166), the memory FSDP is for. DDP all-reduces on the last micro-step only.
                if world_size > 1 and not cfg.fsdp:  # set before forward
                    train_model.require_backward_grad_sync = micro == accum - 1
                # The data and the dropout masks of a micro-batch depend on (seed, step, global micro-batch index) alone:
                # no random state to save, and the same run on any number of processes.
                g = rank * accum + micro
                offsets = batch_offsets(len(train_data), mcfg.block_size, cfg.batch_size, cfg.seed, it, g)
                x, y = get_batch(train_data, offsets, mcfg.block_size, device)
                if mcfg.dropout:  # nothing else in a step draws random numbers
                    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, it, g]).generate_state(1)[0]))
                with ctx:
                    _, losses = train_model(x, y, **weight)
                # Every micro-batch holds the same number of tokens, so dividing each mean by the number
                # of micro-steps makes the accumulated gradient exactly that of the mean over the batch.
                scaler.scale(losses["total"] / accum).backward()
                sums += torch.stack([losses[k].detach().float() for k in logged])
                counts = counts + losses.get("expert_counts", 0)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
            # One host sync per step: a non-finite update must never reach the weights (or a checkpoint).
            finite = bool(torch.isfinite(norm)) and bool(torch.isfinite(sums).all())
            if finite or scaler.is_enabled():  # float16's scaler skips a bad step itself and lowers its scale
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            skipped = 0 if finite else skipped + 1
            if not finite:
                what = f"non-finite loss or gradient at step {it + 1} (loss {sums[0] / accum:.4g}, grad norm {norm:.4g})"
                keep = f"stopped without saving, so {ckpt_path} still holds the last good state"
                if cfg.on_nonfinite == "stop" and not scaler.is_enabled():
                    raise NonFiniteLoss(f"{what}; {keep}. Lower --learning_rate, or pass --on_nonfinite=skip")
                if skipped > MAX_SKIPPED_IN_A_ROW:
                    raise NonFiniteLoss(f"{what}: {skipped} steps in a row skipped (the limit is {MAX_SKIPPED_IN_A_ROW}),"
                                        f" the weights are broken; {keep}. Lower --learning_rate")
                say(f"warning: {what}; step skipped")
            bar.update(1)
            timed_steps += 1

            if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
                means = sums / accum
                if world_size > 1:  # log the global batch: average over processes
                    dist.all_reduce(means)
                    means /= world_size
                means = dict(zip(logged, means.tolist()))
                record = {"iter": it + 1, "loss": means.pop("total"), **means, "lr": lr}
                if mcfg.n_experts:  # load balance of this step's global batch: counts summed over ranks
                    if world_size > 1:
                        dist.all_reduce(counts)
                    stats = expert_balance_stats(counts)
                    record.update(moe_imbalance=stats["imbalance"], moe_idle=stats["idle"])
                if cuda:
                    record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if master:
                    log(record)
                elapsed = time.time() - t0
                tok_s = tokens_per_iter * timed_steps / elapsed
                mfu = f" mfu {100 * flops['total'] * tok_s / (peak * world_size):.1f}%" if peak else ""
                shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                                 if k != "lr")
                say(f"{shown} lr {lr:.2e} norm {norm:.2f} {1000 * elapsed / timed_steps:.0f} ms/iter "
                    f"{tok_s:,.0f} tok/s{mfu}")
                t0, timed_steps = time.time(), 0


def ignore_stop_signals():
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def main(argv):
    """Run, and end every way with one line and an exit code: 0 done, 2 bad input (on any rank), 3 non-finite,
    128 + the signal when stopped (130 Ctrl-C, 143 SIGTERM from a scheduler or torchrun)."""
    code, stopped, progress = None, [], {"step": None, "saved": 0, "agreed": False}
    one_line = int(os.environ.get("LOCAL_RANK", 0)) == 0  # one line per node, however many processes it runs

    def stop(signum, frame):
        ignore_stop_signals()  # the SIGTERM that torchrun sends after a Ctrl-C must not cut the cleanup short
        stopped.append(signum)
        raise KeyboardInterrupt
    handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ExitStack() as cleanup:  # the lock's release, however the run ends
            try:
                run(argv, cleanup, progress)
                code = 0
            finally:  # the outcome is known: a late signal (torchrun stopping the other ranks) must not change it
                ignore_stop_signals()
    except (UsageError, DatasetError, CheckpointError, NonFiniteLoss, TaskError, HFError) as e:
        code = 3 if isinstance(e, NonFiniteLoss) else 2
        if dist.is_initialized() and not progress["agreed"]:  # the other ranks wait for this one's verdict
            try:
                agree_on_setup(e)
            except RankError as first:
                e = first
        if one_line:
            print(f"error: {e}", file=sys.stderr)
    except BaseException:  # an interrupt, or what it caused once one came (a peer's closed connection)
        if not stopped:
            raise
        code, step, saved = 128 + stopped[0], progress["step"], progress["saved"]
        where = "during setup" if step is None else f"at step {step}"
        kept = (f"{os.path.join(parse_args(argv)[0].out_dir, 'ckpt.pt')} holds step {saved}; resume with: "
                f"{resume_command(argv)}" if saved else "nothing saved yet; start again with the same command")
        if one_line:
            print(f"stopped by {signal.Signals(stopped[0]).name} {where}; {kept}", file=sys.stderr)
    finally:
        if dist.is_initialized():
            # In this order, or a rank can die at exit with SIGABRT: the DDP/FSDP objects hold the group and its
            # last async work in reference cycles that outlive run(), and gloo's threads must not meet interpreter
            # finalization.
            gc.collect()
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return code


if __name__ == "__main__":
    ignore_stop_signals()  # main() handles them while it runs; after it, a late one must not change the exit code
    sys.stdout.reconfigure(line_buffering=True)  # a log file or a scheduler's output file gets each line at once
    sys.exit(main(sys.argv[1:]))
