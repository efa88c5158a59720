"""
Peak memory of the loss and of a training step: the plain cross-entropy (full logits, as before issue 22) against
the chunked one (model.linear_cross_entropy), and with activation checkpointing, as ratios measured in one run.

    python -m bench.memory                                  # the 152k-vocabulary shape of issue 22, CPU, ~2 minutes
    python -m bench.memory --shapes=gpt2_124m --batch_size=2 --block_size=1024
    python -m bench.memory --device=cuda --shapes=gpt2_124m,vocab152k --batch_size=16

Shapes: `vocab152k` is 2 layers x 256 with the paper's vocabulary of 152,064 (issue 22's measurement),
`gpt2_124m` is config/gpt2_124m.py's model (vocabulary 50,304), `tiny` 2 x 32 with 512 tokens (bench/gpu.py's
smoke path: it checks that the measurements run, its figures mean nothing). Each measurement runs in a fresh subprocess,
so that one's allocations cannot hide another's: on the CPU the figure is the process's peak resident set
(ru_maxrss, everything: weights, AdamW state, the allocator's slack), on CUDA torch.cuda.max_memory_allocated.
`loss` is the forward and backward of the loss alone from random final states (N tokens x d), its peak above the
inputs; `step` is --steps training steps (forward, backward, AdamW), fp32 on the CPU, bf16 autocast on CUDA, and
the time of the last one. --paired_rounds=N adds the step's time as the issue asks for it: plain and chunked steps
alternated in one process on one model and batch, the median of N per-round ratios (a single process's
drift, and another job's load, cancel in a ratio of neighbours).
"""
import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import model  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = ("vocab152k", "gpt2_124m", "tiny")
VARIANTS = ("plain", "chunked", "chunked+ckpt")  # the loss path, and activation checkpointing on top


def plain_cross_entropy(h, weight, targets, chunk):
    """The loss before issue 22: all logits at once, their log-softmax and gradient (N, V) each."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, ignore_index=-1)


def shape_config(shape, block_size):
    if shape in ("vocab152k", "tiny"):
        big = shape == "vocab152k"
        return GPTConfig(n_layer=2, n_embd=256 if big else 32, n_head=4, vocab_size=152064 if big else 512,
                         block_size=block_size)
    from configurator import parse_args  # the preset read as train.py reads it; GPT-2's vocabulary as its shards give it
    model_args = parse_args([f"config/{shape}.py"])[1]
    return GPTConfig(**{"vocab_size": 50304, **model_args, "block_size": block_size})


def peak_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_bytes(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:  # pages: size, resident, ...
        return int(f.read().split()[1]) * 4096


def autocast(device):  # bf16 on CUDA, fp32 on the CPU
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def training_setup(cfg, batch_size, block_size, device, checkpointing=False):
    """(model, optimizer, one batch of ids) for timing training steps, seeded."""
    torch.manual_seed(0)
    gpt = GPT(cfg).to(device)
    for block in gpt.transformer.h:
        block.checkpoint = checkpointing
    opt = gpt.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    return gpt, opt, torch.randint(0, cfg.vocab_size, (batch_size, block_size), device=device)


def timed_step(gpt, opt, idx, device):
    """Seconds of one training step (forward, backward, AdamW), the device synchronised."""
    t0 = time.perf_counter()
    with autocast(device):
        _, losses = gpt(idx, idx)
    losses["total"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(shape, what, variant, batch_size, block_size, steps, device):
    """One measurement, meant for a fresh process: {"peak_gb": ..., "ms": ...}."""
    device = torch.device(device)
    cfg = shape_config(shape, block_size)
    if variant == "plain":
        model.linear_cross_entropy = plain_cross_entropy  # what GPT.forward calls
    chunk = max(1, model.CE_CHUNK_LOGITS // cfg.vocab_size)
    if what == "loss":
        torch.manual_seed(0)
        h = torch.randn(batch_size * block_size, cfg.n_embd, device=device, requires_grad=True)  # (N, C)
        weight = torch.randn(cfg.vocab_size, cfg.n_embd, device=device, requires_grad=True)  # (V, C)
        targets = torch.randint(0, cfg.vocab_size, (batch_size * block_size,), device=device)
        base = current_bytes(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss = model.linear_cross_entropy(h, weight, targets, chunk)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    else:
        gpt, opt, idx = training_setup(cfg, batch_size, block_size, device, variant == "chunked+ckpt")
        base = 0  # the whole process: the measure
        seconds = [timed_step(gpt, opt, idx, device) for _ in range(steps)][-1]
    print(json.dumps({"peak_gb": (peak_bytes(device) - base) / 1e9, "ms": 1000 * seconds}))


def paired_step_ratio(shape, batch_size, block_size, rounds, device):
    """Median over `rounds` of (chunked step time / plain step time), the two steps run back to back in one process
    on one model and batch (after one untimed step of each), with their times."""
    device = torch.device(device)
    chunked = model.linear_cross_entropy
    gpt, opt, idx = training_setup(shape_config(shape, block_size), batch_size, block_size, device)

    def step(loss_fn):
        model.linear_cross_entropy = loss_fn  # what GPT.forward calls
        return timed_step(gpt, opt, idx, device)
    try:
        step(plain_cross_entropy), step(chunked)  # warm-up: allocator, kernels, AdamW state
        pairs = [(step(plain_cross_entropy), step(chunked)) for _ in range(rounds)]
    finally:
        model.linear_cross_entropy = chunked
    ratios = sorted(c / p for p, c in pairs)
    return {"ratio": ratios[len(ratios) // 2], "plain_s": [p for p, _ in pairs], "chunked_s": [c for _, c in pairs]}


def measure_in_subprocess(shape, what, variant, batch_size, block_size, steps, device, timeout):
    """measure(...) in a fresh Python process (bench/gpu.py's memory section calls it too)."""
    code = (f"from bench.memory import measure; measure({shape!r}, {what!r}, {variant!r}, {batch_size}, "
            f"{block_size}, {steps}, {device!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
        raise RuntimeError(f"{shape} {what} {variant}: {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measurements():
    """(what, variant) pairs, each kind's plain variant first (the ratios' denominator)."""
    return [("loss", v) for v in VARIANTS[:2]] + [("step", v) for v in VARIANTS]


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)  # one line, exit 2
    p.add_argument("--shapes", default="vocab152k", help=f"comma-separated, of {','.join(SHAPES)}")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="training steps per step measurement; the last is timed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=int, default=900, help="seconds for one measurement's process")
    p.add_argument("--paired_rounds", type=int, default=0,
                   help="also time plain against chunked steps alternated in one process, this many rounds (0 = off)")
    args = p.parse_args()
    shapes = args.shapes.split(",")
    if set(shapes) - set(SHAPES):
        p.error(f"--shapes: unknown {','.join(sorted(set(shapes) - set(SHAPES)))}; choose from {','.join(SHAPES)}")
    if min(args.batch_size, args.block_size, args.steps, args.timeout) < 1 or args.paired_rounds < 0:
        p.error("--batch_size, --block_size, --steps and --timeout must be >= 1, --paired_rounds >= 0")
    if args.device not in ("cpu", "cuda") or args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device={args.device}: use cpu, or cuda on a machine with a CUDA GPU")
    unit = "peak RSS" if args.device == "cpu" else "max_memory_allocated"
    print(f"device {args.device}, torch {torch.__version__}, batch {args.batch_size} x {args.block_size} tokens, "
          f"{'fp32' if args.device == 'cpu' else 'bf16 autocast'}; memory = {unit} (loss: above its inputs)")
    print("| shape | what | variant | peak GB | vs plain | ms | vs plain |")
    print("|---|---|---|---|---|---|---|")
    plain = None  # each kind's plain row, the ratios' denominator (measurements() gives it first)
    for shape in shapes:
        for what, variant in measurements():
            try:
                r = measure_in_subprocess(shape, what, variant, args.batch_size, args.block_size, args.steps,
                                          args.device, args.timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                sys.exit(print(f"error: {e}", file=sys.stderr) or 1)
            plain = r if variant == "plain" else plain
            print(f"| {shape} | {what} | {variant} | {r['peak_gb']:.2f} | {r['peak_gb'] / plain['peak_gb']:.2f} "
                  f"| {r['ms']:.0f} | {r['ms'] / plain['ms']:.2f} |", flush=True)
    for shape in shapes if args.paired_rounds else []:
        r = paired_step_ratio(shape, args.batch_size, args.block_size, args.paired_rounds, args.device)
        print(f"{shape}: a training step with the chunked loss takes {r['ratio']:.3f}x the plain one's time (median "
              f"of {args.paired_rounds} paired rounds in one process; plain "
              f"{' '.join(f'{t:.2f}' for t in r['plain_s'])} s, chunked {' '.join(f'{t:.2f}' for t in r['chunked_s'])} s)")


if __name__ == "__main__":
    main()
