"""
What NITP costs in training time, measured against plain next-token prediction on the same
config, next to the analytic FLOPs share (spec, Appendix G). A benchmark, not a test.

    python -m bench.overhead                       # a CPU-sized config
    python -m bench.overhead --n_layer=12 --n_embd=768 --block_size=1024 --batch_size=8 --device=cuda --compile

Both models are built, then training steps (forward, backward, AdamW) alternate NTP, NITP, NTP,
... so that both see the same machine load; the overhead is the median over rounds of the paired
ratio NITP step / NTP step (a pair runs back to back, so slow drifts in machine load cancel), and
its interquartile range is printed so that the noise is visible next to the result.
"""
import argparse
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, GPTConfig, flops_per_token


def build(config, device, compile_model):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    opt = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    return (torch.compile(model) if compile_model else model), opt


def step_time(model, opt, idx, ctx, device):
    t0 = time.perf_counter()
    with ctx:
        _, losses = model(idx, idx)
    losses["total"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)  # one line, exit 2
    for name, default in (("n_layer", 4), ("n_embd", 512), ("n_head", 8), ("block_size", 128), ("batch_size", 8),
                          ("vocab_size", 320), ("warmup", 3), ("rounds", 40)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if min(args.n_layer, args.n_embd, args.n_head, args.block_size, args.batch_size, args.vocab_size, args.rounds) < 2 \
            or args.warmup < 0:
        p.error("sizes and --rounds must be >= 2 (the median of paired ratios needs two rounds), --warmup >= 0")
    if args.device.split(":")[0] not in ("cpu", "cuda") or args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device={args.device}: use cpu, or cuda on a machine with a CUDA GPU")
    device = torch.device(args.device)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    shape = dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.block_size,
                 vocab_size=args.vocab_size)
    try:
        configs = {"ntp": GPTConfig(**shape, nitp_weight=0.0), "nitp": GPTConfig(**shape, nitp_weight=1.0)}
    except ValueError as e:
        p.error(str(e))
    runs = {name: build(cfg, device, args.compile) for name, cfg in configs.items()}
    idx = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=device)
    times = {name: [] for name in runs}
    for i in range(args.warmup + args.rounds):
        for name, (model, opt) in runs.items():  # alternate, so drifting load hits both alike
            dt = step_time(model, opt, idx, ctx, device)
            if i >= args.warmup:
                times[name].append(dt)
    ntp, nitp = statistics.median(times["ntp"]), statistics.median(times["nitp"])
    ratios = [b / a - 1 for a, b in zip(times["ntp"], times["nitp"])]
    q1, measured, q3 = statistics.quantiles(ratios, n=4)
    flops = flops_per_token(configs["nitp"])
    print(f"config: {shape}, batch {args.batch_size}, device {device}, compile {args.compile}, {torch.__version__}")
    print(f"median step: NTP {1000 * ntp:.1f} ms, NITP {1000 * nitp:.1f} ms over {args.rounds} alternated rounds")
    print(f"NITP extra time (measured, median of paired ratios): {100 * measured:+.2f}% "
          f"(interquartile range {100 * q1:+.2f}% to {100 * q3:+.2f}%)")
    print(f"NITP extra FLOPs (analytic, 6 x params touched): {100 * flops['nitp_share']:+.2f}%")
    print(f"difference: {100 * (measured - flops['nitp_share']):+.2f} percentage points")


if __name__ == "__main__":
    main()
