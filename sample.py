"""
Generate text from a training checkpoint, or export its inference weights without the NITP head.

    python sample.py --out_dir=out --start="def main(" --num_samples=2 --max_new_tokens=300
    python sample.py --out_dir=out --export=out/inference.pt

NITP costs nothing at inference (spec): the projection head is dropped. The exported file holds
{"model": state dict without nitp_head.*, "model_config": the config with nitp_weight=0}, which
loads into a plain GPT and gives the same logits as the trained model.
"""
import argparse
import dataclasses
import os
import sys

import torch

from model import GPT, GPTConfig
from train import UsageError, load_checkpoint, save_checkpoint


def load_model(ckpt_path, device="cpu"):
    """The trained model (with its head, if it had one) and the checkpoint's training config."""
    ckpt = load_checkpoint(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["train_config"]


def export_inference(ckpt_path, export_path):
    model, _ = load_model(ckpt_path)
    config = dataclasses.replace(model.config, nitp_weight=0.0)
    save_checkpoint(export_path, {"model": model.inference_state_dict(), "model_config": dataclasses.asdict(config)})
    return model.num_params(include_head=False)


def tokenizer_for(train_config, tiktoken_file):
    from prepare_data import get_tokenizer, read_meta  # only sampling needs the tokenizer
    if train_config.get("train_shards"):
        return get_tokenizer("gpt2", tiktoken_file=tiktoken_file)  # llm.c shards hold GPT-2 ids
    data_dir = train_config["data_dir"] or os.path.join("data", train_config["dataset"])
    return get_tokenizer(read_meta(data_dir)["tokenizer"], tiktoken_file=tiktoken_file)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--export", default="", help="write the head-free inference weights to this file and exit")
    p.add_argument("--start", default="\n", help="prompt text")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiktoken_file", default=None, help="local .tiktoken ranks for offline machines")
    args = p.parse_args(argv)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    if args.export:
        n = export_inference(ckpt_path, args.export)
        print(f"wrote {args.export}: {n / 1e6:.2f}M parameters, no nitp_head")
        return
    model, train_config = load_model(ckpt_path, args.device)
    tok = tokenizer_for(train_config, args.tiktoken_file)
    torch.manual_seed(args.seed)
    idx = torch.tensor([tok.encode(args.start)], dtype=torch.long, device=args.device)
    for _ in range(args.num_samples):
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        print(tok.decode(out[0].tolist()))
        print("-" * 60)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UsageError as e:
        sys.exit(f"error: {e}")
