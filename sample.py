"""
Generate text from a training checkpoint, or export its weights without the NITP head.

    python sample.py --out_dir=out --start="def main(" --num_samples=2 --max_new_tokens=300
    python sample.py --out_dir=out --export=out/inference.pt      # head-free weights for GPT
    python sample.py --out_dir=out --export_hf=out/hf             # Hugging Face folder (Llama or Qwen2), tokenizer too

NITP costs nothing at inference (spec): the projection head is dropped. The exported file holds
{"model": state dict without nitp_head.*, "model_config": the config with nitp_weight=0}, which
loads into a plain GPT and gives the same logits as the trained model.
"""
import argparse
import dataclasses
import math
import os
import sys

import torch

from model import GPT, CheckpointError, GPTConfig, load_checkpoint, save_checkpoint


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, instead of a usage block
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def check_args(args):
    """Every numeric option in range and the device present, before any work; -> a problem or None."""
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.seed < 0:
        return "--num_samples and --max_new_tokens must be >= 1 and --seed >= 0"
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        return f"--temperature={args.temperature} must be a finite number >= 0 (0 = greedy)"
    if args.top_k < 1:
        return f"--top_k={args.top_k} must be >= 1 (the number of most likely tokens to sample from)"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device={args.device} but this machine has no CUDA GPU: use --device=cpu"
    if args.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        return f"--device={args.device!r} must be cpu, cuda, cuda:N or mps"
    for path in (args.export, args.export_hf):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            return f"cannot write {path}: the folder {folder} does not exist; create it or pick another path"
    return None


def load_model(ckpt_path, device="cpu"):
    """The trained model (with its head, if it had one) and the checkpoint dict."""
    if not os.path.exists(ckpt_path):
        raise CheckpointError(f"no checkpoint at {ckpt_path}: train one first with `python train.py "
                              f"--out_dir={os.path.dirname(ckpt_path) or '.'}`, or pass the right --out_dir")
    ckpt = load_checkpoint(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def split_documents(ids, eot_token):
    """ids cut at each end-of-text id (dropped): the documents a sample holds, printed apart instead of the
    id's literal text ("<|endoftext|>")."""
    documents = [[]]
    for i in ids:
        if i == eot_token:
            documents.append([])
        else:
            documents[-1].append(i)
    return documents


def export_inference(ckpt_path, export_path):
    model, _ = load_model(ckpt_path)
    config = dataclasses.replace(model.config, nitp_weight=0.0)
    save_checkpoint(export_path, {"model": model.inference_state_dict(), "model_config": dataclasses.asdict(config)})
    return model.num_params(include_head=False)


def main(argv):
    p = ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--export", default="", help="write the head-free inference weights to this file and exit")
    p.add_argument("--export_hf", default="", help="write a Hugging Face folder (weights, tokenizer) and exit")
    p.add_argument("--start", default="\n", help="prompt text; \"\" starts a new document")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiktoken_file", default=None, help="local gpt2.tiktoken ranks for offline machines")
    args = p.parse_args(argv)
    problem = check_args(args)
    if problem:
        p.error(problem)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.export:
        n = export_inference(ckpt_path, args.export)
        print(f"wrote {args.export}: {n / 1e6:.2f}M parameters, no nitp_head")
        return
    model, ckpt = load_model(ckpt_path, args.device)
    data = ckpt.get("data") or {}
    if args.export_hf:
        from hf import HFError, export_hf
        try:
            info = export_hf(model, args.export_hf, tokenizer=data.get("tokenizer"), eot_token=data.get("eot_token"),
                             tiktoken_file=args.tiktoken_file)
        except HFError as e:
            p.error(str(e))
        print(f"wrote {args.export_hf}: {info['architecture']}, {info['n_params'] / 1e6:.2f}M parameters, no nitp_head")
        print(info["tokenizer_note"])
        return
    from tokenizer import TokenizerError, get_tokenizer  # only sampling needs a tokenizer
    if not data.get("tokenizer"):
        p.error(f"{ckpt_path} does not record its tokenizer (written by an older train.py): retrain, or decode ids yourself")
    try:
        tok = get_tokenizer(data["tokenizer"], tiktoken_file=args.tiktoken_file)
    except TokenizerError as e:
        p.error(str(e))
    torch.manual_seed(args.seed)
    # An empty prompt starts where every document starts: after the end-of-text id (prepare_data.py puts one first)
    eot = data.get("eot_token", tok.eot_token)
    idx = torch.tensor([tok.encode(args.start) or [eot]], dtype=torch.long, device=args.device)
    for _ in range(args.num_samples):
        # n_tokens: never sample the ids that only pad vocab_size up to a multiple of 64.
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             n_tokens=data["vocab_size"])
        # prompt and sample (no leading end-of-text), its documents apart instead of the id's literal text
        documents = split_documents(out[0, 0 if args.start else 1:].tolist(), data.get("eot_token"))
        print("\n~~~ end of document ~~~\n".join(tok.decode(ids) for ids in documents))
        print("-" * 60)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
