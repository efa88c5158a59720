"""
Look inside trained checkpoints: the geometry of the residual stream layer by layer, how well the NITP
head predicts the next token's implicit token, and a document-retrieval probe of the final states.

    python -m experiments.probe out                                  # one run, its own val split -> out/probe/
    python -m experiments.probe experiments/ntp_s1_* experiments/nitp_s1_* --out=/tmp/probe
    python -m experiments.probe out/ckpt.pt --data_dir=data/stdlib --docs=128

Each argument is a run folder (its ckpt.pt is read) or a ckpt.pt path. The data is the validation
split of --data_dir, or else the dataset recorded in each checkpoint's train_config. Per run:

  geometry   effective rank and mean pairwise cosine (spec, Appendix D) of the token states at every
             layer: 0 = the embedding output, k = after block k, and "final" = after the last norm,
             what the unembedding sees (train.py's erank / mean_cos), so the NITP target layer k and
             the last layer can be compared. Up to --tokens states from evenly spaced windows.
  nitp_cos   mean cos(P(h_t), z_{t+1}) over the same windows, i.e. 1 - the NITP cosine loss, for runs
             that have a projection head (the no-head and NTP runs get none).
  retrieval  a PROXY for the paper's frozen-embedding evaluation (MTEB 39.24 -> 41.56), NOT MTEB: the
             validation split is cut into documents at the end-of-text id, each document long enough
             is halved (each half cut to block_size tokens), both halves are embedded as the mean of
             their final states, and each first half must find its own second half among the N by
             cosine. recall@1 and mean reciprocal rank (chance: 1/N and H_N/N) measure whether
             mean-pooled states keep what identifies a document (its vocabulary, names, topic).

Writes <out>/probe.json, <out>/probe.md (one row per run) and <out>/probe_erank.png (effective rank
per layer, one line per run; needs matplotlib); <out> is --out, or probe/ in the (first) run's
folder. A bad input is one line on stderr and exit code 2.
"""
import json
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GPT, CheckpointError, GPTConfig, load_checkpoint
from nitp import effective_rank, implicit_token_loss, mean_pairwise_cosine
from dataset import DatasetError, load_split, read_meta, val_offsets
from configurator import ArgumentParser, UsageError

PROXY_NOTE = ("retrieval is a proxy, not MTEB: first half of a held-out document -> its second half among N, "
              "by cosine of mean-pooled final states")
TIE_TOL = 1e-12  # cosines this close count as tied (float64 round-off of identical embeddings)


class ProbeError(Exception):
    """An input the probe cannot use: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------
# states and geometry

@torch.no_grad()
def layer_states(model, idx, ctx=nullcontext()):
    """Residual stream of idx (B, T) at every layer: [embedding output, after block 1, ..., after
    block L, final normed states], each (B, T, C) fp32. Forward hooks read the blocks' outputs, so
    this sees exactly what model.trunk computes. Like the functions below, it expects a model in
    eval mode (load_model gives one): dropout would make the states random."""
    captured = []  # a block returns its output, or (output, MoE stats)
    hooks = [m.register_forward_hook(lambda _m, _inp, out: captured.append(out[0] if isinstance(out, tuple) else out))
             for m in [model.transformer.wte, *model.transformer.h]]
    try:
        with ctx:
            _, h, _ = model.trunk(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return [s.float() for s in captured + [h]]


def geometry_by_layer(states):
    """[(..., C) states of each layer] -> [{"erank", "mean_cos"} of each layer] (spec, Appendix D)."""
    out = []
    for s in states:
        flat = s.reshape(-1, s.size(-1))  # (n, C)
        out.append({"erank": effective_rank(flat), "mean_cos": mean_pairwise_cosine(flat)})
    return out


@torch.no_grad()
def nitp_cosine(model, idx, ctx=nullcontext()):
    """mean cos(P(h_t), z_{t+1}) over idx (B, T) = 1 - the NITP cosine loss; None without a head.
    Always against the NEXT token's target, also for a run trained with shift 0 (same position)."""
    if model.nitp_head is None:
        return None
    with ctx:
        z, h, _ = model.trunk(idx)
        pred = model.nitp_head(h)  # (B, T, C)
    return 1.0 - implicit_token_loss(pred.float(), z.float(), loss="cosine", shift=1).item()


# ----------------------------------------------------------------------------------------------
# the retrieval proxy

def split_documents(tokens, eot):
    """Flat ids -> the documents between end-of-text ids (which are dropped), empty ones skipped."""
    tokens = np.asarray(tokens)
    pieces = np.split(tokens, np.flatnonzero(tokens == eot))  # every piece but the first starts with eot
    docs = [p[1:] if len(p) and p[0] == eot else p for p in pieces]
    return [d for d in docs if len(d)]


def document_halves(docs, block_size, n_docs, min_half=8):
    """(first halves, second halves): the first n_docs documents with at least 2 * min_half tokens,
    halved, each half cut to its first block_size tokens."""
    firsts, seconds = [], []
    for d in docs:
        if len(d) >= 2 * min_half:
            mid = len(d) // 2
            firsts.append(d[:mid][:block_size])
            seconds.append(d[mid:][:block_size])
            if len(firsts) == n_docs:
                break
    return firsts, seconds


@torch.no_grad()
def embed(model, seqs, device, ctx=nullcontext(), batch_size=32):
    """Mean of the final states over each sequence's tokens: list of N id arrays -> (N, C) fp32.
    Sequences are right-padded into batches; a causal model's states at real tokens do not see
    the padding, and the mean skips it."""
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        T = max(len(s) for s in chunk)
        idx = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(chunk), T, 1)  # (B, T, 1)
        for j, s in enumerate(chunk):
            idx[j, :len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
            mask[j, :len(s)] = 1.0
        with ctx:
            _, h, _ = model.trunk(idx.to(device))
        mask = mask.to(device)
        out.append(((h.float() * mask).sum(dim=1) / mask.sum(dim=1)).cpu())  # (B, C)
    return torch.cat(out)


def retrieval_scores(queries, keys):
    """Query i's match is key i. -> {"recall_at_1", "mrr"} by cosine, queries and keys (N, C).

    Ties are broken at random, in expectation: with g keys scoring above the match and m others
    tied with it, the match's rank is uniform on g+1 .. g+m+1, so recall@1 counts 1/(m+1) when
    g = 0 and the reciprocal rank is (H_{g+m+1} - H_g) / (m+1). States that collapsed to one point
    thus score chance, 1/N and H_N/N, instead of a perfect 1.0."""
    q = F.normalize(queries.double(), dim=-1)
    k = F.normalize(keys.double(), dim=-1)
    sim = q @ k.T  # (N, N)
    n = sim.size(0)
    match = sim.diagonal().unsqueeze(1)  # (N, 1)
    others = ~torch.eye(n, dtype=torch.bool)
    above = ((sim > match + TIE_TOL) & others).sum(dim=1)  # (N,) g
    tied = (((sim - match).abs() <= TIE_TOL) & others).sum(dim=1)  # (N,) m
    harmonic = torch.cat([torch.zeros(1, dtype=torch.float64),
                          torch.cumsum(1.0 / torch.arange(1, n + 1, dtype=torch.float64), 0)])  # H_0 .. H_N
    recall = torch.where(above == 0, 1.0 / (tied + 1), torch.zeros((), dtype=torch.float64))
    rr = (harmonic[above + tied + 1] - harmonic[above]) / (tied + 1)
    return {"recall_at_1": recall.mean().item(), "mrr": rr.mean().item()}


def chance_scores(n):
    """Expected recall@1 and MRR of a random ranking of n candidates: 1/n and H_n/n."""
    return {"recall_at_1": 1.0 / n, "mrr": sum(1.0 / r for r in range(1, n + 1)) / n}


# ----------------------------------------------------------------------------------------------
# one checkpoint

def load_model(ckpt, device):
    """The checkpoint's model in eval mode (the functions above expect one: no dropout)."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def probe_model(model, val, eot, device, ctx=nullcontext(), n_docs=256, n_tokens=8192, batch_size=16,
                min_half=8):
    """Every measurement of one model on one validation split (flat ids) -> a dict. Raises ProbeError
    when the split holds fewer than two documents long enough to halve."""
    T = model.config.block_size
    docs = split_documents(val, eot)
    firsts, seconds = document_halves(docs, T, n_docs, min_half)
    if len(firsts) < 2:
        raise ProbeError(f"the validation split has {len(firsts)} document(s) of at least {2 * min_half} tokens "
                         f"between end-of-text ids ({eot}), the retrieval probe needs 2 or more: prepare the "
                         f"dataset with more validation documents (prepare_data.py --val_docs=N)")
    n_windows = max(2, math.ceil(n_tokens / T))
    windows = val_offsets(len(val), T, n_windows, 1)[0]  # (n_windows,) evenly spaced starts
    per_batch, cos_sum = [], 0.0
    for i in range(0, n_windows, batch_size):
        idx = torch.from_numpy(np.stack([val[o:o + T] for o in windows[i:i + batch_size]]).astype(np.int64))
        idx = idx.to(device)  # (B, T)
        per_batch.append([s.reshape(-1, s.size(-1)).cpu() for s in layer_states(model, idx, ctx)])  # (B*T, C) each
        cos = nitp_cosine(model, idx, ctx)
        cos_sum = None if cos is None else cos_sum + cos * idx.size(0)
    states = [torch.cat(layer)[:n_tokens] for layer in zip(*per_batch)]  # per layer (n, C)
    geometry = geometry_by_layer(states)
    names = ["embedding"] + [f"block {i}" for i in range(1, model.config.n_layer + 1)] + ["final norm"]
    layers = [{"layer": i if i <= model.config.n_layer else "final", "name": name, **g}
              for i, (name, g) in enumerate(zip(names, geometry))]
    queries, keys = embed(model, firsts, device, ctx), embed(model, seconds, device, ctx)
    return {"layers": layers, "nitp_layer": model.config.nitp_layer,
            "nitp_cos": None if cos_sum is None else cos_sum / n_windows,
            "geometry_tokens": min(n_tokens, n_windows * T),
            "retrieval": {"n_docs": len(firsts), **retrieval_scores(queries, keys),
                          "chance": chance_scores(len(firsts)), "note": PROXY_NOTE}}


def checkpoint_path(arg):
    path = os.path.join(arg, "ckpt.pt") if os.path.isdir(arg) else arg
    if not os.path.isfile(path):
        raise ProbeError(f"no checkpoint at {path}: give a run folder that train.py wrote (with ckpt.pt) "
                         f"or the path of a ckpt.pt")
    return path


def dataset_of(ckpt, path, data_dir):
    """The dataset folder to probe on, its meta and its validation ids; checked against the model."""
    tc = ckpt.get("train_config", {})
    if not data_dir:
        if tc.get("val_shards"):
            raise ProbeError(f"{path} was trained on llm.c shards, which hold no document boundaries: pass "
                             f"--data_dir=a dataset made by prepare_data.py with the same tokenizer")
        data_dir = tc.get("data_dir") or os.path.join("data", tc.get("dataset", "stdlib"))
    try:
        meta = read_meta(data_dir)
        val = load_split(data_dir, "val", meta)
    except DatasetError as e:
        raise ProbeError(f"{e} (the dataset for {path}; or pass --data_dir=DIR)") from None
    trained_on = (ckpt.get("data") or {}).get("tokenizer")
    if trained_on and meta.get("tokenizer") and trained_on != meta["tokenizer"]:
        raise ProbeError(f"{path} was trained with the {trained_on} tokenizer but {data_dir} holds "
                         f"{meta['tokenizer']} ids: pass --data_dir=a {trained_on} dataset")
    if meta["vocab_size"] > ckpt["model_config"]["vocab_size"]:
        raise ProbeError(f"{data_dir} has vocab_size {meta['vocab_size']}, more than the model's "
                         f"{ckpt['model_config']['vocab_size']}: pass --data_dir=the dataset it was trained on")
    if not isinstance(meta.get("eot_token"), int):
        raise ProbeError(f"{data_dir}/meta.json has no eot_token, so documents cannot be found: rebuild it "
                         f"with prepare_data.py")
    return data_dir, meta, val


def run_name(arg):
    folder = arg if os.path.isdir(arg) else os.path.dirname(os.path.abspath(arg))
    return os.path.basename(os.path.normpath(folder))


# ----------------------------------------------------------------------------------------------
# outputs

def fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def table(results):
    """One markdown row per run: the target layer k against the final states, NITP cosine, retrieval."""
    lines = ["| run | iter | nitp_weight | k | erank[k] | erank[final] | mean_cos[k] | mean_cos[final] | nitp_cos "
             "| recall@1 | MRR | docs (chance recall@1, MRR) |", "|---|" + "---|" * 11]
    for r in results:
        k, final = r["layers"][r["nitp_layer"]], r["layers"][-1]
        ret = r["retrieval"]
        lines.append(f"| {r['name']} | {r['iter']} | {r['nitp_weight']:g} | {r['nitp_layer']} | {k['erank']:.2f} | "
                     f"{final['erank']:.2f} | {k['mean_cos']:.4f} | {final['mean_cos']:.4f} | "
                     f"{fmt(r['nitp_cos'])} | {ret['recall_at_1']:.4f} | {ret['mrr']:.4f} | {ret['n_docs']} "
                     f"({ret['chance']['recall_at_1']:.4f}, {ret['chance']['mrr']:.4f}) |")
    return "\n".join(lines) + f"\n\nk: the NITP target layer (0 = embedding). {PROXY_NOTE}.\n"


def plot_erank(results, path):
    """Effective rank per layer, one line per run. -> True if written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: no plot, matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in results:
        n = len(r["layers"])
        ax.plot(range(n), [layer["erank"] for layer in r["layers"]], marker="o", label=r["name"])
        ax.plot([r["nitp_layer"]], [r["layers"][r["nitp_layer"]]["erank"]], marker="s", color="black", ms=4)
    n = max(len(r["layers"]) for r in results)
    ax.set_xticks(range(n), [str(i) for i in range(n - 1)] + ["final"])
    ax.set_xlabel("layer (0 = embedding, final = after the last norm; black square = NITP target)")
    ax.set_ylabel("effective rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv):
    p = ArgumentParser(description=__doc__.strip().splitlines()[0])  # a usage error: one line, exit 2
    p.add_argument("runs", nargs="+", help="run folders (holding ckpt.pt) or ckpt.pt paths")
    p.add_argument("--data_dir", default="", help="prepared dataset to probe on; default: each checkpoint's own")
    p.add_argument("--out", default="", help="folder for probe.json, probe.md, probe_erank.png (default: RUN/probe)")
    p.add_argument("--docs", type=int, default=256, help="N documents for the retrieval probe (fewer if fewer)")
    p.add_argument("--tokens", type=int, default=8192, help="token states per layer for erank and mean_cos")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (bfloat16 autocast on cuda)")
    try:
        args = p.parse_args(argv)
        if args.docs < 2 or args.tokens < 2:
            raise ProbeError(f"--docs={args.docs} and --tokens={args.tokens} must be at least 2")
        device = torch.device(args.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        results = []
        for arg in args.runs:
            path = checkpoint_path(arg)
            ckpt = load_checkpoint(path)
            data_dir, meta, val = dataset_of(ckpt, path, args.data_dir)
            model = load_model(ckpt, device)
            r = probe_model(model, val, meta["eot_token"], device, ctx, n_docs=args.docs, n_tokens=args.tokens)
            results.append({"name": run_name(arg), "path": path, "iter": ckpt.get("iter_num"), "data_dir": data_dir,
                            "nitp_weight": model.config.nitp_weight, "nitp_loss": model.config.nitp_loss,
                            "val_loss": (ckpt.get("val") or {}).get("val_loss"), **r})
            print(f"{results[-1]['name']}: erank final {r['layers'][-1]['erank']:.2f}, recall@1 "
                  f"{r['retrieval']['recall_at_1']:.3f} over {r['retrieval']['n_docs']} docs")
    except (ProbeError, CheckpointError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Next to the run, never the source tree; a subfolder, as run_experiments caches its own probe.json in the run.
    out = args.out or os.path.join(os.path.dirname(results[0]["path"]), "probe")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "probe.json"), "w") as f:
        json.dump({"note": PROXY_NOTE, "docs": args.docs, "tokens": args.tokens, "runs": results}, f, indent=2)
    md = table(results)
    with open(os.path.join(out, "probe.md"), "w") as f:
        f.write(md)
    print(md)
    plotted = plot_erank(results, os.path.join(out, "probe_erank.png"))
    print(f"wrote {out}/probe.json, probe.md{' and probe_erank.png' if plotted else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
