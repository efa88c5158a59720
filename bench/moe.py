"""
Benchmark: one MoE layer's forward + backward against a dense SwiGLU layer of the same active width,
and the grouped-matmul dispatch against the per-expert loop, measured side by side in one run.

    python -m bench.moe                          # T=4096 tokens, D=256, expert width 128, fp32, CPU
    python -m bench.moe --tokens=8192 --reps=9

The dense layer's hidden width is (K + shared) * expert width, so both do the same matmul FLOPs per
token; what the MoE adds is routing, sorting, gathering and smaller matmuls. "loop" is the same
layer with the grouped matmul replaced by model.py's per-expert fallback (same sorted layout);
"masked" is the naive MoE many simple implementations write (a mask per expert, gather, run,
scatter back; checked equal to the layer first), to show what sorting and grouping buy over it.
Variants are timed in turn within each repetition, in rotating order (so drifting machine load
hits them alike), after a warm-up, and the median is reported.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model
from model import MoE, GPTConfig, SwiGLU, expert_counts, load_balance_loss


def fwd_bwd(layer, x, grad):
    """One training step's work for the layer: forward, backward into the input and the weights."""
    if isinstance(layer, SwiGLU):
        loss = (layer(x) * grad).sum()
    else:  # an MoE layer, or the masked-loop MoE: (output, (balance loss, counts))
        y, (aux, _) = layer(x)
        loss = (y * grad).sum() + aux
    loss.backward()


def masked_loop_moe(moe, x):
    """The common naive MoE (as many simple implementations write it): for each expert, find its
    tokens with a mask, gather them, run the expert, scatter back. Same weights and routing as
    `moe`; no sorting, no grouped matmul. Only for the benchmark's extra column."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (T, D)
    scores, weights, experts = moe.route(x)
    counts = expert_counts(experts, moe.n_experts)
    y = torch.zeros_like(x)
    w = moe.experts
    for e in range(moe.n_experts):
        token, slot = (experts == e).nonzero(as_tuple=True)  # the tokens that chose e, and in which slot
        if token.numel() == 0:
            continue
        xe = x[token]
        out = (F.silu(xe @ w.c_gate[e]) * (xe @ w.c_up[e])) @ w.c_proj[e]
        y = y.index_add(0, token, out * weights[token, slot].unsqueeze(-1))
    if moe.shared is not None:
        y = y + moe.shared(x)
    return y.view(shape), (load_balance_loss(scores, counts, moe.top_k), counts)


def timed(fn, grouped):
    model.GROUPED_MM = grouped
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_point(n_experts, top_k, args):
    """Median seconds per step of: dense, MoE grouped, MoE loop, the masked-loop MoE."""
    cfg = GPTConfig(n_embd=args.width, n_head=4, n_experts=n_experts, moe_top_k=top_k,
                    n_shared_experts=args.shared, expert_hidden=args.expert_hidden)
    torch.manual_seed(0)
    moe = MoE(cfg)
    dense = SwiGLU(args.width, (top_k + args.shared) * args.expert_hidden)
    x = torch.randn(1, args.tokens, args.width, requires_grad=True)  # (B, T, D)
    grad = torch.randn(1, args.tokens, args.width)
    naive = lambda inp: masked_loop_moe(moe, inp)  # noqa: E731
    with torch.no_grad():  # the extra column must compute the same layer
        torch.testing.assert_close(naive(x)[0], moe(x)[0], rtol=1e-4, atol=1e-5)
    variants = {"dense": (lambda: fwd_bwd(dense, x, grad), True),
                "grouped": (lambda: fwd_bwd(moe, x, grad), True),
                "loop": (lambda: fwd_bwd(moe, x, grad), False),
                "masked": (lambda: fwd_bwd(naive, x, grad), True)}
    times = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.warmup + args.reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:  # one of each per repetition, in rotating order
            t = timed(*variants[name])
            if rep >= args.warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)  # one line, exit 2
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per step (batch x sequence)")
    p.add_argument("--width", type=int, default=256, help="D, model width")
    p.add_argument("--expert_hidden", type=int, default=128, help="H, one expert's SwiGLU width")
    p.add_argument("--shared", type=int, default=1, help="shared experts")
    p.add_argument("--points", default="32x4,8x2,64x8,128x8", help="E x K pairs, comma separated")
    p.add_argument("--reps", type=int, default=9, help="timed repetitions per variant (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default (all cores)")
    args = p.parse_args()
    try:
        points = [tuple(map(int, point.split("x"))) for point in args.points.split(",")]
    except ValueError:
        p.error(f"--points={args.points}: expected E x K pairs such as 32x4,8x2")
    if min(args.tokens, args.width, args.expert_hidden, args.reps, *sum(points, ())) < 1 or min(args.shared, args.warmup,
                                                                                                  args.threads) < 0:
        p.error("--tokens, --width, --expert_hidden, --reps and every E and K must be >= 1; --shared, --warmup, --threads >= 0")
    if any(k > e for e, k in points) or args.width % 4:
        p.error("each K must be at most its E, and --width a multiple of 4 (16-byte rows for the grouped kernel)")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Another busy process on the same cores stalls every multi-threaded small matmul (the expert
    # groups) far more than one big one: the load average is printed so a reader can judge a run.
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}, "
          f"T={args.tokens} D={args.width} H={args.expert_hidden} shared={args.shared}, "
          f"fp32 forward+backward, median of {args.reps}")
    print(f"{'E':>4} {'K':>3} {'dense ms':>9} {'MoE grouped ms':>15} {'MoE loop ms':>12} "
          f"{'grouped/dense':>14} {'loop/grouped':>13} {'masked ms':>10} {'masked/grouped':>15}")
    for n_experts, top_k in points:
        t = bench_point(n_experts, top_k, args)
        print(f"{n_experts:>4} {top_k:>3} {1e3 * t['dense']:>9.1f} {1e3 * t['grouped']:>15.1f} "
              f"{1e3 * t['loop']:>12.1f} {t['grouped'] / t['dense']:>14.2f} {t['loop'] / t['grouped']:>13.2f} "
              f"{1e3 * t['masked']:>10.1f} {t['masked'] / t['grouped']:>15.2f}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
