"""
Both directions between this project's GPT and Hugging Face causal-LM folders (config.json, *.safetensors).

Import: GPT.from_pretrained(PATH), or `python train.py --init_from=hf:PATH` to continue pre-training it with NITP.
    LlamaForCausalLM (Llama 2/3, TinyLlama, SmolLM), MistralForCausalLM (sliding window off or >= block_size) and
    Qwen2ForCausalLM (q/k/v biases); config.json as transformers 4.x (rope_theta, rope_scaling) or 5.x
    (rope_parameters) writes it; Llama 3.1's "llama3" rope scaling. Anything else is refused with one line naming
    it, never loaded wrong. Tensors are read one at a time (safe_open; shards through model.safetensors.index.json).
Export: `python sample.py --out_dir=OUT --export_hf=DIR` writes Qwen2ForCausalLM for a model with q/k/v biases,
    LlamaForCausalLM otherwise (Mistral without a window is Llama), plus the tokenizer's files, so that
    transformers, vLLM and lm-evaluation-harness load it without this code:
    lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --tasks hellaswag

Our dense block is Llama's (RMSNorm, RoPE, GQA, SwiGLU), so the mapping renames tensors and splits (or joins) the
fused c_attn rows q | k | v. apply_rotary pairs channel i with i + hd/2 (first half, second half of each head), as
HF's rotate_half does, so q and k rows are copied unpermuted. The NITP head is training only: dropped on export,
new on import. Needs safetensors; writing the GPT-2 tokenizer needs transformers. The export is written under a
temporary sibling name, then renamed into place; a folder whose config.json has the "nitp_export" key and which
holds only our files was written here and is replaced; any other non-empty folder is refused.
"""
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import torch

from model import GPT, GPTConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MARKER = "nitp_export"  # config.json key holding our GPTConfig: provenance, and the mark of a replaceable folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja")  # what an HF tokenizer may save
OUR_FILES = {"config.json", "model.safetensors", "README.md", *TOKENIZER_FILES}
LAYER_NAMES = {  # ours (transformer.h.i.*) -> Llama's (model.layers.i.*); c_attn is split into q, k, v
    "ln_1": "input_layernorm", "attn.c_proj": "self_attn.o_proj", "ln_2": "post_attention_layernorm",
    "mlp.c_gate": "mlp.gate_proj", "mlp.c_up": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
_TIKTOKEN = ("OpenAI's {} has no official Hugging Face copy: convert its tiktoken ranks with transformers' "
             "TikTokenConverter (pattern = tiktoken's split pattern), save it, check it gives tiktoken's ids "
             "(end-of-text included) on a sample, and pass tokenizer=THAT_FOLDER.")
TOKENIZER_NOTES = {  # prepare_data.py's tokenizer name -> what to pair the export with, where no files are shipped
    "cl100k_base": _TIKTOKEN.format("cl100k_base"),
    "o200k_base": _TIKTOKEN.format("o200k_base"),
    "byte": "byte-level ids (UTF-8 bytes, end-of-text 256) have no standard Hugging Face tokenizer (ByT5's is "
            "shifted by 3 ids): encode with tokenizer.get_tokenizer('byte') and feed the ids yourself.",
}


class HFError(Exception):
    """A Hugging Face folder that cannot be imported, or an export that cannot be done; the message is one line
    saying what is wrong and what to do."""


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise HFError(f"cannot read {path}: {e.strerror or e}; pass a local Hugging Face model folder (e.g. from "
                      f"`huggingface-cli download NAME --local-dir DIR`)") from None
    except ValueError as e:
        raise HFError(f"{path} is not valid JSON ({e}); download the model again") from None


# ---------------------------------------------------------------------------------------------------------------------
# Import

def hf_gpt_config(path, overrides):
    """GPTConfig of the Hugging Face model at `path`, with `overrides` (GPTConfig fields given by the user) applied;
    an override of an architecture knob that differs from the checkpoint's, or anything the model does not
    implement, raises HFError naming it."""
    hf = read_json(os.path.join(path, "config.json"))
    arch = (hf.get("architectures") or [hf.get("model_type", "an unnamed architecture")])[0]
    if arch not in ARCHITECTURES:
        raise HFError(f"{path}: {arch} is not supported (supported: {', '.join(ARCHITECTURES)}); its layers differ "
                      f"from this project's Llama-style block")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "max_position_embeddings") if not isinstance(hf.get(k), int)]
    if missing:
        raise HFError(f"{path}/config.json lacks {', '.join(missing)}: it is not a complete {arch} config")
    # transformers 4.x writes rope_theta and rope_scaling (type or rope_type), 5.x rope_parameters (theta included).
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_scaling") or {}),
            **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    qwen2 = arch == "Qwen2ForCausalLM"
    block_size = overrides.get("block_size", GPTConfig.block_size)
    window = hf.get("sliding_window") if arch == "MistralForCausalLM" or hf.get("use_sliding_window") else None
    refused = [(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')} (only SiLU's SwiGLU)"),
               (hf.get("attention_bias", False) and not qwen2, "attention_bias=true (biases on q/k/v and o_proj)"),
               (hf.get("mlp_bias", False), "mlp_bias=true (biases in the MLP)"),
               (rope_type not in ("default", "llama3"), f"rope scaling {rope_type!r} (only 'llama3' is implemented)"),
               (rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0, "partial rotary"),
               (window is not None and window < block_size,
                f"sliding_window={window} below block_size={block_size} (window attention; --block_size={window} "
                f"or less trains it exactly)")]
    for refuse, what in refused:
        if refuse:
            raise HFError(f"{path}: {arch} with {what} is not implemented here, so it is not loaded")
    if block_size > hf["max_position_embeddings"]:
        raise HFError(f"block_size={block_size} exceeds {path}'s max_position_embeddings="
                      f"{hf['max_position_embeddings']}: lower --block_size")
    n_head = hf["num_attention_heads"]
    llama3 = rope_type == "llama3"
    knobs = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
                 n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                 head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, mlp_hidden=hf["intermediate_size"],
                 rope_theta=float(rope["rope_theta"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                 tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qwen2, n_experts=0,
                 rope_factor=float(rope["factor"]) if llama3 else 0.0,
                 rope_low_freq_factor=float(rope["low_freq_factor"]) if llama3 else GPTConfig.rope_low_freq_factor,
                 rope_high_freq_factor=float(rope["high_freq_factor"]) if llama3 else GPTConfig.rope_high_freq_factor,
                 rope_original_max_pos=int(rope["original_max_position_embeddings"]) if llama3
                 else GPTConfig.rope_original_max_pos)
    for key, value in overrides.items():
        if key in knobs and value != knobs[key]:
            raise HFError(f"--{key}={value} conflicts with {path}'s {key}={knobs[key]}: drop it (the architecture "
                          f"comes from the checkpoint)")
    try:
        return GPTConfig(**{**knobs, **overrides})
    except ValueError as e:
        raise HFError(f"{path}: {e}") from None


def hf_names(config):
    """[(our parameter name, [its Hugging Face names])] for every inference weight; several names are row blocks of
    one of ours (c_attn's q | k | v), in order."""
    pairs = [("transformer.wte.weight", ["model.embed_tokens.weight"]),
             ("transformer.ln_f.weight", ["model.norm.weight"])]
    if not config.tie_embeddings:  # tied: HF reuses embed_tokens as lm_head
        pairs.append(("lm_head.weight", ["lm_head.weight"]))
    for i in range(config.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        pairs += [(f"{ours}{mine}.weight", [f"{hf}{theirs}.weight"]) for mine, theirs in LAYER_NAMES.items()]
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            pairs.append((f"{ours}attn.c_attn.{kind}", [f"{hf}self_attn.{p}_proj.{kind}" for p in "qkv"]))
    return pairs


def weight_files(path):
    """{HF tensor name: the .safetensors file holding it} of the folder at `path`."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFError(f"{index} has no weight_map: download the model again")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise HFError(f"{path} holds no model.safetensors (nor model.safetensors.index.json): only safetensors weights "
                      f"are read; re-save the model with transformers' save_pretrained")
    from safetensors import safe_open
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


@torch.no_grad()
def load_hf_weights(model, path):
    """Copy the weights of the Hugging Face folder `path` into `model` (built by hf_gpt_config(path, ...)), one tensor
    at a time (peak memory: the model plus one tensor), each cast to the model's dtype. The NITP head is untouched."""
    try:
        from safetensors import SafetensorError, safe_open  # optional: only the Hugging Face mapping needs it
    except ImportError:
        raise HFError("reading Hugging Face weights needs safetensors: pip install safetensors") from None
    pairs, params = hf_names(model.config), dict(model.named_parameters())
    wanted = {name for _, names in pairs for name in names}
    try:
        files = weight_files(path)
        # Older checkpoints store the rotary frequencies (derived here); a tied model may store its lm_head copy too.
        extra = [n for n in files if n not in wanted and not n.endswith("rotary_emb.inv_freq")
                 and not (model.config.tie_embeddings and n == "lm_head.weight")]
        absent = sorted(wanted - files.keys())
        if extra or absent:
            raise HFError(f"{path}'s tensors do not match its config.json: " + "; ".join(
                f"{what} {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for what, names in (("unexpected", extra), ("missing", absent)) if names))
        with contextlib.ExitStack() as stack:
            handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}
            for ours, names in pairs:
                t = torch.cat([handles[files[n]].get_tensor(n) for n in names])  # rows q | k | v, or the one tensor
                if t.shape != params[ours].shape:
                    raise HFError(f"{path}: {names[0]} has shape {tuple(t.shape)}, its config.json implies "
                                  f"{tuple(params[ours].shape)}; the checkpoint is inconsistent")
                params[ours].copy_(t)
    except (OSError, SafetensorError) as e:  # a shard missing, truncated or not safetensors
        raise HFError(f"cannot read the weights in {path} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      f"download the model again") from None


# ---------------------------------------------------------------------------------------------------------------------
# Export

def hf_config_json(config, eot_token=None):
    """config.json for transformers: Qwen2ForCausalLM if the model has q/k/v biases, else LlamaForCausalLM."""
    qwen2 = config.qkv_bias
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_factor:
        rope.update(rope_type="llama3", factor=config.rope_factor, low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_max_pos)
    arch = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
            "sliding_window": None, "max_window_layers": config.n_layer} if qwen2 else {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False}
    return {
        **arch,
        "vocab_size": config.vocab_size,  # the padded one: ids past the tokenizer's are never trained
        "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
        # transformers < 5 reads rope_theta and rope_scaling, >= 5 rope_parameters
        "rope_theta": config.rope_theta, "rope_scaling": {k: v for k, v in rope.items() if k != "rope_theta"}
        if config.rope_factor else None, "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
        "torch_dtype": "float32", "dtype": "float32",  # the key before and after transformers 5
        "bos_token_id": eot_token, "eos_token_id": eot_token,
        MARKER: dataclasses.asdict(config),
    }


def hf_state_dict(model):
    """Our inference weights under Hugging Face names, fp32 on the CPU, each in its own storage."""
    cfg, sd = model.config, model.inference_state_dict()  # inference: without nitp_head.*
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {}
    for ours, names in hf_names(cfg):
        blocks = sd[ours].split([q_rows, kv_rows, kv_rows]) if len(names) == 3 else [sd[ours]]  # rows q | k | v
        out.update(zip(names, blocks))
    # copy=True: safetensors refuses tensors that share storage, as the q/k/v views of c_attn do.
    return {name: t.detach().to("cpu", torch.float32, copy=True) for name, t in out.items()}


def write_tokenizer(folder, tokenizer, eot_token, tiktoken_file=None):
    """Write the training data's tokenizer as Hugging Face files into folder (AutoTokenizer loads them); -> a note
    for the user. gpt2: built from tiktoken's ranks (--tiktoken_file offline); "hf:PATH": that tokenizer's files
    copied; others: nothing written, the note says what to use."""
    if tokenizer and tokenizer.startswith("hf:"):
        source = tokenizer[3:]
        names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
        if not names:
            raise HFError(f"the data's tokenizer folder {source} (meta.json) holds no tokenizer files any more; "
                          f"restore it, then export again")
        for name in names:
            shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
        return f"Tokenizer: the training data's, copied from {source}."
    if tokenizer != "gpt2":
        return "Tokenizer: " + TOKENIZER_NOTES.get(tokenizer, f"unknown tokenizer {tokenizer!r}: pair the export "
                                                             f"with the tokenizer the training data was encoded with.")
    try:
        from tokenizers import AddedToken
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:  # the weights are still worth writing
        return ("Tokenizer: GPT-2 BPE, not written (pip install transformers, then export again to ship its files); "
                "the Hub's `gpt2` tokenizer gives the same ids.")
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's split pattern

    from tokenizer import TokenizerError, get_tokenizer
    try:
        encoding = get_tokenizer("gpt2", tiktoken_file).encoding
    except TokenizerError as e:
        raise HFError(f"{e} (sample.py takes --tiktoken_file too)") from None
    eot = encoding.decode_single_token_bytes(encoding.eot_token).decode()
    with tempfile.NamedTemporaryFile("w", suffix=".tiktoken") as ranks:  # the converter reads ranks from a file
        ranks.writelines(f"{base64.b64encode(encoding.decode_single_token_bytes(i)).decode()} {i}\n"
                         for i in range(encoding.eot_token))  # every id below end-of-text is a merge rank
        ranks.flush()
        converted = TikTokenConverter(ranks.name, r50k_pat_str).converted()
    converted.add_special_tokens([AddedToken(eot, special=True, normalized=False)])  # id n_ranks = tiktoken's eot
    PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=eot, eos_token=eot, unk_token=eot,
                            model_max_length=1024).save_pretrained(folder)
    return "Tokenizer: GPT-2 BPE, written from tiktoken's ranks: AutoTokenizer.from_pretrained(this folder) loads it."


def check_target(out_dir):
    """Raise HFError unless out_dir is missing, empty, or an earlier export of this module."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HFError(f"{out_dir} is a file, not a folder; choose another --export_hf path")
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            ours = MARKER in json.load(f) and names <= OUR_FILES
    except (OSError, ValueError, TypeError):
        ours = False
    if names and not ours:
        raise HFError(f"refusing to overwrite {out_dir}: it is not empty and not an untouched export_hf folder; "
                      f"choose a new or empty folder")


def export_hf(model: GPT, out_dir: str, tokenizer: str | None = None, eot_token: int | None = None,
              tiktoken_file: str | None = None) -> dict:
    """Write model as a Hugging Face folder at out_dir. tokenizer: the training data's (meta.json); eot_token: its
    end-of-text id (HF's bos and eos); tiktoken_file: GPT-2 ranks for offline machines. Returns {"out_dir",
    "architecture", "n_params", "tokenizer_files" (written into the folder), "tokenizer_note"}."""
    cfg = model.config
    if cfg.n_experts > 0:
        raise HFError("cannot export an MoE model (n_experts > 0): no HF class matches it (DeepSeek-V2's uses "
                      "MLA attention); export a dense model, or use sample.py --export for this project's format")
    check_target(out_dir)
    try:
        from safetensors.torch import save_file  # optional dependency: only the Hugging Face mapping needs it
    except ImportError:
        raise HFError("the Hugging Face export needs safetensors: pip install safetensors") from None
    tensors, config = hf_state_dict(model), hf_config_json(cfg, eot_token)
    parent, name = os.path.split(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)  # a sibling: same file system, so rename is atomic
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        note = write_tokenizer(tmp, tokenizer, eot_token, tiktoken_file)
        if cfg.qkv_bias and tokenizer == "gpt2":  # transformers 5 maps model_type qwen2 to Qwen2Tokenizer, whatever
            note += " With transformers >= 5 load it with PreTrainedTokenizerFast: AutoTokenizer picks Qwen2's."
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors writes 0600; readable like the rest
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(f"# NITP model as {config['architectures'][0]}\n\nWritten by hf.py: fp32, no NITP head, "
                    f"vocabulary padded to {cfg.vocab_size}.\n\n{note}\n")
        tokenizer_files = sorted(set(os.listdir(tmp)) & set(TOKENIZER_FILES))
        old = tmp + ".old"
        if os.path.exists(out_dir):  # empty, or our earlier export: moved aside, deleted once the new one is in
            os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only if something failed
    return {"out_dir": out_dir, "architecture": config["architectures"][0], "n_params": sum(t.numel() for t in
            tensors.values()), "tokenizer_files": tokenizer_files, "tokenizer_note": note}
