"""
Everything one H100/H200 session has to measure, in one command: a JSON file and a markdown table.

    python -m bench.gpu --out=gpu.json                   # one GPU, about 6-8 minutes
    python -m bench.gpu --device=cpu --smoke             # every section with tiny shapes, ~25 s on 2 cores
    python -m bench.gpu --only=moe_layer,e2e             # re-run some sections

Sections, run in this order; each catches its own failure and records it (error type and first
line), and the JSON (default out-bench-gpu/gpu.json) is rewritten before each section (marked
"running") and after it, so a run killed by a time limit keeps what it measured and shows where it
stopped. A section not started within --time_limit seconds is recorded as skipped.

    env          torch, GPU, its bf16 peak as train.py looks it up, a measured 8192^3 bf16 matmul rate
                 (the practical ceiling for MFU)
    dense        GPT-2 124M shape (12 x 768, 12 heads, T=1024, vocab 50304), batch 32 as in
                 config/gpt2_124m.py, bf16 autocast, compiled, fused AdamW, synthetic tokens: NTP and
                 NITP (nitp_layer=2) steps alternated after warm-up; tokens/s, MFU, and the NITP
                 overhead next to its analytic FLOPs share
    moe_layer    one MoE layer (D=768; E=32/K=4 and E=64/K=8, one shared expert), forward + backward:
                 torch._grouped_mm vs the per-expert loop (model.GROUPED_MM) vs a dense SwiGLU of the
                 same active width; outputs and gradients compared between the two paths, and an idle
                 expert's weight gradient checked to be exactly zero (what DDP relies on)
    moe_compile  a small MoE GPT under torch.compile(fullgraph=True): no graph break, compiled loss
                 equal to eager at step 0, loss falls over a few steps
    e2e          `torchrun --standalone --nproc_per_node=1 train.py` (run as python -m
                 torch.distributed.run) on a synthetic dataset folder written here, compiled, bf16:
                 loss falls, a checkpoint is written, --init_from=resume with a larger --max_iters
                 continues from the checkpoint's step
    memory       bench/memory.py's measurements, each in a fresh process: peak torch.cuda.max_memory_allocated of
                 the loss and of a training step (bf16 autocast) with the plain cross-entropy (full logits), the
                 chunked one, and the chunked one with activation checkpointing, for config/gpt2_124m.py's
                 model and a 2 x 256 model with the paper's 152,064-token vocabulary; ratios to the plain path

Timings synchronise the device and read time.perf_counter. Peak GPU memory is
torch.cuda.max_memory_allocated for the in-process sections; for e2e it is whatever train.py logs
(a field with "mem" in its name), and the report says when it logs none. The smoke path shrinks
every shape, runs the dense section and e2e uncompiled, and compiles the MoE model with the
aot_eager backend (graph capture, fake kernels and autograd of the custom ops, without inductor,
which would add over a minute on 2 cores); the table says so. Exit code 1 if any section failed.
"""
import argparse
import gc
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
from model import PEAK_BF16_FLOPS, GPT, MoE, GPTConfig, SwiGLU, flops_per_token, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "dense", "moe_layer", "moe_compile", "e2e", "memory")


class CheckFailed(Exception):
    """A measured property that must hold did not (outputs differ, loss did not fall, ...)."""


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


# ----------------------------------------------------------------------------------------------
# helpers shared by the sections

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device, dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def peak_memory_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fresh_memory(device):
    """Free what the previous section left and restart the peak-memory counter."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_peak_flops(device):
    """The bf16 peak FLOP/s train.py uses for MFU on this device (None on CPU or an unlisted GPU)."""
    if device.type != "cuda":
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)


def markov_tokens(n, vocab, seed):
    """A learnable synthetic stream: the next token is (previous + 7) mod vocab with probability 0.9,
    else uniform; about 0.9 nats/token at vocab 256, so a loss that falls is a model that learns."""
    rng = np.random.default_rng(seed)
    reset = rng.random(n) < 0.1
    reset[0] = True
    pos = np.arange(n)
    start = np.maximum.accumulate(np.where(reset, pos, 0))  # (n,) where each run began
    first = rng.integers(0, vocab, n)
    return (first[start] + 7 * (pos - start)) % vocab  # (n,) int64


def markov_batch(batch_size, block_size, vocab, seed, device):
    flat = markov_tokens(batch_size * (block_size + 1), vocab, seed).reshape(batch_size, block_size + 1)
    t = torch.from_numpy(flat).to(device)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets


def train_step(net, opt, x, y, ctx):
    with ctx:
        _, losses = net(x, y)
    losses["total"].backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return losses["total"].detach()


def graph_break_count():
    try:
        from torch._dynamo.utils import counters
        return sum(counters["graph_break"].values())
    except Exception:  # private API; a count is a nicety, not a check
        return None


def rel_diff(a, b):
    """max |a - b| / max |b|, in fp32."""
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# sections: each fills `entry` as it goes, so a failure keeps the figures measured before it

def section_env(entry, a):
    device = a.device
    entry.update(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                 numpy=np.__version__, device=str(device), grouped_mm_in_torch=hasattr(torch, "_grouped_mm"),
                 grouped_mm_flag=model.GROUPED_MM)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        entry.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=props.total_memory / 2**30,
                     sm_count=props.multi_processor_count, bf16_supported=torch.cuda.is_bf16_supported(),
                     float32_matmul_precision=torch.get_float32_matmul_precision())
        # torch._grouped_mm's CUTLASS kernel runs for bf16 on compute capability 9.x/10.x only;
        # elsewhere torch falls back to a loop of mm's with a device-to-host sync.
        entry["grouped_mm_fast_path"] = props.major in (9, 10)
    else:
        entry.update(gpu=None, cpu_threads=torch.get_num_threads())
    entry["peak_bf16_flops"] = train_peak_flops(device)
    n = a.matmul_n
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ w
    sync(device)
    t0 = time.perf_counter()
    for _ in range(a.matmul_reps):
        x @ w
    sync(device)
    seconds = (time.perf_counter() - t0) / a.matmul_reps
    entry.update(matmul_n=n, matmul_bf16_flops=2 * n**3 / seconds)
    if entry["peak_bf16_flops"]:
        entry["matmul_fraction_of_peak"] = entry["matmul_bf16_flops"] / entry["peak_bf16_flops"]


def section_dense(entry, a):
    device, dtype = a.device, a.dtype
    shape = dict(n_layer=a.dense_layers, n_embd=a.dense_embd, n_head=a.dense_heads, block_size=a.dense_block,
                 vocab_size=a.dense_vocab)
    configs = {"ntp": GPTConfig(**shape, nitp_weight=0.0),
               "nitp": GPTConfig(**shape, nitp_weight=1.0, nitp_layer=a.nitp_layer)}
    tokens_per_step = a.dense_batch * a.dense_block
    entry.update(shape=shape, batch_size=a.dense_batch, tokens_per_step=tokens_per_step, dtype=str(dtype),
                 compile=a.compile, nitp_layer=a.nitp_layer)
    torch.manual_seed(0)
    x = torch.randint(0, a.dense_vocab, (a.dense_batch, a.dense_block), device=device)  # (B, T)
    y = torch.randint(0, a.dense_vocab, (a.dense_batch, a.dense_block), device=device)  # (B, T)
    ctx = autocast(device, dtype)
    runs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        raw = GPT(cfg).to(device)
        opt = raw.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)  # fused AdamW on CUDA
        net = torch.compile(raw) if a.compile else raw
        t0 = time.perf_counter()
        first = train_step(net, opt, x, y, ctx).item()  # compiles when a.compile
        entry[f"{name}_first_step_s"] = time.perf_counter() - t0
        for _ in range(a.warmup - 1):
            train_step(net, opt, x, y, ctx)
        sync(device)
        runs[name] = (net, opt)
        entry[f"{name}_params"] = raw.num_params()
        entry[f"{name}_first_loss"] = first
    # Alternate NTP and NITP, a few steps each per round, so drifting clocks and load hit both alike.
    times = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, (net, opt) in runs.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(a.steps_per_round):
                train_step(net, opt, x, y, ctx)
            sync(device)
            times[name].append((time.perf_counter() - t0) / a.steps_per_round)
    peak = entry["peak_bf16_flops_used"] = train_peak_flops(device)
    for name, cfg in configs.items():
        step = statistics.median(times[name])
        tok_s = tokens_per_step / step
        flops = flops_per_token(cfg)["total"]
        # PaLM / nanoGPT also count attention scores: 12 L d T per token (train.py's count leaves them out).
        flops_attn = flops + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        entry[name] = dict(step_ms=1e3 * step, tokens_per_s=tok_s, flops_per_token=flops,
                           mfu=flops * tok_s / peak if peak else None,
                           mfu_with_attention=flops_attn * tok_s / peak if peak else None)
    ratios = sorted(nitp / ntp - 1 for ntp, nitp in zip(times["ntp"], times["nitp"]))  # paired by round
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    entry.update(nitp_overhead_measured=median, nitp_overhead_iqr=[q1, q3],
                 nitp_overhead_analytic=flops_per_token(configs["nitp"])["nitp_share"],
                 graph_breaks=graph_break_count(), peak_memory_gb=peak_memory_gb(device))
    for name in runs:
        check(np.isfinite(entry[f"{name}_first_loss"]), f"{name}: non-finite loss at the first step")


def moe_layer_config(a, n_experts, top_k):
    return GPTConfig(n_embd=a.moe_width, n_head=4, n_experts=n_experts, moe_top_k=top_k, n_shared_experts=1)


def fwd_bwd(layer, x, grad, ctx):
    """One training step's work for a feed-forward layer: forward, backward into input and weights.
    Returns the layer's output: y, or for an MoE layer (y, (balance loss, expert counts))."""
    with ctx:
        out = layer(x)
    if isinstance(out, tuple):
        y, (aux, _) = out
        loss = (y.float() * grad).sum() + aux
    else:
        loss = (out.float() * grad).sum()
    loss.backward()
    return out


def moe_grads(layer, x):
    return {"x": x.grad, "router": layer.router.weight.grad, "c_gate": layer.experts.c_gate.grad,
            "c_up": layer.experts.c_up.grad, "c_proj": layer.experts.c_proj.grad}


def section_moe_layer(entry, a):
    device, dtype = a.device, a.dtype
    ctx = autocast(device, dtype)
    entry.update(width=a.moe_width, tokens=a.moe_tokens, dtype=str(dtype), points=[])
    grouped_default = model.GROUPED_MM
    problems = []  # checked after timing, so that a failed check still leaves the timings in the report
    try:
        for n_experts, top_k in a.moe_points:
            cfg = moe_layer_config(a, n_experts, top_k)
            point = dict(E=n_experts, K=top_k, expert_hidden=cfg.expert_hidden, shared=cfg.n_shared_experts)
            entry["points"].append(point)
            torch.manual_seed(0)
            layer = MoE(cfg).to(device)
            # Expert `idle` is kept out of every top-k: the inputs' feature 0 is a constant 1, on
            # which its router row is very negative.
            idle = n_experts - 1
            with torch.no_grad():
                layer.router.weight[idle, 0] = -100.0
            dense = SwiGLU(a.moe_width, (top_k + cfg.n_shared_experts) * cfg.expert_hidden).to(device)
            x = torch.randn(1, a.moe_tokens, a.moe_width, device=device)  # (B, T, D)
            x[..., 0] = 1.0
            x.requires_grad_()
            grad = torch.randn(1, a.moe_tokens, a.moe_width, device=device)
            point["grouped_mm_runs"] = bool(model._grouped_mm_fits(x.to(dtype), layer.experts.c_up.to(dtype)))

            # Correctness first: the grouped and loop paths compute the same layer.
            results = {}
            for path, grouped in (("grouped", True), ("loop", False)):
                model.GROUPED_MM = grouped
                layer.zero_grad(set_to_none=True)
                x.grad = None
                y, (_, counts) = fwd_bwd(layer, x, grad, ctx)
                grads = {k: v.detach().clone() for k, v in moe_grads(layer, x).items()}
                results[path] = (y.detach(), grads, counts)
            (y_g, g_g, counts), (y_l, g_l, _) = results["grouped"], results["loop"]
            point["idle_expert_tokens"] = int(counts[idle])
            point["max_rel_diff"] = {"y": rel_diff(y_g, y_l), **{k: rel_diff(g_g[k], g_l[k]) for k in g_g}}
            point["idle_expert_grad_max"] = {
                path: max(g[k][idle].abs().max().item() for k in ("c_gate", "c_up", "c_proj"))
                for path, (_, g, _) in results.items()}
            tol = 3e-2 if dtype != torch.float32 else 1e-4
            bad = {k: v for k, v in point["max_rel_diff"].items() if not v <= tol}
            if bad:
                problems.append(f"E={n_experts} K={top_k}: grouped and loop paths differ beyond {tol}: {bad}")
            if point["idle_expert_tokens"]:
                problems.append(f"E={n_experts}: the idle expert got tokens; the zero-gradient check is void")
            if any(v != 0 for v in point["idle_expert_grad_max"].values()):
                problems.append(f"E={n_experts} K={top_k}: an expert with no tokens got a non-zero weight gradient "
                                f"{point['idle_expert_grad_max']} (DDP without find_unused_parameters relies on "
                                f"exact zeros)")

            variants = {"dense": (dense, True), "grouped": (layer, True), "loop": (layer, False)}
            times = {name: [] for name in variants}
            names = list(variants)
            for rep in range(a.moe_warmup + a.moe_reps):
                shift = rep % len(names)
                for name in names[shift:] + names[:shift]:  # rotating order, one of each per repetition
                    net, grouped = variants[name]
                    model.GROUPED_MM = grouped
                    net.zero_grad(set_to_none=True)
                    x.grad = None
                    sync(device)
                    t0 = time.perf_counter()
                    fwd_bwd(net, x, grad, ctx)
                    sync(device)
                    if rep >= a.moe_warmup:
                        times[name].append(time.perf_counter() - t0)
            # fwd + bwd matmul FLOPs per token: 3 passes x 2 FLOPs x 3 matrices x D x active hidden
            active = (top_k + cfg.n_shared_experts) * cfg.expert_hidden
            flops = 6 * 3 * a.moe_width * active * a.moe_tokens
            for name, ts in times.items():
                t = statistics.median(ts)
                point[name] = dict(ms=1e3 * t, tokens_per_s=a.moe_tokens / t, matmul_flops=flops / t)
            point["grouped_over_dense"] = point["grouped"]["ms"] / point["dense"]["ms"]
            point["loop_over_grouped"] = point["loop"]["ms"] / point["grouped"]["ms"]
            del layer, dense, x, grad, results
    finally:
        model.GROUPED_MM = grouped_default
    entry["peak_memory_gb"] = peak_memory_gb(device)
    check(not problems, "; ".join(problems))


def section_moe_compile(entry, a):
    device, dtype = a.device, a.dtype
    cfg = GPTConfig(n_layer=a.mc_layers, n_embd=a.mc_embd, n_head=a.mc_heads, n_kv_head=a.mc_heads // 2,
                    block_size=a.mc_block, vocab_size=a.mc_vocab, n_experts=a.mc_experts, moe_top_k=a.mc_top_k,
                    n_dense_layers=1, nitp_layer=1)
    backend = "inductor" if a.compile else "aot_eager"
    entry.update(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_experts=cfg.n_experts, top_k=cfg.moe_top_k,
                 expert_hidden=cfg.expert_hidden, batch_size=a.mc_batch, block_size=cfg.block_size,
                 dtype=str(dtype), backend=backend, fullgraph=True, steps=a.mc_steps)
    torch.manual_seed(0)
    raw = GPT(cfg).to(device)
    opt = raw.configure_optimizers(0.0, a.mc_lr, (0.9, 0.95), device.type)
    ctx = autocast(device, dtype)
    x, y = markov_batch(a.mc_batch, cfg.block_size, 256, seed=0, device=device)
    with torch.no_grad(), ctx:
        eager_loss = raw(x, y)[1]["total"].item()
    torch._dynamo.reset()
    breaks_before = graph_break_count()
    net = torch.compile(raw, fullgraph=True, backend=backend)  # any graph break raises here
    losses = []
    t0 = time.perf_counter()
    for step in range(a.mc_steps):
        if step > 0:  # a fresh batch from the same stream each step: the loss falls only if it learns
            x, y = markov_batch(a.mc_batch, cfg.block_size, 256, seed=step, device=device)
        losses.append(train_step(net, opt, x, y, ctx).item())
        if step == 0:
            sync(device)
            entry["compile_and_first_step_s"] = time.perf_counter() - t0
    sync(device)
    after = graph_break_count()
    entry.update(eager_loss_step0=eager_loss, losses=losses,
                 seconds_after_compile=time.perf_counter() - t0 - entry["compile_and_first_step_s"],
                 graph_breaks=None if after is None else after - (breaks_before or 0),
                 peak_memory_gb=peak_memory_gb(device))
    check(all(np.isfinite(losses)), f"non-finite loss: {losses}")
    check(abs(losses[0] - eager_loss) <= 2e-2 * abs(eager_loss) + 1e-3,
          f"compiled loss {losses[0]:.5f} differs from eager {eager_loss:.5f} at step 0")
    check(losses[-1] < losses[0] - 0.1, f"loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


def write_dataset(folder, train_tokens, val_tokens):
    """A dataset folder as prepare_data.py writes one (meta.json, train.bin, val.bin), byte tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": markov_tokens(train_tokens, 256, seed=1), "val": markov_tokens(val_tokens, 256, seed=2)}
    for split, tokens in splits.items():
        tokens.astype("<u2").tofile(folder / f"{split}.bin")
    meta = {"tokenizer": "byte", "vocab_size": 257, "dtype": "uint16", "eot_token": 256,
            "train_tokens": train_tokens, "val_tokens": val_tokens}
    (folder / "meta.json").write_text(json.dumps(meta))


def run_train(args, log_path, timeout):
    """torchrun one process of train.py; its own session so that a timeout kills the worker too."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
    output = Path(log_path).read_text(errors="replace")
    return code, output


def read_log(path):
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def memory_fields(record):
    return {k: v for k, v in record.items() if "mem" in k.lower()}


def section_e2e(entry, a, deadline):
    work = Path(tempfile.mkdtemp(prefix="nitp-gpu-bench-"))
    e2e_runs(entry, a, deadline, work)  # a failure leaves the folder, with the runs' output, at entry["work_dir"]
    shutil.rmtree(work, ignore_errors=True)


def e2e_runs(entry, a, deadline, work):
    data, out = work / "data", work / "out"
    write_dataset(data, a.e2e_train_tokens, a.e2e_train_tokens // 10)
    common = [f"--data_dir={data}", f"--out_dir={out}", f"--device={a.device.type}",
              f"--dtype={'bfloat16' if a.dtype == torch.bfloat16 else 'float32'}", f"--compile={a.compile}",
              f"--eval_interval={a.e2e_eval_interval}", "--eval_iters=4", f"--log_interval={a.e2e_log_interval}",
              f"--batch_size={a.e2e_batch}", f"--block_size={a.e2e_block}", f"--n_layer={a.e2e_layers}",
              f"--n_embd={a.e2e_embd}", f"--n_head={a.e2e_heads}"]
    entry.update(work_dir=str(work), args=common, max_iters=[a.e2e_iters, a.e2e_resume_iters],
                 launcher="python -m torch.distributed.run --standalone --nproc_per_node=1 train.py")

    for run, extra in (("first", [f"--max_iters={a.e2e_iters}"]),
                       ("resume", [f"--max_iters={a.e2e_resume_iters}", "--init_from=resume"])):
        before = len(read_log(out / "log.jsonl"))
        timeout = min(a.e2e_timeout, max(30.0, deadline - time.time()))
        t0 = time.perf_counter()
        code, output = run_train(common + extra, work / f"{run}.txt", timeout)
        entry[f"{run}_seconds"] = time.perf_counter() - t0
        entry[f"{run}_exit_code"] = code
        speeds = re.findall(r"([\d,]+) tok/s", output)  # train.py's progress lines
        entry[f"{run}_tokens_per_s_printed"] = int(speeds[-1].replace(",", "")) if speeds else None
        if code != 0:
            entry[f"{run}_output_tail"] = output[-2000:]
        check(code is not None, f"{run} run timed out after {timeout:.0f} s")
        check(code == 0, f"{run} run exited with {code}: {output.strip().splitlines()[-1] if output.strip() else ''}")
        records = read_log(out / "log.jsonl")[before:]
        train_recs = [r for r in records if "loss" in r]
        val_recs = [r for r in records if "val_loss" in r]
        entry[f"{run}_train"] = [[r["iter"], r["loss"]] for r in train_recs]
        entry[f"{run}_val"] = [[r["iter"], r["val_loss"]] for r in val_recs]
        check(train_recs and val_recs, f"{run} run logged no training or evaluation record to log.jsonl")
        mem = memory_fields(train_recs[-1]) if train_recs else {}
        entry[f"{run}_peak_memory"] = mem or "not logged by train.py (no *mem* field in its training records)"
        check((out / "ckpt.pt").is_file(), f"{run} run wrote no checkpoint at {out / 'ckpt.pt'}")
        try:
            entry[f"{run}_ckpt_iter"] = load_checkpoint(str(out / "ckpt.pt")).get("iter_num")
        except Exception as e:  # the format may change with train.py; the log says the same thing
            entry[f"{run}_ckpt_iter"] = f"unreadable: {error_line(e)}"

    first, resumed = entry["first_train"], entry["resume_train"]
    first_val = entry["first_val"]
    check(first[-1][0] == a.e2e_iters, f"first run ended at iter {first[-1][0]}, not {a.e2e_iters}")
    check(first[-1][1] < first[0][1], f"training loss did not fall: {first[0][1]:.4f} -> {first[-1][1]:.4f}")
    check(first_val[-1][1] < first_val[0][1], f"val loss did not fall: {first_val[0][1]:.4f} -> {first_val[-1][1]:.4f}")
    # Resumed from the checkpoint's step: no record at or before it, the next logged step right after
    # it, the end at the new max_iters, and a loss near where the first run left off (a fresh start
    # would begin again near log(vocab)).
    check(all(r[0] > a.e2e_iters for r in resumed) and all(r[0] >= a.e2e_iters for r in entry["resume_val"]),
          f"the resumed run logged steps before the checkpoint's step {a.e2e_iters}: {resumed}")
    check(resumed[0][0] == a.e2e_iters + a.e2e_log_interval and resumed[-1][0] == a.e2e_resume_iters,
          f"the resumed run logged steps {[r[0] for r in resumed]}, expected {a.e2e_iters + a.e2e_log_interval}"
          f"..{a.e2e_resume_iters}")
    check(resumed[0][1] < (first[0][1] + first[-1][1]) / 2,
          f"the resumed run's first loss {resumed[0][1]:.4f} looks like a fresh start (first run: "
          f"{first[0][1]:.4f} -> {first[-1][1]:.4f})")
    entry["resumed_from_iter"] = resumed[0][0] - a.e2e_log_interval
    check(entry["first_ckpt_iter"] in (a.e2e_iters, None) or isinstance(entry["first_ckpt_iter"], str),
          f"the first run's checkpoint is at step {entry['first_ckpt_iter']}, not {a.e2e_iters}")


# ----------------------------------------------------------------------------------------------
# the run

def section_memory(entry, a):
    from bench.memory import measure_in_subprocess, measurements
    entry.update(device=str(a.device), batch_size=a.mem_batch, block_size=a.mem_block, steps=a.mem_steps, points=[])
    for shape in a.mem_shapes:
        for what, variant in measurements():
            r = measure_in_subprocess(shape, what, variant, a.mem_batch, a.mem_block, a.mem_steps, a.device.type,
                                      a.mem_timeout)
            plain = r if variant == "plain" else plain
            entry["points"].append(dict(shape=shape, what=what, variant=variant, **r,
                                        memory_ratio=r["peak_gb"] / plain["peak_gb"], time_ratio=r["ms"] / plain["ms"]))


def settings(args):
    """Every shape and count, for the GPU run or the CPU smoke path."""
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    s = SimpleNamespace(device=device, smoke=args.smoke,
                        dtype=(torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported(including_emulation=False)
                               else torch.float32),
                        # inductor on a 2-core CPU takes 10-20 s per model: the smoke path skips it
                        compile=on_gpu or not args.smoke, time_limit=args.time_limit)
    if not args.smoke:
        s.__dict__.update(matmul_n=8192, matmul_reps=30,
                          dense_layers=12, dense_embd=768, dense_heads=12, dense_block=1024, dense_vocab=50304,
                          dense_batch=32, nitp_layer=2, warmup=3, rounds=10, steps_per_round=3,
                          moe_width=768, moe_tokens=16384, moe_points=[(32, 4), (64, 8)], moe_warmup=3, moe_reps=10,
                          mc_layers=4, mc_embd=512, mc_heads=8, mc_block=512, mc_vocab=320, mc_experts=16,
                          mc_top_k=4, mc_batch=8, mc_steps=12, mc_lr=2e-3,
                          e2e_train_tokens=2_000_000, e2e_layers=4, e2e_embd=256, e2e_heads=4, e2e_block=256,
                          e2e_batch=32, e2e_iters=50, e2e_resume_iters=70, e2e_eval_interval=25,
                          e2e_log_interval=5, e2e_timeout=240.0,
                          mem_shapes=["gpt2_124m", "vocab152k"], mem_batch=16, mem_block=1024, mem_steps=3,
                          mem_timeout=300.0)
    else:
        s.__dict__.update(matmul_n=256, matmul_reps=3,
                          dense_layers=3, dense_embd=64, dense_heads=4, dense_block=64, dense_vocab=512,
                          dense_batch=4, nitp_layer=1, warmup=1, rounds=3, steps_per_round=1,
                          moe_width=64, moe_tokens=256, moe_points=[(8, 2), (16, 4)], moe_warmup=1, moe_reps=2,
                          mc_layers=2, mc_embd=64, mc_heads=4, mc_block=64, mc_vocab=320, mc_experts=8,
                          mc_top_k=2, mc_batch=8, mc_steps=8, mc_lr=3e-3,
                          e2e_train_tokens=200_000, e2e_layers=2, e2e_embd=64, e2e_heads=4, e2e_block=64,
                          e2e_batch=8, e2e_iters=20, e2e_resume_iters=30, e2e_eval_interval=10,
                          e2e_log_interval=5, e2e_timeout=90.0,
                          mem_shapes=["tiny"], mem_batch=1, mem_block=16, mem_steps=1, mem_timeout=120.0)
    if args.compile is not None:
        s.compile = args.compile
    return s


def error_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def fmt(v, unit="", scale=1.0, digits=1):
    return "n/a" if v is None else f"{v / scale:,.{digits}f}{unit}"


def fmt_flops(v):
    return "n/a" if v is None else f"{v / 1e12:,.1f} TFLOP/s" if v >= 1e11 else f"{v / 1e9:,.1f} GFLOP/s"


def table_rows(report):
    """(section, figure, value) rows for the markdown table."""
    rows = []
    for name, e in report["sections"].items():
        if e["status"] != "ok":
            rows.append((name, e["status"].upper(), e.get("error", "") or e.get("reason", "")))
        try:
            for row in section_rows(name, e):  # a generator: the rows before a missing figure are kept
                rows.append((name, *row))
        except (KeyError, TypeError, IndexError, ValueError):
            pass  # a failed section lacks some figures; what it has is in the JSON
        rows.append((name, "time", f"{e.get('seconds', 0):.0f} s"))
    return rows


def section_rows(name, e):
    """(figure, value) rows of one section's entry."""
    if name == "env":
        where = (f"{e['gpu']} (sm {e['capability']}, {e['memory_gb']:.0f} GiB)" if e["gpu"]
                 else f"CPU, {e.get('cpu_threads')} threads")
        yield "device", f"{where}, torch {e['torch']}, CUDA {e['cuda']}"
        yield "bf16 peak (train.py)", fmt_flops(e["peak_bf16_flops"])
        frac = f" = {100 * e['matmul_fraction_of_peak']:.0f}% of peak" if e.get("matmul_fraction_of_peak") else ""
        yield f"bf16 matmul {e['matmul_n']}^3", fmt_flops(e["matmul_bf16_flops"]) + frac
    elif name == "dense":
        shape = e["shape"]
        yield "config", (f"{shape['n_layer']}x{shape['n_embd']}, T={shape['block_size']}, B={e['batch_size']}, "
                         f"{e['dtype']}, compile={e['compile']}")
        for v in ("ntp", "nitp"):
            r = e[v]
            mfu = "" if r["mfu"] is None else (f", MFU {100 * r['mfu']:.1f}% "
                                               f"({100 * r['mfu_with_attention']:.1f}% counting attention)")
            yield v.upper(), f"{r['tokens_per_s']:,.0f} tok/s, {r['step_ms']:.1f} ms/step{mfu}"
        q1, q3 = e["nitp_overhead_iqr"]
        yield "NITP overhead", (f"measured {100 * e['nitp_overhead_measured']:+.1f}% (IQR {100 * q1:+.1f}.."
                                f"{100 * q3:+.1f}%), analytic {100 * e['nitp_overhead_analytic']:+.1f}%")
        yield "peak memory", fmt(e["peak_memory_gb"], " GiB")
    elif name == "moe_layer":
        for p in e["points"]:
            label = f"E={p['E']} K={p['K']} H={p['expert_hidden']}"
            if "max_rel_diff" in p:
                yield label + " check", (f"grouped vs loop max rel diff {max(p['max_rel_diff'].values()):.1e}; "
                                         f"idle expert grad {max(p['idle_expert_grad_max'].values()):.1e}; "
                                         f"_grouped_mm used: {p['grouped_mm_runs']}")
            if "dense" in p:
                yield label, (f"grouped {p['grouped']['ms']:.2f} ms, loop {p['loop']['ms']:.2f} ms, dense "
                              f"{p['dense']['ms']:.2f} ms; grouped/dense {p['grouped_over_dense']:.2f}, loop/grouped "
                              f"{p['loop_over_grouped']:.2f}; grouped {fmt_flops(p['grouped']['matmul_flops'])}")
        yield "peak memory", fmt(e.get("peak_memory_gb"), " GiB")
    elif name == "moe_compile":
        note = "" if e["backend"] == "inductor" else " (smoke: inductor skipped)"
        yield "fullgraph", (f"backend {e['backend']}{note}, graph breaks {e['graph_breaks']}, compile + step 0 "
                            f"{e['compile_and_first_step_s']:.1f} s")
        losses = e["losses"]
        yield "loss", (f"eager {e['eager_loss_step0']:.4f} vs compiled {losses[0]:.4f} at step 0; "
                       f"{losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps")
    elif name == "e2e":
        first, val = e["first_train"], e["first_val"]
        yield "first run", (f"loss {first[0][1]:.3f} -> {first[-1][1]:.3f}, val {val[0][1]:.3f} -> {val[-1][1]:.3f}, "
                            f"{e['first_seconds']:.0f} s, {fmt(e['first_tokens_per_s_printed'], ' tok/s', digits=0)}")
        mem = e["first_peak_memory"]
        yield "peak memory", mem if isinstance(mem, str) else json.dumps(mem)
        resumed = e["resume_train"]
        yield "resume", (f"from step {e['resumed_from_iter']} to {resumed[-1][0]}, loss {resumed[0][1]:.3f} -> "
                         f"{resumed[-1][1]:.3f}, {e['resume_seconds']:.0f} s")
    elif name == "memory":
        unit = "GB max_memory_allocated" if e["device"].startswith("cuda") else "GB peak RSS"
        for p in e["points"]:
            yield f"{p['shape']} {p['what']} {p['variant']}", (f"{p['peak_gb']:.2f} {unit} ({p['memory_ratio']:.2f} x "
                                                                f"plain), {p['ms']:.0f} ms ({p['time_ratio']:.2f} x)")


def print_table(report):
    meta = report["meta"]
    print(f"\nbench/gpu.py on {meta['device']}{' (smoke)' if meta['smoke'] else ''}, compile={meta['compile']}, "
          f"{meta['elapsed_s']:.0f} s, git {meta['git']}\n")
    print("| section | figure | value |")
    print("|---|---|---|")
    for section, figure, value in table_rows(report):
        print(f"| {section} | {figure} | {str(value).replace('|', '/')} |")
    sys.stdout.flush()


def git_hash():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_report(report, path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)  # a kill mid-write leaves the previous, complete file


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out", default="out-bench-gpu/gpu.json", help="the JSON report (rewritten after every section)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: checks that every section runs")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections, of {','.join(SECTIONS)}")
    p.add_argument("--compile", type=lambda t: t.lower() in ("1", "true", "yes", "on"), default=None,
                   help="override: compile the dense model, e2e and (inductor) the MoE model; default: on, "
                        "except on the CPU smoke path")
    p.add_argument("--time_limit", type=float, default=480.0,
                   help="seconds; a section not started by then is recorded as skipped, and train.py's "
                        "timeouts shrink to fit")
    args = p.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device=cuda but torch.cuda.is_available() is False; use --device=cpu --smoke on a CPU machine")
    a = settings(args)
    if a.device.type == "cpu" and not args.smoke:
        print("notice: full shapes on a CPU take a very long time; add --smoke", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + a.time_limit
    report = {"meta": {"argv": sys.argv, "device": str(a.device), "smoke": a.smoke, "compile": a.compile,
                       "dtype": str(a.dtype), "git": git_hash(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "elapsed_s": 0.0, "time_limit_s": a.time_limit},
              "sections": {}}
    functions = {"env": section_env, "dense": section_dense, "moe_layer": section_moe_layer,
                 "moe_compile": section_moe_compile, "e2e": lambda entry, a: section_e2e(entry, a, deadline),
                 "memory": section_memory}
    for name in only:
        entry = report["sections"][name] = {"status": "running"}
        if time.time() > deadline:
            entry.update(status="skipped", reason=f"time limit of {a.time_limit:.0f} s reached")
            continue
        write_report(report, out)
        t0 = time.perf_counter()
        print(f"[bench.gpu] {name} ...", file=sys.stderr, flush=True)
        try:
            fresh_memory(a.device)
            functions[name](entry, a)
            sync(a.device)  # an asynchronous CUDA error belongs to this section
            entry["status"] = "ok"
        except Exception as e:  # recorded, so that one failed section never hides the others' figures
            entry.update(status="failed", error=error_line(e), where=traceback.format_exc().strip().splitlines()[-3:])
        entry["seconds"] = time.perf_counter() - t0
        report["meta"]["elapsed_s"] = time.time() - start
        write_report(report, out)
        print(f"[bench.gpu] {name}: {entry['status']} in {entry['seconds']:.1f} s"
              + (f" ({entry['error']})" if "error" in entry else ""), file=sys.stderr, flush=True)
    report["meta"]["elapsed_s"] = time.time() - start
    write_report(report, out)
    print_table(report)
    print(f"\nwrote {out}")
    return 1 if any(e["status"] == "failed" for e in report["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
