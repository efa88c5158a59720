"""
Export a trained dense GPT as a Hugging Face Llama folder (config.json, model.safetensors, README.md)
that transformers, vLLM and lm-evaluation-harness load without this code. Run it through sample.py:

    python sample.py --out_dir=OUT --export_hf=DIR
    lm_eval --model hf --model_args pretrained=DIR,tokenizer=gpt2,dtype=float32 --tasks hellaswag

Our dense block is Llama's (RMSNorm, RoPE, GQA, SwiGLU, no biases), so the export renames tensors and
splits the fused c_attn rows into q, k, v. apply_rotary pairs channel i with i + hd/2 (first half,
second half of each head), as HF's rotate_half does, so q and k rows are copied unpermuted. The NITP
head is training only and is dropped; MoE models are refused. Needs safetensors, not transformers.
The folder is written under a temporary sibling name, then renamed into place. A folder whose
config.json has the "nitp_export" key and which holds only our three files was written here and is
replaced; any other non-empty folder is refused.
"""
import dataclasses
import json
import os
import shutil
import tempfile

import torch

from model import GPT

MARKER = "nitp_export"  # config.json key holding our GPTConfig: provenance, and the mark of a replaceable folder
OUR_FILES = {"config.json", "model.safetensors", "README.md"}
LAYER_NAMES = {  # ours (transformer.h.i.*) -> Llama's (model.layers.i.*); c_attn is split into q, k, v
    "ln_1": "input_layernorm", "attn.c_proj": "self_attn.o_proj", "ln_2": "post_attention_layernorm",
    "mlp.c_gate": "mlp.gate_proj", "mlp.c_up": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
_TIKTOKEN = ("OpenAI's {} has no official Hugging Face copy: convert its tiktoken ranks with transformers' "
             "TikTokenConverter (pattern = tiktoken's split pattern), save it, check it gives tiktoken's ids "
             "(end-of-text included) on a sample, and pass tokenizer=THAT_FOLDER.")
TOKENIZERS = {  # prepare_data.py's tokenizer name -> (Hugging Face hub tokenizer or None, what to pair the export with)
    "gpt2": ("gpt2", "the GPT-2 BPE: pass tokenizer=gpt2 (the Hugging Face hub's `gpt2`)."),
    "cl100k_base": (None, _TIKTOKEN.format("cl100k_base")),
    "o200k_base": (None, _TIKTOKEN.format("o200k_base")),
    "byte": (None, "byte-level ids (UTF-8 bytes, end-of-text 256) have no standard Hugging Face tokenizer (ByT5's "
                   "is shifted by 3 ids): encode with prepare_data.get_tokenizer('byte') and feed the ids yourself."),
}


class ExportError(Exception):
    """An export that cannot be done; the message is one line saying what is wrong and what to do."""


def llama_config(config, eot_token=None):
    """config.json for transformers' LlamaForCausalLM, from our GPTConfig."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size,  # the padded one: ids past the tokenizer's are never trained
        "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers < 5 reads this key, >= 5 rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "torch_dtype": "float32", "dtype": "float32",  # the key before and after transformers 5
        "bos_token_id": eot_token, "eos_token_id": eot_token,
        MARKER: dataclasses.asdict(config),
    }


def llama_state_dict(model):
    """Our inference weights under Llama names, fp32 on the CPU, each in its own storage."""
    cfg, sd = model.config, model.inference_state_dict()  # inference: without nitp_head.*
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["transformer.wte.weight"], "model.norm.weight": sd["transformer.ln_f.weight"]}
    if not cfg.tie_embeddings:  # tied: HF reuses embed_tokens as lm_head
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        out.update({f"{hf}{theirs}.weight": sd[f"{ours}{mine}.weight"] for mine, theirs in LAYER_NAMES.items()})
        q, k, v = sd[ours + "attn.c_attn.weight"].split([q_rows, kv_rows, kv_rows])  # fused rows: q | k | v
        out.update({hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k, hf + "self_attn.v_proj.weight": v})
    # copy=True: safetensors refuses tensors that share storage, as the q/k/v views of c_attn do.
    return {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in out.items()}


def check_target(out_dir):
    """Raise ExportError unless out_dir is missing, empty, or an earlier export of this script."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir} is a file, not a folder; choose another --export_hf path")
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            ours = MARKER in json.load(f) and names <= OUR_FILES
    except (OSError, ValueError, TypeError):
        ours = False
    if names and not ours:
        raise ExportError(f"refusing to overwrite {out_dir}: it is not empty and not an untouched export_hf folder; "
                          f"choose a new or empty folder")


def export_hf(model: GPT, out_dir: str, tokenizer: str | None = None, eot_token: int | None = None) -> dict:
    """Write model as a Llama folder at out_dir. tokenizer: prepare_data.py's name for the training
    data's tokenizer; eot_token: its end-of-text id (HF's bos and eos). Returns {"out_dir", "n_params",
    "hf_tokenizer" (a hub name, or None), "tokenizer_note" (what to pair the export with)}."""
    cfg = model.config
    if cfg.n_experts > 0:
        raise ExportError("cannot export an MoE model (n_experts > 0): no HF class matches it (DeepSeek-V2's uses "
                          "MLA attention); export a dense model, or use sample.py --export for this project's format")
    check_target(out_dir)
    try:
        from safetensors.torch import save_file  # optional dependency: only this export needs it
    except ImportError:
        raise ExportError("the Hugging Face export needs safetensors: pip install safetensors") from None
    hf_tokenizer, note = TOKENIZERS.get(tokenizer, (None, f"unknown tokenizer {tokenizer!r}: pair the export "
                                                          f"with the tokenizer the training data was encoded with."))
    tensors = llama_state_dict(model)
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)  # a sibling: same file system, so rename is atomic
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(llama_config(cfg, eot_token), f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"# NITP model as LlamaForCausalLM\n\nWritten by export_hf.py: fp32, no NITP head, vocabulary "
                    f"padded to {cfg.vocab_size}.\n\nTokenizer: {note}\n")
        old = tmp + ".old"
        if os.path.exists(out_dir):  # empty, or our earlier export: moved aside, deleted once the new one is in
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only if something failed
    return {"out_dir": out_dir, "n_params": sum(t.numel() for t in tensors.values()),
            "hf_tokenizer": hf_tokenizer, "tokenizer_note": note}
